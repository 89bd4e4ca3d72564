#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace sdrpn {

// Sink tokens by massive activations (VisAttnSink): RMS-normalise each hidden state and
// flag the token where max over `dims` of |h_d| > tau.
//   hidden: (B, L, D) float32/float64/float16/bfloat16; dims: indices into D (1 to 64 of them).
// Returns bool (B, L).
at::Tensor massive_activation_sinks(const at::Tensor& hidden, c10::IntArrayRef dims,
                                    double tau = 20.0, double eps = 1e-6);

}  // namespace sdrpn
