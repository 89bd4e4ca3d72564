#include "sdrpn/attention_rows.h"

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "error_text.h"
#include "ops/attention_rows_impl.h"

namespace {

struct Inputs {
  at::Tensor query, key, positions, starts, mask;
};

Inputs make_inputs(int64_t heads, int64_t kv_heads) {
  torch::manual_seed(0);
  Inputs in;
  in.query = torch::randn({2, heads, 3, 8});
  in.key = torch::randn({2, kv_heads, 12, 8});
  in.positions = torch::tensor({4, 11, 7, 2, 9, 11}, torch::kLong).view({2, 3});
  in.starts = torch::tensor({1, 3}, torch::kLong);
  in.mask = torch::ones({2, 12}, torch::kBool);
  in.mask[1][0] = false;
  return in;
}

// The direct formula: softmax(q k^T / sqrt(d) + mask) restricted to the window.
at::Tensor naive(const Inputs& in, int64_t key_length) {
  const int64_t group = in.query.size(1) / in.key.size(1);
  auto k = in.key.repeat_interleave(group, 1);
  auto scores = torch::matmul(in.query, k.transpose(2, 3)) / std::sqrt(8.0);
  auto j = torch::arange(12).view({1, 1, 1, 12});
  auto visible = (j <= in.positions.view({2, 1, 3, 1})) & in.mask.view({2, 1, 1, 12});
  auto probs = torch::softmax(scores.masked_fill(~visible, -INFINITY), -1);
  return torch::stack({probs[0].narrow(-1, 1, key_length), probs[1].narrow(-1, 3, key_length)});
}

TEST(AttentionRows, MatchesTheDirectFormulaWithGroupedHeads) {
  const auto in = make_inputs(4, 2);
  auto out = sdrpn::attention_rows(in.query, in.key, in.positions, in.starts, 6, in.mask);
  EXPECT_TRUE(torch::allclose(out, naive(in, 6), 1e-5, 1e-6));
}

TEST(AttentionRows, OutputsNeverRequireGrad) {
  auto in = make_inputs(4, 2);
  in.query.requires_grad_(true);
  auto out = sdrpn::attention_rows(in.query, in.key, in.positions, in.starts, 5, in.mask);
  EXPECT_FALSE(out.requires_grad());
}

TEST(AttentionRows, ChunkingOverKeyHeadsChangesNothing) {
  const auto in = make_inputs(6, 3);
  auto whole = sdrpn::attention_rows(in.query, in.key, in.positions, in.starts, 6, in.mask);
  // A budget of one score element forces one key head per chunk.
  auto chunked =
      sdrpn::ops::attention_rows_by_chunks(in.query, in.key, in.positions, in.starts, 6, in.mask,
                                           std::nullopt, &sdrpn::ops::window_softmax_cpu, 1);
  EXPECT_TRUE(torch::equal(whole, chunked));
}

TEST(AttentionRows, StridedKeysInChunksOfTheKeysBudgetChangeNothing) {
  const auto in = make_inputs(6, 3);
  auto whole = sdrpn::attention_rows(in.query, in.key, in.positions, in.starts, 6, in.mask);
  // A model's keys: a (B, L, Hk, d) buffer seen as (B, Hk, L, d).
  const auto strided = in.key.transpose(1, 2).contiguous().transpose(1, 2);
  ASSERT_FALSE(strided.is_contiguous());
  // Room for two key heads' keys a chunk: 3 key heads walk in chunks of 2 and 1.
  const int64_t keys_per_head = in.key.size(0) * in.key.size(2) * in.key.size(3);
  auto chunked = sdrpn::ops::attention_rows_by_chunks(
      in.query, strided, in.positions, in.starts, 6, in.mask, std::nullopt,
      &sdrpn::ops::window_softmax_cpu, 2 * keys_per_head);
  EXPECT_TRUE(torch::equal(whole, chunked));
}

TEST(AttentionRows, WindowOutsideTheKeysIsRejected) {
  const auto in = make_inputs(2, 2);
  const auto message = sdrpn::testing::error_of([&] {
    sdrpn::attention_rows(in.query, in.key, in.positions, torch::tensor({0, 8}, torch::kLong), 6);
  });
  EXPECT_NE(message.find("key_start + key_length must stay within [0, L] with L = 12"),
            std::string::npos)
      << message;
  // key_start + key_length would wrap past INT64_MAX: still refused, never read.
  const auto wrapping = sdrpn::testing::error_of([&] {
    sdrpn::attention_rows(in.query, in.key, in.positions,
                          torch::tensor({int64_t{0}, INT64_MAX - 3}, torch::kLong), 6);
  });
  EXPECT_NE(wrapping.find("key_start + key_length must stay within"), std::string::npos)
      << wrapping;
}

TEST(AttentionRowsCuda, MatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const auto in = make_inputs(4, 2);
  auto cpu = sdrpn::attention_rows(in.query, in.key, in.positions, in.starts, 6, in.mask);
  auto cuda = sdrpn::attention_rows(in.query.cuda(), in.key.cuda(), in.positions.cuda(),
                                    in.starts.cuda(), 6, in.mask.cuda());
  EXPECT_TRUE(torch::allclose(cpu, cuda.cpu(), 1e-5, 1e-6));
}

// A C++ caller can pass at::Tensor(): named before the dispatcher sees it, and an optional
// holding one is no mask.
TEST(AttentionRows, UndefinedTensorsAreNamed) {
  auto in = make_inputs(4, 2);
  const auto message = sdrpn::testing::error_of(
      [&] { sdrpn::attention_rows(in.query, at::Tensor(), in.positions, in.starts, 6); });
  EXPECT_NE(message.find("key must be a defined tensor, got an undefined one"), std::string::npos)
      << message;
  EXPECT_TRUE(torch::equal(
      sdrpn::attention_rows(in.query, in.key, in.positions, in.starts, 6, at::Tensor()),
      sdrpn::attention_rows(in.query, in.key, in.positions, in.starts, 6)));
}

}  // namespace
