// Cached-context attention on the CPU: the same op as csrc/context_attention.cu, one query row at a
// time. Forward: scores of the row's valid keys, their max, then out = sum_j p_j v_j / l and
// lse = m + log(l) (two passes over the scores, exact). Backward recomputes p from the saved lse and
// uses delta_i = rowsum(dO_i * O_i) - dLSE_i; dK/dV are summed per (batch, kv head) task so no two
// threads write the same element. Inputs are made contiguous first; keys at or beyond ctx_lens[b]
// (clamped to [0, Nc]) are never read.
#include "context_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace latte {
namespace {

template <typename scalar_t>
using acc_type = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

std::vector<int64_t> row_lengths(const c10::optional<at::Tensor>& ctx_lens, int64_t B, int64_t Nc) {
  std::vector<int64_t> lens(B, Nc);
  if (ctx_lens.has_value() && ctx_lens->defined()) {
    const at::Tensor l = ctx_lens->to(at::kLong).contiguous();
    const int64_t* p = l.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) lens[b] = std::min(std::max<int64_t>(p[b], 0), Nc);
  }
  return lens;
}

template <typename A, typename S>
A dot(const A* x, const S* y, int64_t n) {
  A s = 0;
  for (int64_t d = 0; d < n; ++d) s += x[d] * static_cast<A>(y[d]);
  return s;
}

template <typename scalar_t>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& lens,
             double scale, at::Tensor& out, at::Tensor& lse) {
  using acc = acc_type<scalar_t>;
  const int64_t B = q.size(0), Nq = q.size(1), Hq = q.size(2), D = q.size(3), Nc = k.size(1), Hkv = k.size(2);
  const int64_t group = Hq / Hkv;
  const scalar_t* Q = q.data_ptr<scalar_t>();
  const scalar_t* K = k.data_ptr<scalar_t>();
  const scalar_t* Vv = v.data_ptr<scalar_t>();
  scalar_t* O = out.data_ptr<scalar_t>();
  acc* L = lse.data_ptr<acc>();
  const acc sc = static_cast<acc>(scale);

  at::parallel_for(0, B * Hq * Nq, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc> s(Nc), o(D), qi(D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx % Nq, h = (idx / Nq) % Hq, b = idx / (Nq * Hq), hk = h / group, n = lens[b];
      const scalar_t* qrow = Q + ((b * Nq + i) * Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) qi[d] = static_cast<acc>(qrow[d]);
      std::fill(o.begin(), o.end(), acc(0));
      acc m = -std::numeric_limits<acc>::infinity(), l = 0;
      for (int64_t j = 0; j < n; ++j) {
        s[j] = sc * dot(qi.data(), K + ((b * Nc + j) * Hkv + hk) * D, D);
        m = std::max(m, s[j]);
      }
      for (int64_t j = 0; j < n; ++j) {
        const acc p = std::exp(s[j] - m);
        l += p;
        const scalar_t* vrow = Vv + ((b * Nc + j) * Hkv + hk) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += p * static_cast<acc>(vrow[d]);
      }
      scalar_t* orow = O + ((b * Nq + i) * Hq + h) * D;
      const acc inv = l > 0 ? acc(1) / l : acc(0);
      for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<scalar_t>(o[d] * inv);
      L[(b * Hq + h) * Nq + i] = l > 0 ? m + std::log(l) : -std::numeric_limits<acc>::infinity();
    }
  });
}

template <typename scalar_t>
void backward(const at::Tensor& g, const at::Tensor& glse, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const std::vector<int64_t>& lens, const at::Tensor& out, const at::Tensor& lse,
              double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc = acc_type<scalar_t>;
  const int64_t B = q.size(0), Nq = q.size(1), Hq = q.size(2), D = q.size(3), Nc = k.size(1), Hkv = k.size(2);
  const int64_t group = Hq / Hkv;
  const scalar_t* Q = q.data_ptr<scalar_t>();
  const scalar_t* K = k.data_ptr<scalar_t>();
  const scalar_t* Vv = v.data_ptr<scalar_t>();
  const scalar_t* O = out.data_ptr<scalar_t>();
  const scalar_t* G = g.data_ptr<scalar_t>();
  const acc* L = lse.data_ptr<acc>();
  const acc* GL = glse.data_ptr<acc>();
  scalar_t* DQ = dq.data_ptr<scalar_t>();
  scalar_t* DK = dk.data_ptr<scalar_t>();
  scalar_t* DV = dv.data_ptr<scalar_t>();
  const acc sc = static_cast<acc>(scale);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> dk_acc(Nc * D), dv_acc(Nc * D), qi(D), gi(D), dqi(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, hk = task % Hkv, n = lens[b];
      std::fill(dk_acc.begin(), dk_acc.end(), acc(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i = 0; i < Nq; ++i) {
          const int64_t row = (b * Nq + i) * Hq + h;
          std::fill(dqi.begin(), dqi.end(), acc(0));
          const acc li = L[(b * Hq + h) * Nq + i];
          if (n > 0 && std::isfinite(li)) {
            for (int64_t d = 0; d < D; ++d) {
              qi[d] = static_cast<acc>(Q[row * D + d]);
              gi[d] = static_cast<acc>(G[row * D + d]);
            }
            const acc delta = dot(gi.data(), O + row * D, D) - GL[(b * Hq + h) * Nq + i];
            for (int64_t j = 0; j < n; ++j) {
              const scalar_t* krow = K + ((b * Nc + j) * Hkv + hk) * D;
              const scalar_t* vrow = Vv + ((b * Nc + j) * Hkv + hk) * D;
              const acc p = std::exp(sc * dot(qi.data(), krow, D) - li);
              const acc ds = p * (dot(gi.data(), vrow, D) - delta);
              acc* dkj = dk_acc.data() + j * D;
              acc* dvj = dv_acc.data() + j * D;
              for (int64_t d = 0; d < D; ++d) {
                dqi[d] += ds * static_cast<acc>(krow[d]);
                dkj[d] += ds * qi[d];
                dvj[d] += p * gi[d];
              }
            }
          }
          for (int64_t d = 0; d < D; ++d) DQ[row * D + d] = static_cast<scalar_t>(sc * dqi[d]);
        }
      }
      for (int64_t j = 0; j < Nc; ++j) {
        const int64_t off = ((b * Nc + j) * Hkv + hk) * D;
        for (int64_t d = 0; d < D; ++d) {
          DK[off + d] = static_cast<scalar_t>(sc * dk_acc[j * D + d]);
          DV[off + d] = static_cast<scalar_t>(dv_acc[j * D + d]);
        }
      }
    }
  });
}

at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> context_attention_cpu_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                             const at::Tensor& v_in,
                                                             const c10::optional<at::Tensor>& ctx_lens,
                                                             double scale) {
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(lse_dtype(q)));
  const auto lens = row_lengths(ctx_lens, q.size(0), k.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "context_attention_cpu_fwd",
                                  [&] { forward<scalar_t>(q, k, v, lens, scale, out, lse); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> context_attention_cpu_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const c10::optional<at::Tensor>& ctx_lens, const at::Tensor& out_in,
    const at::Tensor& lse_in, double scale) {
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor out = out_in.to(q.scalar_type()).contiguous();
  const at::Tensor g = grad_out.to(q.scalar_type()).contiguous();
  const at::ScalarType acc = lse_dtype(q);
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const at::Tensor glse = grad_lse.to(acc).contiguous();
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  const auto lens = row_lengths(ctx_lens, q.size(0), k.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "context_attention_cpu_bwd", [&] {
    backward<scalar_t>(g, glse, q, k, v, lens, out, lse, scale, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace latte
