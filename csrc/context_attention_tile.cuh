// Device helpers the CuTe kernels of cached-context attention share: predicated tile copies (rows
// past the valid length and head-dim columns past D are zero-filled, never read), the two shared-
// memory GEMM loops, and small conversions. Only included by the .cu files.
#pragma once

#include "context_attention_traits.cuh"

namespace latte {
namespace cute_attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ int clamped_len(const void* lens, bool is64, int b, int nc) {
  if (lens == nullptr) return nc;
  const long long n = is64 ? static_cast<const long long*>(lens)[b] : static_cast<const int*>(lens)[b];
  return n < 0 ? 0 : (n > nc ? nc : static_cast<int>(n));
}

// Rows [0, valid_rows) x columns [0, d) of a strided global tile into shared memory with cp.async;
// every other 16-byte chunk of the shared tile is cleared. tS/tD/tC: the thread's partition of the
// global tile, the shared tile and an identity tensor, (CPY, CPY_M, CPY_K).
template <typename TiledCopy, typename TS, typename TD, typename TC>
__device__ __forceinline__ void copy_rows(const TiledCopy& tiled_copy, const TS& tS, TD&& tD, const TC& tC,
                                          int valid_rows, int d) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tD); ++m) {
    const bool row_ok = get<0>(tC(0, m, 0)) < valid_rows;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tD); ++k) {
      if (row_ok && get<1>(tC(0, m, k)) < d) {
        copy(tiled_copy, tS(_, m, k), tD(_, m, k));
      } else {
        clear(tD(_, m, k));
      }
    }
  }
}

// The same for a tile of packed GQA rows, whose global rows are not one stride apart: row r of the
// tile (packed row row0 + r < rows) starts at `row_ptr(row0 + r)`.
template <typename TiledCopy, typename TD, typename TC, typename RowPtr>
__device__ __forceinline__ void copy_packed_rows(const TiledCopy& tiled_copy, TD&& tD, const TC& tC, int row0,
                                                 int rows, int d, const RowPtr& row_ptr) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tD); ++m) {
    const int r = row0 + get<0>(tC(0, m, 0));
    const bool row_ok = r < rows;
    const auto* src = row_ptr(row_ok ? r : 0);
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tD); ++k) {
      const int col = get<1>(tC(0, m, k));
      if (row_ok && col < d) {
        copy(tiled_copy, make_tensor(make_gmem_ptr(src + col), make_layout(shape(tD(_, m, k)))), tD(_, m, k));
      } else {
        clear(tD(_, m, k));
      }
    }
  }
}

// Registers (a GmemStore partition) to packed global rows, skipping rows >= rows and columns >= d.
template <typename TiledCopy, typename TR, typename TC, typename RowPtr>
__device__ __forceinline__ void store_packed_rows(const TiledCopy& tiled_copy, const TR& tR, const TC& tC, int row0,
                                                  int rows, int d, const RowPtr& row_ptr) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tR); ++m) {
    const int r = row0 + get<0>(tC(0, m, 0));
    if (r >= rows) continue;
    auto* dst = row_ptr(r);
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tR); ++k) {
      const int col = get<1>(tC(0, m, k));
      if (col < d) copy(tiled_copy, tR(_, m, k), make_tensor(make_gmem_ptr(dst + col), make_layout(shape(tR(_, m, k)))));
    }
  }
}

// acc += A B^T with both operands in shared memory: ldmatrix of k-slice s + 1 overlaps the MMAs of s.
template <typename TiledMma, typename Acc, typename TA, typename TB, typename SA, typename SB, typename CopyA,
          typename CopyB, typename ThrCopyA, typename ThrCopyB>
__device__ __forceinline__ void gemm_ss(const TiledMma& mma, Acc& acc, TA& rA, TB& rB, const SA& sA, const SB& sB,
                                        const CopyA& copy_a, const CopyB& copy_b, const ThrCopyA& thr_a,
                                        const ThrCopyB& thr_b) {
  auto rA_view = thr_a.retile_D(rA);
  auto rB_view = thr_b.retile_D(rB);
  copy(copy_a, sA(_, _, 0), rA_view(_, _, 0));
  copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) {
      copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A B^T with A already in registers (P of the forward).
template <typename TiledMma, typename Acc, typename TA, typename TB, typename SB, typename CopyB, typename ThrCopyB>
__device__ __forceinline__ void gemm_rs(const TiledMma& mma, Acc& acc, const TA& rA, TB& rB, const SB& sB,
                                        const CopyB& copy_b, const ThrCopyB& thr_b) {
  auto rB_view = thr_b.retile_D(rB);
  copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// Float accumulator -> Element fragment of the same layout.
template <typename Element, typename Acc>
__device__ __forceinline__ auto to_element(const Acc& acc) {
  auto out = make_tensor_like<Element>(acc);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) out(i) = static_cast<Element>(acc(i));
  return out;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace cute_attn
}  // namespace latte
