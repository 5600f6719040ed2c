// The C++ CPU kernels of cached-context attention (SPEC 2.4), called by csrc/binding.cpp after it has
// validated the arguments. float32 / float16 / bfloat16 compute in float32, float64 in float64.
#pragma once

#include <tuple>

#include <ATen/ATen.h>

namespace latte {

// -> (out (B, Nq, Hq, D) in q's dtype, lse (B, Hq, Nq) float32, float64 for float64 inputs)
std::tuple<at::Tensor, at::Tensor> context_attention_cpu_fwd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const c10::optional<at::Tensor>& ctx_lens,
                                                             double scale);

// -> (dq, dk, dv); dk/dv rows at or beyond ctx_lens[b] are zero
std::tuple<at::Tensor, at::Tensor, at::Tensor> context_attention_cpu_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const c10::optional<at::Tensor>& ctx_lens, const at::Tensor& out, const at::Tensor& lse,
    double scale);

}  // namespace latte
