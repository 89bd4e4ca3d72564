#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../massive_activation_sinks_impl.h"
#include "sdrpn/massive_activation_math.h"
#include "sum_squares.h"

namespace sdrpn::ops {
namespace {

constexpr int kLanes = 8;

// Any layout and float64: independent partial sums break the add dependency chain.
template <typename scalar_t, typename opmath_t>
opmath_t strided_sum_squares(const scalar_t* h, int64_t hidden_size, int64_t stride_d) {
  opmath_t partial[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= hidden_size; d += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const auto v = static_cast<opmath_t>(h[(d + lane) * stride_d]);
      partial[lane] += v * v;
    }
  }
  for (; d < hidden_size; ++d) {
    const auto v = static_cast<opmath_t>(h[d * stride_d]);
    partial[0] += v * v;
  }
  opmath_t sum = 0;
  for (int lane = 0; lane < kLanes; ++lane) sum += partial[lane];
  return sum;
}

template <typename scalar_t, typename opmath_t>
opmath_t row_sum_squares(const scalar_t* h, int64_t hidden_size, int64_t stride_d) {
#ifdef SDRPN_X86_SIMD
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (stride_d == 1 && cpu::cpu_has_avx2_f16c()) return cpu::sum_squares_avx2(h, hidden_size);
  }
#endif
  return strided_sum_squares<scalar_t, opmath_t>(h, hidden_size, stride_d);
}

template <typename scalar_t>
void flag_sinks(const at::Tensor& hidden, c10::IntArrayRef dims, double tau, double eps,
                at::Tensor& sinks) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t seq_len = hidden.size(1);
  const int64_t hidden_size = hidden.size(2);
  const int64_t stride_b = hidden.stride(0), stride_l = hidden.stride(1),
                stride_d = hidden.stride(2);
  const scalar_t* data = hidden.const_data_ptr<scalar_t>();
  bool* out = sinks.data_ptr<bool>();
  const std::vector<int64_t> dim_list(dims.begin(), dims.end());

  at::parallel_for(0, sinks.numel(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; ++token) {
      const scalar_t* h = data + (token / seq_len) * stride_b + (token % seq_len) * stride_l;
      const opmath_t sum_squares = row_sum_squares<scalar_t, opmath_t>(h, hidden_size, stride_d);
      opmath_t max_abs = 0;
      for (const int64_t d : dim_list) {
        max_abs = std::max(max_abs, std::abs(static_cast<opmath_t>(h[d * stride_d])));
      }
      out[token] = math::is_massive_activation<opmath_t>(
          max_abs, sum_squares, static_cast<opmath_t>(hidden_size), static_cast<opmath_t>(tau),
          static_cast<opmath_t>(eps));
    }
  });
}

at::Tensor massive_activation_sinks_kernel(const at::Tensor& hidden, c10::IntArrayRef dims,
                                           double tau, double eps) {
  check_massive_activation_sinks_inputs(hidden, dims, tau, eps);
  auto sinks = at::empty({hidden.size(0), hidden.size(1)}, hidden.options().dtype(at::kBool));
  if (sinks.numel() == 0) return sinks;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(),
                                  "massive_activation_sinks_cpu",
                                  [&] { flag_sinks<scalar_t>(hidden, dims, tau, eps, sinks); });
  return sinks;
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CPU, m) {
  m.impl("massive_activation_sinks", &massive_activation_sinks_kernel);
}

}  // namespace sdrpn::ops
