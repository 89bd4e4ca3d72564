#pragma once

// Argument-check helpers shared by the ops' check_<op>_inputs functions.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace sdrpn::ops {

// The C++ entry points' first check: a C++ caller can pass at::Tensor(), which Python cannot,
// and the dispatcher would fail on it without naming the argument.
inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor, got an undefined one");
}

// An optional holding an undefined tensor means no tensor, as ATen's own ops take it.
inline std::optional<at::Tensor> defined_or_none(const std::optional<at::Tensor>& t) {
  return t && t->defined() ? t : std::nullopt;
}

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
