#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <math_constants.h>

#include "../attention_rows_impl.h"
#include "launch.h"
#include "sdrpn/attention_rows_math.h"

namespace sdrpn::ops {
namespace {

struct OutLayout {
  int64_t stride_b, stride_h, stride_q, stride_k;
};

// One warp per attention row: a max pass and a sum pass over the visible keys (the
// scores stay in L2 between them), then one write per kept column.
__global__ void attention_rows_cuda_kernel(const float* __restrict__ scores, int64_t num_rows,
                                           int64_t heads, int64_t rows, int64_t seq_len,
                                           const int64_t* __restrict__ positions,
                                           const int64_t* __restrict__ starts,
                                           const bool* __restrict__ mask, int64_t key_length,
                                           OutLayout layout, float* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       row < num_rows; row += warps_in_grid) {
    const int64_t b = row / (heads * rows), h = (row / rows) % heads, q = row % rows;
    const float* s = scores + row * seq_len;
    const bool* real = mask ? mask + b * seq_len : nullptr;
    const int64_t position = positions[b * rows + q];
    auto visible = [&](int64_t j) { return math::key_visible(j, position, !real || real[j]); };

    float row_max = -CUDART_INF_F;
    for (int64_t j = lane; j < seq_len; j += kWarpSize) {
      if (visible(j)) row_max = fmaxf(row_max, s[j]);
    }
    row_max = warp_all_reduce(row_max, [](float a, float b) { return fmaxf(a, b); });
    float row_sum = 0.0f;
    for (int64_t j = lane; j < seq_len; j += kWarpSize) {
      if (visible(j)) row_sum += math::shifted_exp(s[j], row_max);
    }
    row_sum = warp_all_reduce(row_sum, [](float a, float b) { return a + b; });

    float* o = out + b * layout.stride_b + h * layout.stride_h + q * layout.stride_q;
    const int64_t start = starts[b];
    for (int64_t c = lane; c < key_length; c += kWarpSize) {
      o[c * layout.stride_k] =
          math::window_probability(s[start + c], visible(start + c), row_max, row_sum);
    }
  }
}

void window_softmax_cuda(const at::Tensor& scores, const at::Tensor& query_positions,
                         const at::Tensor& key_start,
                         const std::optional<at::Tensor>& key_padding_mask, at::Tensor& out) {
  const auto positions = query_positions.contiguous();
  const auto starts = key_start.contiguous();
  const auto mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  const int64_t num_rows = scores.size(0) * scores.size(1) * scores.size(2);
  const OutLayout layout{out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  attention_rows_cuda_kernel<<<grid_size(num_rows, kWarpsPerBlock), kThreadsPerBlock, 0,
                               at::cuda::getCurrentCUDAStream()>>>(
      scores.const_data_ptr<float>(), num_rows, scores.size(1), scores.size(2), scores.size(3),
      positions.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
      mask.defined() ? mask.const_data_ptr<bool>() : nullptr, out.size(3), layout,
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor attention_rows_kernel(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& query_positions, const at::Tensor& key_start,
                                 int64_t key_length,
                                 const std::optional<at::Tensor>& key_padding_mask,
                                 std::optional<double> scale) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(query));
  return attention_rows_by_chunks(query, key, query_positions, key_start, key_length,
                                  key_padding_mask, scale, &window_softmax_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CUDA, m) { m.impl("attention_rows", &attention_rows_kernel); }

}  // namespace sdrpn::ops
