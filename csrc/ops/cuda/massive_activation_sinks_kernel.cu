#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../massive_activation_sinks_impl.h"
#include "launch.h"
#include "sdrpn/massive_activation_math.h"

namespace sdrpn::ops {
namespace {

// The probed dimensions, passed by value in the launch's arguments.
struct SinkDims {
  int64_t index[kMaxSinkDims];
  int64_t count;
};

// One warp per token: one coalesced pass over the hidden state gives both the sum of
// squares (for the RMS) and the largest |h_d| over the probed dimensions.
template <typename scalar_t>
__global__ void massive_activation_sinks_cuda_kernel(const scalar_t* __restrict__ hidden,
                                                     int64_t num_tokens, int64_t seq_len,
                                                     int64_t hidden_size, int64_t stride_b,
                                                     int64_t stride_l, int64_t stride_d,
                                                     const SinkDims dims, double tau, double eps,
                                                     bool* __restrict__ sinks) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       token < num_tokens; token += warps_in_grid) {
    const scalar_t* h = hidden + (token / seq_len) * stride_b + (token % seq_len) * stride_l;
    opmath_t sum_squares = 0;
    for (int64_t d = lane; d < hidden_size; d += kWarpSize) {
      const auto v = static_cast<opmath_t>(h[d * stride_d]);
      sum_squares += v * v;
    }
    opmath_t max_abs = 0;
    for (int64_t k = lane; k < dims.count; k += kWarpSize) {
      max_abs = max(max_abs, abs(static_cast<opmath_t>(h[dims.index[k] * stride_d])));
    }
    sum_squares = warp_all_reduce(sum_squares, [](opmath_t a, opmath_t b) { return a + b; });
    max_abs = warp_all_reduce(max_abs, [](opmath_t a, opmath_t b) { return a > b ? a : b; });
    if (lane == 0) {
      sinks[token] = math::is_massive_activation<opmath_t>(
          max_abs, sum_squares, static_cast<opmath_t>(hidden_size), static_cast<opmath_t>(tau),
          static_cast<opmath_t>(eps));
    }
  }
}

at::Tensor massive_activation_sinks_kernel(const at::Tensor& hidden, c10::IntArrayRef dims,
                                           double tau, double eps) {
  check_massive_activation_sinks_inputs(hidden, dims, tau, eps);
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(hidden));
  auto sinks = at::empty({hidden.size(0), hidden.size(1)}, hidden.options().dtype(at::kBool));
  if (sinks.numel() == 0) return sinks;
  SinkDims probed{};
  std::copy(dims.begin(), dims.end(), probed.index);
  probed.count = static_cast<int64_t>(dims.size());
  const int64_t num_tokens = sinks.numel();
  const unsigned int blocks = grid_size(num_tokens, kWarpsPerBlock);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "massive_activation_sinks_cuda", [&] {
        massive_activation_sinks_cuda_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, stream>>>(
            hidden.const_data_ptr<scalar_t>(), num_tokens, hidden.size(1), hidden.size(2),
            hidden.stride(0), hidden.stride(1), hidden.stride(2), probed, tau, eps,
            sinks.data_ptr<bool>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return sinks;
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CUDA, m) {
  m.impl("massive_activation_sinks", &massive_activation_sinks_kernel);
}

}  // namespace sdrpn::ops
