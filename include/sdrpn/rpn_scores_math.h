#pragma once

#include "sdrpn/macros.h"

namespace sdrpn::math {

// A masked-out cell (padding of a smaller grid) has probability 0: score -inf.
template <typename T>
SDRPN_HOST_DEVICE T rpn_score(T raw, T bias_term, T scale, bool real, T neg_inf) {
  return real ? (raw + bias_term) * scale : neg_inf;
}

// ... and passes no gradient back.
template <typename T>
SDRPN_HOST_DEVICE T rpn_grad_scaled(T grad, T scale, bool real) {
  return real ? grad * scale : T(0);
}

}  // namespace sdrpn::math
