#include "sdrpn/massive_activation_sinks.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "massive_activation_sinks_impl.h"

namespace sdrpn {
namespace ops {

void check_massive_activation_sinks_inputs(const at::Tensor& hidden, c10::IntArrayRef dims,
                                           double tau, double eps) {
  TORCH_CHECK(hidden.dim() == 3, "hidden must be (B, L, D), got shape ", hidden.sizes());
  check_floating(hidden, "hidden");
  TORCH_CHECK(!dims.empty(), "dims must name at least one hidden dimension, got []");
  TORCH_CHECK(static_cast<int64_t>(dims.size()) <= kMaxSinkDims, "dims may name at most ",
              kMaxSinkDims, " hidden dimensions, got ", dims.size());
  const int64_t hidden_size = hidden.size(2);
  for (const int64_t d : dims) {
    TORCH_CHECK(d >= 0 && d < hidden_size, "dims must lie in [0, D) with D = ", hidden_size,
                ", got ", d, " in dims ", dims);
  }
  TORCH_CHECK(std::isfinite(tau) && tau >= 0.0, "tau must be a finite number >= 0, got ", tau);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0, got ", eps);
}

TORCH_LIBRARY_FRAGMENT(sdrpn, m) {
  m.def(
      "massive_activation_sinks(Tensor hidden, int[] dims, float tau=20.0, float eps=1e-06) "
      "-> Tensor");
}

}  // namespace ops

at::Tensor massive_activation_sinks(const at::Tensor& hidden, c10::IntArrayRef dims, double tau,
                                    double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdrpn::massive_activation_sinks", "")
                       .typed<decltype(massive_activation_sinks)>();
  ops::check_defined(hidden, "hidden");
  return op.call(hidden, dims, tau, eps);
}

}  // namespace sdrpn
