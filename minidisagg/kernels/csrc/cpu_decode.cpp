// Native CPU kernels of the decode step (minidisagg/engine/native_decode.py and compiled.py).
//
// Three ops, registered with the PyTorch dispatcher under the namespace `minidisagg_cpu`. The
// compiled graph's C++ wrapper calls the first two with no Python in between; the third is the
// whole step, the engine's default on the CPU, with no graph compiler involved:
//
//   gemv_bf16(weight, x)       y = weight @ x for a bf16 weight [out, in] and one bf16 row x [in].
//                              A batch-1 decode step is a chain of these: it streams every weight of
//                              the model once, so what matters is the memory bandwidth it reaches.
//   write_kv_and_attend(...)   the paged KV write and the attention of one sequence, the same
//                              ATen ops as the Python kernel in compiled.py, in the same order.
//   decode_step(...)           one decode step of a batch of sequences: the eager engine's layer
//                              (models/llama.py with the kernels' torch references) op for op,
//                              the same ATen calls in the same order, so the same bits, with none
//                              of Python's cost per op.
//
// The GEMV keeps four rows in flight: each AVX512-BF16 `vdpbf16ps` multiplies 32 bf16 pairs and
// adds them into 16 float32 lanes, and every row prefetches the weight 8 KB ahead of its loads,
// so the cores keep more cache-line requests to memory outstanding than the hardware prefetcher
// alone would. It is compiled for AVX512-BF16 only (a per-function target attribute); Python
// checks that the CPU has those instructions before it calls it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/addmv.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/flip.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <algorithm>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <optional>
#include <tuple>
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

// compiled.py's rms_norm_reference: (rmsnorm(x + residual) * weight, x + residual), float32 math.
std::pair<at::Tensor, at::Tensor> rms_norm(at::Tensor x, const at::Tensor& weight, const at::Tensor& eps,
                                           const std::optional<at::Tensor>& residual) {
  if (residual.has_value()) x = at::add(x, *residual);
  const at::Tensor norm = at::linalg_vector_norm(x, 2, at::IntArrayRef{-1}, /*keepdim=*/true, at::kFloat);
  const at::Tensor inv_rms = at::addcmul(eps, norm, norm, 1.0 / double(x.size(-1))).rsqrt_();
  at::Tensor normed = at::empty_like(x);
  at::mul_out(normed, x, inv_rms);  // float32 math, rounded to x's dtype
  if (normed.scalar_type() == c10::promoteTypes(normed.scalar_type(), weight.scalar_type()))
    return {normed.mul_(weight), x};
  return {at::mul(weight, normed), x};
}

// Which kernel a projection of the step runs; Python picks it per step by the rules of
// kernels/linear.py (engine/native_decode.py), so every product is the eager engine's.
enum LinearKind : int64_t { kPlain = 0, kOneRowMv = 1, kNativeGemv = 2, kPacked = 3 };

// x @ weight.T: `packed` is the weight in oneDNN's packed layout (read only by kPacked).
at::Tensor step_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed, int64_t kind) {
  switch (kind) {
    case kOneRowMv:  // compiled.py's decode_linear: the bits of torch.mv
      return at::addmv(at::zeros({}, x.options()), weight, x.view({-1}), /*beta=*/0).view({1, -1});
    case kNativeGemv:
      return gemv_bf16(weight, x.view({-1})).view({1, -1});
    case kPacked: {  // kernels/linear.py's linear_cpu_packed
      static const c10::OperatorHandle op =
          c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
      torch::jit::Stack stack{x.contiguous(), packed, c10::IValue(), std::string("none"),
                              c10::List<std::optional<at::Scalar>>(), c10::IValue(std::string())};
      op.callBoxed(&stack);
      return stack[0].toTensor();
    }
    default:
      return at::linear(x, weight);
  }
}

// kernels/attention.py's decode_attention_reference for several sequences, after the KV write of
// kernels/cache_write.py: pages gathered into a padded batch, a padding mask where lengths differ.
at::Tensor write_kv_and_attend_batch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kv,
                                     int64_t layer, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                     const at::Tensor& context_lens, int64_t min_len, int64_t max_len, double scale) {
  const at::Tensor k_cache = kv.select(0, layer).select(0, 0), v_cache = kv.select(0, layer).select(0, 1);
  const int64_t num_seqs = q.size(0), block_size = k_cache.size(1);
  k_cache.view({-1, k_cache.size(2), k_cache.size(3)}).index_copy_(0, slot_mapping, k.to(k_cache.scalar_type()));
  v_cache.view({-1, v_cache.size(2), v_cache.size(3)}).index_copy_(0, slot_mapping, v.to(v_cache.scalar_type()));
  const int64_t max_blocks = (max_len + block_size - 1) / block_size;
  const at::Tensor flat = block_tables.narrow(1, 0, max_blocks).reshape({-1});
  auto gather = [&](const at::Tensor& cache) {
    return cache.index_select(0, flat)
        .reshape({num_seqs, max_blocks * block_size, cache.size(2), cache.size(3)})
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

// One decode step of a batch of sequences, one token each: float32 logits [B, vocab]. `weights`
// holds the embedding, the final norm and the LM head, then per layer its input norm, qkv, o,
// post-attention norm, gate_up and down projections; `packed` the same list with the projections
// packed for oneDNN where `linear_kind` is kPacked (engine/native_decode.py builds both).
// `first_block` is a lone sequence's first block when its blocks are consecutive, else -1.
at::Tensor decode_step(at::TensorList weights, at::TensorList packed, at::Tensor& kv, const at::Tensor& cos_sin,
                       const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& slot_mapping,
                       const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t first_block,
                       int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
                       int64_t linear_kind) {
  constexpr int64_t kPerLayer = 6;
  TORCH_CHECK(weights.size() >= 3 && (weights.size() - 3) % kPerLayer == 0 &&
                  int64_t(weights.size() - 3) / kPerLayer == kv.size(0),
              "decode_step takes 3 + 6 weights per layer for a pool of ", kv.size(0), " layers; got ", weights.size());
  TORCH_CHECK(packed.size() == weights.size(), "decode_step takes as many packed weights as weights; got ",
              packed.size(), " and ", weights.size());
  const int64_t num_seqs = input_ids.size(0);
  TORCH_CHECK(num_seqs >= 1 && positions.size(0) == num_seqs && slot_mapping.size(0) == num_seqs &&
                  block_tables.size(0) == num_seqs && context_lens.size(0) == num_seqs,
              "decode_step takes one position, slot, block table row and context length per token; got ", num_seqs,
              " tokens, ", positions.size(0), " positions, ", slot_mapping.size(0), " slots, ", block_tables.size(0),
              " table rows, ", context_lens.size(0), " lengths");
  const at::Tensor eps_t = at::scalar_tensor(eps, at::kFloat);
  const int64_t half = head_dim / 2, q_size = num_heads * head_dim;
  const at::Tensor lens = context_lens.to(at::kLong).contiguous();
  const int64_t* len_data = lens.const_data_ptr<int64_t>();
  const int64_t max_len = *std::max_element(len_data, len_data + num_seqs);
  const int64_t min_len = *std::min_element(len_data, len_data + num_seqs);
  const at::Tensor window = at::tensor({max_len, first_block}, at::kLong);  // a lone sequence's (length, first block)
  // kernels/rope.py's rotation_tables: cos and sign-folded sin rows [B, 1, D] for these positions
  const at::Tensor table = cos_sin.index_select(0, positions).unsqueeze(1);
  const at::Tensor cos = table.narrow(-1, 0, half), sin = table.narrow(-1, half, half);
  const at::Tensor cos2 = at::cat({cos, cos}, -1), signed_sin = at::cat({at::neg(sin), sin}, -1);
  at::Tensor hidden = weights[0].index_select(0, input_ids);
  std::optional<at::Tensor> residual;
  for (int64_t layer = 0; layer < kv.size(0); ++layer) {
    const int64_t base = 3 + layer * kPerLayer;
    const at::Tensor* w = weights.data() + base;
    const at::Tensor* pw = packed.data() + base;
    at::Tensor x, res;
    std::tie(x, res) = rms_norm(hidden, w[0], eps_t, residual);
    const at::Tensor qkv = step_linear(x, w[1], pw[1], linear_kind).view({-1, num_heads + 2 * num_kv_heads, head_dim});
    const at::Tensor q = qkv.narrow(1, 0, num_heads), k = qkv.narrow(1, num_heads, num_kv_heads);
    const at::Tensor v = qkv.narrow(1, num_heads + num_kv_heads, num_kv_heads);
    // kernels/rope.py's rotate: x * [cos, cos] + [x2, x1] * [-sin, sin], rounded to q's dtype
    const at::Tensor both = at::cat({q, k}, 1);
    const at::Tensor swapped = both.unflatten(-1, {2, half}).flip({-2}).flatten(-2);
    const at::Tensor rotated = at::mul(both, cos2).add_(at::mul(swapped, signed_sin)).to(q.scalar_type());
    const at::Tensor q_rot = rotated.narrow(1, 0, num_heads), k_rot = rotated.narrow(1, num_heads, num_kv_heads);
    const at::Tensor attn =
        num_seqs == 1
            ? write_kv_and_attend(q_rot, k_rot, v, kv, layer, slot_mapping, block_tables, window, scale)
            : write_kv_and_attend_batch(q_rot, k_rot, v, kv, layer, slot_mapping, block_tables, lens, min_len, max_len,
                                        scale);
    hidden = step_linear(attn.reshape({-1, q_size}), w[2], pw[2], linear_kind);
    std::tie(x, res) = rms_norm(hidden, w[3], eps_t, res);
    const at::Tensor gate_up = step_linear(x, w[4], pw[4], linear_kind);
    const auto halves = gate_up.chunk(2, -1);
    hidden = step_linear(at::silu(halves[0]).mul_(halves[1]), w[5], pw[5], linear_kind);
    residual = res;
  }
  const at::Tensor normed = rms_norm(hidden, weights[1], eps_t, residual).first;
  return step_linear(normed, weights[2], packed[2], linear_kind).to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY(minidisagg_cpu, m) {
  m.def("gemv_bf16(Tensor weight, Tensor x) -> Tensor");
  m.def("write_kv_and_attend(Tensor q, Tensor k, Tensor v, Tensor(a!) kv, int layer, Tensor slot_mapping, "
        "Tensor block_table, Tensor window, float scale) -> Tensor");
  m.def("decode_step(Tensor[] weights, Tensor[] packed, Tensor(a!) kv, Tensor cos_sin, Tensor input_ids, "
        "Tensor positions, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, int first_block, "
        "int num_heads, int num_kv_heads, int head_dim, float eps, float scale, int linear_kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(minidisagg_cpu, CPU, m) {
  m.impl("gemv_bf16", gemv_bf16);
  m.impl("write_kv_and_attend", write_kv_and_attend);
  m.impl("decode_step", decode_step);
}

// oneDNN's packed weights are MkldnnCPU tensors: a step that reads them dispatches on that key
TORCH_LIBRARY_IMPL(minidisagg_cpu, MkldnnCPU, m) {
  m.impl("decode_step", decode_step);
}

TORCH_LIBRARY_IMPL(minidisagg_cpu, Meta, m) {
  m.impl("gemv_bf16", gemv_bf16_meta);
  m.impl("write_kv_and_attend", write_kv_and_attend_meta);
}
