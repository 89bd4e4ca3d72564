#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../roi_boxes_impl.h"
#include "../roi_crops_impl.h"
#include "sdrpn/roi_crops.h"
#include "sdrpn/roi_math.h"

namespace sdrpn::ops {
namespace {

// Mask mode of one sample, after the labelling: `count` boxes (0, 1 or 2 = "2 or more"),
// the first in `slot`.
void crop_sample(const float* blurred, int64_t h, int64_t w, double threshold, int64_t count,
                 const int64_t* slot, int64_t* box_out, bool* keep, bool* has_crop) {
  const int64_t n = h * w;
  if (count == 0) {
    *has_crop = false;
    return;
  }
  if (count == 1) {
    std::copy(slot, slot + 4, box_out);
    std::fill(keep, keep + n, true);
    *has_crop = true;
    return;
  }
  float max_value = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) max_value = std::max(max_value, blurred[i]);
  const float thr = math::roi_threshold(threshold, max_value);
  math::CellBox box{w, h, -1, -1, 0};
  for (int64_t i = 0; i < n; ++i) {
    if (!(blurred[i] > thr)) continue;
    const int64_t y = i / w, x = i % w;
    box.x0 = std::min(box.x0, x);
    box.y0 = std::min(box.y0, y);
    box.x1 = std::max(box.x1, x + 1);
    box.y1 = std::max(box.y1, y + 1);
    ++box.area;
  }
  *has_crop = box.area > 0;
  if (!*has_crop) return;
  box_out[0] = box.x0;
  box_out[1] = box.y0;
  box_out[2] = box.x1;
  box_out[3] = box.y1;
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t x = 0; x < w; ++x) {
      keep[y * w + x] = math::crop_keep(blurred, thr, w, box, h, w, y, x);
    }
  }
}

void roi_crop_cpu(const at::Tensor& blurred, double threshold, const at::Tensor& slots,
                  const at::Tensor& counts, at::Tensor& boxes, at::Tensor& keep,
                  at::Tensor& has_crop) {
  const int64_t h = blurred.size(1), w = blurred.size(2), n = h * w;
  const int64_t slot_stride = slots.size(1) * 4;
  const float* b = blurred.const_data_ptr<float>();
  const int64_t* sl = slots.const_data_ptr<int64_t>();
  const int64_t* ct = counts.const_data_ptr<int64_t>();
  int64_t* bx = boxes.data_ptr<int64_t>();
  bool* kp = keep.data_ptr<bool>();
  bool* has = has_crop.data_ptr<bool>();
  at::parallel_for(0, blurred.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      crop_sample(b + i * n, h, w, threshold, ct[i], sl + i * slot_stride, bx + i * 4, kp + i * n,
                  has + i);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_crops_kernel(
    const at::Tensor& prob, double threshold, c10::string_view mode, double sigma, int64_t min_area,
    int64_t max_area, int64_t max_boxes, bool drop_singletons, bool reference_clamp) {
  return roi_crops_impl(prob, threshold, mode, sigma, min_area, max_area, max_boxes,
                        drop_singletons, reference_clamp, &roi_label_cpu, &roi_crop_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CPU, m) { m.impl("roi_crops", &roi_crops_kernel); }

}  // namespace sdrpn::ops
