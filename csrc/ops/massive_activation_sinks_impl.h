#pragma once

// Private to the op: the argument checks every device's kernel runs first.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace sdrpn::ops {

// The most hidden dimensions one call probes (VisAttnSink probes two): the CUDA kernel
// takes them by value as a launch argument, so a call never copies them to the device
// (a copy from pageable memory would wait for the work queued on the stream).
constexpr int64_t kMaxSinkDims = 64;

void check_massive_activation_sinks_inputs(const at::Tensor& hidden, c10::IntArrayRef dims,
                                           double tau, double eps);

}  // namespace sdrpn::ops
