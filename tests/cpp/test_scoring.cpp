// The C++ core without Python: token_scores against a float64 two-pass reference, on every SIMD
// path, plus argument validation. Tolerance: |got - ref| <= 2e-5 + 2e-5 |ref| (inputs exact in f32).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "scrimp/build_info.h"
#include "scrimp/error.h"
#include "scrimp/scoring.h"

namespace {

const double kInf = std::numeric_limits<double>::infinity();

struct Ref {
  double hs, ht, kf, kr;
};

// Two-pass float64 reference for one row: log-softmax then sums (p == 0 terms contribute 0).
Ref reference_row(const float* s, const float* t, int64_t V) {
  auto lse = [V](const float* x) {
    double m = -kInf;
    for (int64_t i = 0; i < V; ++i) m = std::fmax(m, (double)x[i]);
    double z = 0;
    for (int64_t i = 0; i < V; ++i) z += std::exp((double)x[i] - m);
    return m + std::log(z);
  };
  const double ls0 = lse(s), lt0 = lse(t);
  Ref r{0, 0, 0, 0};
  for (int64_t i = 0; i < V; ++i) {
    const double ls = s[i] - ls0, lt = t[i] - lt0, ps = std::exp(ls), pt = std::exp(lt);
    if (ps != 0) r.hs -= ps * ls, r.kr += ps * (ls - lt);
    if (pt != 0) r.ht -= pt * lt, r.kf += pt * (lt - ls);
  }
  return r;
}

void expect_close(double got, double ref, const char* what) {
  if (std::isnan(ref)) {
    EXPECT_TRUE(std::isnan(got)) << what;
  } else if (std::isinf(ref)) {
    EXPECT_EQ(got, ref) << what;
  } else {
    EXPECT_NEAR(got, ref, 2e-5 + 2e-5 * std::fabs(ref)) << what;
  }
}

uint16_t to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return static_cast<uint16_t>(u >> 16);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float from_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

class ScoringTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    // SCRIMP_CPU_SIMD only caps the level: skip a level this CPU lacks (no AVX-512 on many CI hosts)
    setenv("SCRIMP_CPU_SIMD", GetParam(), 1);
    if (std::string(scrimp::cpu_simd_level()) != GetParam()) GTEST_SKIP() << "no " << GetParam() << " on this CPU";
  }
  void TearDown() override { unsetenv("SCRIMP_CPU_SIMD"); }
};

void run_case(int64_t N, int64_t V, bool bf16, unsigned seed, bool edge_rows) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 3.f);
  std::vector<float> s(N * V), t(N * V);
  for (auto& x : s) x = nd(rng);
  for (auto& x : t) x = nd(rng);
  if (edge_rows && N >= 4) {
    for (int64_t i = 0; i < V / 2; ++i) s[i] = t[i] = -INFINITY;          // masked on both sides
    for (int64_t i = 0; i < V / 3 + 1; ++i) s[V + i] = -INFINITY;         // student masks: kf = inf
    for (int64_t i = 0; i < V; ++i) s[2 * V + i] *= 3000.f, t[2 * V + i] *= -3000.f;  // huge
    s[3 * V + V / 2] = NAN;                                                // NaN row
  }
  std::vector<uint16_t> s16, t16;
  if (bf16) {
    for (auto& x : s) s16.push_back(to_bf16(x)), x = from_bf16(s16.back());
    for (auto& x : t) t16.push_back(to_bf16(x)), x = from_bf16(t16.back());
  }
  const scrimp::DType dt = bf16 ? scrimp::DType::BFloat16 : scrimp::DType::Float32;
  scrimp::TokenScoresArgs a;
  a.student = scrimp::TensorView::contiguous(bf16 ? (void*)s16.data() : (void*)s.data(), dt, {}, {N, V});
  scrimp::TensorView teacher = scrimp::TensorView::contiguous(bf16 ? (void*)t16.data() : (void*)t.data(), dt, {}, {N, V});
  a.teacher = &teacher;
  std::vector<float> hs(N), ht(N), kf(N), kr(N);
  a.student_entropy = hs;
  a.teacher_entropy = ht;
  a.kl_forward = kf;
  a.kl_reverse = kr;
  scrimp::token_scores(a);
  for (int64_t r = 0; r < N; ++r) {
    const Ref ref = reference_row(&s[r * V], &t[r * V], V);
    expect_close(hs[r], ref.hs, "student_entropy");
    expect_close(ht[r], ref.ht, "teacher_entropy");
    expect_close(kf[r], ref.kf, "kl_forward");
    expect_close(kr[r], ref.kr, "kl_reverse");
  }
  if (edge_rows && N >= 4) {
    EXPECT_TRUE(std::isinf(kf[1]));
    EXPECT_TRUE(std::isnan(hs[3]));
    EXPECT_FALSE(std::isnan(hs[0]) || std::isnan(hs[2]));
  }
}

TEST_P(ScoringTest, MatchesFloat64ReferenceFloat32) {
  EXPECT_STREQ(scrimp::cpu_simd_level(), GetParam());
  run_case(5, 1271, false, 1, true);
  run_case(3, 1, false, 2, false);
  run_case(2, 151936, false, 3, false);
  run_case(7, 1024, false, 4, true);
}

TEST_P(ScoringTest, MatchesFloat64ReferenceBFloat16) {
  run_case(6, 4099, true, 5, true);
  run_case(1, 7, true, 6, false);
}

INSTANTIATE_TEST_SUITE_P(AllSimdLevels, ScoringTest, ::testing::Values("generic", "avx2", "avx512"));

TEST(ScoringValidation, RejectsBadArguments) {
  std::vector<float> x(20, 0.f), out(4);
  scrimp::TokenScoresArgs a;
  a.student = scrimp::TensorView::contiguous(x.data(), scrimp::DType::Int64, {}, {4, 5});
  a.student_entropy = out;
  EXPECT_THROW(scrimp::token_scores(a), scrimp::Error);
  try {
    scrimp::token_scores(a);
  } catch (const scrimp::Error& e) {
    EXPECT_EQ(e.kind(), scrimp::ErrorKind::Type);
    EXPECT_NE(std::string(e.what()).find("student_logits"), std::string::npos);
  }
  a.student = scrimp::TensorView::contiguous(x.data(), scrimp::DType::Float32, {}, {4, 5});
  a.temperature = 0.f;
  EXPECT_THROW(scrimp::token_scores(a), scrimp::Error);
  a.temperature = 1.f;
  a.kl_forward = out;  // teacher output without a teacher
  EXPECT_THROW(scrimp::token_scores(a), scrimp::Error);
  a.kl_forward = nullptr;
  std::vector<int64_t> targets = {0, 1, 5, 2};  // 5 is out of range for V = 5
  scrimp::TensorView g = scrimp::TensorView::contiguous(targets.data(), scrimp::DType::Int64, {}, {4});
  a.targets = &g;
  a.student_logprob = out;
  EXPECT_THROW(scrimp::token_scores(a), scrimp::Error);
  targets[2] = 4;
  EXPECT_NO_THROW(scrimp::token_scores(a));
  EXPECT_NEAR(out[0], -std::log(5.0), 1e-6);
}

TEST(BuildInfo, ReportsVersionAndSimd) {
  const scrimp::BuildInfo info = scrimp::build_info();
  EXPECT_FALSE(info.version.empty());
  EXPECT_GE(info.openmp_threads, 1);
  if (!info.cuda_compiled) EXPECT_FALSE(info.cuda_device_usable);
}

}  // namespace
