#pragma once

#include <cstdint>

#include "sdrpn/macros.h"

namespace sdrpn::math {

// Label values written by the pseudo-label rules (the ignore value is an argument).
constexpr int64_t kForeground = 1;
constexpr int64_t kBackground = 0;

// Step 1: a sink token draws attention whatever the question, so its grounding value
// carries no signal and is zeroed before any threshold is taken.
template <typename T>
SDRPN_HOST_DEVICE T suppress_sink(T grounding, T sink, T sink_threshold) {
  return sink >= sink_threshold ? T(0) : grounding;
}

// Inclusive bounding box of the foreground cells on the grid. Empty until a cell is
// added; an empty box stands for the whole grid (SPEC Stage 1, step 3).
struct GridBox {
  int64_t row0;
  int64_t col0;
  int64_t row1;
  int64_t col1;

  SDRPN_HOST_DEVICE static GridBox empty() { return {INT64_MAX, INT64_MAX, -1, -1}; }
  SDRPN_HOST_DEVICE bool is_empty() const { return row1 < row0; }
  SDRPN_HOST_DEVICE void add(int64_t row, int64_t col) {
    row0 = row < row0 ? row : row0;
    col0 = col < col0 ? col : col0;
    row1 = row > row1 ? row : row1;
    col1 = col > col1 ? col : col1;
  }
  SDRPN_HOST_DEVICE void merge(const GridBox& other) {
    row0 = other.row0 < row0 ? other.row0 : row0;
    col0 = other.col0 < col0 ? other.col0 : col0;
    row1 = other.row1 > row1 ? other.row1 : row1;
    col1 = other.col1 > col1 ? other.col1 : col1;
  }
  SDRPN_HOST_DEVICE GridBox or_whole_grid(int64_t grid_h, int64_t grid_w) const {
    return is_empty() ? GridBox{0, 0, grid_h - 1, grid_w - 1} : *this;
  }
  SDRPN_HOST_DEVICE int64_t area() const { return (row1 - row0 + 1) * (col1 - col0 + 1); }
  SDRPN_HOST_DEVICE bool contains(int64_t row, int64_t col) const {
    return row >= row0 && row <= row1 && col >= col0 && col <= col1;
  }
};

// Step 5: a box this large means the attention was diffuse and the sample teaches
// nothing; the comparison is done in double so that the boundary is exact.
SDRPN_HOST_DEVICE bool box_too_large(int64_t box_area, int64_t num_cells, double max_box_fraction) {
  return static_cast<double>(box_area) >= max_box_fraction * static_cast<double>(num_cells);
}

// Steps 2, 4 and 6 for one cell, given the sink-suppressed value and the thresholds
// fg_ratio * max and bg_ratio * max. Foreground cells always lie inside the box.
template <typename T>
SDRPN_HOST_DEVICE int64_t cell_label(T value, T fg_threshold, T bg_threshold, bool inside_box,
                                     int64_t ignore_index) {
  if (value > fg_threshold) return kForeground;
  if (!inside_box && value < bg_threshold) return kBackground;
  return ignore_index;
}

}  // namespace sdrpn::math
