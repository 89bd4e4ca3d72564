#pragma once

// Launch geometry shared by the CUDA kernels. Every kernel loops over its work (a
// grid-stride loop over elements, rows or samples), so any grid size is correct and a
// capped grid covers inputs of any size.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace sdrpn::ops {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
// More blocks than any GPU keeps resident at once; the kernels loop over the rest.
constexpr int64_t kMaxBlocks = 65535;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The grid for `items` units of work at `items_per_block` units a block (a sample, a warp's
// row, a thread's element), capped at kMaxBlocks. `items` must be positive: a launch of
// zero blocks is an error, so the ops return early on empty inputs.
inline unsigned int grid_size(int64_t items, int64_t items_per_block = 1) {
  return static_cast<unsigned int>(std::min(ceil_div(items, items_per_block), kMaxBlocks));
}

// The device a kernel's CUDA guard takes: `t`'s where it is on CUDA, none otherwise. The
// dispatcher picks the CUDA kernel when any input is on CUDA, so the one the guard reads
// may be on the CPU; guarding nothing then lets the op's own check name the argument on the
// wrong device, where a guard on the CPU would throw an error that names none.
inline std::optional<c10::Device> cuda_device_of(const at::Tensor& t) {
  return t.is_cuda() ? std::optional<c10::Device>(t.device()) : std::nullopt;
}

// Butterfly reduction over the 32 lanes of a warp: every lane ends with the result, so no
// lane has to broadcast it.
template <typename T, typename Op>
__device__ T warp_all_reduce(T value, Op op) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

}  // namespace sdrpn::ops
