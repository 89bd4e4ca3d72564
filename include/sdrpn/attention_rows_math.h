#pragma once

#include <cmath>
#include <cstdint>

#include "sdrpn/macros.h"

namespace sdrpn::math {

// Causal visibility with padding: a query at sequence position `position` sees key j
// when j <= position and the key is a real token.
SDRPN_HOST_DEVICE bool key_visible(int64_t key, int64_t position, bool is_real_token) {
  return key <= position && is_real_token;
}

// The softmax numerator, shifted by the row maximum so that it never overflows.
SDRPN_HOST_DEVICE float shifted_exp(float score, float row_max) { return expf(score - row_max); }

// One probability of a row whose visible scores have maximum `row_max` and
// sum of shifted_exp `row_sum`; a row with no visible key is all zeros. A NaN or +Inf
// among the visible scores makes the sum NaN, and then the whole row is NaN, as eager
// attention's softmax gives it: a broken model must reach the pseudo labels' NaN guard,
// not pass as an attention of zeros.
SDRPN_HOST_DEVICE float window_probability(float score, bool visible, float row_max,
                                           float row_sum) {
  if (row_sum != row_sum) return row_sum;  // NaN
  return visible && row_sum > 0.0f ? shifted_exp(score, row_max) / row_sum : 0.0f;
}

}  // namespace sdrpn::math
