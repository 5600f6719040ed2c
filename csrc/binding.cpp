// torch binding of cached-context attention: one TORCH_LIBRARY schema with CPU and (when built with
// -DLATTE_WITH_CUDA) CUDA implementations. Fake (meta) implementations and autograd are registered
// in Python (latte_kernels/context_attention.py) once this library is loaded.
//
// The public Python op validates arguments first with messages naming them; the checks here keep
// direct calls of torch.ops.latte_ext.* from reaching a kernel with a malformed input.
#include <Python.h>

#include <cmath>
#include <tuple>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "context_attention_cpu.h"

#ifdef LATTE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "context_attention.cuh"
#endif

namespace latte {
namespace {

void check_bshd(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must have 4 dimensions (B, N, H, D), got ", t.sizes());
  TORCH_CHECK_VALUE(t.numel() > 0, name, " must be non-empty, got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& ctx_lens, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  check_bshd("q", q);
  check_bshd("k_ctx", k);
  check_bshd("v_ctx", v);
  const int64_t D = q.size(3);
  TORCH_CHECK_VALUE(D % 8 == 0 && D >= 8 && D <= 256, "q head_dim must be a multiple of 8 in [8, 256], got ", D);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k_ctx", k}, {"v_ctx", v}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(), " but q has ",
                     q.scalar_type());
    TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device());
    TORCH_CHECK_VALUE(t.size(0) == q.size(0) && t.size(3) == D, name, " must have shape (B=", q.size(0),
                      ", Nc, Hkv, D=", D, "), got ", t.sizes());
  }
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v_ctx must have the shape of k_ctx ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK_VALUE(q.size(2) % k.size(2) == 0, "q has ", q.size(2), " heads, not a multiple of the ", k.size(2),
                    " heads of k_ctx");
  if (ctx_lens.has_value() && ctx_lens->defined()) {
    const at::Tensor& l = *ctx_lens;
    TORCH_CHECK_TYPE(l.scalar_type() == at::kInt || l.scalar_type() == at::kLong, "ctx_lens must be int32 or int64, got ",
                     l.scalar_type());
    TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == q.size(0), "ctx_lens must have shape (B=", q.size(0), ",), got ",
                      l.sizes());
    TORCH_CHECK_VALUE(l.device() == q.device(), "ctx_lens is on ", l.device(), " but q is on ", q.device());
  }
}

// The forward's outputs and their cotangents: floating point (converted to q's dtype, the LSEs to
// float32/float64, inside), q's device, out/grad_out shaped like q, lse/grad_lse (B, Hq, Nq).
void check_backward(const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
                    const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> lse_shape{q.size(0), q.size(2), q.size(1)};
  const std::pair<const char*, const at::Tensor*> args[] = {
      {"grad_out", &grad_out}, {"grad_lse", &grad_lse}, {"out", &out}, {"lse", &lse}};
  for (const auto& [name, t] : args) {
    const bool is_lse = t == &grad_lse || t == &lse;
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), name, " must be floating point, got ", t->scalar_type());
    if (is_lse) {
      TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(lse_shape), name, " must have shape (B, Hq, Nq) = ",
                        at::IntArrayRef(lse_shape), ", got ", t->sizes());
    } else {
      TORCH_CHECK_VALUE(t->sizes() == q.sizes(), name, " must have the shape of q ", q.sizes(), ", got ", t->sizes());
    }
    TORCH_CHECK_VALUE(t->device() == q.device(), name, " is on ", t->device(), " but q is on ", q.device());
  }
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const c10::optional<at::Tensor>& ctx_lens, double scale) {
  check_inputs(q, k, v, ctx_lens, scale);
  return context_attention_cpu_fwd(q, k, v, ctx_lens, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                                       const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const c10::optional<at::Tensor>& ctx_lens,
                                                       const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_inputs(q, k, v, ctx_lens, scale);
  check_backward(grad_out, grad_lse, q, out, lse);
  return context_attention_cpu_bwd(grad_out, grad_lse, q, k, v, ctx_lens, out, lse, scale);
}

#ifdef LATTE_WITH_CUDA

DType cuda_dtype(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "q must be float32, float16 or bfloat16 on CUDA, got ", q.scalar_type());
  }
  return DType::kFloat32;
}

// The kernels take any strides but need the head_dim dimension contiguous, and 16-byte aligned rows
// (the tensor-core path moves 16-byte chunks with cp.async); anything else is copied once.
at::Tensor kernel_layout(const at::Tensor& t) {
  const int64_t e = t.element_size();
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) == 1 || (t.stride(d) * e) % 16 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

template <typename P>
void set_lens(P& p, const c10::optional<at::Tensor>& ctx_lens, at::Tensor& keep) {
  if (ctx_lens.has_value() && ctx_lens->defined()) {
    keep = ctx_lens->contiguous();
    p.ctx_lens = keep.data_ptr();
    p.ctx_lens_int64 = keep.scalar_type() == at::kLong;
  }
}

#define LATTE_STRIDES(prefix, t) \
  p.prefix##_stride_b = (t).stride(0); p.prefix##_stride_n = (t).stride(1); p.prefix##_stride_h = (t).stride(2)

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                            const c10::optional<at::Tensor>& ctx_lens, double scale) {
  check_inputs(q_in, k_in, v_in, ctx_lens, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  ContextAttentionParams p;
  p.dtype = cuda_dtype(q);
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  LATTE_STRIDES(q, q); LATTE_STRIDES(k, k); LATTE_STRIDES(v, v);
  p.out = out.data_ptr(); LATTE_STRIDES(o, out);
  p.lse = lse.data_ptr<float>();
  at::Tensor lens;
  set_lens(p, ctx_lens, lens);
  p.B = q.size(0); p.Nq = q.size(1); p.Hq = q.size(2); p.D = q.size(3); p.Nc = k.size(1); p.Hkv = k.size(2);
  p.scale = static_cast<float>(scale);
  launch_context_attention_fwd(p, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                                        const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in,
                                                        const c10::optional<at::Tensor>& ctx_lens,
                                                        const at::Tensor& out_in, const at::Tensor& lse_in,
                                                        double scale) {
  check_inputs(q_in, k_in, v_in, ctx_lens, scale);
  check_backward(grad_out, grad_lse, q_in, out_in, lse_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const at::Tensor out = kernel_layout(out_in.to(q.scalar_type()));
  const at::Tensor g = kernel_layout(grad_out.to(q.scalar_type()));
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const at::Tensor glse = grad_lse.to(at::kFloat).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  at::Tensor dq_accum;  // float16/bfloat16: dQ summed over key tiles in float32
  if (q.scalar_type() != at::kFloat) dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  ContextAttentionBwdParams p;
  p.dtype = cuda_dtype(q);
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.out = out.data_ptr(); p.grad_out = g.data_ptr();
  LATTE_STRIDES(q, q); LATTE_STRIDES(k, k); LATTE_STRIDES(v, v); LATTE_STRIDES(o, out); LATTE_STRIDES(do, g);
  p.lse = lse.data_ptr<float>();
  p.grad_lse = glse.data_ptr<float>();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  LATTE_STRIDES(dq, dq); LATTE_STRIDES(dk, dk); LATTE_STRIDES(dv, dv);
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.defined() ? dq_accum.data_ptr<float>() : nullptr;
  at::Tensor lens;
  set_lens(p, ctx_lens, lens);
  p.B = q.size(0); p.Nq = q.size(1); p.Hq = q.size(2); p.D = q.size(3); p.Nc = k.size(1); p.Hkv = k.size(2);
  p.scale = static_cast<float>(scale);
  launch_context_attention_bwd(p, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

#undef LATTE_STRIDES
#endif  // LATTE_WITH_CUDA

}  // namespace
}  // namespace latte

TORCH_LIBRARY(latte_ext, m) {
  m.def("context_attention(Tensor q, Tensor k_ctx, Tensor v_ctx, Tensor? ctx_lens, float scale) -> (Tensor, Tensor)");
  m.def(
      "context_attention_backward(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor k_ctx, Tensor v_ctx, "
      "Tensor? ctx_lens, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(latte_ext, CPU, m) {
  m.impl("context_attention", &latte::fwd_cpu);
  m.impl("context_attention_backward", &latte::bwd_cpu);
}

#ifdef LATTE_WITH_CUDA
TORCH_LIBRARY_IMPL(latte_ext, CUDA, m) {
  m.impl("context_attention", &latte::fwd_cuda);
  m.impl("context_attention_backward", &latte::bwd_cuda);
}
#endif

// `import latte_kernels._C` loads this library (and so runs the registrations above); the module
// itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
