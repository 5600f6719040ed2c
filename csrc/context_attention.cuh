// Cached-context cross attention (SPEC 2.4): the torch-free CUDA interface.
//
// Image queries q (B, Nq, Hq, D) attend to a padded context k_ctx / v_ctx (B, Nc, Hkv, D); row b
// sees its first clamp(ctx_lens[b], 0, Nc) keys. out (B, Nq, Hq, D) in q's dtype, lse (B, Hq, Nq)
// float32 natural log; a row with no key gives out = 0 and lse = -inf.
//
// Kernels: context_attention_fwd.cu and context_attention_bwd.cu (fp16/bf16, CuTe, FlashAttention-2
// structure; tile configurations in context_attention_traits.cuh), context_attention_generic.cu
// (the float32 SIMT path and the backward's delta). Only CUDA and CUTLASS headers there and none of
// them here, so nvcc compiles the kernels on any machine and the binding needs no CUTLASS. The
// caller (csrc/binding.cpp) validates shapes, allocates outputs (and the float32 dQ accumulator) and
// passes the current stream; the launchers never synchronise, never read device values on the host,
// and so are safe inside CUDA-graph capture.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace latte {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Forward. Element strides; the head_dim (last) dimension of q, k, v and out must be contiguous.
// Preconditions (checked by the binding): D % 8 == 0, 8 <= D <= 256, Hq % Hkv == 0, all sizes > 0;
// for float16/bfloat16 the base pointers and the b/n/h strides of q, k, v, out are 16-byte aligned
// (cp.async and vector stores move 16-byte chunks).
struct ContextAttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* ctx_lens = nullptr;  // (B,) int32 or int64 on the device; nullptr means Nc for every row
  bool ctx_lens_int64 = false;
  int64_t q_stride_b = 0, q_stride_n = 0, q_stride_h = 0;
  int64_t k_stride_b = 0, k_stride_n = 0, k_stride_h = 0;
  int64_t v_stride_b = 0, v_stride_n = 0, v_stride_h = 0;

  void* out = nullptr;  // (B, Nq, Hq, D), q's dtype
  int64_t o_stride_b = 0, o_stride_n = 0, o_stride_h = 0;
  float* lse = nullptr;  // (B, Hq, Nq) contiguous

  int B = 0, Nq = 0, Nc = 0, Hq = 0, Hkv = 0, D = 0;
  float scale = 1.f;
  DType dtype = DType::kFloat32;
};

// Backward: dq, dk_ctx, dv_ctx from grad_out and grad_lse (the LSE is differentiable).
// k, v, dk, dv share the (B, Nc, Hkv, D) shape; q, out, grad_out, dq share (B, Nq, Hq, D).
// dk/dv rows at or beyond ctx_lens[b] are written as zeros. dK/dV are deterministic; for
// float16/bfloat16, dQ is summed over key tiles with float32 atomics into dq_accum (order-dependent in
// the last bits), float32's dQ is deterministic.
struct ContextAttentionBwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;
  const void* grad_out = nullptr;
  const float* lse = nullptr;       // (B, Hq, Nq) contiguous
  const float* grad_lse = nullptr;  // (B, Hq, Nq) contiguous, or nullptr for zeros
  const void* ctx_lens = nullptr;
  bool ctx_lens_int64 = false;
  int64_t q_stride_b = 0, q_stride_n = 0, q_stride_h = 0;
  int64_t k_stride_b = 0, k_stride_n = 0, k_stride_h = 0;
  int64_t v_stride_b = 0, v_stride_n = 0, v_stride_h = 0;
  int64_t o_stride_b = 0, o_stride_n = 0, o_stride_h = 0;
  int64_t do_stride_b = 0, do_stride_n = 0, do_stride_h = 0;

  void* dq = nullptr;  // strides of dq, dk, dv (outputs)
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_stride_b = 0, dq_stride_n = 0, dq_stride_h = 0;
  int64_t dk_stride_b = 0, dk_stride_n = 0, dk_stride_h = 0;
  int64_t dv_stride_b = 0, dv_stride_n = 0, dv_stride_h = 0;

  float* delta = nullptr;     // workspace (B, Hq, Nq) float32: rowsum(dO * O) - dLSE
  float* dq_accum = nullptr;  // workspace (B, Nq, Hq, D) contiguous float32, zeroed (float16/bfloat16)

  int B = 0, Nq = 0, Nc = 0, Hq = 0, Hkv = 0, D = 0;
  float scale = 1.f;
  DType dtype = DType::kFloat32;
};

// Enqueue on `stream`. Launch errors are left for the caller's cudaGetLastError().
void launch_context_attention_fwd(const ContextAttentionParams& params, cudaStream_t stream);
void launch_context_attention_bwd(const ContextAttentionBwdParams& params, cudaStream_t stream);

namespace detail {  // context_attention_generic.cu
void launch_fwd_f32(const ContextAttentionParams& params, cudaStream_t stream);
void launch_bwd_f32(const ContextAttentionBwdParams& params, cudaStream_t stream);
void launch_bwd_delta(const ContextAttentionBwdParams& params, cudaStream_t stream);
}  // namespace detail

}  // namespace latte
