// Shared declarations of the compiled core (dflow_fast._C): the input checks every backend runs
// before any work, the CPU kernels, and the build facts the CUDA translation unit fills in.
//
// The ops and their exact semantics are the PyTorch twins in dflow_fast/ops/twins.py.
// Shapes: x, v, a, w*, and every tensor of the reversible solvers' updates (y, yhat, f, fnext,
// z, y1, a_y, a_yhat, a_z, b): [B, *S] (one shape, dtype and device per call); g: [B, D];
// S, Y: [B, m, D]; rho: [B, m]; gamma: [B]. fp16/bf16 inputs are computed in fp32 (opmath).
//
// Only light ATen headers here: this file is also compiled by nvcc, and <torch/extension.h>
// would double every translation unit's compile time.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <string>
#include <tuple>
#include <vector>

namespace dflow_fast {

// ---- input checks (ops.cpp); TORCH_CHECK with the op, argument names, shapes and dtypes --------

// Every (name, tensor) has the shape, dtype and device of the first, whose dtype is one of
// float32, float64, float16, bfloat16. Example: check_elementwise("axpy", {{"x", &x}, {"v", &v}}).
using NamedTensor = std::pair<const char*, const at::Tensor*>;
void check_elementwise(const char* op, std::initializer_list<NamedTensor> args);
// x: [B, D], floating point.
void check_chi_prior(const at::Tensor& x);
// g: [B, D]; S, Y: [B, m, D]; rho: [B, m]; gamma: [B]; one dtype and device.
void check_lbfgs(const at::Tensor& g, const at::Tensor& S, const at::Tensor& Y,
                 const at::Tensor& rho, const at::Tensor& gamma);
// Every (name, value) is finite (a step size, a coupling, a weight). Example:
// check_finite("axpy", {{"h", h}}).
using NamedScalar = std::pair<const char*, double>;
void check_finite(const char* op, std::initializer_list<NamedScalar> args);
// coupled_inverse divides by lam: nonzero.
void check_coupled_inverse_lam(double lam);
// dtype of chi_prior's sq and value outputs: fp32 for fp16/bf16 inputs, else x's dtype.
at::ScalarType chi_prior_stat_dtype(at::ScalarType x_dtype);

// ---- CPU kernels (cpu_kernels.cpp); outputs are new contiguous tensors -------------------------

at::Tensor axpy_cpu(const at::Tensor& x, const at::Tensor& v, double h);
at::Tensor adjoint_euler_cpu(const at::Tensor& a, const at::Tensor& w);
at::Tensor adjoint_midpoint_cpu(const at::Tensor& a, const at::Tensor& w2, const at::Tensor& w1);
std::tuple<at::Tensor, at::Tensor, at::Tensor> chi_prior_cpu(const at::Tensor& x, double weight);
at::Tensor lbfgs_direction_cpu(const at::Tensor& g, const at::Tensor& S, const at::Tensor& Y,
                               const at::Tensor& rho, const at::Tensor& gamma);
// reversible solvers' state updates (formulas: dflow_fast/ops/twins.py)
at::Tensor heun_predict_cpu(const at::Tensor& y, const at::Tensor& yhat, const at::Tensor& f,
                            double h);
std::tuple<at::Tensor, at::Tensor> heun_step_cpu(const at::Tensor& y, const at::Tensor& yhat,
                                                 const at::Tensor& f, const at::Tensor& fnext,
                                                 double h, double hnext);
std::tuple<at::Tensor, at::Tensor, at::Tensor> heun_adjoint_cpu(const at::Tensor& a_y,
                                                                const at::Tensor& a_yhat,
                                                                const at::Tensor& w, double h,
                                                                double hnext);
at::Tensor coupled_forward_cpu(const at::Tensor& y, const at::Tensor& z, const at::Tensor& v,
                               double lam, double h);
at::Tensor coupled_inverse_cpu(const at::Tensor& y1, const at::Tensor& z, const at::Tensor& v,
                               double lam, double h);
std::tuple<at::Tensor, at::Tensor> coupled_adjoint_cpu(const at::Tensor& a_z, const at::Tensor& b,
                                                       const at::Tensor& w, double lam, double h);
// Whether cpu_kernels.cpp was compiled with OpenMP (else at::parallel_for runs serially).
bool cpu_kernels_openmp();

// ---- build facts (module.cpp) -----------------------------------------------------------------

// Filled by a static initializer of the CUDA translation unit when it is linked in, so has_cuda()
// reports what was actually built rather than what a macro promised.
struct CudaBuildFacts {
  bool linked = false;
  std::vector<std::string> archs;  // "9.0", ...: the virtual architectures nvcc compiled
  std::string cuda_version;        // CUDA runtime headers the kernels were compiled against
  std::string nvcc_version;
};
CudaBuildFacts& cuda_build_facts();

}  // namespace dflow_fast
