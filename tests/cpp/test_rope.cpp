// RoPE re-rotation and assembly on the CPU against a float64 reference: rotating keys computed at
// position p by d equals rotating the raw key to p + d.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "scrimp/error.h"
#include "scrimp/rope.h"

using namespace scrimp;

namespace {

std::vector<double> freqs(int D, int rot) {
  std::vector<double> f;
  for (int i = 0; i < rot / 2; ++i) f.push_back(static_cast<float>(std::pow(10000.0, -2.0 * i / rot)));
  (void)D;
  return f;
}

// Rotate raw row x to position p (float64), layout half or interleaved.
std::vector<double> rotate_ref(const std::vector<double>& x, double p, const std::vector<double>& f, RopeLayout lay) {
  std::vector<double> y = x;
  const size_t hr = f.size();
  for (size_t i = 0; i < hr; ++i) {
    const size_t ix = lay == RopeLayout::Half ? i : 2 * i, iy = lay == RopeLayout::Half ? i + hr : 2 * i + 1;
    const double c = std::cos(p * f[i]), s = std::sin(p * f[i]);
    y[ix] = x[ix] * c - x[iy] * s;
    y[iy] = x[iy] * c + x[ix] * s;
  }
  return y;
}

class RopeLayouts : public ::testing::TestWithParam<RopeLayout> {};

TEST_P(RopeLayouts, RerotateMatchesFloat64ReferenceInPlaceAndPerPosition) {
  const RopeLayout lay = GetParam();
  const int B = 2, H = 3, S = 17, D = 12, R = 8;  // partial rotary: last 4 dims untouched
  auto f = freqs(D, R);
  std::mt19937 rng(7);
  std::normal_distribution<double> nd;
  std::vector<std::vector<double>> raw(B * H * S, std::vector<double>(D));
  for (auto& r : raw)
    for (auto& v : r) v = nd(rng);
  std::vector<float> keys(B * H * S * D);
  std::vector<int64_t> per_pos(S);
  for (int s = 0; s < S; ++s) per_pos[s] = 1000 + 13 * s - (s % 3) * 700;
  for (int r = 0; r < B * H * S; ++r) {
    auto y = rotate_ref(raw[r], r % S, f, lay);  // computed at position s
    for (int d = 0; d < D; ++d) keys[r * D + d] = static_cast<float>(y[d]);
  }
  for (int mode = 0; mode < 2; ++mode) {
    std::vector<float> out(keys.size(), -1.f), inplace = keys;
    RerotateArgs a;
    a.keys = TensorView::contiguous(keys.data(), DType::Float32, Device{}, {B, H, S, D});
    a.out = TensorView::contiguous(out.data(), DType::Float32, Device{}, {B, H, S, D});
    a.inv_freq = f;
    a.layout = lay;
    a.delta = 37;
    TensorView dp = TensorView::contiguous(per_pos.data(), DType::Int64, Device{}, {S});
    if (mode == 1) a.delta_per_pos = &dp;
    rerotate_keys(a);
    a.keys.data = a.out.data = inplace.data();
    rerotate_keys(a);
    double worst = 0;
    for (int r = 0; r < B * H * S; ++r) {
      const int s = r % S;
      auto want = rotate_ref(raw[r], s + (mode ? per_pos[s] : 37), f, lay);
      for (int d = 0; d < D; ++d) {
        worst = std::max(worst, std::fabs(out[r * D + d] - want[d]));
        ASSERT_EQ(out[r * D + d], inplace[r * D + d]);
      }
    }
    EXPECT_LT(worst, 2e-5) << "mode " << mode;
  }
}

INSTANTIATE_TEST_SUITE_P(Both, RopeLayouts, ::testing::Values(RopeLayout::Half, RopeLayout::Interleaved));

TEST(Rope, AssembleRotatesKeysAndCopiesValues) {
  const int L = 2, H = 2, D = 8;
  auto f = freqs(D, D);
  std::vector<int> lens{3, 5};
  std::vector<std::vector<float>> store;  // per part: L * 2 * H * T * D
  std::vector<AssemblePart> parts;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  store.reserve(2);
  for (int p = 0; p < 2; ++p) {
    const int T = lens[p];
    store.emplace_back(L * 2 * H * T * D);
    for (auto& v : store.back()) v = nd(rng);
    AssemblePart part;
    for (int l = 0; l < L; ++l) {
      part.keys.push_back(TensorView::contiguous(store.back().data() + (2 * l) * H * T * D, DType::Float32, Device{}, {H, T, D}));
      part.values.push_back(TensorView::contiguous(store.back().data() + (2 * l + 1) * H * T * D, DType::Float32, Device{}, {H, T, D}));
    }
    part.delta = p == 0 ? 1 : 4;  // prefix of 1 token, then packet 0 (3 tokens)
    part.inv_freq = f;
    parts.push_back(part);
  }
  const int S = 10;
  std::vector<std::vector<float>> ok(L, std::vector<float>(H * S * D, 0.f)), ov = ok;
  AssembleArgs a;
  a.parts = parts;
  for (int l = 0; l < L; ++l) {
    a.out_keys.push_back(TensorView::contiguous(ok[l].data(), DType::Float32, Device{}, {1, H, S, D}));
    a.out_values.push_back(TensorView::contiguous(ov[l].data(), DType::Float32, Device{}, {1, H, S, D}));
  }
  a.seq_offset = 1;
  assemble_kv(a);
  for (int p = 0, pos = 1; p < 2; pos += lens[p], ++p) {
    const int T = lens[p];
    for (int l = 0; l < L; ++l) {
      std::vector<float> rot(H * T * D);
      RerotateArgs r;
      r.keys = TensorView::contiguous(const_cast<float*>(static_cast<const float*>(parts[p].keys[l].data)), DType::Float32, Device{}, {1, H, T, D});
      r.out = TensorView::contiguous(rot.data(), DType::Float32, Device{}, {1, H, T, D});
      r.delta = parts[p].delta;
      r.inv_freq = f;
      rerotate_keys(r);
      const float* v = static_cast<const float*>(parts[p].values[l].data);
      for (int h = 0; h < H; ++h)
        for (int t = 0; t < T; ++t)
          for (int d = 0; d < D; ++d) {
            ASSERT_EQ(ok[l][(h * S + pos + t) * D + d], rot[(h * T + t) * D + d]);
            ASSERT_EQ(ov[l][(h * S + pos + t) * D + d], v[(h * T + t) * D + d]);
          }
    }
  }
  // position 0 and the tail are untouched
  EXPECT_EQ(ok[0][0], 0.f);
  EXPECT_EQ(ov[1][(H * S - 1) * D], 0.f);
  // too small an output is a clear error
  a.seq_offset = 3;
  EXPECT_THROW(assemble_kv(a), Error);
}

}  // namespace
