// The CPU kernels behind the model's dispatch points (minidisagg/kernels/*.py), in C++.
//
// Most functions are the torch reference of one dispatch point written with the same ATen calls in
// the same order, so they give the reference's bits; what they save is Python's cost per op (a
// decode step of SmolLM2 runs some 1,800 small ops). Two are kernels of their own, with the
// reference's math summed in another order: the decode attention and the GEMV.
//
//   rms_norm            kernels/norm.py's rms_norm_reference (add_rms_norm: with the residual add)
//   silu_and_mul        kernels/activation.py's silu_and_mul_reference
//   rope_and_write_kv   kernels/rope_cache.py's rope_and_write_kv_reference: RoPE, then the paged KV write
//   write_kv            kernels/cache_write.py's write_kv_reference
//   decode_attention    kernels/attention.py's decode_attention_reference: pages read in place, float32 math
//   gemv                y = weight @ x for a weight [out, in] and one row x [in], float32 or bfloat16
//
// kernels/csrc/cpu_ops.cpp registers them as the `minidisagg_cpu` ops the model calls; the opt-in
// whole-step decode (minidisagg/accel/csrc/decode_step.cpp) calls the same functions. Everything here
// sits in an anonymous namespace: each extension that includes this file gets its own copy.
//
// The GEMV keeps four rows in flight: in bf16 each AVX512-BF16 `vdpbf16ps` multiplies 32 bf16 pairs
// and adds them into 16 float32 lanes (in float32 a `vfmadd231ps` 16 pairs), and every row prefetches
// the weight 8 KB ahead of its loads, so the cores keep more cache-line requests to memory outstanding
// than the hardware prefetcher alone would: a one-row product is bound by streaming its weight. It is
// compiled for AVX512F / AVX512-BF16 only (per-function target attributes); Python checks that the CPU
// has those instructions before it calls it.

#pragma once
// (decode_attention lives in cpu_attention.h, included at the end of this file.)

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
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

namespace {

inline float load_float(float v) { return v; }
inline float load_float(c10::BFloat16 v) { return static_cast<float>(v); }

constexpr int64_t kRowsPerTile = 4;         // rows of the weight read side by side
constexpr int64_t kPrefetchElements = 4096;  // how far ahead each row prefetches (8 KB of bf16)
constexpr int64_t kTilesPerTask = 8;         // at::parallel_for grain, in tiles

at::Tensor gemv_bf16(const at::Tensor& weight, const at::Tensor& x);

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

// The float32 twin of dot_rows: 16 float32 products a `vfmadd231ps`, the same rows in flight and prefetch.
template <int kRows>
__attribute__((target("avx512f"))) void dot_rows_f32(const float* weight, int64_t in_features, const float* x,
                                                     float* y) {
  __m512 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= in_features; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    for (int r = 0; r < kRows; ++r) {
      const float* row = weight + r * in_features;
      _mm_prefetch(reinterpret_cast<const char*>(row + i + kPrefetchElements / 2), _MM_HINT_T0);
      acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(row + i), xv, acc[r]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float sum = _mm512_reduce_add_ps(acc[r]);
    for (int64_t j = i; j < in_features; ++j) sum += weight[r * in_features + j] * x[j];
    y[r] = sum;
  }
}

// y = weight @ x, one row of x, float32 (AVX512F) or bfloat16 (AVX512-BF16): the weight streamed
// once, row tiles spread over the threads.
at::Tensor gemv(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() == 1 && weight.size(1) == x.size(0),
              "gemv takes a weight [out, in] and a vector [in]; got ", weight.sizes(), " and ", x.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "gemv takes float32 or bfloat16 tensors of one dtype; got ", weight.scalar_type(), " and ",
              x.scalar_type());
  if (x.scalar_type() == at::kBFloat16) return gemv_bf16(weight, x);
  const at::Tensor w = weight.contiguous(), v = x.contiguous();
  const int64_t out_features = w.size(0), in_features = w.size(1);
  at::Tensor y = at::empty({out_features}, v.options());
  const float* wp = w.const_data_ptr<float>();
  const float* xp = v.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t tiles = out_features / kRowsPerTile;
  at::parallel_for(0, tiles, kTilesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      dot_rows_f32<kRowsPerTile>(wp + t * kRowsPerTile * in_features, in_features, xp, yp + t * kRowsPerTile);
  });
  for (int64_t r = tiles * kRowsPerTile; r < out_features; ++r) dot_rows_f32<1>(wp + r * in_features, in_features, xp, yp + r);
  return y;
}

at::Tensor gemv_bf16(const at::Tensor& weight, const at::Tensor& x) {
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

// rope_and_write_kv_reference's loops written out for one token's heads: each rotated element is
// x1 * cos + x2 * (-sin) (or x2 * cos + x1 * sin), two float32 products and a sum, each rounded as
// torch's separate mul, mul and add round them (the build keeps the compiler from fusing them into
// an FMA), then rounded once to T: the reference's bits, without its dozen ATen calls.
template <typename T>
void rotate_heads(const T* src, int64_t head_stride, int64_t heads, int64_t half, const float* cos,
                  const float* sin, T* dst) {
  for (int64_t h = 0; h < heads; ++h) {
    const T* x = src + h * head_stride;
    T* out = dst + h * 2 * half;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = load_float(x[i]), x2 = load_float(x[i + half]);
      const float first = x1 * cos[i], first_swapped = x2 * -sin[i];
      const float second = x2 * cos[i], second_swapped = x1 * sin[i];
      out[i] = T(first + first_swapped);
      out[i + half] = T(second + second_swapped);
    }
  }
}

template <typename T>
void rope_and_write_kv_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& positions, const at::Tensor& cos_sin, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& slot_mapping, at::Tensor& rotated) {
  const int64_t tokens = q.size(0), num_heads = q.size(1), num_kv_heads = k.size(1), head_dim = q.size(2);
  const int64_t half = head_dim / 2, width = (num_heads + num_kv_heads) * head_dim;
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  const float* table = cos_sin.const_data_ptr<float>();
  const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
  T* out = rotated.mutable_data_ptr<T>();
  T *kc = k_cache.mutable_data_ptr<T>(), *vc = v_cache.mutable_data_ptr<T>();
  const int64_t block_size = k_cache.size(1);
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* cos = table + pos[t] * cos_sin.stride(0);
      T* row = out + t * width;
      rotate_heads(qp + t * q.stride(0), q.stride(1), num_heads, half, cos, cos + half, row);
      rotate_heads(kp + t * k.stride(0), k.stride(1), num_kv_heads, half, cos, cos + half, row + num_heads * head_dim);
      const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
      T* k_slot = kc + block * k_cache.stride(0) + offset * k_cache.stride(1);
      T* v_slot = vc + block * v_cache.stride(0) + offset * v_cache.stride(1);
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        std::copy_n(row + (num_heads + h) * head_dim, head_dim, k_slot + h * k_cache.stride(2));
        std::copy_n(vp + t * v.stride(0) + h * v.stride(1), head_dim, v_slot + h * v_cache.stride(2));
      }
    }
  });
}

// rope_and_write_kv_reference: q and k rotated by their positions ([T, H + KH, D], q's heads first),
// and the rotated k and the v written to their slots of the caches. In float32 or bf16 with caches of
// the same dtype, a float32 table and each head's values side by side, the loops above; else the
// reference's ATen calls.
at::Tensor rope_and_write_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                             const at::Tensor& cos_sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& slot_mapping) {
  const auto dtype = q.scalar_type();
  const bool direct = (dtype == at::kFloat || dtype == at::kBFloat16) && k.scalar_type() == dtype &&
                      v.scalar_type() == dtype && k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype &&
                      cos_sin.scalar_type() == at::kFloat && cos_sin.stride(1) == 1 && q.stride(2) == 1 &&
                      k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1 &&
                      positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                      slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && q.size(2) % 2 == 0;
  if (!direct) {
    const auto [cos, signed_sin] = rotation_tables(positions, cos_sin);
    at::Tensor rotated = rotate(q, k, cos, signed_sin);
    write_kv(rotated.narrow(1, q.size(1), k.size(1)), v, k_cache, v_cache, slot_mapping);
    return rotated;
  }
  at::Tensor rotated = at::empty({q.size(0), q.size(1) + k.size(1), q.size(2)}, q.options());
  if (dtype == at::kFloat)
    rope_and_write_kv_typed<float>(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, rotated);
  else
    rope_and_write_kv_typed<c10::BFloat16>(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, rotated);
  return rotated;
}

}  // namespace

#include "cpu_attention.h"
