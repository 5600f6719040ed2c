// Cached-context attention on CuTe: the tile configurations (one traits struct each) and the layout
// helpers the kernels share. Host-includable (no kernels, no device-only code), so
// tests/kernels/cute_layouts.cpp checks the same layouts the kernels use, on the CPU.
//
// Conventions. An MMA "TN" atom computes C(m, n) += sum_k A(m, k) B(n, k). Shared-memory tiles are
// row-major with the head dim (or key dim) contiguous and XOR-swizzled in 8-element (16-byte) chunks,
// so cp.async writes whole chunks and ldmatrix reads 8 rows of one chunk column from 8 distinct bank
// groups. An operand whose contraction dim is not the contiguous one (V in P V, the transposed P, dS,
// Q, dO and K of the backward) is read through a transposed view of the same storage with the
// transposing ldmatrix (LDSM_T).
//
// GQA packing: a CTA owns one kv head and `kBlockM` rows of the packed query matrix of its group,
// row r = i * G + g for query i and head hk * G + g (G = Hq / Hkv), so each K/V tile it loads serves
// every query head of the group. In BSHD memory the G heads of one query are adjacent, so a tile's
// rows stay nearly contiguous.
#pragma once

#include <cute/tensor.hpp>  // first: the layout algebra and the algorithms
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>

#include <type_traits>

namespace latte {
namespace cute_attn {

using namespace cute;

// ------------------------------------------------------------------------------------------------
// GQA row packing and its inverse

struct GqaPack {
  int group;  // Hq / Hkv >= 1
  CUTE_HOST_DEVICE int rows(int nq) const { return nq * group; }
  CUTE_HOST_DEVICE int query(int r) const { return r / group; }
  CUTE_HOST_DEVICE int head(int hk, int r) const { return hk * group + r % group; }
  CUTE_HOST_DEVICE int row(int i, int g) const { return i * group + g; }
};

// ------------------------------------------------------------------------------------------------
// Shared building blocks

template <typename Element>
using Sm80Mma = std::conditional_t<std::is_same<Element, cutlass::half_t>::value, SM80_16x8x16_F32F16F16F32_TN,
                                   SM80_16x8x16_F32BF16BF16F32_TN>;

// warps_m x warps_n warps, each 16 x 16 of the output per step (two n8 atoms side by side, so a
// B operand comes from one 4-matrix ldmatrix).
template <typename Element, int kWarpsM, int kWarpsN>
using TiledMma16 = TiledMMA<MMA_Atom<Sm80Mma<Element>>, Layout<Shape<Int<kWarpsM>, Int<kWarpsN>, _1>>,
                            Tile<Int<16 * kWarpsM>, Int<16 * kWarpsN>, _16>>;

// 8 rows x kCols (32 or 64) elements: 16-byte chunks XOR-swizzled by the row index.
template <int kCols>
using SmemAtom = decltype(composition(Swizzle<kCols == 64 ? 3 : 2, 3, 3>{},
                                      Layout<Shape<_8, Int<kCols>>, Stride<Int<kCols>, _1>>{}));

template <int kCols>
constexpr int atom_cols() {
  return kCols % 64 == 0 ? 64 : 32;
}

// Row-major (rows, cols, stages) tile of swizzled atoms and its (cols, rows, stages) transpose.
template <int kRows, int kCols, int kStages>
using SmemTile = decltype(tile_to_shape(SmemAtom<atom_cols<kCols>()>{}, Shape<Int<kRows>, Int<kCols>, Int<kStages>>{}));
template <int kRows, int kCols, int kStages>
using SmemTileT = decltype(composition(SmemTile<kRows, kCols, kStages>{},
                                       make_ordered_layout(Shape<Int<kCols>, Int<kRows>, Int<kStages>>{},
                                                           Step<_2, _1, _3>{})));
template <int kRows, int kCols>
using SmemTile2 = decltype(tile_to_shape(SmemAtom<atom_cols<kCols>()>{}, Shape<Int<kRows>, Int<kCols>>{}));
template <int kRows, int kCols>
using SmemTile2T = decltype(composition(SmemTile2<kRows, kCols>{},
                                        make_layout(Shape<Int<kCols>, Int<kRows>>{}, GenRowMajor{})));

// Global -> shared: 16-byte cp.async per thread, kCols / 8 threads per row.
template <typename Element, int kThreads, int kCols>
using GmemTiledCopy =
    decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
                             Layout<Shape<Int<kThreads / (atom_cols<kCols>() / 8)>, Int<atom_cols<kCols>() / 8>>,
                                    Stride<Int<atom_cols<kCols>() / 8>, _1>>{},
                             Layout<Shape<_1, _8>>{}));
// Shared -> registers -> global for the output: 16-byte vector copies, same thread arrangement.
template <typename Element, int kThreads, int kCols>
using GmemTiledStore =
    decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{},
                             Layout<Shape<Int<kThreads / (atom_cols<kCols>() / 8)>, Int<atom_cols<kCols>() / 8>>,
                                    Stride<Int<atom_cols<kCols>() / 8>, _1>>{},
                             Layout<Shape<_1, _8>>{}));

template <typename Element>
using LdsmN = Copy_Atom<SM75_U32x4_LDSM_N, Element>;  // rows of the contraction dim
template <typename Element>
using LdsmT = Copy_Atom<SM75_U16x8_LDSM_T, Element>;  // columns of it (transposed view)
template <typename Element>
using SmemStoreC = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>;  // accumulator -> smem

// ------------------------------------------------------------------------------------------------
// Forward: one CTA per (kBlockM packed query rows, kv head, batch row); K/V tiles of kBlockN keys in
// kStages cp.async buffers; warps split the rows, so a warp's softmax rows live in its own registers.

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kStages_ = 2>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kNWarps = kNWarps_;
  static constexpr int kStages = kStages_, kNThreads = 32 * kNWarps;
  static_assert(kBlockM % (16 * kNWarps) == 0 && kBlockN % 16 == 0 && kHeadDim % 32 == 0, "tile shape");
  static_assert(kStages >= 1, "stages");

  using TiledMma = TiledMma16<Element, kNWarps, 1>;
  using SmemLayoutQ = SmemTile2<kBlockM, kHeadDim>;
  using SmemLayoutKV = SmemTile<kBlockN, kHeadDim, kStages>;   // (key, d, stage)
  using SmemLayoutVt = SmemTileT<kBlockN, kHeadDim, kStages>;  // (d, key, stage)
  using GmemCopy = GmemTiledCopy<Element, kNThreads, kHeadDim>;
  using GmemStore = GmemTiledStore<Element, kNThreads, kHeadDim>;
  using CopyQK = LdsmN<Element>;
  using CopyVt = LdsmT<Element>;
  using CopyO = SmemStoreC<Element>;

  static constexpr int kSmemBytes = int(sizeof(Element)) * (kBlockM + 2 * kStages * kBlockN) * kHeadDim;
  static constexpr int kMaxSmemSm80 = 163 * 1024;
  static_assert(kSmemBytes <= kMaxSmemSm80, "must fit sm_80 shared memory");
};

// ------------------------------------------------------------------------------------------------
// Backward: one CTA per (kBlockN keys, kv head, batch row), looping over the packed query rows in
// tiles of kBlockM (Q, dO, lse, delta in kStages cp.async buffers). S and dP are recomputed; P and
// dS go through shared memory once (they are the transposed A operands of dV and dK and the A
// operand of dQ); dQ of each (query tile, key tile) is added to a float32 accumulator with atomics.

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kWarpsMSdP_,
          int kWarpsNdKV_, int kWarpsMdQ_, int kStages_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kNWarps = kNWarps_;
  static constexpr int kStages = kStages_, kNThreads = 32 * kNWarps;
  static constexpr int kWarpsMSdP = kWarpsMSdP_, kWarpsNdKV = kWarpsNdKV_, kWarpsMdQ = kWarpsMdQ_;
  static_assert(kNWarps % kWarpsMSdP == 0 && kNWarps % kWarpsNdKV == 0 && kNWarps % kWarpsMdQ == 0, "warps");
  static_assert(kBlockM % (16 * kWarpsMSdP) == 0 && kBlockN % (16 * (kNWarps / kWarpsMSdP)) == 0, "S tile");
  static_assert(kBlockN % (16 * kWarpsNdKV) == 0 && kHeadDim % (16 * (kNWarps / kWarpsNdKV)) == 0, "dK tile");
  static_assert(kBlockM % (16 * kWarpsMdQ) == 0 && kHeadDim % (16 * (kNWarps / kWarpsMdQ)) == 0, "dQ tile");

  using TiledMmaSdP = TiledMma16<Element, kWarpsMSdP, kNWarps / kWarpsMSdP>;  // (query, key)
  using TiledMmadKV = TiledMma16<Element, kWarpsNdKV, kNWarps / kWarpsNdKV>;  // (key, d)
  using TiledMmadQ = TiledMma16<Element, kWarpsMdQ, kNWarps / kWarpsMdQ>;     // (query, d)

  using SmemLayoutQdO = SmemTile<kBlockM, kHeadDim, kStages>;    // (query, d, stage)
  using SmemLayoutQdOt = SmemTileT<kBlockM, kHeadDim, kStages>;  // (d, query, stage)
  using SmemLayoutKV = SmemTile2<kBlockN, kHeadDim>;             // (key, d)
  using SmemLayoutKt = SmemTile2T<kBlockN, kHeadDim>;            // (d, key)
  using SmemLayoutPdS = SmemTile2<kBlockM, kBlockN>;             // (query, key)
  using SmemLayoutPdSt = SmemTile2T<kBlockM, kBlockN>;           // (key, query)
  using GmemCopy = GmemTiledCopy<Element, kNThreads, kHeadDim>;
  using GmemStore = GmemTiledStore<Element, kNThreads, kHeadDim>;
  using CopyN = LdsmN<Element>;
  using CopyT = LdsmT<Element>;
  using CopyC = SmemStoreC<Element>;

  static constexpr int kQdOElems = kBlockM * kHeadDim * kStages;
  static constexpr int kSmemBytes = int(sizeof(Element)) * (2 * kQdOElems + 2 * kBlockN * kHeadDim +
                                                            2 * kBlockM * kBlockN) +
                                    int(sizeof(float)) * 2 * kStages * kBlockM;
  static constexpr int kMaxSmemSm80 = 163 * 1024;
  static_assert(kSmemBytes <= kMaxSmemSm80, "must fit sm_80 shared memory");
};

// ------------------------------------------------------------------------------------------------
// The instantiated configurations (head_dim is padded up to the next of 64, 128, 256).

template <typename Element, int kHeadDim> struct FwdConfig;
template <typename E> struct FwdConfig<E, 64> { using type = FwdTraits<E, 64, 128, 64, 8>; };
template <typename E> struct FwdConfig<E, 128> { using type = FwdTraits<E, 128, 128, 64, 8>; };
template <typename E> struct FwdConfig<E, 256> { using type = FwdTraits<E, 256, 64, 32, 4>; };

template <typename Element, int kHeadDim> struct BwdConfig;
template <typename E> struct BwdConfig<E, 64> { using type = BwdTraits<E, 64, 64, 64, 8, 4, 4, 4, 2>; };
template <typename E> struct BwdConfig<E, 128> { using type = BwdTraits<E, 128, 64, 64, 8, 4, 4, 4, 2>; };
template <typename E> struct BwdConfig<E, 256> { using type = BwdTraits<E, 256, 64, 32, 8, 4, 2, 4, 1>; };

// ------------------------------------------------------------------------------------------------
// Accumulator views

// The C fragment of an m16n8 atom, ((2 cols, 2 rows), MMA_M, MMA_N), as (rows, cols): row i of the
// view is one row of the tile, held by the 4 lanes of a quad (lane ^ 1, lane ^ 2).
template <typename Layout>
CUTE_HOST_DEVICE constexpr auto rowcol(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3 && decltype(rank(get<0>(acc)))::value == 2, "C fragment");
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)), make_layout(get<0, 0>(acc), get<2>(acc)));
}

// The same C fragment (of a tile whose columns are the next product's contraction dim) read as the
// A operand of an m16n8k16 atom, ((2, 2, 2), MMA_M, MMA_N / 2): two adjacent n8 accumulator tiles are
// one k16 A tile, so P never leaves registers between the two products.
template <typename Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_a(Layout acc) {
  static_assert(decltype(size<2>(acc))::value % 2 == 0, "needs an even number of n8 tiles");
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

}  // namespace cute_attn
}  // namespace latte
