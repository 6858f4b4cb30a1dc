// Decode attention on the CPU, part of the kernels of cpu_kernels.h (which includes this file after
// its own definitions, so it can use them).

#pragma once

namespace {

// Decode attention: q [B, H, D], one query per sequence, over each sequence's cached pages, read in
// place through its block table (no gather, no padding). One task per (sequence, KV head) computes
// the scores of its `group` query heads over the sequence's L keys, a softmax, and the weighted sum
// of the values, all in float32, and rounds once to q's dtype: what decode_attention_reference
// computes, with sums in another order (tested within float rounding). On a CPU with AVX512F the
// loops are vector instructions (attend_group_avx512); elsewhere plain C++.

template <typename T>
void attend_group(
    const T* q, int64_t q_head_stride, int64_t group, int64_t head_dim, float scale, const T* keys,
    const T* values, int64_t block_stride, int64_t slot_stride, const int64_t* table, int64_t block_size,
    int64_t len, float* buffer, T* out, int64_t out_head_stride) {
  float* qf = buffer;                       // [group, D]: q in float32, times the scale
  float* acc = qf + group * head_dim;       // [group, D]: the weighted sum of the values
  float* scores = acc + group * head_dim;   // [group, L]
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d) qf[g * head_dim + d] = load_float(q[g * q_head_stride + d]) * scale;
  for (int64_t t = 0; t < len; ++t) {
    const T* key = keys + table[t / block_size] * block_stride + (t % block_size) * slot_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * head_dim;
      float lanes[16] = {0};
      int64_t d = 0;
      for (; d + 16 <= head_dim; d += 16)
        for (int j = 0; j < 16; ++j) lanes[j] += qg[d + j] * load_float(key[d + j]);
      float dot = 0;
      for (; d < head_dim; ++d) dot += qg[d] * load_float(key[d]);
      for (int j = 0; j < 16; ++j) dot += lanes[j];
      scores[g * len + t] = dot;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * len;
    float top = s[0];
    for (int64_t t = 1; t < len; ++t) top = std::max(top, s[t]);
    float total = 0;
    for (int64_t t = 0; t < len; ++t) {
      s[t] = std::exp(s[t] - top);
      total += s[t];
    }
    const float inv = 1.0f / total;
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  std::fill(acc, acc + group * head_dim, 0.0f);
  for (int64_t t = 0; t < len; ++t) {
    const T* value = values + table[t / block_size] * block_stride + (t % block_size) * slot_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * len + t];
      float* ag = acc + g * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) ag[d] += p * load_float(value[d]);
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d) out[g * out_head_stride + d] = T(acc[g * head_dim + d]);
}

// AVX512 versions of attend_group for a head_dim that is a multiple of 16 (64 and 128 in practice):
// each key row is loaded once as head_dim / 16 float32 vectors (bf16 widened by a shift), its dot with
// each query head is a chain of FMAs and one horizontal add, and the value rows are FMA'd into the
// group's accumulators.
__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename T>
__attribute__((target("avx512f"))) void attend_group_avx512(
    const T* q, int64_t q_head_stride, int64_t group, int64_t head_dim, float scale, const T* keys,
    const T* values, int64_t block_stride, int64_t slot_stride, const int64_t* table, int64_t block_size,
    int64_t len, float* buffer, T* out, int64_t out_head_stride) {
  float* qf = buffer;
  float* acc = qf + group * head_dim;
  float* scores = acc + group * head_dim;
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d) qf[g * head_dim + d] = load_float(q[g * q_head_stride + d]) * scale;
  const int64_t chunks = head_dim / 16;
  for (int64_t t = 0; t < len; ++t) {
    const T* key = keys + table[t / block_size] * block_stride + (t % block_size) * slot_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * head_dim;
      __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qg), load16(key));
      for (int64_t c = 1; c < chunks; ++c) dot = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), load16(key + 16 * c), dot);
      scores[g * len + t] = _mm512_reduce_add_ps(dot);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * len;
    float top = s[0];
    for (int64_t t = 1; t < len; ++t) top = std::max(top, s[t]);
    float total = 0;
    for (int64_t t = 0; t < len; ++t) {
      s[t] = std::exp(s[t] - top);
      total += s[t];
    }
    const float inv = 1.0f / total;
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  std::fill(acc, acc + group * head_dim, 0.0f);
  for (int64_t t = 0; t < len; ++t) {
    const T* value = values + table[t / block_size] * block_stride + (t % block_size) * slot_stride;
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512 v = load16(value + 16 * c);
      for (int64_t g = 0; g < group; ++g) {
        float* a = acc + g * head_dim + 16 * c;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * len + t]), v, _mm512_loadu_ps(a)));
      }
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d) out[g * out_head_stride + d] = T(acc[g * head_dim + d]);
}

inline bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

template <typename T>
void decode_attention_typed(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& tables, const int64_t* lens, double scale, at::Tensor& out) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(2), group = num_heads / num_kv_heads, block_size = k_cache.size(1);
  const int64_t max_len = *std::max_element(lens, lens + num_seqs);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k_cache.const_data_ptr<T>();
  const T* vp = v_cache.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t* table = tables.const_data_ptr<int64_t>();
  const bool wide = head_dim % 16 == 0 && cpu_has_avx512f();
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(group * (2 * head_dim + max_len));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, kh = task % num_kv_heads;
      auto* attend = wide ? attend_group_avx512<T> : attend_group<T>;
      attend(qp + b * q.stride(0) + kh * group * q.stride(1), q.stride(1), group, head_dim, float(scale),
             kp + kh * k_cache.stride(2), vp + kh * v_cache.stride(2), k_cache.stride(0), k_cache.stride(1),
             table + b * tables.stride(0), block_size, lens[b], buffer.data(),
             op + b * out.stride(0) + kh * group * out.stride(1), out.stride(1));
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  const int64_t num_seqs = q.size(0), block_size = k_cache.size(1);
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "decode_attention takes q [B, H, D] and caches [blocks, block_size, KH, D] with H a multiple of KH; "
              "got ", q.sizes(), " and ", k_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "decode_attention takes float32 or bfloat16 q and caches of one dtype");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.strides() == k_cache.strides(),
              "decode_attention needs each head's D values side by side, and caches of one layout");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_seqs && context_lens.numel() == num_seqs,
              "decode_attention takes one block table row and one context length per query; got ", num_seqs,
              " queries, block tables ", block_tables.sizes(), ", ", context_lens.numel(), " lengths");
  const at::Tensor lens = context_lens.to(at::kLong).contiguous();
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const int64_t* len_data = lens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t blocks = (len_data[b] + block_size - 1) / block_size;
    TORCH_CHECK(len_data[b] >= 1 && blocks <= tables.size(1), "decode_attention: a context of ", len_data[b],
                " tokens needs ", blocks, " blocks; the block table has ", tables.size(1));
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.scalar_type() == at::kFloat)
    decode_attention_typed<float>(q, k_cache, v_cache, tables, len_data, scale, out);
  else
    decode_attention_typed<c10::BFloat16>(q, k_cache, v_cache, tables, len_data, scale, out);
  return out;
}

}  // namespace
