// Cached-context attention: the dtype-generic pieces. The float32 path is a plain SIMT kernel, one
// warp per output row, exact float32 arithmetic (tf32 tensor cores would miss float32's tolerance):
// float32 is the correctness path on CUDA, fp16/bf16 the fast one (context_attention_fwd.cu, _bwd.cu).
// Also the backward's delta = rowsum(dO * O) - dLSE for every dtype.
//
// Lane l holds head-dim elements l, l + 32, ... (at most 8 for D <= 256); a dot product is a warp
// sum. Keys at or past ctx_lens[b] are never read; any strides, no alignment needed.
#include "context_attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace latte {
namespace detail {
namespace {

constexpr int kPerLane = 8;  // 256 / 32
constexpr int kWarps = 8;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ int clamped_len(const void* lens, bool is64, int b, int nc) {
  if (lens == nullptr) return nc;
  const long long n = is64 ? static_cast<const long long*>(lens)[b] : static_cast<const int*>(lens)[b];
  return n < 0 ? 0 : (n > nc ? nc : static_cast<int>(n));
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ void load_row(float (&x)[kPerLane], const float* src, int D, int lane) {
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) x[t] = lane + 32 * t < D ? src[lane + 32 * t] : 0.f;
}

__device__ __forceinline__ float dot_row(const float (&x)[kPerLane], const float* src, int D, int lane) {
  float s = 0.f;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) s += lane + 32 * t < D ? x[t] * src[lane + 32 * t] : 0.f;
  return warp_sum(s);
}

// One warp per (b, h, i) row: online softmax over the row's valid keys.
__global__ void __launch_bounds__(32 * kWarps) fwd_f32_kernel(const ContextAttentionParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= static_cast<int64_t>(p.B) * p.Hq * p.Nq) return;
  const int lane = threadIdx.x & 31;
  const int i = static_cast<int>(row % p.Nq), h = static_cast<int>((row / p.Nq) % p.Hq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.Nq) * p.Hq)), hk = h / (p.Hq / p.Hkv);
  const int len = clamped_len(p.ctx_lens, p.ctx_lens_int64, b, p.Nc);
  const float* k = static_cast<const float*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const float* v = static_cast<const float*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  float q[kPerLane], o[kPerLane];
  load_row(q, static_cast<const float*>(p.q) + b * p.q_stride_b + i * p.q_stride_n + h * p.q_stride_h, p.D, lane);
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) o[t] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int j = 0; j < len; ++j) {
    const float s = p.scale * dot_row(q, k + j * p.k_stride_n, p.D, lane);
    const float m_new = fmaxf(m, s);
    const float base = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = expf(m - base), e = expf(s - base);
    l = l * alpha + e;
    m = m_new;
    const float* vr = v + j * p.v_stride_n;
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) o[t] = o[t] * alpha + (lane + 32 * t < p.D ? e * vr[lane + 32 * t] : 0.f);
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  float* out = static_cast<float*>(p.out) + b * p.o_stride_b + i * p.o_stride_n + h * p.o_stride_h;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    if (lane + 32 * t < p.D) out[lane + 32 * t] = o[t] * inv;
  }
  if (lane == 0) p.lse[row] = l > 0.f ? m + logf(l) : -INFINITY;
}

// dQ: one warp per query row. p = exp(scale s - lse), dS = p (dP - delta), dq = scale sum_j dS k_j.
__global__ void __launch_bounds__(32 * kWarps) bwd_dq_f32_kernel(const ContextAttentionBwdParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= static_cast<int64_t>(p.B) * p.Hq * p.Nq) return;
  const int lane = threadIdx.x & 31;
  const int i = static_cast<int>(row % p.Nq), h = static_cast<int>((row / p.Nq) % p.Hq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.Nq) * p.Hq)), hk = h / (p.Hq / p.Hkv);
  const int len = clamped_len(p.ctx_lens, p.ctx_lens_int64, b, p.Nc);
  const float lse = p.lse[row], delta = p.delta[row];
  const float* k = static_cast<const float*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const float* v = static_cast<const float*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  float q[kPerLane], g[kPerLane], dq[kPerLane];
  load_row(q, static_cast<const float*>(p.q) + b * p.q_stride_b + i * p.q_stride_n + h * p.q_stride_h, p.D, lane);
  load_row(g, static_cast<const float*>(p.grad_out) + b * p.do_stride_b + i * p.do_stride_n + h * p.do_stride_h,
           p.D, lane);
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) dq[t] = 0.f;
  if (lse > -INFINITY && lse < INFINITY) {
    for (int j = 0; j < len; ++j) {
      const float* kr = k + j * p.k_stride_n;
      const float pr = expf(p.scale * dot_row(q, kr, p.D, lane) - lse);
      const float ds = pr * (dot_row(g, v + j * p.v_stride_n, p.D, lane) - delta);
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) dq[t] += lane + 32 * t < p.D ? ds * kr[lane + 32 * t] : 0.f;
    }
  }
  float* out = static_cast<float*>(p.dq) + b * p.dq_stride_b + i * p.dq_stride_n + h * p.dq_stride_h;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    if (lane + 32 * t < p.D) out[lane + 32 * t] = p.scale * dq[t];
  }
}

// dK, dV: one warp per (b, key j, kv head), summing over the group's query heads and all queries.
__global__ void __launch_bounds__(32 * kWarps) bwd_dkdv_f32_kernel(const ContextAttentionBwdParams p) {
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (task >= static_cast<int64_t>(p.B) * p.Nc * p.Hkv) return;
  const int lane = threadIdx.x & 31;
  const int hk = static_cast<int>(task % p.Hkv), j = static_cast<int>((task / p.Hkv) % p.Nc);
  const int b = static_cast<int>(task / (static_cast<int64_t>(p.Hkv) * p.Nc)), group = p.Hq / p.Hkv;
  const int len = clamped_len(p.ctx_lens, p.ctx_lens_int64, b, p.Nc);
  float kr[kPerLane], vr[kPerLane], dk[kPerLane], dv[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) dk[t] = dv[t] = 0.f;
  if (j < len) {
    load_row(kr, static_cast<const float*>(p.k) + b * p.k_stride_b + j * p.k_stride_n + hk * p.k_stride_h, p.D, lane);
    load_row(vr, static_cast<const float*>(p.v) + b * p.v_stride_b + j * p.v_stride_n + hk * p.v_stride_h, p.D, lane);
    for (int h = hk * group; h < (hk + 1) * group; ++h) {
      for (int i = 0; i < p.Nq; ++i) {
        const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq + i;
        const float lse = p.lse[row];
        if (!(lse > -INFINITY && lse < INFINITY)) continue;
        const float* qr = static_cast<const float*>(p.q) + b * p.q_stride_b + i * p.q_stride_n + h * p.q_stride_h;
        const float* gr =
            static_cast<const float*>(p.grad_out) + b * p.do_stride_b + i * p.do_stride_n + h * p.do_stride_h;
        const float pr = expf(p.scale * dot_row(kr, qr, p.D, lane) - lse);
        const float ds = pr * (dot_row(vr, gr, p.D, lane) - p.delta[row]);
#pragma unroll
        for (int t = 0; t < kPerLane; ++t) {
          if (lane + 32 * t < p.D) {
            dv[t] += pr * gr[lane + 32 * t];
            dk[t] += ds * qr[lane + 32 * t];
          }
        }
      }
    }
  }
  float* dko = static_cast<float*>(p.dk) + b * p.dk_stride_b + j * p.dk_stride_n + hk * p.dk_stride_h;
  float* dvo = static_cast<float*>(p.dv) + b * p.dv_stride_b + j * p.dv_stride_n + hk * p.dv_stride_h;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    if (lane + 32 * t < p.D) {
      dko[lane + 32 * t] = p.scale * dk[t];
      dvo[lane + 32 * t] = dv[t];
    }
  }
}

// delta[b, h, i] = sum_d dO * O - dLSE: one warp per row, any dtype.
template <typename T>
__global__ void __launch_bounds__(32 * kWarps) delta_kernel(const ContextAttentionBwdParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= static_cast<int64_t>(p.B) * p.Hq * p.Nq) return;
  const int lane = threadIdx.x & 31;
  const int i = static_cast<int>(row % p.Nq), h = static_cast<int>((row / p.Nq) % p.Hq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.Nq) * p.Hq));
  const T* o = static_cast<const T*>(p.out) + b * p.o_stride_b + i * p.o_stride_n + h * p.o_stride_h;
  const T* g = static_cast<const T*>(p.grad_out) + b * p.do_stride_b + i * p.do_stride_n + h * p.do_stride_h;
  float sum = 0.f;
  for (int d = lane; d < p.D; d += 32) sum += to_f(o[d]) * to_f(g[d]);
  sum = warp_sum(sum);
  if (lane == 0) p.delta[row] = sum - (p.grad_lse ? p.grad_lse[row] : 0.f);
}

unsigned blocks_for(int64_t warps) { return static_cast<unsigned>((warps + kWarps - 1) / kWarps); }

}  // namespace

void launch_bwd_delta(const ContextAttentionBwdParams& p, cudaStream_t stream) {
  const unsigned blocks = blocks_for(static_cast<int64_t>(p.B) * p.Hq * p.Nq);
  switch (p.dtype) {
    case DType::kFloat32: delta_kernel<float><<<blocks, 32 * kWarps, 0, stream>>>(p); break;
    case DType::kFloat16: delta_kernel<__half><<<blocks, 32 * kWarps, 0, stream>>>(p); break;
    case DType::kBFloat16: delta_kernel<__nv_bfloat16><<<blocks, 32 * kWarps, 0, stream>>>(p); break;
  }
}

void launch_fwd_f32(const ContextAttentionParams& p, cudaStream_t stream) {
  fwd_f32_kernel<<<blocks_for(static_cast<int64_t>(p.B) * p.Hq * p.Nq), 32 * kWarps, 0, stream>>>(p);
}

void launch_bwd_f32(const ContextAttentionBwdParams& p, cudaStream_t stream) {
  launch_bwd_delta(p, stream);
  bwd_dq_f32_kernel<<<blocks_for(static_cast<int64_t>(p.B) * p.Hq * p.Nq), 32 * kWarps, 0, stream>>>(p);
  bwd_dkdv_f32_kernel<<<blocks_for(static_cast<int64_t>(p.B) * p.Nc * p.Hkv), 32 * kWarps, 0, stream>>>(p);
}

}  // namespace detail
}  // namespace latte
