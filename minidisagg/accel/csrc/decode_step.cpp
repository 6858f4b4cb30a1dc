// An opt-in accelerator: one whole decode step of the stock Llama model as one C++ op
// (minidisagg/accel/native_decode.py builds and calls it; EngineConfig.native_cpu_decode turns it on).
//
//   minidisagg_accel::decode_step(...)   one decode step of a batch of sequences, one token each:
//                                        float32 logits [B, vocab].
//
// It is models/llama.py's LlamaModel.forward and compute_logits for decode tokens on a CPU, written
// out: LlamaLayer's six steps in the same order, each calling the same kernel function of
// kernels/csrc/cpu_kernels.h that the model's dispatch points call through the `minidisagg_cpu`
// ops, and the same products (Python picks them by kernels/linear.py's rules). So its logits and KV
// writes are the model's bits, with no Python between the ops. Because it is a copy of the layer,
// Python refuses to run it for a model whose code is not the stock one (accel/stock.py).

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mv.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "cpu_kernels.h"

namespace {

// Which kernel a projection of the step runs: kernels/linear.py's cpu_linear_kind, picked per step in Python.
enum LinearKind : int64_t { kPlain = 0, kOneRowMv = 1, kNativeGemv = 2, kPacked = 3 };

// x @ weight.T: `packed` is the weight in oneDNN's packed layout (read only by kPacked).
at::Tensor step_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed, int64_t kind) {
  switch (kind) {
    case kOneRowMv:  // kernels/linear.py's linear_cpu_gemv: torch.mv
      return at::mv(weight, x.view({-1})).view({1, -1});
    case kNativeGemv:  // kernels/linear.py's linear_cpu_native_gemv
      return gemv(weight, x.view({-1})).view({1, -1});
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

// `weights` holds the embedding, the final norm and the LM head, then per layer its input norm, qkv,
// o, post-attention norm, gate_up and down projections; `packed` the same list with the projections
// packed for oneDNN where `linear_kind` is kPacked (accel/native_decode.py builds both).
at::Tensor decode_step(at::TensorList weights, at::TensorList packed, at::Tensor& kv, const at::Tensor& cos_sin,
                       const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& slot_mapping,
                       const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, double eps, double scale, int64_t linear_kind) {
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
  const int64_t q_size = num_heads * head_dim;
  at::Tensor hidden = weights[0].index_select(0, input_ids);  // LlamaModel.embed_tokens
  at::Tensor residual;
  for (int64_t layer = 0; layer < kv.size(0); ++layer) {
    const at::Tensor* w = weights.data() + 3 + layer * kPerLayer;
    const at::Tensor* pw = packed.data() + 3 + layer * kPerLayer;
    const at::Tensor k_cache = kv.select(0, layer).select(0, 0), v_cache = kv.select(0, layer).select(0, 1);
    // attention_inputs: residual add, RMSNorm, the fused q/k/v projection
    at::Tensor x;
    if (layer == 0) {
      x = rms_norm(hidden, w[0], eps);
      residual = hidden;
    } else {
      std::tie(x, residual) = add_rms_norm(hidden, residual, w[0], eps);
    }
    const at::Tensor qkv = step_linear(x, w[1], pw[1], linear_kind).view({-1, num_heads + 2 * num_kv_heads, head_dim});
    const at::Tensor q = qkv.narrow(1, 0, num_heads), k = qkv.narrow(1, num_heads, num_kv_heads);
    const at::Tensor v = qkv.narrow(1, num_heads + num_kv_heads, num_kv_heads);
    // rope_and_write_kv, then attention
    const at::Tensor rotated = rope_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping);
    const at::Tensor attn = decode_attention(rotated.narrow(1, 0, num_heads), k_cache, v_cache, block_tables,
                                             context_lens, scale);
    // attention_output, mlp_input, mlp
    hidden = step_linear(attn.reshape({-1, q_size}), w[2], pw[2], linear_kind);
    std::tie(x, residual) = add_rms_norm(hidden, residual, w[3], eps);
    hidden = step_linear(silu_and_mul(step_linear(x, w[4], pw[4], linear_kind)), w[5], pw[5], linear_kind);
  }
  const at::Tensor normed = add_rms_norm(hidden, residual, weights[1], eps).first;  // LlamaModel.final_norm
  return step_linear(normed, weights[2], packed[2], linear_kind).to(at::kFloat);  // LlamaModel.compute_logits
}

}  // namespace

TORCH_LIBRARY(minidisagg_accel, m) {
  m.def("decode_step(Tensor[] weights, Tensor[] packed, Tensor(a!) kv, Tensor cos_sin, Tensor input_ids, "
        "Tensor positions, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, int num_heads, "
        "int num_kv_heads, int head_dim, float eps, float scale, int linear_kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(minidisagg_accel, CPU, m) {
  m.impl("decode_step", decode_step);
}

// oneDNN's packed weights are MkldnnCPU tensors: a step that reads them dispatches on that key
TORCH_LIBRARY_IMPL(minidisagg_accel, MkldnnCPU, m) {
  m.impl("decode_step", decode_step);
}
