// C++ CPU kernels of the fused ops (semantics: dflow_fast/ops/twins.py).
//
// Plain contiguous loops the compiler vectorizes, split across threads with at::parallel_for
// (OpenMP: this file is compiled with -fopenmp, see csrc/flags.txt; without it parallel_for runs
// serially). Each output element or row is computed by exactly one thread in a fixed order, so
// results do not depend on the thread count. fp16/bf16 are computed in fp32 (at::opmath_type).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "dflow_fast.h"

namespace dflow_fast {
namespace {

// Elements per parallel task: below about this many, waking threads costs more than the loop
// (ATen's own elementwise kernels use the same at::internal::GRAIN_SIZE).
constexpr int64_t kGrain = 32768;

// Independent partial sums of a reduction: the compiler can keep them in vector registers without
// -ffast-math (which would license reassociation everywhere), and each partial sums only n/8 terms.
constexpr int kLanes = 8;

#define DFLOW_FAST_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Rows per parallel task for row-wise work of `cost` elements per row.
int64_t rows_grain(int64_t cost) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, cost));
}

// out[i] = f(in[i]...) over n contiguous elements, inputs upcast to opmath.
template <typename scalar_t, typename F, typename... In>
void map_elementwise(scalar_t* out, int64_t n, const F& f, const In*... in) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = static_cast<scalar_t>(f(static_cast<acc_t>(in[i])...));
    }
  });
}

// outs[k][i] = f(in[i]...)[k] for k < NOut: several outputs from one pass over the inputs.
template <typename scalar_t, size_t NOut, typename F, typename... In>
void map_elementwise_n(const std::array<scalar_t*, NOut>& outs, int64_t n, const F& f,
                       const In*... in) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const std::array<acc_t, NOut> r = f(static_cast<acc_t>(in[i])...);
      for (size_t k = 0; k < NOut; ++k) outs[k][i] = static_cast<scalar_t>(r[k]);
    }
  });
}

// sum over i in [0, n) of term(i), in kLanes partial sums combined pairwise. term may have side
// effects (the fused passes below write their update and return the next dot product's term).
template <typename acc_t, typename F>
acc_t lane_sum(int64_t n, const F& term) {
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += term(i + l);
  }
  for (int l = 0; i < n; ++i, ++l) part[l] += term(i);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  }
  return part[0];
}

// One sample's two-loop recursion (Nocedal & Wright, Alg. 7.4), d = -H g.
//   g, out: [D]; S, Y: [m, D] oldest first; rho: [m]; q: [D] and alpha: [m] opmath workspaces.
// Every pass over q both applies one update and accumulates the dot product the next update
// needs, so q is swept once per history slot and loop (2m + 1 sweeps instead of 4m + 1).
template <typename scalar_t, typename acc_t>
void lbfgs_row(const scalar_t* g, const scalar_t* S, const scalar_t* Y, const scalar_t* rho,
               acc_t gamma, int64_t m, int64_t D, acc_t* q, acc_t* alpha, scalar_t* out) {
  auto up = [](scalar_t v) { return static_cast<acc_t>(v); };
  if (m == 0) {  // no history: steepest descent scaled by gamma
    for (int64_t i = 0; i < D; ++i) out[i] = static_cast<scalar_t>(-up(g[i]) * gamma);
    return;
  }
  // First loop, newest (m-1) to oldest (0): alpha_j = rho_j <s_j, q>;  q -= alpha_j y_j.
  const scalar_t* Sn = S + (m - 1) * D;
  acc_t dot = lane_sum<acc_t>(D, [&](int64_t i) {
    const acc_t qi = -up(g[i]);
    q[i] = qi;
    return up(Sn[i]) * qi;
  });
  for (int64_t j = m - 1; j >= 0; --j) {
    const acc_t a = up(rho[j]) * dot;
    alpha[j] = a;
    const scalar_t* Yj = Y + j * D;
    if (j > 0) {
      const scalar_t* Sp = S + (j - 1) * D;
      dot = lane_sum<acc_t>(D, [&](int64_t i) {
        const acc_t qi = q[i] - a * up(Yj[i]);
        q[i] = qi;
        return up(Sp[i]) * qi;
      });
    } else {  // last update, then r = gamma q and the second loop's first dot <y_0, r>
      dot = lane_sum<acc_t>(D, [&](int64_t i) {
        const acc_t ri = (q[i] - a * up(Yj[i])) * gamma;
        q[i] = ri;
        return up(Yj[i]) * ri;
      });
    }
  }
  // Second loop, oldest to newest: beta = rho_j <y_j, r>;  r += (alpha_j - beta) s_j.  q holds r.
  for (int64_t j = 0; j < m; ++j) {
    const acc_t c = alpha[j] - up(rho[j]) * dot;
    const scalar_t* Sj = S + j * D;
    if (j + 1 < m) {
      const scalar_t* Yn = Y + (j + 1) * D;
      dot = lane_sum<acc_t>(D, [&](int64_t i) {
        const acc_t ri = q[i] + c * up(Sj[i]);
        q[i] = ri;
        return up(Yn[i]) * ri;
      });
    } else {
      for (int64_t i = 0; i < D; ++i) out[i] = static_cast<scalar_t>(q[i] + c * up(Sj[i]));
    }
  }
}

}  // namespace

at::Tensor axpy_cpu(const at::Tensor& x_, const at::Tensor& v_, double h) {
  check_elementwise("axpy", {{"x", &x_}, {"v", &v_}});
  check_finite("axpy", {{"h", h}});
  const at::Tensor x = x_.contiguous(), v = v_.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  DFLOW_FAST_DISPATCH(x.scalar_type(), "dflow_fast::axpy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t hh = static_cast<acc_t>(h);
    map_elementwise(
        out.mutable_data_ptr<scalar_t>(), x.numel(), [hh](acc_t a, acc_t b) { return a + hh * b; },
        x.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor adjoint_euler_cpu(const at::Tensor& a_, const at::Tensor& w_) {
  check_elementwise("adjoint_euler", {{"a", &a_}, {"w", &w_}});
  const at::Tensor a = a_.contiguous(), w = w_.contiguous();
  at::Tensor out = at::empty(a.sizes(), a.options());
  DFLOW_FAST_DISPATCH(a.scalar_type(), "dflow_fast::adjoint_euler", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    map_elementwise(
        out.mutable_data_ptr<scalar_t>(), a.numel(), [](acc_t p, acc_t q) { return p + q; },
        a.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor adjoint_midpoint_cpu(const at::Tensor& a_, const at::Tensor& w2_,
                                const at::Tensor& w1_) {
  check_elementwise("adjoint_midpoint", {{"a", &a_}, {"w2", &w2_}, {"w1", &w1_}});
  const at::Tensor a = a_.contiguous(), w2 = w2_.contiguous(), w1 = w1_.contiguous();
  at::Tensor out = at::empty(a.sizes(), a.options());
  DFLOW_FAST_DISPATCH(a.scalar_type(), "dflow_fast::adjoint_midpoint", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // (a + w2) + w1: the reference's association, so fp32/fp64 results match it bit for bit.
    map_elementwise(
        out.mutable_data_ptr<scalar_t>(), a.numel(),
        [](acc_t p, acc_t q, acc_t r) { return (p + q) + r; }, a.const_data_ptr<scalar_t>(),
        w2.const_data_ptr<scalar_t>(), w1.const_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chi_prior_cpu(const at::Tensor& x_, double weight) {
  check_chi_prior(x_);
  check_finite("chi_prior", {{"weight", weight}});
  const at::Tensor x = x_.contiguous();
  const int64_t B = x.size(0), D = x.size(1);
  const auto stat = x.options().dtype(chi_prior_stat_dtype(x.scalar_type()));
  at::Tensor sq = at::empty({B}, stat), value = at::empty({B}, stat);
  at::Tensor grad = at::empty({B, D}, x.options());
  DFLOW_FAST_DISPATCH(x.scalar_type(), "dflow_fast::chi_prior", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // the C++ type of chi_prior_stat_dtype
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    acc_t* sqp = sq.mutable_data_ptr<acc_t>();
    acc_t* valp = value.mutable_data_ptr<acc_t>();
    const acc_t w = static_cast<acc_t>(weight), dm1 = static_cast<acc_t>(D - 1);
    at::parallel_for(0, B, rows_grain(2 * D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = xp + r * D;
        const acc_t s = lane_sum<acc_t>(D, [xr](int64_t i) {
          const acc_t v = static_cast<acc_t>(xr[i]);
          return v * v;
        });
        sqp[r] = s;
        valp[r] = w * (acc_t(0.5) * s - acc_t(0.5) * dm1 * std::log(s));
        const acc_t c = w * (acc_t(1) - dm1 / s);
        scalar_t* gr = gp + r * D;
        for (int64_t i = 0; i < D; ++i) {
          gr[i] = static_cast<scalar_t>(c * static_cast<acc_t>(xr[i]));
        }
      }
    });
  });
  return {sq, value, grad};
}

at::Tensor lbfgs_direction_cpu(const at::Tensor& g_, const at::Tensor& S_, const at::Tensor& Y_,
                               const at::Tensor& rho_, const at::Tensor& gamma_) {
  check_lbfgs(g_, S_, Y_, rho_, gamma_);
  const at::Tensor g = g_.contiguous(), S = S_.contiguous(), Y = Y_.contiguous();
  const at::Tensor rho = rho_.contiguous(), gamma = gamma_.contiguous();
  const int64_t B = g.size(0), D = g.size(1), m = S.size(1);
  at::Tensor out = at::empty({B, D}, g.options());
  DFLOW_FAST_DISPATCH(g.scalar_type(), "dflow_fast::lbfgs_direction", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* Sp = S.const_data_ptr<scalar_t>();
    const scalar_t* Yp = Y.const_data_ptr<scalar_t>();
    const scalar_t* rhop = rho.const_data_ptr<scalar_t>();
    const scalar_t* gammap = gamma.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, rows_grain((4 * m + 1) * D), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> q(D), alpha(m);  // per task: q/r in opmath, one sample at a time
      for (int64_t b = b0; b < b1; ++b) {
        lbfgs_row<scalar_t, acc_t>(gp + b * D, Sp + b * m * D, Yp + b * m * D, rhop + b * m,
                                   static_cast<acc_t>(gammap[b]), m, D, q.data(), alpha.data(),
                                   op + b * D);
      }
    });
  });
  return out;
}

// ---- reversible solvers' state updates ----------------------------------------------------------
// Scalar coefficients are formed in double (as the twins form them in Python) and rounded once to
// opmath; each formula keeps the twin's association.

at::Tensor heun_predict_cpu(const at::Tensor& y_, const at::Tensor& yhat_, const at::Tensor& f_,
                            double h) {
  check_elementwise("heun_predict", {{"y", &y_}, {"yhat", &yhat_}, {"f", &f_}});
  check_finite("heun_predict", {{"h", h}});
  const at::Tensor y = y_.contiguous(), yhat = yhat_.contiguous(), f = f_.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  DFLOW_FAST_DISPATCH(y.scalar_type(), "dflow_fast::heun_predict", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t hh = static_cast<acc_t>(h);
    map_elementwise(
        out.mutable_data_ptr<scalar_t>(), y.numel(),
        [hh](acc_t yi, acc_t yhi, acc_t fi) { return (acc_t(2) * yi - yhi) + hh * fi; },
        y.const_data_ptr<scalar_t>(), yhat.const_data_ptr<scalar_t>(),
        f.const_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> heun_step_cpu(const at::Tensor& y_, const at::Tensor& yhat_,
                                                 const at::Tensor& f_, const at::Tensor& fnext_,
                                                 double h, double hnext) {
  check_elementwise("heun_step", {{"y", &y_}, {"yhat", &yhat_}, {"f", &f_}, {"fnext", &fnext_}});
  check_finite("heun_step", {{"h", h}, {"hnext", hnext}});
  const at::Tensor y = y_.contiguous(), yhat = yhat_.contiguous(), f = f_.contiguous(),
                   fnext = fnext_.contiguous();
  at::Tensor y1 = at::empty(y.sizes(), y.options()), yhat2 = at::empty(y.sizes(), y.options());
  DFLOW_FAST_DISPATCH(y.scalar_type(), "dflow_fast::heun_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t half_h = static_cast<acc_t>(0.5 * h), hn = static_cast<acc_t>(hnext);
    // The prediction uses y' in opmath, before it is rounded to scalar_t (as the twin does).
    map_elementwise_n<scalar_t, 2>(
        {y1.mutable_data_ptr<scalar_t>(), yhat2.mutable_data_ptr<scalar_t>()}, y.numel(),
        [half_h, hn](acc_t yi, acc_t yhi, acc_t fi, acc_t fni) {
          const acc_t yn = yi + half_h * (fi + fni);
          return std::array<acc_t, 2>{yn, (acc_t(2) * yn - yhi) + hn * fni};
        },
        y.const_data_ptr<scalar_t>(), yhat.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
        fnext.const_data_ptr<scalar_t>());
  });
  return {y1, yhat2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> heun_adjoint_cpu(const at::Tensor& a_y_,
                                                                const at::Tensor& a_yhat_,
                                                                const at::Tensor& w_, double h,
                                                                double hnext) {
  check_elementwise("heun_adjoint", {{"a_y", &a_y_}, {"a_yhat", &a_yhat_}, {"w", &w_}});
  check_finite("heun_adjoint", {{"h", h}, {"hnext", hnext}});
  const at::Tensor a_y = a_y_.contiguous(), a_yhat = a_yhat_.contiguous(), w = w_.contiguous();
  const auto opts = a_y.options();
  at::Tensor o_y = at::empty(a_y.sizes(), opts), o_yhat = at::empty(a_y.sizes(), opts),
             o_g = at::empty(a_y.sizes(), opts);
  DFLOW_FAST_DISPATCH(a_y.scalar_type(), "dflow_fast::heun_adjoint", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t half_h = static_cast<acc_t>(0.5 * h), hh = static_cast<acc_t>(h),
                half_hn = static_cast<acc_t>(0.5 * hnext);
    map_elementwise_n<scalar_t, 3>(
        {o_y.mutable_data_ptr<scalar_t>(), o_yhat.mutable_data_ptr<scalar_t>(),
         o_g.mutable_data_ptr<scalar_t>()},
        a_y.numel(),
        [half_h, hh, half_hn](acc_t ay, acc_t ayh, acc_t wi) {
          const acc_t c = ayh + wi;
          const acc_t ay1 = ay + acc_t(2) * c;
          return std::array<acc_t, 3>{ay1, -c, (half_h * ay + hh * c) + half_hn * ay1};
        },
        a_y.const_data_ptr<scalar_t>(), a_yhat.const_data_ptr<scalar_t>(),
        w.const_data_ptr<scalar_t>());
  });
  return {o_y, o_yhat, o_g};
}

at::Tensor coupled_forward_cpu(const at::Tensor& y_, const at::Tensor& z_, const at::Tensor& v_,
                               double lam, double h) {
  check_elementwise("coupled_forward", {{"y", &y_}, {"z", &z_}, {"v", &v_}});
  check_finite("coupled_forward", {{"lam", lam}, {"h", h}});
  const at::Tensor y = y_.contiguous(), z = z_.contiguous(), v = v_.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  DFLOW_FAST_DISPATCH(y.scalar_type(), "dflow_fast::coupled_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t l = static_cast<acc_t>(lam), oml = static_cast<acc_t>(1.0 - lam),
                hh = static_cast<acc_t>(h);
    map_elementwise(
        out.mutable_data_ptr<scalar_t>(), y.numel(),
        [l, oml, hh](acc_t yi, acc_t zi, acc_t vi) { return (l * yi + oml * zi) + hh * vi; },
        y.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor coupled_inverse_cpu(const at::Tensor& y1_, const at::Tensor& z_, const at::Tensor& v_,
                               double lam, double h) {
  check_elementwise("coupled_inverse", {{"y1", &y1_}, {"z", &z_}, {"v", &v_}});
  check_finite("coupled_inverse", {{"lam", lam}, {"h", h}});
  check_coupled_inverse_lam(lam);
  const at::Tensor y1 = y1_.contiguous(), z = z_.contiguous(), v = v_.contiguous();
  at::Tensor out = at::empty(y1.sizes(), y1.options());
  DFLOW_FAST_DISPATCH(y1.scalar_type(), "dflow_fast::coupled_inverse", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t l = static_cast<acc_t>(lam), oml = static_cast<acc_t>(1.0 - lam),
                hh = static_cast<acc_t>(h);
    // A true division by lam, not a multiplication by 1/lam: one rounding fewer, like the twin.
    map_elementwise(
        out.mutable_data_ptr<scalar_t>(), y1.numel(),
        [l, oml, hh](acc_t yi, acc_t zi, acc_t vi) { return ((yi - oml * zi) - hh * vi) / l; },
        y1.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> coupled_adjoint_cpu(const at::Tensor& a_z_, const at::Tensor& b_,
                                                       const at::Tensor& w_, double lam, double h) {
  check_elementwise("coupled_adjoint", {{"a_z", &a_z_}, {"b", &b_}, {"w", &w_}});
  check_finite("coupled_adjoint", {{"lam", lam}, {"h", h}});
  const at::Tensor a_z = a_z_.contiguous(), b = b_.contiguous(), w = w_.contiguous();
  at::Tensor o_y = at::empty(a_z.sizes(), a_z.options()),
             o_z = at::empty(a_z.sizes(), a_z.options());
  DFLOW_FAST_DISPATCH(a_z.scalar_type(), "dflow_fast::coupled_adjoint", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t l = static_cast<acc_t>(lam), oml = static_cast<acc_t>(1.0 - lam),
                hh = static_cast<acc_t>(h);
    map_elementwise_n<scalar_t, 2>(
        {o_y.mutable_data_ptr<scalar_t>(), o_z.mutable_data_ptr<scalar_t>()}, a_z.numel(),
        [l, oml, hh](acc_t az, acc_t bi, acc_t wi) {
          return std::array<acc_t, 2>{l * bi, (az + oml * bi) + hh * wi};
        },
        a_z.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>());
  });
  return {o_y, o_z};
}

bool cpu_kernels_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace dflow_fast

TORCH_LIBRARY_IMPL(dflow_fast, CPU, m) {
  m.impl("axpy", &dflow_fast::axpy_cpu);
  m.impl("adjoint_euler", &dflow_fast::adjoint_euler_cpu);
  m.impl("adjoint_midpoint", &dflow_fast::adjoint_midpoint_cpu);
  m.impl("chi_prior", &dflow_fast::chi_prior_cpu);
  m.impl("lbfgs_direction", &dflow_fast::lbfgs_direction_cpu);
  m.impl("heun_predict", &dflow_fast::heun_predict_cpu);
  m.impl("heun_step", &dflow_fast::heun_step_cpu);
  m.impl("heun_adjoint", &dflow_fast::heun_adjoint_cpu);
  m.impl("coupled_forward", &dflow_fast::coupled_forward_cpu);
  m.impl("coupled_inverse", &dflow_fast::coupled_inverse_cpu);
  m.impl("coupled_adjoint", &dflow_fast::coupled_adjoint_cpu);
}
