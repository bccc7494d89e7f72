// The Python module dflow_fast._C: importing it loads the op registrations of this library
// (ops.cpp, cpu_kernels.cpp, cuda/*.cu). The fast path is torch.ops.dflow_fast.<op>; the plain
// functions here call the same dispatcher entries (device dispatch included) for use without
// torch.ops, and the build facts say what this binary was built with.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/headeronly/version.h>

#include <string>
#include <tuple>

#include "dflow_fast.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace dflow_fast {

CudaBuildFacts& cuda_build_facts() {
  static CudaBuildFacts facts;  // function-local: safe against static initialization order
  return facts;
}

namespace {

// The typed dispatcher entry of dflow_fast::<name>; callers keep it in a function-local static
// (thread-safe initialization, looked up once).
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string("dflow_fast::") + name).c_str(), "")
      .typed<Sig>();
}

using T = at::Tensor;
using CT = const at::Tensor&;

std::string compiler_version() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

}  // namespace
}  // namespace dflow_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace dflow_fast;
  namespace py = pybind11;
  m.doc() = "dflow_fast compiled core: C++ CPU (and, when built, CUDA) kernels of the fused ops, "
            "registered as torch.ops.dflow_fast.*";

  // The GIL is released around the kernels (they are pure C++); a Python autograd or fake kernel
  // the dispatcher reaches takes it back itself.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("axpy",
        [](CT x, CT v, double h) {
          static const auto f = typed_op<T(CT, CT, double)>("axpy");
          return f.call(x, v, h);
        },
        "x + h * v; x, v: [B, *S]", py::arg("x"), py::arg("v"), py::arg("h"), nogil);
  m.def("adjoint_euler",
        [](CT a, CT w) {
          static const auto f = typed_op<T(CT, CT)>("adjoint_euler");
          return f.call(a, w);
        },
        "a + w; a, w: [B, *S]", py::arg("a"), py::arg("w"), nogil);
  m.def("adjoint_midpoint",
        [](CT a, CT w2, CT w1) {
          static const auto f = typed_op<T(CT, CT, CT)>("adjoint_midpoint");
          return f.call(a, w2, w1);
        },
        "a + w2 + w1; a, w2, w1: [B, *S]", py::arg("a"), py::arg("w2"), py::arg("w1"), nogil);
  m.def("chi_prior",
        [](CT x, double weight) {
          static const auto f = typed_op<std::tuple<T, T, T>(CT, double)>("chi_prior");
          return f.call(x, weight);
        },
        "x: [B, D] -> (sq [B], value [B], grad [B, D]) of the chi_d prior", py::arg("x"),
        py::arg("weight"), nogil);
  m.def("lbfgs_direction",
        [](CT g, CT S, CT Y, CT rho, CT gamma) {
          static const auto f = typed_op<T(CT, CT, CT, CT, CT)>("lbfgs_direction");
          return f.call(g, S, Y, rho, gamma);
        },
        "d = -H g of the batched L-BFGS two-loop recursion; g: [B, D], S, Y: [B, m, D], "
        "rho: [B, m], gamma: [B]",
        py::arg("g"), py::arg("S"), py::arg("Y"), py::arg("rho"), py::arg("gamma"), nogil);

  // Reversible solvers' state updates (formulas: dflow_fast/ops/twins.py).
  using T2 = std::tuple<T, T>;
  using T3 = std::tuple<T, T, T>;
  m.def("heun_predict",
        [](CT y, CT yhat, CT f, double h) {
          static const auto op = typed_op<T(CT, CT, CT, double)>("heun_predict");
          return op.call(y, yhat, f, h);
        },
        "2 y - yhat + h f; all [B, *S]", py::arg("y"), py::arg("yhat"), py::arg("f"),
        py::arg("h"), nogil);
  m.def("heun_step",
        [](CT y, CT yhat, CT f, CT fnext, double h, double hnext) {
          static const auto op = typed_op<T2(CT, CT, CT, CT, double, double)>("heun_step");
          return op.call(y, yhat, f, fnext, h, hnext);
        },
        "(y' = y + (h/2)(f + fnext), 2 y' - yhat + hnext fnext); all [B, *S]", py::arg("y"),
        py::arg("yhat"), py::arg("f"), py::arg("fnext"), py::arg("h"), py::arg("hnext"), nogil);
  m.def("heun_adjoint",
        [](CT a_y, CT a_yhat, CT w, double h, double hnext) {
          static const auto op = typed_op<T3(CT, CT, CT, double, double)>("heun_adjoint");
          return op.call(a_y, a_yhat, w, h, hnext);
        },
        "reversible Heun's adjoint through one step, c = a_yhat + w: (a_y + 2c, -c, "
        "(h/2) a_y + h c + (hnext/2)(a_y + 2c)); all [B, *S]",
        py::arg("a_y"), py::arg("a_yhat"), py::arg("w"), py::arg("h"), py::arg("hnext"), nogil);
  m.def("coupled_forward",
        [](CT y, CT z, CT v, double lam, double h) {
          static const auto op = typed_op<T(CT, CT, CT, double, double)>("coupled_forward");
          return op.call(y, z, v, lam, h);
        },
        "lam y + (1 - lam) z + h v; all [B, *S]", py::arg("y"), py::arg("z"), py::arg("v"),
        py::arg("lam"), py::arg("h"), nogil);
  m.def("coupled_inverse",
        [](CT y1, CT z, CT v, double lam, double h) {
          static const auto op = typed_op<T(CT, CT, CT, double, double)>("coupled_inverse");
          return op.call(y1, z, v, lam, h);
        },
        "(y1 - (1 - lam) z - h v) / lam; all [B, *S]", py::arg("y1"), py::arg("z"), py::arg("v"),
        py::arg("lam"), py::arg("h"), nogil);
  m.def("coupled_adjoint",
        [](CT a_z, CT b, CT w, double lam, double h) {
          static const auto op = typed_op<T2(CT, CT, CT, double, double)>("coupled_adjoint");
          return op.call(a_z, b, w, lam, h);
        },
        "(lam b, a_z + (1 - lam) b + h w); all [B, *S]", py::arg("a_z"), py::arg("b"),
        py::arg("w"), py::arg("lam"), py::arg("h"), nogil);

  // Build facts.
  m.def("has_cuda", [] { return cuda_build_facts().linked; },
        "whether the CUDA kernels were compiled into this binary");
  m.def("cuda_archs", [] { return cuda_build_facts().archs; },
        "GPU architectures the CUDA kernels were compiled for, e.g. ['8.0', '9.0']");
  m.def("cuda_version", [] { return cuda_build_facts().cuda_version; },
        "CUDA version the kernels were compiled against ('' without CUDA)");
  m.def("nvcc_version", [] { return cuda_build_facts().nvcc_version; },
        "nvcc that compiled the CUDA kernels ('' without CUDA)");
  m.def("compiler_version", &compiler_version, "host C++ compiler of the CPU kernels");
  m.def("torch_version", [] { return std::string(TORCH_VERSION); },
        "torch version whose headers this binary was compiled against");
  m.def("cxx_standard", [] { return static_cast<long>(__cplusplus); }, "__cplusplus of the build");
  m.def("has_openmp", &cpu_kernels_openmp,
        "whether the CPU kernels were compiled with OpenMP (else at::parallel_for runs serially)");
}
