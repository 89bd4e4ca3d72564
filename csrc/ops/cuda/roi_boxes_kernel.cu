#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <math_constants.h>

#include <algorithm>

#include "sdrpn/roi_boxes.h"
#include "sdrpn/roi_math.h"

namespace sdrpn::ops {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;
constexpr int kNotOn = 0x7fffffff;

struct Workspace {
  float* rows;   // (B, H*W) horizontal blur pass
  int* label;    // (B, H*W) component label = smallest cell index of the component
  int* x0;       // per-root statistics, (B, H*W) each
  int* y0;
  int* x1;
  int* y1;
  int* area;
};

// One block per sample: blur, threshold, label propagation (every cell takes the
// smallest label among its 8 neighbours until nothing changes, so a component's label is
// its first cell in row-major order), per-root box statistics by atomics, then one
// thread walks the roots in order and applies the reference's box rules.
template <typename scalar_t>
__global__ void roi_boxes_cuda_kernel(const scalar_t* __restrict__ prob, int64_t batch, int h, int w,
                                      RoiBoxOptions opt, Workspace ws, float* __restrict__ blurred,
                                      int64_t* __restrict__ slots, int64_t* __restrict__ counts) {
  using BlockReduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  __shared__ float shared_max;
  const int n = h * w;
  const float c = math::gaussian_centre_weight(static_cast<float>(opt.sigma));
  const float s = (1.0f - c) / 2.0f;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const scalar_t* p = prob + b * n;
    float* rows = ws.rows + b * n;
    float* out = blurred + b * n;
    int* label = ws.label + b * n;
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int y = i / w, x = i % w;
      rows[i] = math::blur_tap(static_cast<float>(p[y * w + math::reflect_index(x - 1, w)]),
                               static_cast<float>(p[i]),
                               static_cast<float>(p[y * w + math::reflect_index(x + 1, w)]), c, s);
    }
    __syncthreads();
    float local_max = -CUDART_INF_F;
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int y = i / w, x = i % w;
      const float v = math::blur_tap(rows[math::reflect_index(y - 1, h) * w + x], rows[i],
                                     rows[math::reflect_index(y + 1, h) * w + x], c, s);
      out[i] = v;
      local_max = fmaxf(local_max, v);
    }
    const float block_max = BlockReduce(temp).Reduce(local_max, [](float a, float b2) { return fmaxf(a, b2); });
    if (threadIdx.x == 0) shared_max = block_max;
    __syncthreads();
    const float thr = math::roi_threshold(opt.threshold, shared_max);
    for (int i = threadIdx.x; i < n; i += kThreads) {
      label[i] = out[i] > thr ? i : kNotOn;
      ws.x0[b * n + i] = w;
      ws.y0[b * n + i] = h;
      ws.x1[b * n + i] = -1;
      ws.y1[b * n + i] = -1;
      ws.area[b * n + i] = 0;
    }
    __syncthreads();
    bool changed = true;
    while (changed) {
      bool local_change = false;
      for (int i = threadIdx.x; i < n; i += kThreads) {
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
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int root = label[i];
      if (root == kNotOn) continue;
      const int y = i / w, x = i % w;
      atomicMin(ws.x0 + b * n + root, x);
      atomicMin(ws.y0 + b * n + root, y);
      atomicMax(ws.x1 + b * n + root, x + 1);
      atomicMax(ws.y1 + b * n + root, y + 1);
      atomicAdd(ws.area + b * n + root, 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t kept = 0;
      int64_t* slot = slots + b * (opt.max_boxes + 1) * 4;
      for (int i = 0; i < n; ++i) {
        if (label[i] != i) continue;
        math::CellBox box{ws.x0[b * n + i], ws.y0[b * n + i], ws.x1[b * n + i], ws.y1[b * n + i],
                          ws.area[b * n + i]};
        if (math::filter_box(box, h, w, opt.min_area, opt.max_area, opt.drop_singletons,
                             opt.reference_clamp) == math::BoxVerdict::kDrop) {
          continue;
        }
        if (kept <= opt.max_boxes) {
          slot[kept * 4 + 0] = box.x0;
          slot[kept * 4 + 1] = box.y0;
          slot[kept * 4 + 2] = box.x1;
          slot[kept * 4 + 3] = box.y1;
          ++kept;
        }
      }
      counts[b] = kept;
    }
    __syncthreads();
  }
}

void roi_label_cuda(const at::Tensor& prob, const RoiBoxOptions& opt, at::Tensor& blurred,
                    at::Tensor& slots, at::Tensor& counts) {
  const int64_t batch = prob.size(0);
  const int h = static_cast<int>(prob.size(1)), w = static_cast<int>(prob.size(2));
  const int64_t cells = batch * h * w;
  auto rows = at::empty({cells}, prob.options().dtype(at::kFloat));
  auto ints = at::empty({6, cells}, prob.options().dtype(at::kInt));
  int* base = ints.data_ptr<int>();
  const Workspace ws{rows.data_ptr<float>(), base, base + cells, base + 2 * cells,
                     base + 3 * cells, base + 4 * cells, base + 5 * cells};
  const auto blocks = static_cast<unsigned int>(std::min(batch, kMaxBlocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prob.scalar_type(), "roi_boxes_cuda", [&] {
    roi_boxes_cuda_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        prob.const_data_ptr<scalar_t>(), batch, h, w, opt, ws, blurred.data_ptr<float>(),
        slots.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_boxes_kernel(const at::Tensor& prob, double threshold,
                                                                double sigma, int64_t min_area,
                                                                int64_t max_area, int64_t max_boxes,
                                                                bool drop_singletons, bool reference_clamp) {
  const c10::cuda::CUDAGuard device_guard(prob.device());
  const RoiBoxOptions options{threshold, sigma, min_area, max_area, max_boxes, drop_singletons,
                              reference_clamp};
  return roi_boxes_impl(prob, options, &roi_label_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CUDA, m) { m.impl("roi_boxes", &roi_boxes_kernel); }

}  // namespace sdrpn::ops
