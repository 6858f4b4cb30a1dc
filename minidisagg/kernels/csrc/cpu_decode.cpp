// Native CPU kernels of the compiled batch-1 decode step (minidisagg/engine/compiled.py).
//
// Two ops, registered with the PyTorch dispatcher under the namespace `minidisagg_cpu`, so that
// the compiled graph's C++ wrapper calls them with no Python in between:
//
//   gemv_bf16(weight, x)       y = weight @ x for a bf16 weight [out, in] and one bf16 row x [in].
//                              A batch-1 decode step is a chain of these: it streams every weight of
//                              the model once, so what matters is the memory bandwidth it reaches.
//   write_kv_and_attend(...)   the paged KV write and the attention of one sequence, the same
//                              ATen ops as the Python kernel in compiled.py, in the same order.
//
// The GEMV keeps four rows in flight: each AVX512-BF16 `vdpbf16ps` multiplies 32 bf16 pairs and
// adds them into 16 float32 lanes, and every row prefetches the weight 8 KB ahead of its loads,
// so the cores keep more cache-line requests to memory outstanding than the hardware prefetcher
// alone would. It is compiled for AVX512-BF16 only (a per-function target attribute); Python
// checks that the CPU has those instructions before it calls it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kRowsPerTile = 4;         // rows of the weight read side by side
constexpr int64_t kPrefetchElements = 4096;  // how far ahead each row prefetches (8 KB of bf16)
constexpr int64_t kTilesPerTask = 8;         // at::parallel_for grain, in tiles

template <int kRows>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void dot_rows(
    const c10::BFloat16* weight, int64_t in_features, const c10::BFloat16* x, c10::BFloat16* y) {
  __m512 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in_features; i += 32) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
    for (int r = 0; r < kRows; ++r) {
      const c10::BFloat16* row = weight + r * in_features;
      _mm_prefetch(reinterpret_cast<const char*>(row + i + kPrefetchElements), _MM_HINT_T0);
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(row + i), xv);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float sum = _mm512_reduce_add_ps(acc[r]);
    for (int64_t j = i; j < in_features; ++j) sum += float(weight[r * in_features + j]) * float(x[j]);
    y[r] = c10::BFloat16(sum);
  }
}

at::Tensor gemv_bf16(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() == 1 && weight.size(1) == x.size(0),
              "gemv_bf16 takes a weight [out, in] and a vector [in]; got ", weight.sizes(), " and ", x.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16,
              "gemv_bf16 takes bfloat16 tensors; got ", weight.scalar_type(), " and ", x.scalar_type());
  const at::Tensor w = weight.contiguous(), v = x.contiguous();
  const int64_t out_features = w.size(0), in_features = w.size(1);
  at::Tensor y = at::empty({out_features}, v.options());
  const c10::BFloat16* wp = w.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* xp = v.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.mutable_data_ptr<c10::BFloat16>();
  const int64_t tiles = out_features / kRowsPerTile;
  at::parallel_for(0, tiles, kTilesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      dot_rows<kRowsPerTile>(wp + t * kRowsPerTile * in_features, in_features, xp, yp + t * kRowsPerTile);
  });
  for (int64_t r = tiles * kRowsPerTile; r < out_features; ++r) dot_rows<1>(wp + r * in_features, in_features, xp, yp + r);
  return y;
}

at::Tensor gemv_bf16_meta(const at::Tensor& weight, const at::Tensor& x) {
  return at::empty({weight.size(0)}, x.options());
}

// One sequence's decode attention; `window` holds (context length, first block), the first block
// -1 unless the sequence's blocks are consecutive in the pool (then its keys are a slice).
at::Tensor write_kv_and_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kv,
                               int64_t layer, const at::Tensor& slot_mapping, const at::Tensor& block_table,
                               const at::Tensor& window, double scale) {
  at::Tensor keys = kv.select(0, layer).select(0, 0), values = kv.select(0, layer).select(0, 1);
  keys.view({-1, keys.size(2), keys.size(3)}).index_copy_(0, slot_mapping, k.to(keys.scalar_type()));
  values.view({-1, values.size(2), values.size(3)}).index_copy_(0, slot_mapping, v.to(values.scalar_type()));
  const at::Tensor bounds = window.to(at::kLong).contiguous();
  const int64_t context_len = bounds.const_data_ptr<int64_t>()[0], first_block = bounds.const_data_ptr<int64_t>()[1];
  const int64_t num_blocks = (context_len + keys.size(1) - 1) / keys.size(1);
  if (first_block >= 0) {
    keys = keys.narrow(0, first_block, num_blocks);
    values = values.narrow(0, first_block, num_blocks);
  } else {
    const at::Tensor used = block_table.select(0, 0).narrow(0, 0, num_blocks);
    keys = keys.index_select(0, used);
    values = values.index_select(0, used);
  }
  keys = keys.flatten(0, 1).narrow(0, 0, context_len).transpose(0, 1).unsqueeze(0);
  values = values.flatten(0, 1).narrow(0, 0, context_len).transpose(0, 1).unsqueeze(0);
  at::Tensor out = at::scaled_dot_product_attention(q.unsqueeze(2), keys, values, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                                    /*is_causal=*/false, scale, /*enable_gqa=*/true);
  return out.squeeze(2);
}

at::Tensor write_kv_and_attend_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&, at::Tensor&, int64_t,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, double) {
  return at::empty(q.sizes(), q.options());
}

}  // namespace

TORCH_LIBRARY(minidisagg_cpu, m) {
  m.def("gemv_bf16(Tensor weight, Tensor x) -> Tensor");
  m.def("write_kv_and_attend(Tensor q, Tensor k, Tensor v, Tensor(a!) kv, int layer, Tensor slot_mapping, "
        "Tensor block_table, Tensor window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(minidisagg_cpu, CPU, m) {
  m.impl("gemv_bf16", gemv_bf16);
  m.impl("write_kv_and_attend", write_kv_and_attend);
}

TORCH_LIBRARY_IMPL(minidisagg_cpu, Meta, m) {
  m.impl("gemv_bf16", gemv_bf16_meta);
  m.impl("write_kv_and_attend", write_kv_and_attend_meta);
}
