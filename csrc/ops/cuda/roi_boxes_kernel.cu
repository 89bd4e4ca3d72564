#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <math_constants.h>
#include <cub/block/block_reduce.cuh>

#include "../roi_boxes_impl.h"
#include "launch.h"
#include "sdrpn/roi_boxes.h"
#include "sdrpn/roi_math.h"

namespace sdrpn::ops {
namespace {

// The label of a cell below the threshold: larger than every cell index, so the min-label
// propagation never spreads it.
constexpr int kNotOn = 0x7fffffff;

using BlockMax = cub::BlockReduce<float, kThreadsPerBlock>;

// Block-shared scratch of the blur's max reduction; reused by every sample of the block.
struct BlurShared {
  BlockMax::TempStorage reduce;
  float max;
};

// Global scratch, H*W entries per sample for each array.
struct Workspace {
  float* rows;  // horizontal blur pass
  int* label;   // component label = smallest cell index of the component
  int* x0;      // per-root statistics, indexed by the root's cell
  int* y0;
  int* x1;
  int* y1;
  int* area;

  // The arrays of sample b of a batch of n-cell grids.
  __device__ Workspace sample(int64_t b, int n) const {
    const int64_t o = b * n;
    return {rows + o, label + o, x0 + o, y0 + o, x1 + o, y1 + o, area + o};
  }
};

// Phase 1, blur: the separable 3x3 Gaussian (rows, then columns, reflect padding) of one
// sample into `out`. Returns the blurred map's max to every thread of the block.
template <typename scalar_t>
__device__ float blur(const scalar_t* p, int h, int w, math::BlurWeights weights, float* rows,
                      float* out, BlurShared& shared) {
  const int n = h * w;
  for (int i = threadIdx.x; i < n; i += kThreadsPerBlock) {
    const int y = i / w, x = i % w;
    rows[i] = math::blur_tap(static_cast<float>(p[y * w + math::reflect_index(x - 1, w)]),
                             static_cast<float>(p[i]),
                             static_cast<float>(p[y * w + math::reflect_index(x + 1, w)]), weights);
  }
  __syncthreads();
  float local_max = -CUDART_INF_F;
  for (int i = threadIdx.x; i < n; i += kThreadsPerBlock) {
    const int y = i / w, x = i % w;
    const float v = math::blur_tap(rows[math::reflect_index(y - 1, h) * w + x], rows[i],
                                   rows[math::reflect_index(y + 1, h) * w + x], weights);
    out[i] = v;
    local_max = fmaxf(local_max, v);
  }
  const float block_max =
      BlockMax(shared.reduce).Reduce(local_max, [](float a, float b) { return fmaxf(a, b); });
  if (threadIdx.x == 0) shared.max = block_max;
  __syncthreads();
  return shared.max;
}

// Phase 2, label: 8-connected components of the cells above `threshold`. Every cell takes
// the smallest label among its neighbours until nothing changes, so a component's label is
// its first cell in row-major order, the order the CPU kernel finds components in.
__device__ void label_components(const float* blurred, float threshold, int h, int w, int* label) {
  const int n = h * w;
  for (int i = threadIdx.x; i < n; i += kThreadsPerBlock) {
    label[i] = blurred[i] > threshold ? i : kNotOn;
  }
  __syncthreads();
  bool changed = true;
  while (changed) {
    bool local_change = false;
    for (int i = threadIdx.x; i < n; i += kThreadsPerBlock) {
      int best = label[i];
      if (best == kNotOn) continue;
      const int y = i / w, x = i % w;
      for (int dy = -1; dy <= 1; ++dy) {
        for (int dx = -1; dx <= 1; ++dx) {
          const int ny = y + dy, nx = x + dx;
          if (ny < 0 || ny >= h || nx < 0 || nx >= w) continue;
          best = min(best, label[ny * w + nx]);
        }
      }
      best = min(best, label[best]);  // pointer jumping: converges in fewer rounds
      if (best < label[i]) {
        label[i] = best;
        local_change = true;
      }
    }
    changed = __syncthreads_or(local_change);
  }
}

// Phase 3, measure: each component's bounding box and size, gathered at its root cell.
__device__ void measure_components(int h, int w, const Workspace& ws) {
  const int n = h * w;
  for (int i = threadIdx.x; i < n; i += kThreadsPerBlock) {
    ws.x0[i] = w;
    ws.y0[i] = h;
    ws.x1[i] = -1;
    ws.y1[i] = -1;
    ws.area[i] = 0;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kThreadsPerBlock) {
    const int root = ws.label[i];
    if (root == kNotOn) continue;
    const int y = i / w, x = i % w;
    atomicMin(ws.x0 + root, x);
    atomicMin(ws.y0 + root, y);
    atomicMax(ws.x1 + root, x + 1);
    atomicMax(ws.y1 + root, y + 1);
    atomicAdd(ws.area + root, 1);
  }
  __syncthreads();
}

// Phase 4, write: the roots in row-major order through the box rules the CPU kernel uses.
// Sequential, as the rules number the kept boxes; one thread runs it. Returns the count.
__device__ int64_t write_boxes(int h, int w, const Workspace& ws, const math::BoxRules& rules,
                               int64_t* slots) {
  int64_t kept = 0;
  for (int i = 0; i < h * w; ++i) {
    if (ws.label[i] != i) continue;
    const math::CellBox box{ws.x0[i], ws.y0[i], ws.x1[i], ws.y1[i], ws.area[i]};
    kept = math::write_box(box, h, w, rules, kept, slots);
  }
  return kept;
}

// One block per sample, the four phases in turn; no host synchronisation.
template <typename scalar_t>
__global__ void roi_boxes_cuda_kernel(const scalar_t* __restrict__ prob, int64_t batch, int h,
                                      int w, RoiBoxOptions opt, math::BlurWeights weights,
                                      Workspace ws, float* __restrict__ blurred,
                                      int64_t* __restrict__ slots, int64_t* __restrict__ counts) {
  __shared__ BlurShared shared;
  const int n = h * w;
  const math::BoxRules rules = box_rules(opt);
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const Workspace sample = ws.sample(b, n);
    float* out = blurred + b * n;
    const float max_value = blur(prob + b * n, h, w, weights, sample.rows, out, shared);
    label_components(out, math::roi_threshold(opt.threshold, max_value), h, w, sample.label);
    measure_components(h, w, sample);
    if (threadIdx.x == 0) {
      counts[b] = write_boxes(h, w, sample, rules, slots + b * (rules.max_boxes + 1) * 4);
    }
    // The next sample reuses the shared scratch only once every thread is done with this one.
    __syncthreads();
  }
}

}  // namespace

void roi_label_cuda(const at::Tensor& prob, const RoiBoxOptions& opt, at::Tensor& blurred,
                    at::Tensor& slots, at::Tensor& counts) {
  const int64_t batch = prob.size(0);
  const int h = static_cast<int>(prob.size(1)), w = static_cast<int>(prob.size(2));
  const int64_t cells = batch * h * w;
  auto rows = at::empty({cells}, prob.options().dtype(at::kFloat));
  auto ints = at::empty({6, cells}, prob.options().dtype(at::kInt));
  Workspace ws;
  ws.rows = rows.data_ptr<float>();
  ws.label = ints[0].data_ptr<int>();
  ws.x0 = ints[1].data_ptr<int>();
  ws.y0 = ints[2].data_ptr<int>();
  ws.x1 = ints[3].data_ptr<int>();
  ws.y1 = ints[4].data_ptr<int>();
  ws.area = ints[5].data_ptr<int>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, prob.scalar_type(), "roi_boxes_cuda", [&] {
        roi_boxes_cuda_kernel<scalar_t><<<grid_size(batch), kThreadsPerBlock, 0, stream>>>(
            prob.const_data_ptr<scalar_t>(), batch, h, w, opt, math::blur_weights(opt.sigma), ws,
            blurred.data_ptr<float>(), slots.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_boxes_kernel(
    const at::Tensor& prob, double threshold, double sigma, int64_t min_area, int64_t max_area,
    int64_t max_boxes, bool drop_singletons, bool reference_clamp) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(prob));
  return roi_boxes_impl(prob, threshold, sigma, min_area, max_area, max_boxes, drop_singletons,
                        reference_clamp, &roi_label_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CUDA, m) { m.impl("roi_boxes", &roi_boxes_kernel); }

}  // namespace sdrpn::ops
