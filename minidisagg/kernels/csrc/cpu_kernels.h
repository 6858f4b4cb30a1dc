// The CPU kernels behind the model's dispatch points (minidisagg/kernels/*.py), in C++.
//
// Each function is the torch reference of one dispatch point written with the same ATen calls in
// the same order, so it gives the reference's bits; what it saves is Python's cost per op (a decode
// step of SmolLM2 runs some 1,800 small ops). The one exception is gemv_bf16, a kernel of its own.
//
//   rms_norm            kernels/norm.py's rms_norm_reference (add_rms_norm: with the residual add)
//   silu_and_mul        kernels/activation.py's silu_and_mul_reference
//   rope_and_write_kv   kernels/rope_cache.py's rope_and_write_kv_reference: RoPE, then the paged KV write
//   decode_attention    kernels/attention.py's decode_attention_reference (one query per sequence)
//   gemv_bf16           y = weight @ x for a bf16 weight [out, in] and one bf16 row x [in]
//
// kernels/csrc/cpu_ops.cpp registers them as the `minidisagg_cpu` ops the model calls; the opt-in
// whole-step decode (minidisagg/accel/csrc/decode_step.cpp) calls the same functions. Everything here
// sits in an anonymous namespace: each extension that includes this file gets its own copy.
//
// The GEMV keeps four rows in flight: each AVX512-BF16 `vdpbf16ps` multiplies 32 bf16 pairs and adds
// them into 16 float32 lanes, and every row prefetches the weight 8 KB ahead of its loads, so the
// cores keep more cache-line requests to memory outstanding than the hardware prefetcher alone
// would. It is compiled for AVX512-BF16 only (a per-function target attribute); Python checks that
// the CPU has those instructions before it calls it.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/remainder.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/silu.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <optional>
#include <utility>

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

// rms_norm_reference: rmsnorm(x) * weight, the statistics in float32, rounded to x's dtype before the weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor norm = at::linalg_vector_norm(x, 2, at::IntArrayRef{-1}, /*keepdim=*/true, at::kFloat);
  const at::Tensor eps_t = at::scalar_tensor(eps, at::kFloat);
  const at::Tensor inv_rms = at::addcmul(eps_t, norm, norm, 1.0 / double(x.size(-1))).rsqrt_();
  at::Tensor normed = at::empty_like(x);
  at::mul_out(normed, x, inv_rms);  // float32 math, rounded to x's dtype
  if (normed.scalar_type() == c10::promoteTypes(normed.scalar_type(), weight.scalar_type())) return normed.mul_(weight);
  return at::mul(weight, normed);
}

// rms_norm_reference with a residual: (rmsnorm(x + residual) * weight, x + residual).
std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                               const at::Tensor& weight, double eps) {
  at::Tensor sum = at::add(x, residual);
  return {rms_norm(sum, weight, eps), sum};
}

// silu_and_mul_reference: silu(first half) * second half of the fused gate/up output.
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  const auto halves = gate_up.chunk(2, -1);
  return at::silu(halves[0]).mul_(halves[1]);
}

// kernels/rope.py's rotation_tables: cos and sign-folded sin rows [T, 1, D] for these positions.
std::pair<at::Tensor, at::Tensor> rotation_tables(const at::Tensor& positions, const at::Tensor& cos_sin) {
  const int64_t half = cos_sin.size(-1) / 2;
  const at::Tensor table = cos_sin.index_select(0, positions).unsqueeze(1);
  const at::Tensor cos = table.narrow(-1, 0, half), sin = table.narrow(-1, half, half);
  return {at::cat({cos, cos}, -1), at::cat({at::neg(sin), sin}, -1)};
}

// kernels/rope.py's rotate: x * [cos, cos] + [x2, x1] * [-sin, sin] over q and k at once, rounded to q's
// dtype; returns the rotated heads [T, H + KH, D] (q's heads first), which the callers slice.
at::Tensor rotate(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& signed_sin) {
  const int64_t half = q.size(-1) / 2;
  const at::Tensor both = at::cat({q, k}, 1);
  const at::Tensor swapped = both.unflatten(-1, {2, half}).flip({-2}).flatten(-2);
  return at::mul(both, cos).add_(at::mul(swapped, signed_sin)).to(q.scalar_type());
}

// kernels/cache_write.py's write_kv_reference: k, v [T, KH, D] into their flat slots of the paged caches.
void write_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  for (const auto& [fresh, cache] : {std::pair{k, k_cache}, std::pair{v, v_cache}}) {
    if (cache.stride(0) == cache.size(1) * cache.stride(1)) {  // blocks follow each other: one flat copy by slot
      cache.view({-1, cache.size(2), cache.size(3)}).index_copy_(0, slot_mapping, fresh.to(cache.scalar_type()));
    } else {  // blocks apart in memory (block_major): index block and offset
      const int64_t block_size = cache.size(1);
      at::Tensor(cache).index_put_({at::div(slot_mapping, block_size, "floor"), at::remainder(slot_mapping, block_size)},
                                   fresh.to(cache.scalar_type()));
    }
  }
}

// rope_and_write_kv_reference: q and k rotated by their positions ([T, H + KH, D], q's heads first),
// and the rotated k and the v written to their slots of the caches.
at::Tensor rope_and_write_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                             const at::Tensor& cos_sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& slot_mapping) {
  const auto [cos, signed_sin] = rotation_tables(positions, cos_sin);
  at::Tensor rotated = rotate(q, k, cos, signed_sin);
  write_kv(rotated.narrow(1, q.size(1), k.size(1)), v, k_cache, v_cache, slot_mapping);
  return rotated;
}

// decode_attention_reference: q [B, H, D], one query per sequence, over each sequence's cached pages.
// A lone sequence whose blocks are consecutive in the pool reads them as a slice; otherwise the pages
// are gathered into a padded batch, with a padding mask where the lengths differ.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  const int64_t num_seqs = q.size(0), block_size = k_cache.size(1);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_seqs && context_lens.numel() == num_seqs,
              "decode_attention takes one block table row and one context length per query; got ", num_seqs,
              " queries, block tables ", block_tables.sizes(), ", ", context_lens.numel(), " lengths");
  const at::Tensor lens = context_lens.to(at::kLong).contiguous();
  const int64_t* len_data = lens.const_data_ptr<int64_t>();
  const int64_t max_len = *std::max_element(len_data, len_data + num_seqs);
  const int64_t min_len = *std::min_element(len_data, len_data + num_seqs);
  const int64_t max_blocks = (max_len + block_size - 1) / block_size;
  TORCH_CHECK(max_blocks <= block_tables.size(1), "decode_attention: a context of ", max_len,
              " tokens needs ", max_blocks, " blocks; the block table has ", block_tables.size(1));
  int64_t first = -1;
  if (num_seqs == 1) {
    const at::Tensor row = block_tables.select(0, 0).to(at::kLong).contiguous();
    const int64_t* table = row.const_data_ptr<int64_t>();
    first = table[0];
    for (int64_t i = 1; i < max_blocks && first >= 0; ++i)
      if (table[i] != first + i) first = -1;
  }
  const at::Tensor flat = first >= 0 ? at::Tensor() : block_tables.narrow(1, 0, max_blocks).reshape({-1});
  auto gather = [&](const at::Tensor& cache) {
    const at::Tensor pages = first >= 0 ? cache.narrow(0, first, max_blocks) : cache.index_select(0, flat);
    return pages.reshape({num_seqs, max_blocks * block_size, cache.size(2), cache.size(3)})
        .narrow(1, 0, max_len)
        .transpose(1, 2);
  };
  std::optional<at::Tensor> mask;
  if (min_len != max_len) {
    const at::Tensor positions = at::arange(max_len, context_lens.options());
    mask = at::lt(positions.unsqueeze(0), context_lens.unsqueeze(1)).unsqueeze(1).unsqueeze(1);
  }
  return at::scaled_dot_product_attention(q.unsqueeze(2), gather(k_cache), gather(v_cache), mask, /*dropout_p=*/0.0,
                                          /*is_causal=*/false, scale, /*enable_gqa=*/true)
      .squeeze(2);
}

}  // namespace
