// The ops through the dispatcher alone, as code that never includes sdrpn's headers finds
// them once the library is linked (torch::ops style).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("sdrpn::pseudo_labels", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
                                  double, double, double, int64_t)>();
  auto labels = op.call(torch::tensor({{0.f, 1.f, 0.f, 0.f}}), torch::zeros({1, 4}), 2, 2, 1e-3,
                        0.2, 0.1, 0.5, -100);
  const bool ok = torch::equal(labels, torch::tensor({{0, 1, 0, 0}}, torch::kLong));
  std::cout << "dispatch_user: " << (ok ? "ok" : "failed") << "\n";
  return ok ? 0 : 1;
}
