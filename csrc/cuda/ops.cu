// CUDA kernels of the fused ops (semantics: dflow_fast/ops/twins.py), fp32/fp64/fp16/bf16 with
// fp16/bf16 computed in fp32 (at::opmath_type). Every launch goes on the current stream of the
// inputs' device (so the ops are CUDA-graph capturable) and is checked right after.
//
//   axpy, adjoint_euler, adjoint_midpoint and the reversible solvers' updates (heun_predict,
//       heun_step, heun_adjoint, coupled_forward, coupled_inverse, coupled_adjoint): one
//       grid-stride elementwise kernel with 1-3 outputs; 16-byte packed loads/stores when every
//       pointer is 16-byte aligned, a scalar loop for the < 16-byte tail.
//   chi_prior: one block per row; a block reduction of the squared norm, then the gradient pass.
//   lbfgs_direction: one block per sample running the two-loop recursion; q/r live in global
//       memory (an fp32 workspace for fp16/bf16, the output itself otherwise), each thread owning
//       the same strided elements throughout, so only the dot products need the block.
//
// Headers: c10/cuda (stream, guard, launch check) rather than ATen/cuda/CUDAContext.h, which
// pulls in cuBLAS/cuSPARSE headers these kernels do not need (and a minimal toolkit lacks).
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream forwards to.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "../dflow_fast.h"

namespace dflow_fast {
namespace {

#define DFLOW_FAST_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

constexpr int kThreads = 256;      // elementwise block size
constexpr int kBlocksPerSm = 8;    // 8 x 256 = 2048 resident threads: a full SM on sm_80/sm_90
constexpr int kMaxRowThreads = 512;  // chi_prior / lbfgs block size cap (a multiple of 32)

// ---- launch helpers ----------------------------------------------------------------------------

int sm_count(c10::DeviceIndex dev) {
  static std::array<std::atomic<int>, 64> cache{};  // per device; 0 = not queried yet
  const bool cacheable = dev >= 0 && dev < static_cast<int>(cache.size());
  int n = cacheable ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    if (cacheable) cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Blocks for `work` grid-stride items: enough to fill every SM, no more (the loops cover the rest).
unsigned int grid_for(int64_t work, int threads, c10::DeviceIndex dev) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sm_count(dev)) * kBlocksPerSm)));
}

// Threads for one block per row of `work` items: a warp multiple, capped.
int row_threads(int64_t work) {
  const int64_t warps = (work + 31) / 32;
  return static_cast<int>(std::min<int64_t>(kMaxRowThreads, std::max<int64_t>(1, warps) * 32));
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// VEC elements moved as one 16-byte load/store (the alignment makes the compiler emit 128-bit ops).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T>
constexpr int kVec = 16 / sizeof(T);  // fp64: 2, fp32: 4, fp16/bf16: 8

// ---- device math -------------------------------------------------------------------------------

__device__ __forceinline__ float dev_log(float v) { return logf(v); }
__device__ __forceinline__ double dev_log(double v) { return log(v); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block, returned to every thread. The butterfly (xor) shuffles add the same
// two operands in every lane, so all threads get bitwise the same value (lbfgs relies on it: each
// thread uses its own copy of alpha_j). blockDim.x: a multiple of 32, at most 1024; smem: 32 slots.
template <typename T>
__device__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = warp_sum(lane < nwarps ? smem[lane] : T(0));
  __syncthreads();  // smem is free for the next call
  return v;
}

// ---- elementwise -------------------------------------------------------------------------------

template <typename scalar_t, int NIn>
struct Inputs {
  const scalar_t* p[NIn];
};

template <typename scalar_t, int NOut>
struct Outputs {
  scalar_t* p[NOut];
};

// f(a, o): o = {out[0][i], ...} from a = {in[0][i], ...}, all in opmath. VEC > 1: elements
// [0, n / VEC * VEC) move as 16-byte packs (every pointer 16-byte aligned, checked on the host),
// the rest (< VEC) one by one.
template <typename scalar_t, int VEC, int NIn, int NOut, typename F>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(Outputs<scalar_t, NOut> out, Inputs<scalar_t, NIn> in, int64_t n, F f) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t i = tid; i < nvec; i += stride) {
    P pk[NIn];
#pragma unroll
    for (int k = 0; k < NIn; ++k) pk[k] = reinterpret_cast<const P*>(in.p[k])[i];
    P po[NOut];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t a[NIn], o[NOut];
#pragma unroll
      for (int k = 0; k < NIn; ++k) a[k] = static_cast<acc_t>(pk[k].v[j]);
      f(a, o);
#pragma unroll
      for (int k = 0; k < NOut; ++k) po[k].v[j] = static_cast<scalar_t>(o[k]);
    }
#pragma unroll
    for (int k = 0; k < NOut; ++k) reinterpret_cast<P*>(out.p[k])[i] = po[k];
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    acc_t a[NIn], o[NOut];
#pragma unroll
    for (int k = 0; k < NIn; ++k) a[k] = static_cast<acc_t>(in.p[k][i]);
    f(a, o);
#pragma unroll
    for (int k = 0; k < NOut; ++k) out.p[k][i] = static_cast<scalar_t>(o[k]);
  }
}

template <typename acc_t>
struct AxpyOp {
  acc_t h;
  __device__ void operator()(const acc_t (&a)[2], acc_t (&o)[1]) const { o[0] = a[0] + h * a[1]; }
};

template <typename acc_t>
struct Add2Op {
  __device__ void operator()(const acc_t (&a)[2], acc_t (&o)[1]) const { o[0] = a[0] + a[1]; }
};

template <typename acc_t>
struct Add3Op {  // (a + w2) + w1: the reference's association
  __device__ void operator()(const acc_t (&a)[3], acc_t (&o)[1]) const {
    o[0] = (a[0] + a[1]) + a[2];
  }
};

// Reversible solvers' updates, each with its twin's association (dflow_fast/ops/twins.py). The
// scalar coefficients are formed in double on the host and rounded once to opmath.

template <typename acc_t>
struct HeunPredictOp {  // (y, yhat, f) -> 2 y - yhat + h f
  acc_t h;
  __device__ void operator()(const acc_t (&a)[3], acc_t (&o)[1]) const {
    o[0] = (acc_t(2) * a[0] - a[1]) + h * a[2];
  }
};

template <typename acc_t>
struct HeunStepOp {  // (y, yhat, f, fnext) -> (y', 2 y' - yhat + hnext fnext), y' kept in opmath
  acc_t half_h, hnext;
  __device__ void operator()(const acc_t (&a)[4], acc_t (&o)[2]) const {
    const acc_t y1 = a[0] + half_h * (a[2] + a[3]);
    o[0] = y1;
    o[1] = (acc_t(2) * y1 - a[1]) + hnext * a[3];
  }
};

template <typename acc_t>
struct HeunAdjointOp {  // c = a_yhat + w: (a_y + 2c, -c, (h/2) a_y + h c + (hnext/2)(a_y + 2c))
  acc_t half_h, h, half_hnext;
  __device__ void operator()(const acc_t (&a)[3], acc_t (&o)[3]) const {
    const acc_t c = a[1] + a[2];
    const acc_t ay1 = a[0] + acc_t(2) * c;
    o[0] = ay1;
    o[1] = -c;
    o[2] = (half_h * a[0] + h * c) + half_hnext * ay1;
  }
};

template <typename acc_t>
struct CoupledForwardOp {  // (y, z, v) -> lam y + (1 - lam) z + h v
  acc_t lam, one_minus_lam, h;
  __device__ void operator()(const acc_t (&a)[3], acc_t (&o)[1]) const {
    o[0] = (lam * a[0] + one_minus_lam * a[1]) + h * a[2];
  }
};

template <typename acc_t>
struct CoupledInverseOp {  // (y1, z, v) -> (y1 - (1 - lam) z - h v) / lam: a true division
  acc_t lam, one_minus_lam, h;
  __device__ void operator()(const acc_t (&a)[3], acc_t (&o)[1]) const {
    o[0] = ((a[0] - one_minus_lam * a[1]) - h * a[2]) / lam;
  }
};

template <typename acc_t>
struct CoupledAdjointOp {  // (a_z, b, w) -> (lam b, a_z + (1 - lam) b + h w)
  acc_t lam, one_minus_lam, h;
  __device__ void operator()(const acc_t (&a)[3], acc_t (&o)[2]) const {
    o[0] = lam * a[1];
    o[1] = (a[0] + one_minus_lam * a[1]) + h * a[2];
  }
};

// Launches elementwise_kernel over contiguous `ins` and `outs` (all of one shape) on the current
// stream.
template <typename scalar_t, int NIn, int NOut, typename F>
void launch_elementwise(const std::array<at::Tensor, NOut>& outs,
                        const std::array<at::Tensor, NIn>& ins, F f) {
  const int64_t n = outs[0].numel();
  if (n == 0) return;
  constexpr int VEC = kVec<scalar_t>;
  Inputs<scalar_t, NIn> in;
  Outputs<scalar_t, NOut> out;
  bool aligned = true;
  for (int k = 0; k < NIn; ++k) {
    in.p[k] = ins[k].template const_data_ptr<scalar_t>();
    aligned = aligned && aligned16(in.p[k]);
  }
  for (int k = 0; k < NOut; ++k) {
    out.p[k] = outs[k].template mutable_data_ptr<scalar_t>();
    aligned = aligned && aligned16(out.p[k]);
  }
  const c10::DeviceIndex dev = outs[0].device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev);
  if (aligned && n >= VEC) {
    elementwise_kernel<scalar_t, VEC, NIn, NOut, F>
        <<<grid_for(n / VEC, kThreads, dev), kThreads, 0, stream>>>(out, in, n, f);
  } else {  // a view at an odd offset: same kernel, one element at a time
    elementwise_kernel<scalar_t, 1, NIn, NOut, F>
        <<<grid_for(n, kThreads, dev), kThreads, 0, stream>>>(out, in, n, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- chi_prior ---------------------------------------------------------------------------------

// One block per row r of x [B, D]: sq[r] = ||x_r||^2, value[r], grad_r = weight (1 - (D-1)/sq) x_r.
// VEC > 1 only when D % VEC == 0 and x, grad are 16-byte aligned (then every row is).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxRowThreads)
    chi_prior_kernel(const scalar_t* __restrict__ x, int64_t D, at::opmath_type<scalar_t> weight,
                     at::opmath_type<scalar_t>* __restrict__ sq,
                     at::opmath_type<scalar_t>* __restrict__ value, scalar_t* __restrict__ grad) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ acc_t red[32];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * D;
  scalar_t* gr = grad + row * D;
  const int64_t nvec = D / VEC;
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const P p = reinterpret_cast<const P*>(xr)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t v = static_cast<acc_t>(p.v[j]);
      s += v * v;
    }
  }
  for (int64_t i = nvec * VEC + threadIdx.x; i < D; i += blockDim.x) {
    const acc_t v = static_cast<acc_t>(xr[i]);
    s += v * v;
  }
  s = block_sum(s, red);
  const acc_t dm1 = static_cast<acc_t>(D - 1);
  if (threadIdx.x == 0) {
    sq[row] = s;
    value[row] = weight * (acc_t(0.5) * s - acc_t(0.5) * dm1 * dev_log(s));
  }
  const acc_t c = weight * (acc_t(1) - dm1 / s);
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const P p = reinterpret_cast<const P*>(xr)[i];
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = static_cast<scalar_t>(c * static_cast<acc_t>(p.v[j]));
    reinterpret_cast<P*>(gr)[i] = o;
  }
  for (int64_t i = nvec * VEC + threadIdx.x; i < D; i += blockDim.x) {
    gr[i] = static_cast<scalar_t>(c * static_cast<acc_t>(xr[i]));
  }
}

// ---- lbfgs_direction ---------------------------------------------------------------------------

// One block per sample b: d_b = -H_b g_b by the two-loop recursion (Nocedal & Wright, Alg. 7.4).
//   g, out: [B, D]; S, Y: [B, m, D] oldest first; rho: [B, m]; gamma: [B];
//   q: [B, D] opmath workspace for q/r (aliases out when scalar_t is already opmath, hence no
//   __restrict__ on either); alpha: [B, m] opmath workspace.
// Each sweep over the sample applies one update and accumulates the next dot product, so there is
// one block reduction per history slot and loop. Thread t owns elements t, t + blockDim.x, ... of
// q in every sweep, so q needs no synchronization; alpha_j is written by thread 0 and read after
// later block_sum barriers.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxRowThreads)
    lbfgs_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ S,
                 const scalar_t* __restrict__ Y, const scalar_t* __restrict__ rho,
                 const scalar_t* __restrict__ gamma, int64_t m, int64_t D,
                 at::opmath_type<scalar_t>* q, at::opmath_type<scalar_t>* alpha, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[32];
  const int64_t b = blockIdx.x;
  g += b * D;
  S += b * m * D;
  Y += b * m * D;
  rho += b * m;
  q += b * D;
  alpha += b * m;
  out += b * D;
  const acc_t gam = static_cast<acc_t>(gamma[b]);
  const int64_t t0 = threadIdx.x, nt = blockDim.x;
  if (m == 0) {  // no history: steepest descent scaled by gamma
    for (int64_t i = t0; i < D; i += nt) {
      out[i] = static_cast<scalar_t>(-static_cast<acc_t>(g[i]) * gam);
    }
    return;
  }
  // First loop, newest (m-1) to oldest (0): alpha_j = rho_j <s_j, q>;  q -= alpha_j y_j.
  const scalar_t* Sn = S + (m - 1) * D;
  acc_t dot = 0;
  for (int64_t i = t0; i < D; i += nt) {
    const acc_t qi = -static_cast<acc_t>(g[i]);
    q[i] = qi;
    dot += static_cast<acc_t>(Sn[i]) * qi;
  }
  for (int64_t j = m - 1; j >= 0; --j) {
    const acc_t a = static_cast<acc_t>(rho[j]) * block_sum(dot, red);
    if (t0 == 0) alpha[j] = a;
    const scalar_t* Yj = Y + j * D;
    dot = 0;
    if (j > 0) {
      const scalar_t* Sp = S + (j - 1) * D;
      for (int64_t i = t0; i < D; i += nt) {
        const acc_t qi = q[i] - a * static_cast<acc_t>(Yj[i]);
        q[i] = qi;
        dot += static_cast<acc_t>(Sp[i]) * qi;
      }
    } else {  // last update, then r = gamma q and the second loop's first dot <y_0, r>
      for (int64_t i = t0; i < D; i += nt) {
        const acc_t ri = (q[i] - a * static_cast<acc_t>(Yj[i])) * gam;
        q[i] = ri;
        dot += static_cast<acc_t>(Yj[i]) * ri;
      }
    }
  }
  // Second loop, oldest to newest: beta = rho_j <y_j, r>;  r += (alpha_j - beta) s_j.  q holds r.
  for (int64_t j = 0; j < m; ++j) {
    // Two statements on purpose: alpha[j] (thread 0's write) may be read only after the barrier
    // inside block_sum, which the operand order of one expression would not guarantee.
    const acc_t beta = static_cast<acc_t>(rho[j]) * block_sum(dot, red);
    const acc_t c = alpha[j] - beta;
    const scalar_t* Sj = S + j * D;
    dot = 0;
    if (j + 1 < m) {
      const scalar_t* Yn = Y + (j + 1) * D;
      for (int64_t i = t0; i < D; i += nt) {
        const acc_t ri = q[i] + c * static_cast<acc_t>(Sj[i]);
        q[i] = ri;
        dot += static_cast<acc_t>(Yn[i]) * ri;
      }
    } else {
      for (int64_t i = t0; i < D; i += nt) {
        out[i] = static_cast<scalar_t>(q[i] + c * static_cast<acc_t>(Sj[i]));
      }
    }
  }
}

// ---- host entry points -------------------------------------------------------------------------

at::Tensor axpy_cuda(const at::Tensor& x_, const at::Tensor& v_, double h) {
  check_elementwise("axpy", {{"x", &x_}, {"v", &v_}});
  check_finite("axpy", {{"h", h}});
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), v = v_.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  DFLOW_FAST_DISPATCH(x.scalar_type(), "dflow_fast::axpy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise<scalar_t, 2, 1>({out}, {x, v}, AxpyOp<acc_t>{static_cast<acc_t>(h)});
  });
  return out;
}

at::Tensor adjoint_euler_cuda(const at::Tensor& a_, const at::Tensor& w_) {
  check_elementwise("adjoint_euler", {{"a", &a_}, {"w", &w_}});
  const c10::cuda::CUDAGuard guard(a_.device());
  const at::Tensor a = a_.contiguous(), w = w_.contiguous();
  at::Tensor out = at::empty(a.sizes(), a.options());
  DFLOW_FAST_DISPATCH(a.scalar_type(), "dflow_fast::adjoint_euler", [&] {
    launch_elementwise<scalar_t, 2, 1>({out}, {a, w}, Add2Op<at::opmath_type<scalar_t>>{});
  });
  return out;
}

at::Tensor adjoint_midpoint_cuda(const at::Tensor& a_, const at::Tensor& w2_,
                                 const at::Tensor& w1_) {
  check_elementwise("adjoint_midpoint", {{"a", &a_}, {"w2", &w2_}, {"w1", &w1_}});
  const c10::cuda::CUDAGuard guard(a_.device());
  const at::Tensor a = a_.contiguous(), w2 = w2_.contiguous(), w1 = w1_.contiguous();
  at::Tensor out = at::empty(a.sizes(), a.options());
  DFLOW_FAST_DISPATCH(a.scalar_type(), "dflow_fast::adjoint_midpoint", [&] {
    launch_elementwise<scalar_t, 3, 1>({out}, {a, w2, w1}, Add3Op<at::opmath_type<scalar_t>>{});
  });
  return out;
}

at::Tensor heun_predict_cuda(const at::Tensor& y_, const at::Tensor& yhat_, const at::Tensor& f_,
                             double h) {
  check_elementwise("heun_predict", {{"y", &y_}, {"yhat", &yhat_}, {"f", &f_}});
  check_finite("heun_predict", {{"h", h}});
  const c10::cuda::CUDAGuard guard(y_.device());
  const at::Tensor y = y_.contiguous(), yhat = yhat_.contiguous(), f = f_.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  DFLOW_FAST_DISPATCH(y.scalar_type(), "dflow_fast::heun_predict", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise<scalar_t, 3, 1>({out}, {y, yhat, f},
                                       HeunPredictOp<acc_t>{static_cast<acc_t>(h)});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> heun_step_cuda(const at::Tensor& y_, const at::Tensor& yhat_,
                                                  const at::Tensor& f_, const at::Tensor& fnext_,
                                                  double h, double hnext) {
  check_elementwise("heun_step", {{"y", &y_}, {"yhat", &yhat_}, {"f", &f_}, {"fnext", &fnext_}});
  check_finite("heun_step", {{"h", h}, {"hnext", hnext}});
  const c10::cuda::CUDAGuard guard(y_.device());
  const at::Tensor y = y_.contiguous(), yhat = yhat_.contiguous(), f = f_.contiguous(),
                   fnext = fnext_.contiguous();
  at::Tensor y1 = at::empty(y.sizes(), y.options()), yhat2 = at::empty(y.sizes(), y.options());
  DFLOW_FAST_DISPATCH(y.scalar_type(), "dflow_fast::heun_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise<scalar_t, 4, 2>(
        {y1, yhat2}, {y, yhat, f, fnext},
        HeunStepOp<acc_t>{static_cast<acc_t>(0.5 * h), static_cast<acc_t>(hnext)});
  });
  return {y1, yhat2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> heun_adjoint_cuda(const at::Tensor& a_y_,
                                                                 const at::Tensor& a_yhat_,
                                                                 const at::Tensor& w_, double h,
                                                                 double hnext) {
  check_elementwise("heun_adjoint", {{"a_y", &a_y_}, {"a_yhat", &a_yhat_}, {"w", &w_}});
  check_finite("heun_adjoint", {{"h", h}, {"hnext", hnext}});
  const c10::cuda::CUDAGuard guard(a_y_.device());
  const at::Tensor a_y = a_y_.contiguous(), a_yhat = a_yhat_.contiguous(), w = w_.contiguous();
  const auto opts = a_y.options();
  at::Tensor o_y = at::empty(a_y.sizes(), opts), o_yhat = at::empty(a_y.sizes(), opts),
             o_g = at::empty(a_y.sizes(), opts);
  DFLOW_FAST_DISPATCH(a_y.scalar_type(), "dflow_fast::heun_adjoint", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise<scalar_t, 3, 3>(
        {o_y, o_yhat, o_g}, {a_y, a_yhat, w},
        HeunAdjointOp<acc_t>{static_cast<acc_t>(0.5 * h), static_cast<acc_t>(h),
                             static_cast<acc_t>(0.5 * hnext)});
  });
  return {o_y, o_yhat, o_g};
}

at::Tensor coupled_forward_cuda(const at::Tensor& y_, const at::Tensor& z_, const at::Tensor& v_,
                                double lam, double h) {
  check_elementwise("coupled_forward", {{"y", &y_}, {"z", &z_}, {"v", &v_}});
  check_finite("coupled_forward", {{"lam", lam}, {"h", h}});
  const c10::cuda::CUDAGuard guard(y_.device());
  const at::Tensor y = y_.contiguous(), z = z_.contiguous(), v = v_.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  DFLOW_FAST_DISPATCH(y.scalar_type(), "dflow_fast::coupled_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise<scalar_t, 3, 1>(
        {out}, {y, z, v},
        CoupledForwardOp<acc_t>{static_cast<acc_t>(lam), static_cast<acc_t>(1.0 - lam),
                                static_cast<acc_t>(h)});
  });
  return out;
}

at::Tensor coupled_inverse_cuda(const at::Tensor& y1_, const at::Tensor& z_, const at::Tensor& v_,
                                double lam, double h) {
  check_elementwise("coupled_inverse", {{"y1", &y1_}, {"z", &z_}, {"v", &v_}});
  check_finite("coupled_inverse", {{"lam", lam}, {"h", h}});
  check_coupled_inverse_lam(lam);
  const c10::cuda::CUDAGuard guard(y1_.device());
  const at::Tensor y1 = y1_.contiguous(), z = z_.contiguous(), v = v_.contiguous();
  at::Tensor out = at::empty(y1.sizes(), y1.options());
  DFLOW_FAST_DISPATCH(y1.scalar_type(), "dflow_fast::coupled_inverse", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise<scalar_t, 3, 1>(
        {out}, {y1, z, v},
        CoupledInverseOp<acc_t>{static_cast<acc_t>(lam), static_cast<acc_t>(1.0 - lam),
                                static_cast<acc_t>(h)});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> coupled_adjoint_cuda(const at::Tensor& a_z_,
                                                        const at::Tensor& b_, const at::Tensor& w_,
                                                        double lam, double h) {
  check_elementwise("coupled_adjoint", {{"a_z", &a_z_}, {"b", &b_}, {"w", &w_}});
  check_finite("coupled_adjoint", {{"lam", lam}, {"h", h}});
  const c10::cuda::CUDAGuard guard(a_z_.device());
  const at::Tensor a_z = a_z_.contiguous(), b = b_.contiguous(), w = w_.contiguous();
  at::Tensor o_y = at::empty(a_z.sizes(), a_z.options()),
             o_z = at::empty(a_z.sizes(), a_z.options());
  DFLOW_FAST_DISPATCH(a_z.scalar_type(), "dflow_fast::coupled_adjoint", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise<scalar_t, 3, 2>(
        {o_y, o_z}, {a_z, b, w},
        CoupledAdjointOp<acc_t>{static_cast<acc_t>(lam), static_cast<acc_t>(1.0 - lam),
                                static_cast<acc_t>(h)});
  });
  return {o_y, o_z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chi_prior_cuda(const at::Tensor& x_,
                                                               double weight) {
  check_chi_prior(x_);
  check_finite("chi_prior", {{"weight", weight}});
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const int64_t B = x.size(0), D = x.size(1);
  const auto stat = x.options().dtype(chi_prior_stat_dtype(x.scalar_type()));
  at::Tensor sq = at::empty({B}, stat), value = at::empty({B}, stat);
  at::Tensor grad = at::empty({B, D}, x.options());
  if (B == 0) return {sq, value, grad};
  TORCH_CHECK(B <= INT32_MAX, "dflow_fast::chi_prior: at most 2^31 - 1 rows on CUDA, got ", B);
  DFLOW_FAST_DISPATCH(x.scalar_type(), "dflow_fast::chi_prior", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int VEC = kVec<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const bool vec = D % VEC == 0 && aligned16(xp) && aligned16(gp);
    const int threads = row_threads(vec ? D / VEC : D);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
    const acc_t w = static_cast<acc_t>(weight);
    acc_t* sqp = sq.mutable_data_ptr<acc_t>();
    acc_t* valp = value.mutable_data_ptr<acc_t>();
    if (vec) {
      chi_prior_kernel<scalar_t, VEC><<<B, threads, 0, stream>>>(xp, D, w, sqp, valp, gp);
    } else {
      chi_prior_kernel<scalar_t, 1><<<B, threads, 0, stream>>>(xp, D, w, sqp, valp, gp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sq, value, grad};
}

at::Tensor lbfgs_direction_cuda(const at::Tensor& g_, const at::Tensor& S_, const at::Tensor& Y_,
                                const at::Tensor& rho_, const at::Tensor& gamma_) {
  check_lbfgs(g_, S_, Y_, rho_, gamma_);
  const c10::cuda::CUDAGuard guard(g_.device());
  const at::Tensor g = g_.contiguous(), S = S_.contiguous(), Y = Y_.contiguous();
  const at::Tensor rho = rho_.contiguous(), gamma = gamma_.contiguous();
  const int64_t B = g.size(0), D = g.size(1), m = S.size(1);
  at::Tensor out = at::empty({B, D}, g.options());
  if (B == 0) return out;
  TORCH_CHECK(B <= INT32_MAX, "dflow_fast::lbfgs_direction: at most 2^31 - 1 samples on CUDA, got ",
              B);
  DFLOW_FAST_DISPATCH(g.scalar_type(), "dflow_fast::lbfgs_direction", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = g.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    // q/r in opmath: the output itself when it already is, else an fp32 workspace.
    at::Tensor work = std::is_same_v<scalar_t, acc_t> ? out : at::empty({B, D}, acc_opts);
    at::Tensor alpha = at::empty({B, std::max<int64_t>(m, 1)}, acc_opts);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device().index());
    lbfgs_kernel<scalar_t><<<B, row_threads(D), 0, stream>>>(
        g.const_data_ptr<scalar_t>(), S.const_data_ptr<scalar_t>(), Y.const_data_ptr<scalar_t>(),
        rho.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(), m, D,
        work.mutable_data_ptr<acc_t>(), alpha.mutable_data_ptr<acc_t>(),
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---- build facts -------------------------------------------------------------------------------

// "9.0", ... from nvcc's __CUDA_ARCH_LIST__ (the virtual architectures this file was compiled
// for, e.g. 800,900), so the report is what was built, not what was asked for.
std::vector<std::string> compiled_archs() {
  std::vector<std::string> out;
#ifdef __CUDA_ARCH_LIST__
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  for (int a : archs) out.push_back(std::to_string(a / 100) + "." + std::to_string(a % 100 / 10));
#endif
  return out;
}

[[maybe_unused]] const bool kFactsRegistered = [] {
  CudaBuildFacts& f = cuda_build_facts();
  f.linked = true;
  f.archs = compiled_archs();
  f.cuda_version = std::to_string(CUDART_VERSION / 1000) + "." +
                   std::to_string(CUDART_VERSION % 1000 / 10);
  f.nvcc_version = std::to_string(__CUDACC_VER_MAJOR__) + "." +
                   std::to_string(__CUDACC_VER_MINOR__) + "." +
                   std::to_string(__CUDACC_VER_BUILD__);
  return true;
}();

}  // namespace
}  // namespace dflow_fast

TORCH_LIBRARY_IMPL(dflow_fast, CUDA, m) {
  m.impl("axpy", &dflow_fast::axpy_cuda);
  m.impl("adjoint_euler", &dflow_fast::adjoint_euler_cuda);
  m.impl("adjoint_midpoint", &dflow_fast::adjoint_midpoint_cuda);
  m.impl("chi_prior", &dflow_fast::chi_prior_cuda);
  m.impl("lbfgs_direction", &dflow_fast::lbfgs_direction_cuda);
  m.impl("heun_predict", &dflow_fast::heun_predict_cuda);
  m.impl("heun_step", &dflow_fast::heun_step_cuda);
  m.impl("heun_adjoint", &dflow_fast::heun_adjoint_cuda);
  m.impl("coupled_forward", &dflow_fast::coupled_forward_cuda);
  m.impl("coupled_inverse", &dflow_fast::coupled_inverse_cuda);
  m.impl("coupled_adjoint", &dflow_fast::coupled_adjoint_cuda);
}
