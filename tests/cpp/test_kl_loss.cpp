// The C++ core without Python: kl_loss (loss and gradient) against a float64 reference on every SIMD
// path, float32 inputs; plus argument validation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "scrimp/build_info.h"
#include "scrimp/error.h"
#include "scrimp/kl_loss.h"

namespace {

const double kInf = std::numeric_limits<double>::infinity();

// float64 reference of one row: loss and dL/ds (times factor).
void reference_row(const float* s, const float* t, int64_t V, scrimp::KLKind kind, double beta, double T,
                   double* loss, std::vector<double>& grad) {
  auto lse = [V, T](const float* x) {
    double m = -kInf;
    for (int64_t i = 0; i < V; ++i) m = std::fmax(m, x[i] / T);
    double z = 0;
    for (int64_t i = 0; i < V; ++i) z += std::exp(x[i] / T - m);
    return m + std::log(z);
  };
  const double a = lse(s), b = lse(t);
  std::vector<double> lp(V), lq(V), lm(V);
  for (int64_t i = 0; i < V; ++i) {
    lp[i] = s[i] / T - a;
    lq[i] = t[i] / T - b;
    lm[i] = std::log(beta * std::exp(lq[i]) + (1 - beta) * std::exp(lp[i]));
  }
  if (kind == scrimp::KLKind::JSD && beta == 0) kind = scrimp::KLKind::Forward;
  if (kind == scrimp::KLKind::JSD && beta == 1) kind = scrimp::KLKind::Reverse;
  double L = 0, Bs = 0;
  for (int64_t i = 0; i < V; ++i) {
    const double p = std::exp(lp[i]), q = std::exp(lq[i]);
    if (kind == scrimp::KLKind::Reverse && p > 0) L += p * (lp[i] - lq[i]);
    if (kind == scrimp::KLKind::Forward && q > 0) L += q * (lq[i] - lp[i]);
    if (kind == scrimp::KLKind::JSD) {
      if (q > 0) L += beta * q * (lq[i] - lm[i]);
      if (p > 0) Bs += p * (lp[i] - lm[i]);
    }
  }
  if (kind == scrimp::KLKind::JSD) L += (1 - beta) * Bs;
  *loss = L;
  grad.assign(V, 0.0);
  for (int64_t i = 0; i < V; ++i) {
    const double p = std::exp(lp[i]), q = std::exp(lq[i]);
    if (kind == scrimp::KLKind::Forward) grad[i] = (p - q) / T;
    else if (p > 0 && kind == scrimp::KLKind::Reverse) grad[i] = p * (lp[i] - lq[i] - L) / T;
    else if (p > 0) grad[i] = (1 - beta) * p * (lp[i] - lm[i] - Bs) / T;
  }
}

class KLLossTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    setenv("SCRIMP_CPU_SIMD", GetParam(), 1);
    if (std::string(scrimp::cpu_simd_level()) != GetParam()) GTEST_SKIP() << "no " << GetParam() << " on this CPU";
  }
  void TearDown() override { unsetenv("SCRIMP_CPU_SIMD"); }
};

TEST_P(KLLossTest, MatchesFloat64Reference) {
  std::mt19937 rng(42);
  std::normal_distribution<float> nd(0.f, 3.f);
  for (int64_t V : {1, 7, 1271, 3000}) {
    const int64_t N = 5;
    std::vector<float> s(N * V), t(N * V);
    for (auto& x : s) x = nd(rng);
    for (auto& x : t) x = nd(rng);
    for (int64_t r = 0; r < N; ++r)  // a few masked entries, shared by both models
      for (int64_t i = 0; i < V / 10; ++i) s[r * V + i * 7 % V] = t[r * V + i * 7 % V] = -INFINITY;
    for (auto kind : {scrimp::KLKind::Reverse, scrimp::KLKind::Forward, scrimp::KLKind::JSD}) {
      for (float beta : {0.0f, 0.3f, 1.0f}) {
        std::vector<float> loss(N), grad(N * V);
        scrimp::KLLossArgs a;
        a.student = scrimp::TensorView::contiguous(s.data(), scrimp::DType::Float32, {}, {N, V});
        a.teacher = scrimp::TensorView::contiguous(t.data(), scrimp::DType::Float32, {}, {N, V});
        scrimp::TensorView g = scrimp::TensorView::contiguous(grad.data(), scrimp::DType::Float32, {}, {N, V});
        a.kind = kind;
        a.beta = beta;
        a.temperature = 1.3f;
        a.loss = loss;
        a.grad = &g;
        a.grad_scale = 0.5f;
        scrimp::kl_loss(a);
        for (int64_t r = 0; r < N; ++r) {
          double ref;
          std::vector<double> rg;
          reference_row(&s[r * V], &t[r * V], V, kind, beta, 1.3, &ref, rg);
          EXPECT_NEAR(loss[r], ref, 2e-5 + 2e-5 * std::fabs(ref)) << "V=" << V << " kind=" << scrimp::kl_kind_name(kind);
          double gmax = 0;
          for (double x : rg) gmax = std::fmax(gmax, std::fabs(x));
          for (int64_t i = 0; i < V; ++i)
            ASSERT_NEAR(grad[r * V + i], 0.5 * rg[i], 1e-7 + 5e-5 * gmax) << "V=" << V << " i=" << i;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Simd, KLLossTest, ::testing::Values("generic", "avx2", "avx512"));

TEST(KLLossArgs, BadInput) {
  std::vector<float> s(12), t(15), loss(3);
  scrimp::KLLossArgs a;
  a.student = scrimp::TensorView::contiguous(s.data(), scrimp::DType::Float32, {}, {3, 4});
  a.teacher = scrimp::TensorView::contiguous(t.data(), scrimp::DType::Float32, {}, {3, 5});
  a.loss = loss;
  EXPECT_THROW(scrimp::kl_loss(a), scrimp::Error);  // vocabulary mismatch
  a.teacher = scrimp::TensorView::contiguous(t.data(), scrimp::DType::Float32, {}, {3, 4});
  a.temperature = 0.f;
  EXPECT_THROW(scrimp::kl_loss(a), scrimp::Error);
  a.temperature = 1.f;
  a.beta = 2.f;
  EXPECT_THROW(scrimp::kl_loss(a), scrimp::Error);
  a.beta = 0.5f;
  a.student = scrimp::TensorView::contiguous(s.data(), scrimp::DType::Float32, {}, {});
  EXPECT_THROW(scrimp::kl_loss(a), scrimp::Error);  // no vocabulary dimension
}

}  // namespace
