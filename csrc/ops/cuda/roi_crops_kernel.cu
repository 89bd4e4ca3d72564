#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <math_constants.h>
#include <cub/block/block_reduce.cuh>

#include "../roi_boxes_impl.h"
#include "../roi_crops_impl.h"
#include "launch.h"
#include "sdrpn/roi_crops.h"
#include "sdrpn/roi_math.h"

namespace sdrpn::ops {
namespace {

using BlockMax = cub::BlockReduce<float, kThreadsPerBlock>;

// Block-shared scratch of one sample's mask: the blurred max and the mask's tight box.
struct CropShared {
  BlockMax::TempStorage reduce;
  float max;
  int x0, y0, x1, y1;
};

// One block per sample: 0 boxes give no crop, 1 gives that box with every token kept, 2 or
// more give the tight box of the thresholded mask and its resized token mask. `count` is
// the same for the whole block, so every branch keeps the block's barriers uniform.
__global__ void roi_crops_cuda_kernel(const float* __restrict__ blurred, int64_t batch, int h,
                                      int w, double threshold, const int64_t* __restrict__ slots,
                                      int64_t slot_stride, const int64_t* __restrict__ counts,
                                      int64_t* __restrict__ boxes, bool* __restrict__ keep,
                                      bool* __restrict__ has_crop) {
  __shared__ CropShared shared;
  const int n = h * w;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const int64_t count = counts[b];
    const float* map = blurred + b * n;
    bool* sample_keep = keep + b * n;
    if (count == 0) {
      if (threadIdx.x == 0) has_crop[b] = false;
    } else if (count == 1) {
      for (int i = threadIdx.x; i < n; i += kThreadsPerBlock) sample_keep[i] = true;
      if (threadIdx.x < 4) boxes[b * 4 + threadIdx.x] = slots[b * slot_stride + threadIdx.x];
      if (threadIdx.x == 0) has_crop[b] = true;
    } else {
      float local_max = -CUDART_INF_F;
      for (int i = threadIdx.x; i < n; i += kThreadsPerBlock) local_max = fmaxf(local_max, map[i]);
      const float block_max =
          BlockMax(shared.reduce).Reduce(local_max, [](float a, float c) { return fmaxf(a, c); });
      if (threadIdx.x == 0) {
        shared.max = block_max;
        shared.x0 = w;
        shared.y0 = h;
        shared.x1 = -1;
        shared.y1 = -1;
      }
      __syncthreads();
      const float thr = math::roi_threshold(threshold, shared.max);
      for (int i = threadIdx.x; i < n; i += kThreadsPerBlock) {
        if (!(map[i] > thr)) continue;
        const int y = i / w, x = i % w;
        atomicMin(&shared.x0, x);
        atomicMin(&shared.y0, y);
        atomicMax(&shared.x1, x + 1);
        atomicMax(&shared.y1, y + 1);
      }
      __syncthreads();
      const math::CellBox box{shared.x0, shared.y0, shared.x1, shared.y1, 0};
      if (box.x1 >= 0) {
        for (int i = threadIdx.x; i < n; i += kThreadsPerBlock) {
          sample_keep[i] = math::crop_keep(map, thr, w, box, h, w, i / w, i % w);
        }
        if (threadIdx.x == 0) {
          boxes[b * 4 + 0] = box.x0;
          boxes[b * 4 + 1] = box.y0;
          boxes[b * 4 + 2] = box.x1;
          boxes[b * 4 + 3] = box.y1;
        }
      }
      if (threadIdx.x == 0) has_crop[b] = box.x1 >= 0;
    }
    // The next sample reuses the shared scratch only once every thread is done with this one.
    __syncthreads();
  }
}

void roi_crop_cuda(const at::Tensor& blurred, double threshold, const at::Tensor& slots,
                   const at::Tensor& counts, at::Tensor& boxes, at::Tensor& keep,
                   at::Tensor& has_crop) {
  const int64_t batch = blurred.size(0);
  const int h = static_cast<int>(blurred.size(1)), w = static_cast<int>(blurred.size(2));
  const auto stream = at::cuda::getCurrentCUDAStream();
  roi_crops_cuda_kernel<<<grid_size(batch), kThreadsPerBlock, 0, stream>>>(
      blurred.const_data_ptr<float>(), batch, h, w, threshold, slots.const_data_ptr<int64_t>(),
      slots.size(1) * 4, counts.const_data_ptr<int64_t>(), boxes.data_ptr<int64_t>(),
      keep.data_ptr<bool>(), has_crop.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_crops_kernel(
    const at::Tensor& prob, double threshold, c10::string_view mode, double sigma, int64_t min_area,
    int64_t max_area, int64_t max_boxes, bool drop_singletons, bool reference_clamp) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(prob));
  return roi_crops_impl(prob, threshold, mode, sigma, min_area, max_area, max_boxes,
                        drop_singletons, reference_clamp, &roi_label_cuda, &roi_crop_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CUDA, m) { m.impl("roi_crops", &roi_crops_kernel); }

}  // namespace sdrpn::ops
