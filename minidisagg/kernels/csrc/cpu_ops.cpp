// The `minidisagg_cpu` ops: the CPU kernels of cpu_kernels.h, registered with the PyTorch dispatcher.
//
// The model calls them through its dispatch points (kernels/norm.py, activation.py, rope_cache.py,
// attention.py, linear.py) on a CPU once kernels/cpu_native.py has built this file. Each has a Meta
// kernel too, so a torch.compile graph of the model (engine/compiled.py) calls them from its C++
// wrapper: the KV write and the decode attention stay opaque there, since their context grows every
// step while the graph keeps static shapes, and so does the GEMV.

#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu_kernels.h"

namespace {

std::tuple<at::Tensor, at::Tensor> add_rms_norm_op(const at::Tensor& x, const at::Tensor& residual,
                                                   const at::Tensor& weight, double eps) {
  auto [normed, sum] = add_rms_norm(x, residual, weight, eps);
  return {normed, sum};
}

at::Tensor rope_and_write_kv_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& positions, const at::Tensor& cos_sin, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  return rope_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping);
}

void write_kv_op(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                 const at::Tensor& slot_mapping) {
  write_kv(k, v, k_cache, v_cache, slot_mapping);
}

void write_kv_meta(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&) {}

at::Tensor gemv_meta(const at::Tensor& weight, const at::Tensor& x) {
  return at::empty({weight.size(0)}, x.options());
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor& weight, double) {
  return at::empty(x.sizes(), x.options().dtype(c10::promoteTypes(x.scalar_type(), weight.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_meta(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  const auto sum_type = c10::promoteTypes(x.scalar_type(), residual.scalar_type());
  return {rms_norm_meta(x.to(sum_type), weight, eps), at::empty(x.sizes(), x.options().dtype(sum_type))};
}

at::Tensor silu_and_mul_meta(const at::Tensor& gate_up) {
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() /= 2;
  return at::empty(shape, gate_up.options());
}

at::Tensor rope_and_write_kv_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&) {
  return at::empty({q.size(0), q.size(1) + k.size(1), q.size(2)}, q.options());
}

at::Tensor decode_attention_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, double) {
  return at::empty(q.sizes(), q.options());
}

}  // namespace

TORCH_LIBRARY(minidisagg_cpu, m) {
  m.def("gemv(Tensor weight, Tensor x) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rope_and_write_kv(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor cos_sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slot_mapping) -> Tensor");
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(minidisagg_cpu, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm_op);
  m.impl("silu_and_mul", silu_and_mul);
  m.impl("rope_and_write_kv", rope_and_write_kv_op);
  m.impl("write_kv", write_kv_op);
  m.impl("decode_attention", decode_attention);
}

TORCH_LIBRARY_IMPL(minidisagg_cpu, Meta, m) {
  m.impl("gemv", gemv_meta);
  m.impl("rms_norm", rms_norm_meta);
  m.impl("add_rms_norm", add_rms_norm_meta);
  m.impl("silu_and_mul", silu_and_mul_meta);
  m.impl("rope_and_write_kv", rope_and_write_kv_meta);
  m.impl("write_kv", write_kv_meta);
  m.impl("decode_attention", decode_attention_meta);
}
