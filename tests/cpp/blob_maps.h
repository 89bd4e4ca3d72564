#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <utility>

namespace sdrpn::testing {

// (batch, 24, 24) maps of faint noise (below 0.05) with a 3x4 blob of 1.0 in every sample
// and a 3x3 blob of 0.9 eight columns to its right in odd samples: every sample keeps a box
// or two under the RoI rules, so a comparison of two devices compares boxes, not two empty
// lists (random maps raised to a power give none).
inline torch::Tensor blob_maps(int64_t batch) {
  using torch::indexing::Slice;
  torch::manual_seed(0);
  auto prob = torch::rand({batch, 24, 24}) * 0.05;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t r = (b * 7) % 20, c = (b * 5) % 12;
    prob.index_put_({b, Slice(r, r + 3), Slice(c, c + 4)}, 1.0);
    if (b % 2 == 1) prob.index_put_({b, Slice(r, r + 3), Slice(c + 8, c + 11)}, 0.9);
  }
  return prob;
}

// How many of `batch` samples a (K,) sample index of boxes or crops names at least once.
inline int64_t samples_named(const torch::Tensor& index, int64_t batch) {
  return torch::bincount(index, {}, batch).gt(0).sum().item<int64_t>();
}

// Grounding (batch, 576) from blob_maps and sinks (2% of the cells at 0.01, above the 1e-3
// threshold): every sample has foreground and background cells under SPEC's ratios.
inline std::pair<torch::Tensor, torch::Tensor> blob_label_maps(int64_t batch) {
  auto grounding = blob_maps(batch).view({batch, 576});
  torch::manual_seed(1);
  auto sink = (torch::rand({batch, 576}) < 0.02).to(torch::kFloat) * 0.01;
  return {grounding, sink};
}

}  // namespace sdrpn::testing
