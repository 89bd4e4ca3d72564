#pragma once

#include <cmath>

#include "sdrpn/macros.h"

namespace sdrpn::math {

// |h_d| / rms(h) > tau  <=>  |h_d| > tau * sqrt(mean(h^2) + eps); both sides are
// non-negative, so squaring keeps the order and needs no square root or division.
template <typename T>
SDRPN_HOST_DEVICE bool is_massive_activation(T max_abs, T sum_squares, T dim, T tau, T eps) {
  const T rms_squared = sum_squares / dim + eps;
  return max_abs * max_abs > tau * tau * rms_squared;
}

}  // namespace sdrpn::math
