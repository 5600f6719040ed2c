// Host checks of the CuTe layout algebra behind csrc/context_attention_{fwd,bwd}.cu, on the exact
// traits the kernels instantiate (csrc/context_attention_traits.cuh). Built and run by
// test_cute_layouts.py with a host C++ compiler; prints one "ok ..." line per check and exits 1 on
// the first failure, naming it. What it proves, without a GPU:
//   - every tiled MMA covers its output tile exactly once, and its A/B fragments cover their tiles
//     as many times as there are warps along the other dimension;
//   - every global->shared tiled copy covers its tile exactly once in 16-byte chunks that are
//     contiguous and aligned in shared memory;
//   - every shared layout is a bijection onto its storage, the transposed views address the same
//     storage, and each 8-row ldmatrix phase hits 8 distinct 16-byte bank groups (no conflict);
//   - simulating ldmatrix (.x4 and .x4.trans) by the PTX ISA's definition on the addresses the copy
//     partitions supply, every lane receives exactly the (row, col) elements its MMA fragment
//     expects, for every operand of every product (Q, K, V^T; Q, dO, K, V, P^T, dS^T, dO^T, Q^T,
//     dS, K^T);
//   - the (row, col) view of the accumulator puts one tile row per view row (the same rows for S and
//     O), shared by the 4 lanes
//     of a quad (the softmax reductions), and the accumulator read as the A operand holds the same
//     elements the A fragment of P V expects (P never leaves registers);
//   - the GQA row packing is a bijection with the inverse the kernels use.
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include "context_attention_traits.cuh"

using namespace cute;
using namespace latte::cute_attn;

namespace {

int g_checks = 0;

void require(bool cond, const std::string& what) {
  if (!cond) {
    std::printf("FAIL %s\n", what.c_str());
    std::exit(1);
  }
}

void ok(const std::string& what) {
  ++g_checks;
  std::printf("ok %s\n", what.c_str());
}

template <class C>
int row_of(const C& c) { return int(get<0>(c)); }
template <class C>
int col_of(const C& c) { return int(get<1>(c)); }

// ---------------------------------------------------------------------------------------------------
// Tiled MMA coverage: C once per element; A (M x K) once per warp along N; B (N x K) once per warp along M.

template <class Mma, int M, int N, int K>
void check_mma_cover(const std::string& name, int warps_m, int warps_n) {
  Mma mma;
  const int threads = int(size(mma));
  std::vector<int> c(M * N, 0), a(M * K, 0), b(N * K, 0);
  for (int t = 0; t < threads; ++t) {
    auto thr = mma.get_thread_slice(t);
    auto pc = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    for (int i = 0; i < size(pc); ++i) ++c[row_of(pc(i)) * N + col_of(pc(i))];
    auto pa = thr.partition_A(make_identity_tensor(Shape<Int<M>, Int<K>>{}));
    for (int i = 0; i < size(pa); ++i) ++a[row_of(pa(i)) * K + col_of(pa(i))];
    auto pb = thr.partition_B(make_identity_tensor(Shape<Int<N>, Int<K>>{}));
    for (int i = 0; i < size(pb); ++i) ++b[row_of(pb(i)) * K + col_of(pb(i))];
  }
  for (int x : c) require(x == 1, name + ": C element not covered exactly once");
  for (int x : a) require(x == warps_n, name + ": A element coverage != warps along N");
  for (int x : b) require(x == warps_m, name + ": B element coverage != warps along M");
  ok(name + ": MMA covers C " + std::to_string(M) + "x" + std::to_string(N) + " exactly once, A/B per warp");
}

// ---------------------------------------------------------------------------------------------------
// Shared layouts

template <class L>
void check_bijective(const std::string& name, L layout) {
  const int n = int(size(layout));
  std::vector<int> hit(n, 0);
  for (int i = 0; i < n; ++i) {
    const int off = int(layout(i));
    require(off >= 0 && off < n, name + ": offset out of range");
    ++hit[off];
  }
  for (int x : hit) require(x == 1, name + ": swizzled layout is not a bijection");
  ok(name + ": swizzled layout is a bijection onto " + std::to_string(n) + " elements");
}

// (R, C, S) and its (C, R, S) transpose address the same element.
template <class L, class LT>
void check_transpose(const std::string& name, L l, LT lt) {
  for (int s = 0; s < size<2>(l); ++s)
    for (int r = 0; r < size<0>(l); ++r)
      for (int c = 0; c < size<1>(l); ++c) require(int(l(r, c, s)) == int(lt(c, r, s)), name + ": transpose differs");
  ok(name + ": transposed view addresses the same storage");
}

template <class L, class LT>
void check_transpose2(const std::string& name, L l, LT lt) {
  for (int r = 0; r < size<0>(l); ++r)
    for (int c = 0; c < size<1>(l); ++c) require(int(l(r, c)) == int(lt(c, r)), name + ": transpose differs");
  ok(name + ": transposed view addresses the same storage");
}

// ---------------------------------------------------------------------------------------------------
// Global -> shared tiled copy over an (R x C) tile stored with `smem` (2-D).

template <class Copy, int R, int C, class L>
void check_gmem_copy(const std::string& name, L smem) {
  Copy copy;
  const int threads = int(size(copy));
  std::vector<int> hit(R * C, 0);
  for (int t = 0; t < threads; ++t) {
    auto thr = copy.get_thread_slice(t);
    auto src = thr.partition_S(make_identity_tensor(Shape<Int<R>, Int<C>>{}));
    require(size<0>(src) == 8, name + ": expected 8 elements per copy");
    for (int m = 0; m < size<1>(src); ++m)
      for (int k = 0; k < size<2>(src); ++k) {
        const int off0 = int(smem(row_of(src(0, m, k)), col_of(src(0, m, k))));
        require(off0 % 8 == 0, name + ": 16-byte chunk not aligned in shared memory");
        for (int v = 0; v < 8; ++v) {
          const auto x = src(v, m, k);
          ++hit[row_of(x) * C + col_of(x)];
          require(int(smem(row_of(x), col_of(x))) == off0 + v, name + ": chunk not contiguous in shared memory");
          require(row_of(x) == row_of(src(0, m, k)) && col_of(x) == col_of(src(0, m, k)) + v,
                  name + ": chunk is not 8 consecutive columns of one row");
        }
      }
  }
  for (int x : hit) require(x == 1, name + ": tile element not copied exactly once");
  ok(name + ": global->shared copy covers " + std::to_string(R) + "x" + std::to_string(C) +
     " once in aligned 16-byte chunks");
}

// ---------------------------------------------------------------------------------------------------
// ldmatrix, simulated by the PTX ISA's definition. A warp's 32 lanes each supply the address of one
// 16-byte row (lanes 8j..8j+7: rows 0..7 of matrix j). Without .trans, lane l receives in register j
// elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix j; with .trans, (rows 2(l%4), 2(l%4)+1, col l/4).
// Checks that this equals, value by value, what the MMA fragment expects, and that the 8 rows of a
// matrix hit distinct bank groups.

template <bool kA, bool kTrans, class Mma, class Atom, int R, int C, class L>
void check_ldsm(const std::string& name, L smem) {
  Mma mma;
  auto copy = [&] {
    if constexpr (kA) return make_tiled_copy_A(Atom{}, mma);
    else return make_tiled_copy_B(Atom{}, mma);
  }();
  const int threads = int(size(mma));
  auto id = make_identity_tensor(Shape<Int<R>, Int<C>>{});
  for (int w = 0; w < threads / 32; ++w) {
    std::vector<std::vector<int>> rows_r(32), rows_c(32);  // per lane: coordinates of its 16-byte row
    std::vector<decltype(copy.get_thread_slice(0).partition_S(id))> srcs;
    std::vector<std::vector<int>> want(32);  // per lane: encoded expected coordinates, in retile_D order
    int atoms = -1;
    for (int l = 0; l < 32; ++l) {
      const int t = 32 * w + l;
      auto thr_copy = copy.get_thread_slice(t);
      auto thr_mma = mma.get_thread_slice(t);
      srcs.push_back(thr_copy.partition_S(id));
      auto coords = [&] {
        if constexpr (kA) return thr_mma.partition_A(id);
        else return thr_mma.partition_B(id);
      }();
      auto frag = make_tensor<int>(make_layout(shape(coords)));  // a register fragment of that shape
      for (int i = 0; i < size(frag); ++i) frag(i) = row_of(coords(i)) * C + col_of(coords(i));
      auto view = thr_copy.retile_D(frag);
      require(size<0>(view) == 8, name + ": expected 8 values per ldmatrix");
      for (int i = 0; i < size(view); ++i) want[l].push_back(view(i));
      atoms = int(size(view)) / 8;
      require(size<1>(view) == size<1>(srcs.back()) && size<2>(view) == size<2>(srcs.back()),
              name + ": copy and fragment tilings differ");
    }
    for (int a = 0; a < atoms; ++a) {
      // lane l's row for this atom instance: values 8a'..: src(v, m, k) with flat atom index a
      int row_r[32], row_c[32];
      std::set<int> banks[4];
      for (int l = 0; l < 32; ++l) {
        auto& s = srcs[l];
        const int m = a % int(size<1>(s)), k = a / int(size<1>(s));
        require(size<0>(s) == 8, name + ": expected one 16-byte row per lane");
        row_r[l] = row_of(s(0, m, k));
        row_c[l] = col_of(s(0, m, k));
        const int off0 = int(smem(row_r[l], row_c[l]));
        require(off0 % 8 == 0, name + ": ldmatrix row not 16-byte aligned");
        for (int v = 0; v < 8; ++v) {
          require(int(smem(row_of(s(v, m, k)), col_of(s(v, m, k)))) == off0 + v, name + ": ldmatrix row not contiguous");
        }
        banks[l / 8].insert((off0 / 8) % 8);
      }
      for (auto& b : banks) require(b.size() == 8, name + ": bank conflict in an ldmatrix phase");
      for (int l = 0; l < 32; ++l) {
        for (int j = 0; j < 4; ++j)
          for (int h = 0; h < 2; ++h) {
            int src_lane, elem;
            if (!kTrans) {
              src_lane = 8 * j + l / 4;
              elem = 2 * (l % 4) + h;
            } else {
              src_lane = 8 * j + 2 * (l % 4) + h;
              elem = l / 4;
            }
            // element `elem` of src_lane's row: the row's coordinates advance along its contiguous dim
            const auto& s = srcs[src_lane];
            const int m = a % int(size<1>(s)), k = a / int(size<1>(s));
            const auto x = s(elem, m, k);
            const int got = row_of(x) * C + col_of(x);
            require(want[l][8 * a + 2 * j + h] == got, name + ": lane receives an element its MMA fragment does not expect");
          }
      }
    }
  }
  ok(name + std::string(kTrans ? ": ldmatrix.trans" : ": ldmatrix") +
     " delivers each lane's fragment exactly, conflict-free");
}

// ---------------------------------------------------------------------------------------------------
// Accumulator views

// kQuad: the rows are reduced over lanes (the forward's softmax), so each must be held by one quad.
template <class Mma, int M, int N, bool kQuad>
void check_rowcol(const std::string& name) {
  Mma mma;
  const int threads = int(size(mma));
  std::vector<std::vector<int>> row(threads);
  std::vector<std::set<int>> row_cols(M), row_threads(M);
  int nrows = 0;
  for (int t = 0; t < threads; ++t) {
    auto pc = mma.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    auto rc = make_tensor(pc.data(), rowcol(pc.layout()));
    nrows = int(size<0>(rc));
    for (int i = 0; i < size<0>(rc); ++i) {
      const int r = row_of(rc(i, 0));
      row[t].push_back(r);
      row_threads[r].insert(t);
      for (int j = 0; j < size<1>(rc); ++j) {
        require(row_of(rc(i, j)) == r, name + ": a (row, col) view row mixes tile rows");
        row_cols[r].insert(col_of(rc(i, j)));
      }
    }
  }
  for (int t = 0; t < threads; ++t)
    for (int i = 0; i < nrows; ++i)
      require(row[t][i] == row[t ^ 1][i] && row[t][i] == row[t ^ 2][i], name + ": quad lanes hold different rows");
  if (!kQuad) {
    ok(name + ": (row, col) view: one tile row per view row");
    return;
  }
  for (int r = 0; r < M; ++r) {
    require(int(row_cols[r].size()) == N, name + ": a tile row is not complete across its holders");
    require(row_threads[r].size() == 4, name + ": a tile row is held by other than 4 lanes");
    const int q = *row_threads[r].begin();
    require(q % 4 == 0 && row_threads[r].count(q + 3) == 1, name + ": a tile row's holders are not one quad");
  }
  ok(name + ": (row, col) view: one tile row per view row, held by exactly one quad");
}

// Row i of the S view and row i of the O view are the same tile row (the softmax rescales O by the
// statistics of S's rows).
template <class Mma, int M, int N, int D>
void check_rows_align(const std::string& name) {
  Mma mma;
  for (int t = 0; t < int(size(mma)); ++t) {
    auto thr = mma.get_thread_slice(t);
    auto ps = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    auto po = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
    auto s = make_tensor(ps.data(), rowcol(ps.layout()));
    auto o = make_tensor(po.data(), rowcol(po.layout()));
    require(size<0>(s) == size<0>(o), name + ": S and O views have different row counts");
    for (int i = 0; i < size<0>(s); ++i)
      require(row_of(s(i, 0)) == row_of(o(i, 0)), name + ": S and O views disagree on a row");
  }
  ok(name + ": S and O accumulators hold the same rows in the same order");
}

template <class Mma, int M, int N>
void check_acc_as_a(const std::string& name) {
  Mma mma;
  for (int t = 0; t < int(size(mma)); ++t) {
    auto thr = mma.get_thread_slice(t);
    auto pc = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    auto frag = make_tensor_like<int>(partition_fragment_C(mma, Shape<Int<M>, Int<N>>{}));
    for (int i = 0; i < size(frag); ++i) frag(i) = row_of(pc(i)) * N + col_of(pc(i));
    auto as_a = make_tensor(frag.data(), acc_as_a(frag.layout()));
    auto pa = thr.partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    require(size(as_a) == size(pa), name + ": A view size");
    require(size<1>(as_a) == size<1>(pa) && size<2>(as_a) == size<2>(pa), name + ": A view shape");
    for (int i = 0; i < size(pa); ++i)
      require(as_a(i) == row_of(pa(i)) * N + col_of(pa(i)), name + ": accumulator-as-A holds the wrong element");
  }
  ok(name + ": accumulator read as the A operand holds exactly the A fragment (P stays in registers)");
}

// ---------------------------------------------------------------------------------------------------

void check_gqa_packing() {
  for (int g : {1, 2, 3, 6, 12})
    for (int nq : {1, 7, 63, 77, 4096}) {
      const GqaPack pack{g};
      const int hkv = 2;
      std::vector<int> hit(pack.rows(nq), 0);
      for (int hk = 0; hk < hkv; ++hk)
        for (int r = 0; r < pack.rows(nq); ++r) {
          const int i = pack.query(r), h = pack.head(hk, r);
          require(i >= 0 && i < nq && h / g == hk && h >= 0 && h < g * hkv, "gqa: unpack out of range");
          require(pack.row(i, h - hk * g) == r, "gqa: row(query(r), head(r)) != r");
          if (hk == 0) ++hit[r];
        }
      for (int i = 0; i < nq; ++i)
        for (int gg = 0; gg < g; ++gg) {
          const int r = pack.row(i, gg);
          require(pack.query(r) == i && pack.head(1, r) == g + gg, "gqa: query/head(row(i, g)) != (i, g)");
        }
      for (int x : hit) require(x == 1, "gqa: packing is not a bijection");
    }
  ok("gqa: packed row r = i * G + g <-> (query i, head hk * G + g) is a bijection with its inverse");
}

template <class Tr>
void check_fwd(const std::string& tag) {
  constexpr int M = Tr::kBlockM, N = Tr::kBlockN, D = Tr::kHeadDim;
  using Mma = typename Tr::TiledMma;
  const std::string name = "fwd " + tag;
  std::printf("tile %s: %dx%d, %d warps, %d stages, %d B shared\n", name.c_str(), M, N, Tr::kNWarps, Tr::kStages,
              Tr::kSmemBytes);
  check_mma_cover<Mma, M, N, D>(name + " S=QK^T", Tr::kNWarps, 1);
  check_mma_cover<Mma, M, D, N>(name + " O=PV", Tr::kNWarps, 1);
  check_bijective(name + " sQ", typename Tr::SmemLayoutQ{});
  check_bijective(name + " sK/sV", typename Tr::SmemLayoutKV{});
  check_transpose(name + " sV^T", typename Tr::SmemLayoutKV{}, typename Tr::SmemLayoutVt{});
  check_gmem_copy<typename Tr::GmemCopy, M, D>(name + " Q", typename Tr::SmemLayoutQ{});
  auto kv0 = [](int r, int c) { return int(typename Tr::SmemLayoutKV{}(r, c, 0)); };
  auto kv1 = [](int r, int c) { return int(typename Tr::SmemLayoutKV{}(r, c, Tr::kStages - 1)); };
  auto vt0 = [](int r, int c) { return int(typename Tr::SmemLayoutVt{}(r, c, Tr::kStages - 1)); };
  check_gmem_copy<typename Tr::GmemCopy, N, D>(name + " K/V stage 0", kv0);
  check_gmem_copy<typename Tr::GmemCopy, N, D>(name + " K/V last stage", kv1);
  check_gmem_copy<typename Tr::GmemStore, M, D>(name + " O store", typename Tr::SmemLayoutQ{});
  check_ldsm<true, false, Mma, typename Tr::CopyQK, M, D>(name + " Q", typename Tr::SmemLayoutQ{});
  check_ldsm<false, false, Mma, typename Tr::CopyQK, N, D>(name + " K", kv1);
  check_ldsm<false, true, Mma, typename Tr::CopyVt, D, N>(name + " V^T", vt0);
  check_rowcol<Mma, M, N, true>(name + " S");
  check_rowcol<Mma, M, D, true>(name + " O");
  check_acc_as_a<Mma, M, N>(name + " P");
  check_rows_align<Mma, M, N, D>(name + " S/O");
}

template <class Tr>
void check_bwd(const std::string& tag) {
  constexpr int M = Tr::kBlockM, N = Tr::kBlockN, D = Tr::kHeadDim, W = Tr::kNWarps;
  using MS = typename Tr::TiledMmaSdP;
  using MK = typename Tr::TiledMmadKV;
  using MQ = typename Tr::TiledMmadQ;
  const std::string name = "bwd " + tag;
  std::printf("tile %s: %dx%d, %d warps, %d stages, %d B shared\n", name.c_str(), M, N, W, Tr::kStages,
              Tr::kSmemBytes);
  check_mma_cover<MS, M, N, D>(name + " S/dP", Tr::kWarpsMSdP, W / Tr::kWarpsMSdP);
  check_mma_cover<MK, N, D, M>(name + " dK/dV", Tr::kWarpsNdKV, W / Tr::kWarpsNdKV);
  check_mma_cover<MQ, M, D, N>(name + " dQ", Tr::kWarpsMdQ, W / Tr::kWarpsMdQ);
  check_bijective(name + " sQ/sdO", typename Tr::SmemLayoutQdO{});
  check_bijective(name + " sK/sV", typename Tr::SmemLayoutKV{});
  check_bijective(name + " sP/sdS", typename Tr::SmemLayoutPdS{});
  check_transpose(name + " sQ^T", typename Tr::SmemLayoutQdO{}, typename Tr::SmemLayoutQdOt{});
  check_transpose2(name + " sK^T", typename Tr::SmemLayoutKV{}, typename Tr::SmemLayoutKt{});
  check_transpose2(name + " sP^T", typename Tr::SmemLayoutPdS{}, typename Tr::SmemLayoutPdSt{});
  auto q_last = [](int r, int c) { return int(typename Tr::SmemLayoutQdO{}(r, c, Tr::kStages - 1)); };
  auto qt_last = [](int r, int c) { return int(typename Tr::SmemLayoutQdOt{}(r, c, Tr::kStages - 1)); };
  check_gmem_copy<typename Tr::GmemCopy, M, D>(name + " Q/dO last stage", q_last);
  check_gmem_copy<typename Tr::GmemCopy, N, D>(name + " K/V", typename Tr::SmemLayoutKV{});
  check_ldsm<true, false, MS, typename Tr::CopyN, M, D>(name + " Q, dO", q_last);
  check_ldsm<false, false, MS, typename Tr::CopyN, N, D>(name + " K, V", typename Tr::SmemLayoutKV{});
  check_ldsm<true, true, MK, typename Tr::CopyT, N, M>(name + " P^T, dS^T", typename Tr::SmemLayoutPdSt{});
  check_ldsm<false, true, MK, typename Tr::CopyT, D, M>(name + " dO^T, Q^T", qt_last);
  check_ldsm<true, false, MQ, typename Tr::CopyN, M, N>(name + " dS", typename Tr::SmemLayoutPdS{});
  check_ldsm<false, true, MQ, typename Tr::CopyT, D, N>(name + " K^T", typename Tr::SmemLayoutKt{});
  check_rowcol<MS, M, N, false>(name + " S/dP");
}

}  // namespace

int main() {
  check_gqa_packing();
  check_fwd<FwdConfig<cutlass::half_t, 64>::type>("fp16 D64");
  check_fwd<FwdConfig<cutlass::half_t, 128>::type>("fp16 D128");
  check_fwd<FwdConfig<cutlass::half_t, 256>::type>("fp16 D256");
  check_fwd<FwdConfig<cutlass::bfloat16_t, 128>::type>("bf16 D128");
  check_bwd<BwdConfig<cutlass::half_t, 64>::type>("fp16 D64");
  check_bwd<BwdConfig<cutlass::half_t, 128>::type>("fp16 D128");
  check_bwd<BwdConfig<cutlass::half_t, 256>::type>("fp16 D256");
  check_bwd<BwdConfig<cutlass::bfloat16_t, 128>::type>("bf16 D128");
  std::printf("all %d layout checks passed\n", g_checks);
  return 0;
}
