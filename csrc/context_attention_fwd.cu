// Cached-context attention forward (SPEC 2.4) on CuTe, FlashAttention-2 style, fp16/bf16.
//
// One CTA per (kBlockM packed GQA query rows, kv head, batch row). Q goes to shared memory once;
// K/V tiles of the row's valid keys stream through kStages cp.async buffers (tile n + 1 loads while
// tile n is computed; one barrier per tile). Per tile: S = Q K^T (ldmatrix + mma.sync m16n8k16,
// float32 accumulators), the online softmax on the accumulator fragment through its (row, col) view
// (row max and sum over the 4 lanes of a quad), O rescaled in registers, then O += P V with P
// converted in registers into the A operand. One write of O (through shared memory, 16-byte stores)
// and of the LSE at the end.
//
// Varlen: tiles at or past ctx_lens[b] are never loaded; the last partial tile is zero-filled past
// the length (padded slots, NaN included, are never read) and its scores masked to -inf; a row with
// no keys writes O = 0 and lse = -inf without loading anything. head_dim D is padded to the traits'
// kHeadDim (64, 128, 256): columns >= D are zero-filled and never stored.
#include "context_attention.cuh"
#include "context_attention_tile.cuh"

namespace latte {
namespace cute_attn {

template <typename Tr>
__global__ void __launch_bounds__(Tr::kNThreads) fwd_kernel(const ContextAttentionParams p) {
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim, kStages = Tr::kStages;
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x, m_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const GqaPack pack{p.Hq / p.Hkv};
  const int rows = pack.rows(p.Nq), row0 = m_block * kBlockM;
  const int len = clamped_len(p.ctx_lens, p.ctx_lens_int64, b, p.Nc);
  const float scale_log2 = p.scale * kLog2e;

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Tr::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Tr::SmemLayoutVt{});

  const Element* q = static_cast<const Element*>(p.q) + b * p.q_stride_b;
  auto q_row = [&](int r) { return q + pack.query(r) * p.q_stride_n + pack.head(hk, r) * p.q_stride_h; };
  Tensor mK = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h),
                          make_shape(p.Nc, Int<kHeadDim>{}), make_stride(p.k_stride_n, _1{}));
  Tensor mV = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h),
                          make_shape(p.Nc, Int<kHeadDim>{}), make_stride(p.v_stride_n, _1{}));
  Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));  // (N, D, n_block)
  Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));

  typename Tr::GmemCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKgK = gmem_thr.partition_S(gK);
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tVsV = gmem_thr.partition_D(sV);
  Tensor tKVc = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK(_, _, 0));
  Tensor tOrVt = thr_mma.partition_fragment_B(sVt(_, _, 0));
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cS_rc = make_tensor(cS.data(), rowcol(cS.layout()));
  Tensor o_rc = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
  constexpr int kRows = decltype(size<0>(o_rc))::value;  // accumulator rows this thread holds

  auto copy_q = make_tiled_copy_A(typename Tr::CopyQK{}, mma);
  auto thr_copy_q = copy_q.get_thread_slice(tid);
  Tensor tSsQ = thr_copy_q.partition_S(sQ);
  auto copy_k = make_tiled_copy_B(typename Tr::CopyQK{}, mma);
  auto thr_copy_k = copy_k.get_thread_slice(tid);
  Tensor tSsK = thr_copy_k.partition_S(sK);
  auto copy_v = make_tiled_copy_B(typename Tr::CopyVt{}, mma);
  auto thr_copy_v = copy_v.get_thread_slice(tid);
  Tensor tOsVt = thr_copy_v.partition_S(sVt);

  float row_max[kRows], row_sum[kRows];
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }
  clear(acc_o);

  const int n_blocks = (len + kBlockN - 1) / kBlockN;
  if (n_blocks > 0) {
    copy_packed_rows(gmem_copy, tQsQ, tQcQ, row0, rows, p.D, q_row);
    copy_rows(gmem_copy, tKgK(_, _, _, 0), tKsK(_, _, _, 0), tKVc, len, p.D);
    copy_rows(gmem_copy, tVgV(_, _, _, 0), tVsV(_, _, _, 0), tKVc, len, p.D);
    cp_async_fence();
  }

  for (int n = 0; n < n_blocks; ++n) {
    const int stage = n % kStages;
    cp_async_wait<0>();
    __syncthreads();  // tile n is visible to every thread, and every thread is done with tile n - 1
    if (kStages > 1 && n + 1 < n_blocks) {
      const int next = (n + 1) % kStages, k0 = (n + 1) * kBlockN;
      copy_rows(gmem_copy, tKgK(_, _, _, n + 1), tKsK(_, _, _, next), tKVc, len - k0, p.D);
      copy_rows(gmem_copy, tVgV(_, _, _, n + 1), tVsV(_, _, _, next), tKVc, len - k0, p.D);
      cp_async_fence();
    }

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss(mma, acc_s, tSrQ, tSrK, tSsQ, tSsK(_, _, _, stage), copy_q, copy_k, thr_copy_q, thr_copy_k);

    // Online softmax on the fragment, in log2 units: s' = scale * log2(e) * s.
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    static_assert(decltype(size<0>(s_rc))::value == kRows, "S and O views share their rows");
    CUTE_UNROLL
    for (int e = 0; e < size(acc_s); ++e) acc_s(e) *= scale_log2;  // any sign of scale
    const int valid = len - n * kBlockN;
    if (valid < kBlockN) {  // the partial last tile: keys at or past the length do not exist
      CUTE_UNROLL
      for (int i = 0; i < kRows; ++i) {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s_rc); ++j) {
          if (get<1>(cS_rc(i, j)) >= valid) s_rc(i, j) = -INFINITY;
        }
      }
    }
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      float mx = row_max[i];
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s_rc); ++j) mx = fmaxf(mx, s_rc(i, j));
      mx = quad_max(mx);
      const float base = mx == -INFINITY ? 0.f : mx;  // no finite score yet: keep exp2 away from NaN
      const float alpha = exp2f(row_max[i] - base);
      row_max[i] = mx;
      float sum = 0.f;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s_rc); ++j) {
        const float e = exp2f(s_rc(i, j) - base);
        s_rc(i, j) = e;
        sum += e;
      }
      row_sum[i] = row_sum[i] * alpha + sum;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(o_rc); ++j) o_rc(i, j) *= alpha;
    }

    Tensor rP = to_element<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_as_a(rP.layout()));
    gemm_rs(mma, acc_o, tOrP, tOrVt, tOsVt(_, _, _, stage), copy_v, thr_copy_v);

    if (kStages == 1 && n + 1 < n_blocks) {
      __syncthreads();  // single buffer: everyone is done with tile n before it is overwritten
      const int k0 = (n + 1) * kBlockN;
      copy_rows(gmem_copy, tKgK(_, _, _, n + 1), tKsK(_, _, _, 0), tKVc, len - k0, p.D);
      copy_rows(gmem_copy, tVgV(_, _, _, n + 1), tVsV(_, _, _, 0), tKVc, len - k0, p.D);
      cp_async_fence();
    }
  }

  // Epilogue: O / l and lse = ln 2 * (m + log2 l); a row with no key gives 0 and -inf.
  float* lse = p.lse + (static_cast<int64_t>(b) * p.Hq) * p.Nq;
  const bool quad_leader = (tid & 3) == 0;
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    const float l = quad_sum(row_sum[i]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(o_rc); ++j) o_rc(i, j) *= inv;
    const int r = row0 + get<0>(cS_rc(i, 0));
    if (quad_leader && r < rows) {
      lse[static_cast<int64_t>(pack.head(hk, r)) * p.Nq + pack.query(r)] =
          l > 0.f ? (row_max[i] + log2f(l)) * kLn2 : -INFINITY;
    }
  }

  Tensor rO = to_element<Element>(acc_o);
  Tensor sO = make_tensor(sQ.data(), typename Tr::SmemLayoutQ{});
  auto copy_o = make_tiled_copy_C(typename Tr::CopyO{}, mma);
  auto thr_copy_o = copy_o.get_thread_slice(tid);
  __syncthreads();  // every warp is done reading sQ
  copy(copy_o, thr_copy_o.retile_S(rO), thr_copy_o.partition_D(sO));
  __syncthreads();

  typename Tr::GmemStore gmem_store;
  auto store_thr = gmem_store.get_thread_slice(tid);
  Tensor tOsO = store_thr.partition_S(sO);
  Tensor tOrO = make_fragment_like(tOsO);
  Tensor tOcO = store_thr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  copy(gmem_store, tOsO, tOrO);
  Element* out = static_cast<Element*>(p.out) + b * p.o_stride_b;
  auto out_row = [&](int r) { return out + pack.query(r) * p.o_stride_n + pack.head(hk, r) * p.o_stride_h; };
  store_packed_rows(gmem_store, tOrO, tOcO, row0, rows, p.D, out_row);
}

template <typename Tr>
void run_fwd(const ContextAttentionParams& p, cudaStream_t stream) {
  auto kernel = fwd_kernel<Tr>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  const int rows = p.Nq * (p.Hq / p.Hkv);
  const dim3 grid((rows + Tr::kBlockM - 1) / Tr::kBlockM, p.Hkv, p.B);
  kernel<<<grid, Tr::kNThreads, Tr::kSmemBytes, stream>>>(p);
}

template <typename Element>
void fwd_by_head_dim(const ContextAttentionParams& p, cudaStream_t stream) {
  if (p.D <= 64) run_fwd<typename FwdConfig<Element, 64>::type>(p, stream);
  else if (p.D <= 128) run_fwd<typename FwdConfig<Element, 128>::type>(p, stream);
  else run_fwd<typename FwdConfig<Element, 256>::type>(p, stream);
}

// Every forward tile configuration, instantiated explicitly (CI compile-checks each one).
template void run_fwd<FwdConfig<cutlass::half_t, 64>::type>(const ContextAttentionParams&, cudaStream_t);
template void run_fwd<FwdConfig<cutlass::half_t, 128>::type>(const ContextAttentionParams&, cudaStream_t);
template void run_fwd<FwdConfig<cutlass::half_t, 256>::type>(const ContextAttentionParams&, cudaStream_t);
template void run_fwd<FwdConfig<cutlass::bfloat16_t, 64>::type>(const ContextAttentionParams&, cudaStream_t);
template void run_fwd<FwdConfig<cutlass::bfloat16_t, 128>::type>(const ContextAttentionParams&, cudaStream_t);
template void run_fwd<FwdConfig<cutlass::bfloat16_t, 256>::type>(const ContextAttentionParams&, cudaStream_t);

}  // namespace cute_attn

void launch_context_attention_fwd(const ContextAttentionParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: detail::launch_fwd_f32(p, stream); break;
    case DType::kFloat16: cute_attn::fwd_by_head_dim<cutlass::half_t>(p, stream); break;
    case DType::kBFloat16: cute_attn::fwd_by_head_dim<cutlass::bfloat16_t>(p, stream); break;
  }
}

}  // namespace latte
