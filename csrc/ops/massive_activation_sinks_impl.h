#pragma once

// Private to the op: the argument checks every device's kernel runs first.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace sdrpn::ops {

void check_massive_activation_sinks_inputs(const at::Tensor& hidden, c10::IntArrayRef dims,
                                           double tau, double eps);

}  // namespace sdrpn::ops
