// Cached-context attention backward (SPEC 2.4) on CuTe, FlashAttention-2 style, fp16/bf16.
//
// Three launches:
//   1. delta = rowsum(dO * O) - dLSE per query row (the LSE's own gradient enters here: with
//      lse = log sum_j exp(s_j), d lse / d s_j = p_j, so dS = P * (dP - delta) covers both outputs);
//   2. one CTA per (kBlockN keys, kv head, batch row) that keeps K, V and the dK, dV accumulators on
//      chip and walks every packed GQA query row of its group in tiles of kBlockM (Q, dO, lse,
//      delta through kStages cp.async buffers): S = Q K^T and dP = dO V^T recomputed, P and dS in
//      registers and once through shared memory, dV += P^T dO, dK += dS^T Q, and dQ = dS K added
//      with float32 atomics to a zeroed (B, Nq, Hq, D) accumulator;
//   3. dq = scale * accumulator, rounded to the input dtype.
// Determinism: dK and dV are summed by exactly one CTA in a fixed order (bitwise reproducible). dQ
// sums the contributions of the ctx_lens[b] / kBlockN key tiles in the order the atomics land, so
// it can differ in the last bits from run to run (as FlashAttention-2's dQ does); the sum itself is
// float32 before the one rounding to fp16/bf16.
// Key tiles at or past ctx_lens[b] load nothing and write zero dK/dV; the partial key tile is
// zero-filled past the length and its probabilities masked to 0, so padded slots never contribute.
#include "context_attention.cuh"
#include "context_attention_tile.cuh"

namespace latte {
namespace cute_attn {

// dq = scale * dq_accum in q's dtype; dq_accum is (B, Nq, Hq, D) contiguous float32.
template <typename T>
__global__ void __launch_bounds__(256) bwd_convert_dq_kernel(const ContextAttentionBwdParams p) {
  const int64_t n = static_cast<int64_t>(p.B) * p.Nq * p.Hq * p.D;
  for (int64_t e = blockIdx.x * 256ll + threadIdx.x; e < n; e += 256ll * gridDim.x) {
    const int d = static_cast<int>(e % p.D);
    const int64_t rest = e / p.D;
    const int h = static_cast<int>(rest % p.Hq), i = static_cast<int>((rest / p.Hq) % p.Nq);
    const int b = static_cast<int>(rest / (static_cast<int64_t>(p.Hq) * p.Nq));
    static_cast<T*>(p.dq)[b * p.dq_stride_b + i * p.dq_stride_n + h * p.dq_stride_h + d] =
        static_cast<T>(p.scale * p.dq_accum[e]);
  }
}

// lse (raw, natural log) and delta of a tile of packed rows into shared memory with 4-byte cp.async;
// rows past the end get lse = +inf (probability 0) and delta = 0.
template <int kBlockM>
__device__ __forceinline__ void load_row_stats(const ContextAttentionBwdParams& p, const GqaPack& pack, int b, int hk,
                                               int row0, int rows, float* lse_s, float* delta_s) {
  for (int r = threadIdx.x; r < kBlockM; r += blockDim.x) {
    const int R = row0 + r;
    if (R < rows) {
      const int64_t idx = (static_cast<int64_t>(b) * p.Hq + pack.head(hk, R)) * p.Nq + pack.query(R);
      SM80_CP_ASYNC_CACHEALWAYS<float>::copy(p.lse[idx], lse_s[r]);
      SM80_CP_ASYNC_CACHEALWAYS<float>::copy(p.delta[idx], delta_s[r]);
    } else {
      lse_s[r] = INFINITY;
      delta_s[r] = 0.f;
    }
  }
}

template <typename Tr>
__global__ void __launch_bounds__(Tr::kNThreads) bwd_dkdv_kernel(const ContextAttentionBwdParams p) {
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim, kStages = Tr::kStages;
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x, n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const GqaPack pack{p.Hq / p.Hkv};
  const int rows = pack.rows(p.Nq);
  const int len = clamped_len(p.ctx_lens, p.ctx_lens_int64, b, p.Nc);
  const int k0 = n_block * kBlockN, valid_keys = len - k0;
  const float scale_log2 = p.scale * kLog2e;

  Element* dk = static_cast<Element*>(p.dk) + b * p.dk_stride_b + hk * p.dk_stride_h;
  Element* dv = static_cast<Element*>(p.dv) + b * p.dv_stride_b + hk * p.dv_stride_h;
  if (valid_keys <= 0) {  // keys that do not exist: zero gradients, nothing read
    const int nrows = min(kBlockN, p.Nc - k0);
    for (int e = tid; e < nrows * p.D; e += Tr::kNThreads) {
      const int r = e / p.D, c = e % p.D;
      dk[(k0 + r) * p.dk_stride_n + c] = Element(0.f);
      dv[(k0 + r) * p.dv_stride_n + c] = Element(0.f);
    }
    return;
  }

  Element* base = reinterpret_cast<Element*>(smem);
  Tensor sQ = make_tensor(make_smem_ptr(base), typename Tr::SmemLayoutQdO{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Tr::SmemLayoutQdO{});
  Tensor sK = make_tensor(sdO.data() + size(sdO), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Tr::SmemLayoutKV{});
  Tensor sP = make_tensor(sV.data() + size(sV), typename Tr::SmemLayoutPdS{});
  Tensor sdS = make_tensor(sP.data() + size(sP), typename Tr::SmemLayoutPdS{});
  float* lse_s = reinterpret_cast<float*>(smem + sizeof(Element) * (2 * Tr::kQdOElems + 2 * kBlockN * kHeadDim +
                                                                    2 * kBlockM * kBlockN));
  float* delta_s = lse_s + kStages * kBlockM;
  Tensor sQt = make_tensor(sQ.data(), typename Tr::SmemLayoutQdOt{});
  Tensor sdOt = make_tensor(sdO.data(), typename Tr::SmemLayoutQdOt{});
  Tensor sKt = make_tensor(sK.data(), typename Tr::SmemLayoutKt{});
  Tensor sPt = make_tensor(sP.data(), typename Tr::SmemLayoutPdSt{});
  Tensor sdSt = make_tensor(sdS.data(), typename Tr::SmemLayoutPdSt{});

  // Global -> shared
  const Element* q = static_cast<const Element*>(p.q) + b * p.q_stride_b;
  const Element* g = static_cast<const Element*>(p.grad_out) + b * p.do_stride_b;
  auto q_row = [&](int r) { return q + pack.query(r) * p.q_stride_n + pack.head(hk, r) * p.q_stride_h; };
  auto do_row = [&](int r) { return g + pack.query(r) * p.do_stride_n + pack.head(hk, r) * p.do_stride_h; };
  Tensor mK = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h),
                          make_shape(p.Nc, Int<kHeadDim>{}), make_stride(p.k_stride_n, _1{}));
  Tensor mV = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h),
                          make_shape(p.Nc, Int<kHeadDim>{}), make_stride(p.v_stride_n, _1{}));
  Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  typename Tr::GmemCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tdOsdO = gmem_thr.partition_D(sdO);
  Tensor tQc = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKVc = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  auto load_q_tile = [&](int m, int stage) {
    copy_packed_rows(gmem_copy, tQsQ(_, _, _, stage), tQc, m * kBlockM, rows, p.D, q_row);
    copy_packed_rows(gmem_copy, tdOsdO(_, _, _, stage), tQc, m * kBlockM, rows, p.D, do_row);
    load_row_stats<kBlockM>(p, pack, b, hk, m * kBlockM, rows, lse_s + stage * kBlockM, delta_s + stage * kBlockM);
  };

  copy_rows(gmem_copy, gmem_thr.partition_S(gK), gmem_thr.partition_D(sK), tKVc, valid_keys, p.D);
  copy_rows(gmem_copy, gmem_thr.partition_S(gV), gmem_thr.partition_D(sV), tKVc, valid_keys, p.D);
  load_q_tile(0, 0);
  cp_async_fence();

  // S = Q K^T, dP = dO V^T: (query, key)
  typename Tr::TiledMmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  Tensor tSrQ = thr_sdp.partition_fragment_A(sQ(_, _, 0));
  Tensor tSrK = thr_sdp.partition_fragment_B(sK);
  Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO(_, _, 0));
  Tensor tdPrV = thr_sdp.partition_fragment_B(sV);
  auto copy_sdp_a = make_tiled_copy_A(typename Tr::CopyN{}, mma_sdp);
  auto thr_sdp_a = copy_sdp_a.get_thread_slice(tid);
  auto copy_sdp_b = make_tiled_copy_B(typename Tr::CopyN{}, mma_sdp);
  auto thr_sdp_b = copy_sdp_b.get_thread_slice(tid);
  Tensor tSsQ = thr_sdp_a.partition_S(sQ);
  Tensor tdPsdO = thr_sdp_a.partition_S(sdO);
  Tensor tSsK = thr_sdp_b.partition_S(sK);
  Tensor tdPsV = thr_sdp_b.partition_S(sV);
  Tensor cS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cS_rc = make_tensor(cS.data(), rowcol(cS.layout()));
  auto copy_pds = make_tiled_copy_C(typename Tr::CopyC{}, mma_sdp);
  auto thr_pds = copy_pds.get_thread_slice(tid);
  Tensor tPsP = thr_pds.partition_D(sP);
  Tensor tdSsdS = thr_pds.partition_D(sdS);

  // dV += P^T dO, dK += dS^T Q: (key, d)
  typename Tr::TiledMmadKV mma_dkv;
  auto thr_dkv = mma_dkv.get_thread_slice(tid);
  Tensor tdVrPt = thr_dkv.partition_fragment_A(sPt);
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt(_, _, 0));
  Tensor tdKrdSt = thr_dkv.partition_fragment_A(sdSt);
  Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt(_, _, 0));
  auto copy_dkv_a = make_tiled_copy_A(typename Tr::CopyT{}, mma_dkv);
  auto thr_dkv_a = copy_dkv_a.get_thread_slice(tid);
  auto copy_dkv_b = make_tiled_copy_B(typename Tr::CopyT{}, mma_dkv);
  auto thr_dkv_b = copy_dkv_b.get_thread_slice(tid);
  Tensor tdVsPt = thr_dkv_a.partition_S(sPt);
  Tensor tdKsdSt = thr_dkv_a.partition_S(sdSt);
  Tensor tdVsdOt = thr_dkv_b.partition_S(sdOt);
  Tensor tdKsQt = thr_dkv_b.partition_S(sQt);
  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);

  // dQ = dS K: (query, d)
  typename Tr::TiledMmadQ mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(tid);
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);
  Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);
  auto copy_dq_a = make_tiled_copy_A(typename Tr::CopyN{}, mma_dq);
  auto thr_dq_a = copy_dq_a.get_thread_slice(tid);
  auto copy_dq_b = make_tiled_copy_B(typename Tr::CopyT{}, mma_dq);
  auto thr_dq_b = copy_dq_b.get_thread_slice(tid);
  Tensor tdQsdS = thr_dq_a.partition_S(sdS);
  Tensor tdQsKt = thr_dq_b.partition_S(sKt);
  Tensor cdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));

  const int m_blocks = (rows + kBlockM - 1) / kBlockM;
  for (int m = 0; m < m_blocks; ++m) {
    const int stage = m % kStages, row0 = m * kBlockM;
    cp_async_wait<0>();
    __syncthreads();  // tile m is visible; every thread is done with tile m - 1 (and with sP, sdS)
    if (kStages > 1 && m + 1 < m_blocks) {
      load_q_tile(m + 1, (m + 1) % kStages);
      cp_async_fence();
    }

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_ss(mma_sdp, acc_s, tSrQ, tSrK, tSsQ(_, _, _, stage), tSsK, copy_sdp_a, copy_sdp_b, thr_sdp_a, thr_sdp_b);
    gemm_ss(mma_sdp, acc_dp, tdPrdO, tdPrV, tdPsdO(_, _, _, stage), tdPsV, copy_sdp_a, copy_sdp_b, thr_sdp_a,
            thr_sdp_b);

    // P = exp(scale s - lse) on valid keys (0 elsewhere), dS = P (dP - delta); in place.
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    Tensor dp_rc = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
    const float* lse_t = lse_s + stage * kBlockM;
    const float* delta_t = delta_s + stage * kBlockM;
    CUTE_UNROLL
    for (int i = 0; i < size<0>(s_rc); ++i) {
      const int r = get<0>(cS_rc(i, 0));
      const float lse2 = lse_t[r] * kLog2e, delta = delta_t[r];
      const bool live = lse2 > -INFINITY;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s_rc); ++j) {
        const float pr = live && get<1>(cS_rc(i, j)) < valid_keys ? exp2f(s_rc(i, j) * scale_log2 - lse2) : 0.f;
        s_rc(i, j) = pr;
        dp_rc(i, j) = pr * (dp_rc(i, j) - delta);
      }
    }
    Tensor rP = to_element<Element>(acc_s);
    Tensor rdS = to_element<Element>(acc_dp);
    copy(copy_pds, thr_pds.retile_S(rP), tPsP);
    copy(copy_pds, thr_pds.retile_S(rdS), tdSsdS);
    __syncthreads();  // P and dS are visible

    gemm_ss(mma_dkv, acc_dv, tdVrPt, tdVrdOt, tdVsPt, tdVsdOt(_, _, _, stage), copy_dkv_a, copy_dkv_b, thr_dkv_a,
            thr_dkv_b);
    gemm_ss(mma_dkv, acc_dk, tdKrdSt, tdKrQt, tdKsdSt, tdKsQt(_, _, _, stage), copy_dkv_a, copy_dkv_b, thr_dkv_a,
            thr_dkv_b);

    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    clear(acc_dq);
    gemm_ss(mma_dq, acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, copy_dq_a, copy_dq_b, thr_dq_a, thr_dq_b);
    CUTE_UNROLL
    for (int e = 0; e < size(acc_dq); ++e) {
      const int R = row0 + get<0>(cdQ(e)), d = get<1>(cdQ(e));
      if (R < rows && d < p.D) {
        const int64_t at = ((static_cast<int64_t>(b) * p.Nq + pack.query(R)) * p.Hq + pack.head(hk, R)) * p.D + d;
        atomicAdd(p.dq_accum + at, acc_dq(e));
      }
    }

    if (kStages == 1 && m + 1 < m_blocks) {
      __syncthreads();  // single buffer: everyone is done with tile m before it is overwritten
      load_q_tile(m + 1, 0);
      cp_async_fence();
    }
  }

  // dK = scale * dS^T Q, dV = P^T dO; rows past the length are exactly 0 (their P and dS are 0).
  Tensor cKV = thr_dkv.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  const int nrows = min(kBlockN, p.Nc - k0);
  CUTE_UNROLL
  for (int e = 0; e < size(acc_dk); ++e) {
    const int r = get<0>(cKV(e)), d = get<1>(cKV(e));
    if (r < nrows && d < p.D) {
      dk[(k0 + r) * p.dk_stride_n + d] = static_cast<Element>(p.scale * acc_dk(e));
      dv[(k0 + r) * p.dv_stride_n + d] = static_cast<Element>(acc_dv(e));
    }
  }
}

template <typename Tr>
void run_bwd(const ContextAttentionBwdParams& p, cudaStream_t stream) {
  auto kernel = bwd_dkdv_kernel<Tr>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  const dim3 grid((p.Nc + Tr::kBlockN - 1) / Tr::kBlockN, p.Hkv, p.B);
  kernel<<<grid, Tr::kNThreads, Tr::kSmemBytes, stream>>>(p);
}

template <typename Element>
void bwd_by_head_dim(const ContextAttentionBwdParams& p, cudaStream_t stream) {
  detail::launch_bwd_delta(p, stream);
  if (p.D <= 64) run_bwd<typename BwdConfig<Element, 64>::type>(p, stream);
  else if (p.D <= 128) run_bwd<typename BwdConfig<Element, 128>::type>(p, stream);
  else run_bwd<typename BwdConfig<Element, 256>::type>(p, stream);
  const int64_t n = static_cast<int64_t>(p.B) * p.Hq * p.Nq * p.D;
  const unsigned blocks = static_cast<unsigned>(n / 256 + 1 < 65536 ? n / 256 + 1 : 65536);
  bwd_convert_dq_kernel<Element><<<blocks, 256, 0, stream>>>(p);
}

// Every backward tile configuration, instantiated explicitly (CI compile-checks each one).
template void run_bwd<BwdConfig<cutlass::half_t, 64>::type>(const ContextAttentionBwdParams&, cudaStream_t);
template void run_bwd<BwdConfig<cutlass::half_t, 128>::type>(const ContextAttentionBwdParams&, cudaStream_t);
template void run_bwd<BwdConfig<cutlass::half_t, 256>::type>(const ContextAttentionBwdParams&, cudaStream_t);
template void run_bwd<BwdConfig<cutlass::bfloat16_t, 64>::type>(const ContextAttentionBwdParams&, cudaStream_t);
template void run_bwd<BwdConfig<cutlass::bfloat16_t, 128>::type>(const ContextAttentionBwdParams&, cudaStream_t);
template void run_bwd<BwdConfig<cutlass::bfloat16_t, 256>::type>(const ContextAttentionBwdParams&, cudaStream_t);

}  // namespace cute_attn

void launch_context_attention_bwd(const ContextAttentionBwdParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: detail::launch_bwd_f32(p, stream); break;
    case DType::kFloat16: cute_attn::bwd_by_head_dim<cutlass::half_t>(p, stream); break;
    case DType::kBFloat16: cute_attn::bwd_by_head_dim<cutlass::bfloat16_t>(p, stream); break;
  }
}

}  // namespace latte
