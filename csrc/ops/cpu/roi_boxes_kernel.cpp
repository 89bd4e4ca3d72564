#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../roi_boxes_impl.h"
#include "sdrpn/roi_boxes.h"
#include "sdrpn/roi_math.h"

namespace sdrpn::ops {
namespace {

// Blur, threshold, then a flood fill per component in row-major scan order, so
// components come out ordered by their first cell.
template <typename scalar_t>
void label_sample(const scalar_t* p, int64_t h, int64_t w, const RoiBoxOptions& opt, float* blurred,
                  int64_t* slots, int64_t* count) {
  const math::BlurWeights weights = math::blur_weights(opt.sigma);
  std::vector<float> rows(h * w);
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t x = 0; x < w; ++x) {
      rows[y * w + x] =
          math::blur_tap(static_cast<float>(p[y * w + math::reflect_index(x - 1, w)]),
                         static_cast<float>(p[y * w + x]),
                         static_cast<float>(p[y * w + math::reflect_index(x + 1, w)]), weights);
    }
  }
  float max_value = -std::numeric_limits<float>::infinity();
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t x = 0; x < w; ++x) {
      const float v = math::blur_tap(rows[math::reflect_index(y - 1, h) * w + x], rows[y * w + x],
                                     rows[math::reflect_index(y + 1, h) * w + x], weights);
      blurred[y * w + x] = v;
      max_value = std::max(max_value, v);
    }
  }
  const float thr = math::roi_threshold(opt.threshold, max_value);
  const math::BoxRules rules = box_rules(opt);
  std::vector<char> seen(h * w, 0);
  std::vector<int64_t> stack;
  int64_t kept = 0;
  for (int64_t start = 0; start < h * w; ++start) {
    if (seen[start] || !(blurred[start] > thr)) continue;
    math::CellBox box{w, h, -1, -1, 0};
    seen[start] = 1;
    stack.assign(1, start);
    while (!stack.empty()) {
      const int64_t i = stack.back();
      stack.pop_back();
      const int64_t y = i / w, x = i % w;
      box.x0 = std::min(box.x0, x);
      box.y0 = std::min(box.y0, y);
      box.x1 = std::max(box.x1, x + 1);
      box.y1 = std::max(box.y1, y + 1);
      ++box.area;
      for (int64_t dy = -1; dy <= 1; ++dy) {
        for (int64_t dx = -1; dx <= 1; ++dx) {
          const int64_t ny = y + dy, nx = x + dx;
          if (ny < 0 || ny >= h || nx < 0 || nx >= w) continue;
          const int64_t j = ny * w + nx;
          if (!seen[j] && blurred[j] > thr) {
            seen[j] = 1;
            stack.push_back(j);
          }
        }
      }
    }
    kept = math::write_box(box, h, w, rules, kept, slots);
  }
  *count = kept;
}

}  // namespace

void roi_label_cpu(const at::Tensor& prob, const RoiBoxOptions& opt, at::Tensor& blurred,
                   at::Tensor& slots, at::Tensor& counts) {
  const int64_t h = prob.size(1), w = prob.size(2);
  const int64_t cells = h * w, slots_per_sample = (opt.max_boxes + 1) * 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, prob.scalar_type(), "roi_boxes_cpu", [&] {
        const scalar_t* p = prob.const_data_ptr<scalar_t>();
        float* b = blurred.data_ptr<float>();
        int64_t* sl = slots.data_ptr<int64_t>();
        int64_t* ct = counts.data_ptr<int64_t>();
        at::parallel_for(0, prob.size(0), 1, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            label_sample(p + i * cells, h, w, opt, b + i * cells, sl + i * slots_per_sample,
                         ct + i);
          }
        });
      });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_boxes_kernel(
    const at::Tensor& prob, double threshold, double sigma, int64_t min_area, int64_t max_area,
    int64_t max_boxes, bool drop_singletons, bool reference_clamp) {
  return roi_boxes_impl(prob, threshold, sigma, min_area, max_area, max_boxes, drop_singletons,
                        reference_clamp, &roi_label_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CPU, m) { m.impl("roi_boxes", &roi_boxes_kernel); }

}  // namespace sdrpn::ops
