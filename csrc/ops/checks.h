#pragma once

// Argument-check helpers shared by the ops' check_<op>_inputs functions.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace sdrpn::ops {

// The floating dtypes every op accepts.
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// "<name> must be on the device of <ref_name> (<device>), got <device>".
inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

}  // namespace sdrpn::ops
