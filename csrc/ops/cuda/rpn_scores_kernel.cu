#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <limits>

#include "../rpn_scores_impl.h"
#include "launch.h"
#include "sdrpn/rpn_scores_math.h"

namespace sdrpn::ops {
namespace {

template <typename scalar_t>
__global__ void rpn_scores_epilogue_cuda_kernel(
    const scalar_t* __restrict__ raw, const at::opmath_type<scalar_t>* __restrict__ bias_term,
    const bool* __restrict__ mask, int64_t numel, int64_t cells, double scale,
    scalar_t* __restrict__ out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto s = static_cast<opmath_t>(scale);
  const auto neg_inf = -std::numeric_limits<opmath_t>::infinity();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<scalar_t>(math::rpn_score<opmath_t>(
        static_cast<opmath_t>(raw[i]), bias_term[i / cells], s, !mask || mask[i], neg_inf));
  }
}

// One block per sample: scale and mask the gradient and reduce its row sum (the gradient
// of the bias term) in the same pass.
template <typename scalar_t>
__global__ void rpn_scores_grad_prologue_cuda_kernel(
    const scalar_t* __restrict__ grad, const bool* __restrict__ mask, int64_t batch, int64_t cells,
    double scale, scalar_t* __restrict__ grad_scaled,
    at::opmath_type<scalar_t>* __restrict__ grad_bias_term) {
  using opmath_t = at::opmath_type<scalar_t>;
  using BlockReduce = cub::BlockReduce<opmath_t, kThreadsPerBlock>;
  __shared__ typename BlockReduce::TempStorage temp;
  const auto s = static_cast<opmath_t>(scale);
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    opmath_t partial = 0;
    for (int64_t i = b * cells + threadIdx.x; i < (b + 1) * cells; i += kThreadsPerBlock) {
      const opmath_t v =
          math::rpn_grad_scaled<opmath_t>(static_cast<opmath_t>(grad[i]), s, !mask || mask[i]);
      grad_scaled[i] = static_cast<scalar_t>(v);
      partial += v;
    }
    const opmath_t total = BlockReduce(temp).Sum(partial);
    if (threadIdx.x == 0) grad_bias_term[b] = total;
    __syncthreads();  // temp is reused by the next sample
  }
}

void epilogue_cuda(const at::Tensor& raw_in, const at::Tensor& bias_term_in,
                   const std::optional<at::Tensor>& visual_mask, double scale, at::Tensor& out) {
  const auto raw = raw_in.contiguous();
  const auto bias_term = bias_term_in.contiguous();
  const auto mask = visual_mask.has_value() ? visual_mask->contiguous() : at::Tensor();
  const int64_t numel = raw.numel();
  const unsigned int blocks = grid_size(numel, kThreadsPerBlock);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, raw.scalar_type(), "rpn_scores_cuda", [&] {
        rpn_scores_epilogue_cuda_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, stream>>>(
            raw.const_data_ptr<scalar_t>(), bias_term.const_data_ptr<at::opmath_type<scalar_t>>(),
            mask.defined() ? mask.const_data_ptr<bool>() : nullptr, numel, raw.size(1), scale,
            out.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void grad_prologue_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& visual_mask,
                        double scale, at::Tensor& grad_scaled, at::Tensor& grad_bias_term) {
  const auto mask = visual_mask.has_value() ? visual_mask->contiguous() : at::Tensor();
  const int64_t batch = grad.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "rpn_scores_backward_cuda", [&] {
        rpn_scores_grad_prologue_cuda_kernel<scalar_t>
            <<<grid_size(batch), kThreadsPerBlock, 0, stream>>>(
                grad.const_data_ptr<scalar_t>(),
                mask.defined() ? mask.const_data_ptr<bool>() : nullptr, batch, grad.size(1), scale,
                grad_scaled.data_ptr<scalar_t>(),
                grad_bias_term.data_ptr<at::opmath_type<scalar_t>>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

at::Tensor rpn_scores_kernel(const at::Tensor& query_states, const at::Tensor& visual_states,
                             const at::Tensor& q_weight, const at::Tensor& k_weight,
                             int64_t num_heads, const std::optional<at::Tensor>& q_bias,
                             const std::optional<at::Tensor>& k_bias,
                             const std::optional<at::Tensor>& visual_mask) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(query_states));
  return rpn_scores_forward_impl(query_states, visual_states, q_weight, k_weight, num_heads, q_bias,
                                 k_bias, visual_mask, &epilogue_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rpn_scores_backward_kernel(const at::Tensor& grad, const at::Tensor& query_states,
                           const at::Tensor& visual_states, const at::Tensor& q_weight,
                           const at::Tensor& k_weight, int64_t num_heads,
                           const std::optional<at::Tensor>& q_bias,
                           const std::optional<at::Tensor>& k_bias,
                           const std::optional<at::Tensor>& visual_mask) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(query_states));
  return rpn_scores_backward_impl(grad, query_states, visual_states, q_weight, k_weight, num_heads,
                                  q_bias, k_bias, visual_mask, &grad_prologue_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CUDA, m) {
  m.impl("rpn_scores", &rpn_scores_kernel);
  m.impl("rpn_scores_backward", &rpn_scores_backward_kernel);
}

}  // namespace sdrpn::ops
