#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <math_constants.h>
#include <cub/block/block_reduce.cuh>

#include "../pseudo_labels_impl.h"
#include "launch.h"
#include "sdrpn/pseudo_label_math.h"
#include "sdrpn/pseudo_labels.h"

namespace sdrpn::ops {
namespace {

struct MaxOp {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const {
    return a > b ? a : b;
  }
};

struct MergeBoxOp {
  __device__ math::GridBox operator()(math::GridBox a, const math::GridBox& b) const {
    a.merge(b);
    return a;
  }
};

// One block labels one sample: a block-wide max and finiteness test, a block-wide
// foreground box, then one write per cell. No host synchronisation anywhere.
template <typename scalar_t>
__global__ void pseudo_labels_cuda_kernel(const scalar_t* __restrict__ grounding,
                                          const scalar_t* __restrict__ sink, int64_t batch,
                                          int64_t num_cells, int64_t grid_w, int64_t g_stride0,
                                          int64_t g_stride1, int64_t s_stride0, int64_t s_stride1,
                                          PseudoLabelOptions opt, int64_t* __restrict__ labels) {
  using opmath_t = at::opmath_type<scalar_t>;
  using MaxReduce = cub::BlockReduce<opmath_t, kThreadsPerBlock>;
  using BoxReduce = cub::BlockReduce<math::GridBox, kThreadsPerBlock>;
  __shared__ union {
    typename MaxReduce::TempStorage max_storage;
    typename BoxReduce::TempStorage box_storage;
  } temp;
  __shared__ opmath_t shared_max;
  __shared__ math::GridBox shared_box;

  const int64_t grid_h = num_cells / grid_w;
  const opmath_t tau = static_cast<opmath_t>(opt.sink_threshold);

  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const scalar_t* g = grounding + b * g_stride0;
    const scalar_t* s = sink + b * s_stride0;
    int64_t* out = labels + b * num_cells;
    auto value = [&](int64_t i) {
      return math::suppress_sink(static_cast<opmath_t>(g[i * g_stride1]),
                                 static_cast<opmath_t>(s[i * s_stride1]), tau);
    };

    bool finite = true;
    opmath_t local_max = -CUDART_INF_F;
    for (int64_t i = threadIdx.x; i < num_cells; i += kThreadsPerBlock) {
      const auto gi = static_cast<opmath_t>(g[i * g_stride1]);
      const auto si = static_cast<opmath_t>(s[i * s_stride1]);
      finite = finite && isfinite(gi) && isfinite(si);
      local_max = max(local_max, math::suppress_sink(gi, si, tau));
    }
    const bool all_finite = __syncthreads_and(finite);
    const opmath_t block_max = MaxReduce(temp.max_storage).Reduce(local_max, MaxOp{});
    if (threadIdx.x == 0) shared_max = block_max;
    __syncthreads();
    const opmath_t max_value = shared_max;
    const opmath_t fg_threshold = static_cast<opmath_t>(opt.fg_ratio) * max_value;
    const opmath_t bg_threshold = static_cast<opmath_t>(opt.bg_ratio) * max_value;

    auto local_box = math::GridBox::empty();
    for (int64_t i = threadIdx.x; i < num_cells; i += kThreadsPerBlock) {
      if (value(i) > fg_threshold) local_box.add(i / grid_w, i % grid_w);
    }
    const auto block_box = BoxReduce(temp.box_storage).Reduce(local_box, MergeBoxOp{});
    if (threadIdx.x == 0) shared_box = block_box.or_whole_grid(grid_h, grid_w);
    __syncthreads();
    const math::GridBox box = shared_box;

    const bool no_signal =
        !all_finite || math::box_too_large(box.area(), num_cells, opt.max_box_fraction);
    for (int64_t i = threadIdx.x; i < num_cells; i += kThreadsPerBlock) {
      out[i] = no_signal ? opt.ignore_index
                         : math::cell_label(value(i), fg_threshold, bg_threshold,
                                            box.contains(i / grid_w, i % grid_w), opt.ignore_index);
    }
    // The shared scalars are rewritten for the next sample only after every thread read them.
    __syncthreads();
  }
}

at::Tensor pseudo_labels_kernel(const at::Tensor& grounding, const at::Tensor& sink, int64_t grid_h,
                                int64_t grid_w, double sink_threshold, double fg_ratio,
                                double bg_ratio, double max_box_fraction, int64_t ignore_index) {
  check_pseudo_labels_inputs(grounding, sink, grid_h, grid_w, sink_threshold, fg_ratio, bg_ratio,
                             max_box_fraction, ignore_index);
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(grounding));
  auto labels = at::empty(grounding.sizes(), grounding.options().dtype(at::kLong));
  if (labels.numel() == 0) return labels;
  const PseudoLabelOptions options{sink_threshold, fg_ratio, bg_ratio, max_box_fraction,
                                   ignore_index};
  const int64_t batch = grounding.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grounding.scalar_type(), "pseudo_labels_cuda", [&] {
        pseudo_labels_cuda_kernel<scalar_t><<<grid_size(batch), kThreadsPerBlock, 0, stream>>>(
            grounding.const_data_ptr<scalar_t>(), sink.const_data_ptr<scalar_t>(), batch,
            grounding.size(1), grid_w, grounding.stride(0), grounding.stride(1), sink.stride(0),
            sink.stride(1), options, labels.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CUDA, m) { m.impl("pseudo_labels", &pseudo_labels_kernel); }

}  // namespace sdrpn::ops
