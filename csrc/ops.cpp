// The one registration point of the fused ops (schemas) and the input checks shared by the CPU
// and CUDA kernels. Kernels register per device in cpu_kernels.cpp and cuda/ops.cu; the fake
// (meta) kernels and autograd formulas are registered from Python in dflow_fast/ops/ext.py.
#include <torch/library.h>

#include <cmath>
#include <sstream>

#include "dflow_fast.h"

namespace dflow_fast {
namespace {

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(t);
  }
}

// "[2, 3] float32 on cpu"
std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes() << " " << dtype_name(t.scalar_type()) << " on " << t.device();
  return s.str();
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(supported_dtype(t.scalar_type()), "dflow_fast::", op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", describe(t));
}

void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes() && t.scalar_type() == ref.scalar_type() &&
                  t.device() == ref.device(),
              "dflow_fast::", op, ": ", name, " must have the shape, dtype and device of ",
              ref_name, "; ", ref_name, " is ", describe(ref), ", ", name, " is ", describe(t));
}

}  // namespace

void check_elementwise(const char* op, std::initializer_list<NamedTensor> args) {
  const auto& [first_name, first] = *args.begin();
  check_dtype(op, first_name, *first);
  for (const auto& [name, t] : args) check_like(op, name, *t, first_name, *first);
}

void check_chi_prior(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "dflow_fast::chi_prior: x must be 2-D [B, D], got ", describe(x));
  check_dtype("chi_prior", "x", x);
}

void check_lbfgs(const at::Tensor& g, const at::Tensor& S, const at::Tensor& Y,
                 const at::Tensor& rho, const at::Tensor& gamma) {
  const char* op = "lbfgs_direction";
  TORCH_CHECK(g.dim() == 2, "dflow_fast::lbfgs_direction: g must be 2-D [B, D], got ",
              describe(g));
  check_dtype(op, "g", g);
  const int64_t B = g.size(0), D = g.size(1);
  TORCH_CHECK(S.dim() == 3 && S.size(0) == B && S.size(2) == D,
              "dflow_fast::lbfgs_direction: S must be [B, m, D] = [", B, ", m, ", D,
              "] to match g ", describe(g), ", got ", describe(S));
  const int64_t m = S.size(1);
  TORCH_CHECK(Y.sizes() == S.sizes(), "dflow_fast::lbfgs_direction: Y must have S's shape ",
              S.sizes(), ", got ", describe(Y));
  TORCH_CHECK(rho.dim() == 2 && rho.size(0) == B && rho.size(1) == m,
              "dflow_fast::lbfgs_direction: rho must be [B, m] = [", B, ", ", m, "], got ",
              describe(rho));
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == B,
              "dflow_fast::lbfgs_direction: gamma must be [B] = [", B, "], got ", describe(gamma));
  for (const auto& [name, t] : {NamedTensor{"S", &S}, {"Y", &Y}, {"rho", &rho},
                                 {"gamma", &gamma}}) {
    TORCH_CHECK(t->scalar_type() == g.scalar_type() && t->device() == g.device(),
                "dflow_fast::lbfgs_direction: ", name, " must have g's dtype and device; g is ",
                describe(g), ", ", name, " is ", describe(*t));
  }
}

void check_finite(const char* op, std::initializer_list<NamedScalar> args) {
  for (const auto& [name, value] : args) {
    TORCH_CHECK(std::isfinite(value), "dflow_fast::", op, ": ", name, " must be finite, got ",
                value);
  }
}

void check_coupled_inverse_lam(double lam) {
  TORCH_CHECK(lam != 0.0, "dflow_fast::coupled_inverse: lam must be nonzero (the inverse divides "
              "by it), got ", lam);
}

at::ScalarType chi_prior_stat_dtype(at::ScalarType x_dtype) {
  return (x_dtype == at::kHalf || x_dtype == at::kBFloat16) ? at::kFloat : x_dtype;
}

}  // namespace dflow_fast

TORCH_LIBRARY(dflow_fast, m) {
  // The fake kernels live in this Python module (torch requires the pairing, and names the module
  // in its error when a fake tensor reaches an op before the module is imported).
  m.set_python_module("dflow_fast.ops.ext");
  m.def("axpy(Tensor x, Tensor v, float h) -> Tensor");
  m.def("adjoint_euler(Tensor a, Tensor w) -> Tensor");
  m.def("adjoint_midpoint(Tensor a, Tensor w2, Tensor w1) -> Tensor");
  m.def("chi_prior(Tensor x, float weight) -> (Tensor, Tensor, Tensor)");
  m.def("lbfgs_direction(Tensor g, Tensor S, Tensor Y, Tensor rho, Tensor gamma) -> Tensor");
  // State updates of the reversible solvers (reversible Heun; coupled reversible RK).
  m.def("heun_predict(Tensor y, Tensor yhat, Tensor f, float h) -> Tensor");
  m.def("heun_step(Tensor y, Tensor yhat, Tensor f, Tensor fnext, float h, float hnext) "
        "-> (Tensor, Tensor)");
  m.def("heun_adjoint(Tensor a_y, Tensor a_yhat, Tensor w, float h, float hnext) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("coupled_forward(Tensor y, Tensor z, Tensor v, float lam, float h) -> Tensor");
  m.def("coupled_inverse(Tensor y1, Tensor z, Tensor v, float lam, float h) -> Tensor");
  m.def("coupled_adjoint(Tensor a_z, Tensor b, Tensor w, float lam, float h) -> (Tensor, Tensor)");
}
