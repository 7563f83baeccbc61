// IceCache core without Python: clustering, page pool, selection, LRU recall, decode attention over a
// page list against a float64 reference, and argument validation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "dtype_dispatch.h"
#include "scrimp/clustered_cache.h"
#include "scrimp/error.h"

using namespace scrimp;

namespace {

TensorView view(void* p, DType dt, std::vector<int64_t> shape) { return TensorView::contiguous(p, dt, Device{}, shape); }

std::vector<float> randn(int64_t n, uint64_t seed, float sd = 1.0f) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = d(g);
  return v;
}

// Round-trips values through dt so that reference and kernel see identical inputs.
std::vector<uint16_t> encode(const std::vector<float>& x, DType dt, std::vector<float>& rounded) {
  std::vector<uint16_t> h(x.size());
  rounded.resize(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    h[i] = dt == DType::BFloat16 ? float_to_bf16(x[i]) : float_to_half(x[i]);
    rounded[i] = dtype::load(h.data(), dt, static_cast<int64_t>(i));
  }
  return h;
}

}  // namespace

TEST(ClusterIntoPages, PermutationAndFullPages) {
  for (int64_t N : {1, 15, 16, 17, 100, 257}) {
    const int64_t D = 8, ps = 16;
    auto k = randn(N * D, 7 + N);
    std::vector<int64_t> order(static_cast<std::size_t>(N));
    auto bounds = cluster_into_pages(k, N, D, ps, 4, 1, order);
    std::vector<int64_t> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    for (int64_t i = 0; i < N; ++i) ASSERT_EQ(sorted[i], i);
    ASSERT_EQ(static_cast<int64_t>(bounds.size()) - 1, (N + ps - 1) / ps);
    int partial = 0;
    for (std::size_t p = 0; p + 1 < bounds.size(); ++p) {
      const int64_t n = bounds[p + 1] - bounds[p];
      ASSERT_GE(n, 1);
      ASSERT_LE(n, ps);
      partial += n < ps;
    }
    EXPECT_LE(partial, 1);
  }
}

TEST(ClusterIntoPages, SeparatedClustersArePure) {
  // 8 well-separated directions, 16 noisy points each, shuffled: every page must hold one cluster.
  const int64_t C = 8, ps = 16, D = 16, N = C * ps;
  auto centers = randn(C * D, 3);
  std::vector<int64_t> label(static_cast<std::size_t>(N));
  std::vector<float> k(static_cast<std::size_t>(N * D));
  std::mt19937_64 g(5);
  std::vector<int64_t> perm(static_cast<std::size_t>(N));
  for (int64_t i = 0; i < N; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), g);
  auto noise = randn(N * D, 9, 0.05f);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t c = perm[i] / ps;
    label[i] = c;
    for (int64_t d = 0; d < D; ++d) k[i * D + d] = centers[c * D + d] + noise[i * D + d];
  }
  std::vector<int64_t> order(static_cast<std::size_t>(N));
  auto bounds = cluster_into_pages(k, N, D, ps, 6, 0, order);
  ASSERT_EQ(bounds.size(), static_cast<std::size_t>(C + 1));
  for (int64_t p = 0; p < C; ++p) {
    std::set<int64_t> labels;
    for (int64_t i = bounds[p]; i < bounds[p + 1]; ++i) labels.insert(label[order[i]]);
    EXPECT_EQ(labels.size(), 1u) << "page " << p;
  }
}

namespace {

// float64 reference: softmax(q.k * scale [+ bias]) v over the union of dense tokens, page tokens and
// summary rows (each with its bias; -inf bias = not attended).
void reference_attention(const std::vector<float>& q, int64_t B, int64_t Hq, int64_t H, int64_t D,
                         const std::vector<float>& ks, const std::vector<float>& vs, int64_t ps,
                         const std::vector<int32_t>& table, const std::vector<int32_t>& lens, int64_t P,
                         const std::vector<float>& kd, const std::vector<float>& vd, int64_t T,
                         std::vector<double>& out, const std::vector<float>& sk = {},
                         const std::vector<float>& sv = {}, const std::vector<float>& sbias = {}, int64_t R = 0) {
  const int64_t G = Hq / H;
  out.assign(static_cast<std::size_t>(B * Hq * D), 0.0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hq = 0; hq < Hq; ++hq) {
      const int64_t h = hq / G, s = b * H + h;
      std::vector<const float*> krows, vrows;
      std::vector<double> bias;
      for (int64_t t = 0; t < T; ++t) {
        krows.push_back(kd.data() + (s * T + t) * D);
        vrows.push_back(vd.data() + (s * T + t) * D);
      }
      for (int64_t p = 0; p < P; ++p) {
        const int32_t r = table[s * P + p];
        if (r < 0) continue;
        for (int64_t t = 0; t < lens[s * P + p]; ++t) {
          krows.push_back(ks.data() + (r * ps + t) * D);
          vrows.push_back(vs.data() + (r * ps + t) * D);
        }
      }
      bias.assign(krows.size(), 0.0);
      for (int64_t r = 0; r < R; ++r) {
        if (std::isinf(sbias[s * R + r])) continue;
        krows.push_back(sk.data() + (s * R + r) * D);
        vrows.push_back(sv.data() + (s * R + r) * D);
        bias.push_back(sbias[s * R + r]);
      }
      std::vector<double> sc(krows.size());
      double m = -1e300;
      for (std::size_t i = 0; i < krows.size(); ++i) {
        double x = 0;
        for (int64_t d = 0; d < D; ++d) x += static_cast<double>(q[(b * Hq + hq) * D + d]) * krows[i][d];
        sc[i] = x * scale + bias[i];
        m = std::max(m, sc[i]);
      }
      double z = 0;
      for (double& x : sc) z += (x = std::exp(x - m));
      for (std::size_t i = 0; i < krows.size(); ++i)
        for (int64_t d = 0; d < D; ++d) out[(b * Hq + hq) * D + d] += sc[i] / z * vrows[i][d];
    }
}

// R > 0 adds R summary rows per stream whose biases mix log counts, large magnitudes and -inf.
void run_attention_case(DType dt, int64_t B, int64_t Hq, int64_t H, int64_t D, int64_t T, int64_t P, uint64_t seed,
                        int64_t R = 0) {
  const int64_t ps = 16, S = 3 * B * H + 2;
  auto q = randn(B * Hq * D, seed), ks = randn(S * ps * D, seed + 1), vs = randn(S * ps * D, seed + 2);
  auto kd = randn(B * H * T * D, seed + 3), vd = randn(B * H * T * D, seed + 4);
  auto sk = randn(B * H * R * D, seed + 5), sv = randn(B * H * R * D, seed + 6);
  std::mt19937_64 g(seed);
  std::vector<float> sbias(static_cast<std::size_t>(B * H * R));
  for (float& x : sbias) {
    const int c = static_cast<int>(g() % 4);
    x = c == 0 ? -std::numeric_limits<float>::infinity() : c == 1 ? 12.0f : std::log(1.0f + static_cast<float>(g() % 16));
  }
  std::vector<int32_t> table(static_cast<std::size_t>(B * H * P)), lens(table.size());
  for (std::size_t i = 0; i < table.size(); ++i) {
    table[i] = (g() % 5 == 0) ? -1 : static_cast<int32_t>(g() % S);
    lens[i] = table[i] < 0 ? 0 : static_cast<int32_t>(1 + g() % ps);
  }
  std::vector<double> ref;
  std::vector<float> out32(static_cast<std::size_t>(B * Hq * D));
  std::vector<uint16_t> out16(out32.size());
  PagedAttentionArgs a;
  std::vector<uint16_t> hq, hks, hvs, hkd, hvd;
  std::vector<float> rq, rks, rvs, rkd, rvd;
  TensorView kdv, vdv, skv, svv;
  std::vector<uint16_t> hsk, hsv;
  std::vector<float> rsk, rsv;
  if (dt == DType::Float32) {
    a.query = view(q.data(), dt, {B, Hq, D});
    a.k_store = view(ks.data(), dt, {S, ps, D});
    a.v_store = view(vs.data(), dt, {S, ps, D});
    kdv = view(kd.data(), dt, {B, H, T, D});
    vdv = view(vd.data(), dt, {B, H, T, D});
    skv = view(sk.data(), dt, {B, H, R, D});
    svv = view(sv.data(), dt, {B, H, R, D});
    a.out = view(out32.data(), dt, {B, Hq, D});
    reference_attention(q, B, Hq, H, D, ks, vs, ps, table, lens, P, kd, vd, T, ref, sk, sv, sbias, R);
  } else {
    hq = encode(q, dt, rq), hks = encode(ks, dt, rks), hvs = encode(vs, dt, rvs);
    hkd = encode(kd, dt, rkd), hvd = encode(vd, dt, rvd);
    a.query = view(hq.data(), dt, {B, Hq, D});
    a.k_store = view(hks.data(), dt, {S, ps, D});
    a.v_store = view(hvs.data(), dt, {S, ps, D});
    kdv = view(hkd.data(), dt, {B, H, T, D});
    vdv = view(hvd.data(), dt, {B, H, T, D});
    hsk = encode(sk, dt, rsk), hsv = encode(sv, dt, rsv);
    skv = view(hsk.data(), dt, {B, H, R, D});
    svv = view(hsv.data(), dt, {B, H, R, D});
    a.out = view(out16.data(), dt, {B, Hq, D});
    reference_attention(rq, B, Hq, H, D, rks, rvs, ps, table, lens, P, rkd, rvd, T, ref, rsk, rsv, sbias, R);
  }
  a.page_table = table;
  a.page_lens = lens;
  a.pages_per_stream = P;
  if (T > 0) a.k_dense = &kdv, a.v_dense = &vdv;
  if (R > 0) a.summary_keys = &skv, a.summary_values = &svv, a.summary_bias = sbias;
  a.kv_heads = H;
  paged_decode_attention(a);
  const double tol = dt == DType::Float32 ? 2e-5 : (dt == DType::Float16 ? 2e-3 : 1.6e-2);
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double got = dt == DType::Float32 ? out32[i] : dtype::load(out16.data(), dt, static_cast<int64_t>(i));
    ASSERT_NEAR(got, ref[i], tol * (1 + std::fabs(ref[i]))) << "element " << i;
  }
}

}  // namespace

TEST(PagedDecodeAttention, MatchesFloat64Reference) {
  for (DType dt : {DType::Float32, DType::Float16, DType::BFloat16}) {
    run_attention_case(dt, 1, 4, 2, 32, 20, 6, 11);
    run_attention_case(dt, 3, 8, 2, 64, 37, 9, 12);
    run_attention_case(dt, 2, 2, 2, 16, 0, 5, 13);   // no dense segment
    run_attention_case(dt, 2, 6, 3, 8, 33, 0, 14);   // dense only
  }
}

TEST(PagedDecodeAttention, PageSummariesMatchFloat64Reference) {
  for (DType dt : {DType::Float32, DType::Float16, DType::BFloat16}) {
    run_attention_case(dt, 1, 4, 2, 32, 20, 6, 21, 37);  // summaries over several 16-row chunks
    run_attention_case(dt, 2, 2, 1, 16, 0, 0, 22, 5);    // summaries only
    run_attention_case(dt, 3, 8, 2, 64, 37, 9, 23, 1);   // one row
  }
}

TEST(PagedDecodeAttention, AllSummariesSkippedEqualsNoSummaries) {
  const int64_t B = 2, Hq = 4, H = 2, D = 8, T = 12, R = 7;
  auto q = randn(B * Hq * D, 31), kd = randn(B * H * T * D, 32), vd = randn(B * H * T * D, 33);
  auto sk = randn(B * H * R * D, 34, 50.0f), sv = randn(B * H * R * D, 35, 50.0f);
  std::vector<float> ks(16 * D), bias(static_cast<std::size_t>(B * H * R), -std::numeric_limits<float>::infinity());
  std::vector<float> plain(B * Hq * D), with(plain.size());
  TensorView kdv = view(kd.data(), DType::Float32, {B, H, T, D}), vdv = view(vd.data(), DType::Float32, {B, H, T, D});
  TensorView skv = view(sk.data(), DType::Float32, {B, H, R, D}), svv = view(sv.data(), DType::Float32, {B, H, R, D});
  PagedAttentionArgs a;
  a.query = view(q.data(), DType::Float32, {B, Hq, D});
  a.k_store = a.v_store = view(ks.data(), DType::Float32, {1, 16, D});
  a.k_dense = &kdv, a.v_dense = &vdv, a.kv_heads = H;
  a.out = view(plain.data(), DType::Float32, {B, Hq, D});
  paged_decode_attention(a);
  a.summary_keys = &skv, a.summary_values = &svv, a.summary_bias = bias;
  a.out = view(with.data(), DType::Float32, {B, Hq, D});
  paged_decode_attention(a);
  EXPECT_EQ(std::memcmp(plain.data(), with.data(), plain.size() * sizeof(float)), 0);
}

TEST(PagedDecodeAttention, RejectsBadSummaries) {
  const int64_t B = 1, Hq = 2, H = 1, D = 8, R = 3;
  std::vector<float> q(B * Hq * D), ks(16 * D), out(q.size()), sk(B * H * R * D), bias(B * H * R, 0.0f);
  std::vector<uint16_t> sk16(sk.size());
  TensorView skv = view(sk.data(), DType::Float32, {B, H, R, D});
  TensorView bad_shape = view(sk.data(), DType::Float32, {B, H, R, D / 2});
  TensorView bad_dtype = view(sk16.data(), DType::Float16, {B, H, R, D});
  PagedAttentionArgs a;
  a.query = view(q.data(), DType::Float32, {B, Hq, D});
  a.k_store = a.v_store = view(ks.data(), DType::Float32, {1, 16, D});
  a.out = view(out.data(), DType::Float32, {B, Hq, D});
  a.kv_heads = H;
  a.summary_keys = &skv;  // values and bias missing
  EXPECT_THROW(paged_decode_attention(a), Error);
  a.summary_values = &skv, a.summary_bias = bias;
  paged_decode_attention(a);  // complete: fine
  a.summary_values = &bad_shape;
  EXPECT_THROW(paged_decode_attention(a), Error);
  a.summary_values = &bad_dtype;
  EXPECT_THROW(paged_decode_attention(a), Error);
  a.summary_values = &skv;
  bias[1] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(paged_decode_attention(a), Error);
  bias[1] = std::nanf("");
  EXPECT_THROW(paged_decode_attention(a), Error);
}

namespace {

ClusteredCacheConfig small_config(int64_t B, int64_t H, int64_t G, int64_t D, bool cluster, PageScore score) {
  ClusteredCacheConfig c;
  c.batch = B;
  c.kv_heads = H;
  c.q_heads = H * G;
  c.head_dim = D;
  c.page_size = 4;
  c.max_pages = 32;
  c.cache_pages = 3;
  c.cluster = cluster;
  c.score = score;
  return c;
}

}  // namespace

TEST(ClusteredCache, BuildKeepsEveryTokenAndRepresentatives) {
  const int64_t B = 2, H = 2, D = 8, N = 30;
  ClusteredCache cache(small_config(B, H, 2, D, true, PageScore::Bounds));
  auto k = randn(B * H * N * D, 1), v = randn(B * H * N * D, 2);
  std::vector<int64_t> pos(N);
  for (int64_t i = 0; i < N; ++i) pos[i] = 100 + i;
  cache.build(view(k.data(), DType::Float32, {B, H, N, D}), view(v.data(), DType::Float32, {B, H, N, D}), pos);
  ASSERT_EQ(cache.num_pages(), 8);
  std::vector<float> pk(4 * D), pv(4 * D);
  for (int64_t s = 0; s < B * H; ++s) {
    std::set<int64_t> seen;
    std::vector<int32_t> pages(8);
    for (int32_t p = 0; p < 8; ++p) pages[p] = p;
    for (int64_t p = 0; p < 8; ++p) {
      const int64_t n = cache.read_page(s, p, pk, pv);
      std::vector<int64_t> posv(static_cast<std::size_t>(B * H * 8 * 4));
      for (int64_t t = 0; t < n; ++t) {
        // find the token by exact key match and check the value and bounds
        int64_t found = -1;
        for (int64_t i = 0; i < N; ++i)
          if (std::memcmp(&k[(s * N + i) * D], &pk[t * D], D * 4) == 0) found = i;
        ASSERT_GE(found, 0);
        EXPECT_EQ(std::memcmp(&v[(s * N + found) * D], &pv[t * D], D * 4), 0);
        seen.insert(found);
        for (int64_t d = 0; d < D; ++d) {
          EXPECT_LE(cache.lower(s, p)[d], pk[t * D + d]);
          EXPECT_GE(cache.upper(s, p)[d], pk[t * D + d]);
        }
      }
    }
    EXPECT_EQ(seen.size(), static_cast<std::size_t>(N));
  }
  // positions of stream 0 cover 100..129 exactly once
  std::vector<int32_t> sel(static_cast<std::size_t>(B * H * 8));
  for (int64_t s = 0; s < B * H; ++s)
    for (int32_t p = 0; p < 8; ++p) sel[s * 8 + p] = p;
  std::vector<int64_t> out(static_cast<std::size_t>(B * H * 8 * 4));
  cache.page_positions(sel, 8, out);
  std::multiset<int64_t> p0(out.begin(), out.begin() + 32);
  for (int64_t i = 0; i < N; ++i) EXPECT_EQ(p0.count(100 + i), 1u);
  EXPECT_EQ(p0.count(-1), 2u);
}

TEST(ClusteredCache, SelectFindsThePageOfTheBestKey) {
  const int64_t B = 2, H = 1, G = 2, D = 16, N = 64;
  for (PageScore sc : {PageScore::Oracle, PageScore::Bounds, PageScore::Centroid}) {
    ClusteredCache cache(small_config(B, H, G, D, true, sc));
    auto k = randn(B * H * N * D, 3, 0.3f), v = randn(B * H * N * D, 4);
    // Plant one key per stream aligned with that stream's first query head.
    auto q = randn(B * H * G * D, 5);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t d = 0; d < D; ++d) k[((b * H) * N + 17 + b) * D + d] = 3.0f * q[(b * G) * D + d];
    cache.build(view(k.data(), DType::Float32, {B, H, N, D}), view(v.data(), DType::Float32, {B, H, N, D}), nullptr);
    std::vector<int32_t> pages(static_cast<std::size_t>(B * H * 2));
    cache.select(view(q.data(), DType::Float32, {B, H * G, D}), 2, pages, nullptr);
    std::vector<int64_t> pos(static_cast<std::size_t>(B * H * 2 * 4));
    cache.page_positions(pages, 2, pos);
    for (int64_t b = 0; b < B; ++b) {
      bool found = false;
      for (int64_t i = 0; i < 8; ++i) found |= pos[b * 8 + i] == 17 + b;
      EXPECT_TRUE(found) << "score " << static_cast<int>(sc) << " batch " << b;
    }
  }
}

// rerank against a float64 brute force over read_page: the exact max q.k per candidate page, GQA heads
// merged relative to each head's best candidate, ties in candidate order, -1 padding kept out.
TEST(ClusteredCache, RerankIsTheExactMaxOverTheCandidates) {
  const int64_t B = 2, H = 2, G = 3, D = 5, N = 37, kc = 6, k = 3;  // odd sizes; 10 pages of 4 per stream
  for (DType dt : {DType::Float32, DType::BFloat16}) {
    ClusteredCacheConfig cfg = small_config(B, H, G, D, true, PageScore::Bounds);
    cfg.dtype = dt;
    ClusteredCache cache(cfg);
    auto kf = randn(B * H * N * D, 11), vf = randn(B * H * N * D, 12);
    std::vector<float> kr, vr;
    std::vector<uint16_t> kh, vh;
    void* kp = kf.data();
    void* vp = vf.data();
    if (dt != DType::Float32) {
      kh = encode(kf, dt, kr);
      vh = encode(vf, dt, vr);
      kp = kh.data();
      vp = vh.data();
    }
    cache.build(view(kp, dt, {B, H, N, D}), view(vp, dt, {B, H, N, D}), nullptr);
    const int64_t P = cache.num_pages();
    auto q = randn(B * H * G * D, 13);
    // candidates: a shuffled subset per stream, one -1 in the middle
    std::vector<int32_t> cand(static_cast<std::size_t>(B * H * kc));
    std::mt19937_64 g(14);
    for (int64_t s = 0; s < B * H; ++s) {
      std::vector<int32_t> all(static_cast<std::size_t>(P));
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), g);
      for (int64_t i = 0; i < kc; ++i) cand[s * kc + i] = i == 2 ? -1 : all[static_cast<std::size_t>(i)];
    }
    std::vector<int32_t> out(static_cast<std::size_t>(B * H * k), 99);
    cache.rerank(view(q.data(), DType::Float32, {B, H * G, D}), cand, kc, k, out);
    std::vector<float> pk(4 * D), pv(4 * D);
    for (int64_t s = 0; s < B * H; ++s) {
      const int64_t b = s / H, h = s % H;
      std::vector<double> merged(kc, -std::numeric_limits<double>::infinity());
      for (int64_t gi = 0; gi < G; ++gi) {
        const float* qh = &q[((b * H + h) * G + gi) * D];
        std::vector<double> sc(kc, -std::numeric_limits<double>::infinity());
        for (int64_t i = 0; i < kc; ++i) {
          if (cand[s * kc + i] < 0) continue;
          const int64_t n = cache.read_page(s, cand[s * kc + i], pk, pv);
          for (int64_t t = 0; t < n; ++t) {
            double d = 0;
            for (int64_t e = 0; e < D; ++e) d += static_cast<double>(qh[e]) * pk[t * D + e];
            sc[i] = std::max(sc[i], d);
          }
        }
        const double best = *std::max_element(sc.begin(), sc.end());
        for (int64_t i = 0; i < kc; ++i)
          if (cand[s * kc + i] >= 0) merged[i] = std::max(merged[i], sc[i] - best);
      }
      std::vector<int64_t> order;
      for (int64_t i = 0; i < kc; ++i)
        if (cand[s * kc + i] >= 0) order.push_back(i);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return merged[a] > merged[c]; });
      for (int64_t i = 0; i < k; ++i)
        EXPECT_EQ(out[s * k + i], cand[s * kc + order[static_cast<std::size_t>(i)]]) << "stream " << s << " rank " << i;
    }
    // more outputs than valid candidates: -1 padding
    std::vector<int32_t> few(static_cast<std::size_t>(B * H * 2), -1);
    for (int64_t s = 0; s < B * H; ++s) few[s * 2] = static_cast<int32_t>(s % P);
    std::vector<int32_t> o2(static_cast<std::size_t>(B * H * 2));
    cache.rerank(view(q.data(), DType::Float32, {B, H * G, D}), few, 2, 2, o2);
    for (int64_t s = 0; s < B * H; ++s) {
      EXPECT_EQ(o2[s * 2], s % P);
      EXPECT_EQ(o2[s * 2 + 1], -1);
    }
    // bad input: k > kc, out-of-range or repeated candidates, wrong query shape; nothing written
    std::vector<int32_t> o3(static_cast<std::size_t>(B * H * k), 7);
    EXPECT_THROW(cache.rerank(view(q.data(), DType::Float32, {B, H * G, D}), cand, 2, 3, o3), Error);
    auto bad = cand;
    bad[1] = static_cast<int32_t>(P);
    EXPECT_THROW(cache.rerank(view(q.data(), DType::Float32, {B, H * G, D}), bad, kc, k, o3), Error);
    bad = cand;
    bad[1] = bad[0];
    EXPECT_THROW(cache.rerank(view(q.data(), DType::Float32, {B, H * G, D}), bad, kc, k, o3), Error);
    EXPECT_THROW(cache.rerank(view(q.data(), DType::Float32, {B, H, D}), cand, kc, k, o3), Error);
    for (int32_t x : o3) EXPECT_EQ(x, 7);
  }
}

TEST(ClusteredCache, RecallReusesSlotsLru) {
  const int64_t B = 1, H = 1, D = 4, N = 24;  // 6 pages of 4, 3 cache slots
  ClusteredCache cache(small_config(B, H, 1, D, false, PageScore::Bounds));
  auto k = randn(N * D, 8), v = randn(N * D, 9);
  cache.build(view(k.data(), DType::Float32, {1, 1, N, D}), view(v.data(), DType::Float32, {1, 1, N, D}), nullptr);
  std::vector<float> ks(3 * 4 * D), vs(ks.size());
  auto kst = view(ks.data(), DType::Float32, {3, 4, D});
  auto vst = view(vs.data(), DType::Float32, {3, 4, D});
  std::vector<int32_t> slots(2), lens(2);
  auto step = [&](std::vector<int32_t> sel) {
    cache.recall(sel, 2, kst, vst, slots, lens);
    for (int i = 0; i < 2; ++i) {
      if (sel[i] < 0) continue;
      // time-ordered pages: page p holds tokens 4p..4p+3
      EXPECT_EQ(std::memcmp(&ks[slots[i] * 4 * D], &k[sel[i] * 4 * D], 4 * D * 4), 0);
      EXPECT_EQ(std::memcmp(&vs[slots[i] * 4 * D], &v[sel[i] * 4 * D], 4 * D * 4), 0);
      EXPECT_EQ(lens[i], 4);
    }
  };
  step({0, 1});
  EXPECT_EQ(cache.stats().misses, 2);
  step({1, 2});  // 1 hits
  EXPECT_EQ(cache.stats().hits, 1);
  EXPECT_EQ(cache.stats().misses, 3);
  step({3, 1});  // evicts page 0 (least recently used), 1 hits
  EXPECT_EQ(cache.stats().hits, 2);
  step({0, -1});  // page 0 was evicted: a miss; padding ignored
  EXPECT_EQ(cache.stats().misses, 5);
  EXPECT_EQ(slots[1], -1);
  EXPECT_EQ(lens[1], 0);
  std::vector<int32_t> too_many(4, 0), s4(4), l4(4);
  EXPECT_THROW(cache.recall(too_many, 4, kst, vst, s4, l4), Error);  // k > cache_pages
}

TEST(ClusteredCache, AppendPageAndPoolBound) {
  auto c = small_config(1, 1, 1, 4, true, PageScore::Bounds);
  c.max_pages = 3;
  ClusteredCache cache(c);
  auto k = randn(16, 1);
  auto kv = view(k.data(), DType::Float32, {1, 1, 4, 4});
  cache.append_page(kv, kv, 50);
  cache.append_page(kv, kv, 54);
  cache.append_page(kv, kv, 58);
  EXPECT_EQ(cache.num_pages(), 3);
  EXPECT_THROW(cache.append_page(kv, kv, 62), Error);  // pool full: an error, not a crash
  std::vector<int32_t> sel{2};
  std::vector<int64_t> pos(4);
  cache.page_positions(sel, 1, pos);
  EXPECT_EQ(pos[0], 58);
  EXPECT_EQ(pos[3], 61);
  auto big = randn(8 * 4, 2);
  EXPECT_THROW(cache.append_page(view(big.data(), DType::Float32, {1, 1, 8, 4}),
                                 view(big.data(), DType::Float32, {1, 1, 8, 4}), 0),
               Error);  // more than one page
}

TEST(ClusteredCache, RejectsBadConfigAndInput) {
  auto c = small_config(1, 2, 2, 8, true, PageScore::Bounds);
  c.page_size = 0;
  EXPECT_THROW(ClusteredCache{c}, Error);
  c = small_config(1, 2, 2, 8, true, PageScore::Bounds);
  c.q_heads = 3;
  EXPECT_THROW(ClusteredCache{c}, Error);
  c = small_config(1, 2, 2, 8, true, PageScore::Bounds);
  c.dtype = DType::Int32;
  EXPECT_THROW(ClusteredCache{c}, Error);
  c = small_config(1, 2, 2, 8, true, PageScore::Bounds);
  ClusteredCache cache(c);
  std::vector<float> k(1 * 3 * 4 * 8);
  EXPECT_THROW(cache.build(view(k.data(), DType::Float32, {1, 3, 4, 8}), view(k.data(), DType::Float32, {1, 3, 4, 8}),
                           nullptr),
               Error);  // head count mismatch
  EXPECT_THROW(cache.build(view(k.data(), DType::Float16, {1, 2, 4, 8}), view(k.data(), DType::Float16, {1, 2, 4, 8}),
                           nullptr),
               Error);  // dtype mismatch
  std::vector<float> big(2 * 40 * 8 * 4);
  EXPECT_THROW(cache.build(view(big.data(), DType::Float32, {1, 2, 40 * 4, 8}),
                           view(big.data(), DType::Float32, {1, 2, 40 * 4, 8}), nullptr),
               Error);  // more pages than max_pages
}

TEST(NearestCentroid, ArgmaxOfDotProducts) {
  const int64_t N = 50, C = 7, D = 12;
  auto k = randn(N * D, 1), c = randn(C * D, 2);
  std::vector<int32_t> out(N);
  nearest_centroid(view(k.data(), DType::Float32, {N, D}), view(c.data(), DType::Float32, {C, D}), out);
  for (int64_t n = 0; n < N; ++n) {
    double best = -1e30;
    int arg = -1;
    for (int64_t j = 0; j < C; ++j) {
      double s = 0;
      for (int64_t d = 0; d < D; ++d) s += static_cast<double>(k[n * D + d]) * c[j * D + d];
      if (s > best) best = s, arg = static_cast<int>(j);
    }
    EXPECT_EQ(out[n], arg);
  }
}

TEST(ClusteredCache, BuildGroupedClustersEachGroup) {
  // Two streams, tokens pre-grouped per stream: group sizes 20 and 13 (page size 4) -> 5 + 4 pages.
  const int64_t B = 1, H = 2, D = 8, N = 33;
  auto c = small_config(B, H, 1, D, true, PageScore::Bounds);
  ClusteredCache cache(c);
  auto k = randn(B * H * N * D, 21), v = randn(B * H * N * D, 22);
  std::vector<int64_t> bounds{0, 20, 33, 0, 13, 33};
  std::vector<int64_t> pos(static_cast<std::size_t>(H * N));
  for (int64_t s = 0; s < H; ++s)
    for (int64_t i = 0; i < N; ++i) pos[s * N + i] = 1000 * s + i;
  cache.build_grouped(view(k.data(), DType::Float32, {B, H, N, D}), view(v.data(), DType::Float32, {B, H, N, D}),
                      pos, true, bounds, 2);
  EXPECT_EQ(cache.num_pages(0), 5 + 4);  // 20 -> 5 full; 13 -> 3 full + 1
  EXPECT_EQ(cache.num_pages(1), 4 + 5);  // 13 -> 4; 20 -> 5
  for (int64_t s = 0; s < H; ++s) {
    const int64_t P = cache.num_pages(s);
    std::vector<int32_t> sel(static_cast<std::size_t>(H * P), -1);
    for (int32_t p = 0; p < P; ++p) sel[s * P + p] = p;
    std::vector<int64_t> out(static_cast<std::size_t>(H * P * 4));
    cache.page_positions(sel, P, out);
    std::multiset<int64_t> got;
    for (int64_t p = 0; p < P; ++p) {
      // a page never mixes the two groups of its stream
      const int64_t split = bounds[s * 3 + 1];
      int lo = 0, hi = 0;
      for (int64_t t = 0; t < 4; ++t) {
        const int64_t x = out[(s * P + p) * 4 + t];
        if (x < 0) continue;
        got.insert(x);
        ((x - 1000 * s) < split ? lo : hi)++;
      }
      EXPECT_TRUE(lo == 0 || hi == 0) << "stream " << s << " page " << p;
    }
    EXPECT_EQ(got.size(), static_cast<std::size_t>(N));
    for (int64_t i = 0; i < N; ++i) EXPECT_EQ(got.count(1000 * s + i), 1u);
  }
  std::vector<int64_t> bad{0, 40, 33, 0, 13, 33};
  EXPECT_THROW(cache.build_grouped(view(k.data(), DType::Float32, {B, H, N, D}),
                                   view(v.data(), DType::Float32, {B, H, N, D}), pos, true, bad, 2),
               Error);
}

TEST(PagedDecodeAttention, DenseMaskSkipsTokens) {
  // Masking tokens must equal leaving them out.
  const int64_t B = 2, Hq = 4, H = 2, D = 16, T = 20;
  auto q = randn(B * Hq * D, 31), kd = randn(B * H * T * D, 32), vd = randn(B * H * T * D, 33);
  std::vector<uint8_t> mask(static_cast<std::size_t>(B * T), 1);
  for (int64_t t = 0; t < 7; ++t) mask[t] = 0;           // row 0: first 7 masked
  for (int64_t t = 16; t < 20; ++t) mask[T + t] = 0;     // row 1: last 4 masked (one whole split)
  std::vector<float> store(16 * D), out(B * Hq * D), ref(B * Hq * D);
  PagedAttentionArgs a;
  a.query = view(q.data(), DType::Float32, {B, Hq, D});
  a.k_store = view(store.data(), DType::Float32, {1, 16, D});
  a.v_store = a.k_store;
  auto kv = view(kd.data(), DType::Float32, {B, H, T, D});
  auto vv = view(vd.data(), DType::Float32, {B, H, T, D});
  a.k_dense = &kv;
  a.v_dense = &vv;
  a.dense_mask = mask;
  a.kv_heads = H;
  a.out = view(out.data(), DType::Float32, {B, Hq, D});
  paged_decode_attention(a);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t0 = b == 0 ? 7 : 0, t1 = b == 0 ? T : 16, n = t1 - t0;
    std::vector<float> k1(static_cast<std::size_t>(H * n * D)), v1(k1.size());
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t d = 0; d < D; ++d) {
          k1[(h * n + t) * D + d] = kd[((b * H + h) * T + t0 + t) * D + d];
          v1[(h * n + t) * D + d] = vd[((b * H + h) * T + t0 + t) * D + d];
        }
    PagedAttentionArgs r = a;
    auto k1v = view(k1.data(), DType::Float32, {1, H, n, D});
    auto v1v = view(v1.data(), DType::Float32, {1, H, n, D});
    r.query = view(q.data() + b * Hq * D, DType::Float32, {1, Hq, D});
    r.k_dense = &k1v;
    r.v_dense = &v1v;
    r.dense_mask = nullptr;
    r.out = view(ref.data() + b * Hq * D, DType::Float32, {1, Hq, D});
    paged_decode_attention(r);
  }
  for (std::size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], ref[i], 1e-5);
}

TEST(ClusteredCache, ReclusterTailMakesAppendedPagesPureAndInvalidatesSlots) {
  // 4 appended pages, each mixing two well-separated directions; re-clustering separates them.
  const int64_t D = 16, ps = 4;
  auto c = small_config(1, 1, 1, D, true, PageScore::Bounds);
  c.cache_pages = 4;
  ClusteredCache cache(c);
  auto centers = randn(2 * D, 41);
  auto noise = randn(16 * D, 42, 0.05f);
  std::vector<float> k(16 * D);
  for (int64_t i = 0; i < 16; ++i)
    for (int64_t d = 0; d < D; ++d) k[i * D + d] = centers[(i % 2) * D + d] + noise[i * D + d];
  for (int64_t p = 0; p < 4; ++p) {
    auto kv = view(k.data() + p * ps * D, DType::Float32, {1, 1, ps, D});
    cache.append_page(kv, kv, p * ps);
  }
  std::vector<float> ks(4 * ps * D), vs(ks.size());
  auto kst = view(ks.data(), DType::Float32, {4, ps, D});
  auto vst = view(vs.data(), DType::Float32, {4, ps, D});
  std::vector<int32_t> sel{0, 1, 2, 3}, slots(4), lens(4);
  cache.recall(sel, 4, kst, vst, slots, lens);
  EXPECT_EQ(cache.recluster_tail(4), 1);
  EXPECT_EQ(cache.num_pages(0), 4);
  std::vector<int64_t> pos(16);
  cache.page_positions(sel, 4, pos);
  std::multiset<int64_t> all(pos.begin(), pos.end());
  for (int64_t p = 0; p < 4; ++p) {
    std::set<int64_t> parity;
    for (int64_t t = 0; t < ps; ++t) parity.insert(pos[p * ps + t] % 2);
    EXPECT_EQ(parity.size(), 1u) << "page " << p;
  }
  for (int64_t i = 0; i < 16; ++i) EXPECT_EQ(all.count(i), 1u);
  // The old device copies are stale: recalling again must miss and copy the new contents.
  const int64_t misses = cache.stats().misses;
  cache.recall(sel, 4, kst, vst, slots, lens);
  EXPECT_EQ(cache.stats().misses, misses + 4);
  for (int64_t p = 0; p < 4; ++p)
    for (int64_t t = 0; t < ps; ++t)
      EXPECT_EQ(std::memcmp(&ks[(slots[p] * ps + t) * D], &k[pos[p * ps + t] * D], D * 4), 0);
}

// A follower layer (reusing another layer's page selection) must hold the same tokens in the same
// pages: build_paged copies a leader's prefill layout, relayout_tail its re-clustered tail.
TEST(ClusteredCache, FollowerCopiesTheLeadersLayout) {
  const int64_t B = 1, H = 2, D = 8, N = 37, ps = 4;
  auto c = small_config(B, H, 1, D, true, PageScore::Bounds);
  c.cache_pages = 4;
  ClusteredCache leader(c), follower(c);
  auto kl = randn(B * H * N * D, 51), vl = randn(B * H * N * D, 52);
  auto kf = randn(B * H * N * D, 53), vf = randn(B * H * N * D, 54);  // the follower's own K/V
  std::vector<int64_t> pos(N);
  for (int64_t i = 0; i < N; ++i) pos[i] = 10 + i;
  leader.build(view(kl.data(), DType::Float32, {B, H, N, D}), view(vl.data(), DType::Float32, {B, H, N, D}),
               pos);
  const int64_t P = leader.num_pages();
  ASSERT_EQ(P, 10);
  std::vector<int32_t> all(static_cast<std::size_t>(B * H * P));
  for (int64_t s = 0; s < B * H; ++s)
    for (int32_t p = 0; p < P; ++p) all[s * P + p] = p;
  std::vector<int64_t> lpos(static_cast<std::size_t>(B * H * P * ps));
  leader.page_positions(all, P, lpos);
  // the follower's rows in the leader's page order, and the page bounds
  std::vector<float> kp(static_cast<std::size_t>(B * H * N * D)), vp(kp.size());
  std::vector<int64_t> fpos(static_cast<std::size_t>(B * H * N)), bounds(static_cast<std::size_t>(B * H * (P + 1)));
  for (int64_t s = 0; s < B * H; ++s) {
    int64_t r = 0;
    for (int64_t p = 0; p < P; ++p) {
      bounds[s * (P + 1) + p] = r;
      for (int64_t t = 0; t < ps; ++t) {
        const int64_t q = lpos[(s * P + p) * ps + t];
        if (q < 0) continue;
        std::memcpy(&kp[(s * N + r) * D], &kf[(s * N + q - 10) * D], D * 4);
        std::memcpy(&vp[(s * N + r) * D], &vf[(s * N + q - 10) * D], D * 4);
        fpos[s * N + r] = q;
        ++r;
      }
    }
    bounds[s * (P + 1) + P] = r;
    ASSERT_EQ(r, N);
  }
  follower.build_paged(view(kp.data(), DType::Float32, {B, H, N, D}), view(vp.data(), DType::Float32, {B, H, N, D}),
                       fpos, bounds, P);
  ASSERT_EQ(follower.num_pages(), P);
  std::vector<int64_t> got(lpos.size());
  follower.page_positions(all, P, got);
  EXPECT_EQ(got, lpos);
  // the follower's pages hold its own K/V for those positions
  std::vector<float> pk(ps * D), pv(ps * D);
  for (int64_t s = 0; s < B * H; ++s)
    for (int64_t p = 0; p < P; ++p) {
      const int64_t n = follower.read_page(s, p, pk, pv);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t q = got[(s * P + p) * ps + t] - 10;
        EXPECT_EQ(std::memcmp(&pk[t * D], &kf[(s * N + q) * D], D * 4), 0);
        EXPECT_EQ(std::memcmp(&pv[t * D], &vf[(s * N + q) * D], D * 4), 0);
        for (int64_t d = 0; d < D; ++d) {
          EXPECT_LE(follower.lower(s, p)[d], pk[t * D + d]);
          EXPECT_GE(follower.upper(s, p)[d], pk[t * D + d]);
        }
      }
    }

  // Window pages appended to both, the leader re-clusters them, the follower copies that layout.
  auto ka = randn(B * H * 4 * ps * D, 55), kb = randn(B * H * 4 * ps * D, 56);
  for (int64_t p = 0; p < 4; ++p) {
    std::vector<float> chunk_a(static_cast<std::size_t>(B * H * ps * D)), chunk_b(chunk_a.size());
    for (int64_t s = 0; s < B * H; ++s) {
      std::memcpy(&chunk_a[s * ps * D], &ka[(s * 4 * ps + p * ps) * D], ps * D * 4);
      std::memcpy(&chunk_b[s * ps * D], &kb[(s * 4 * ps + p * ps) * D], ps * D * 4);
    }
    auto va = view(chunk_a.data(), DType::Float32, {B, H, ps, D});
    auto vb = view(chunk_b.data(), DType::Float32, {B, H, ps, D});
    leader.append_page(va, va, 100 + p * ps);
    follower.append_page(vb, vb, 100 + p * ps);
  }
  // a tail page of the follower resident in its page cache must leave it when rewritten
  std::vector<float> ks(static_cast<std::size_t>(B * H * 4 * ps * D)), vs(ks.size());
  auto kst = view(ks.data(), DType::Float32, {B * H * 4, ps, D});
  auto vst = view(vs.data(), DType::Float32, {B * H * 4, ps, D});
  std::vector<int32_t> last(static_cast<std::size_t>(B * H), static_cast<int32_t>(P + 3)), slots(B * H), lens(B * H);
  follower.recall(last, 1, kst, vst, slots, lens);
  EXPECT_EQ(leader.recluster_tail(4), B * H);
  std::vector<int32_t> tail(static_cast<std::size_t>(B * H * 4));
  for (int64_t s = 0; s < B * H; ++s)
    for (int32_t j = 0; j < 4; ++j) tail[s * 4 + j] = static_cast<int32_t>(P + j);
  std::vector<int64_t> tpos(static_cast<std::size_t>(B * H * 4 * ps));
  leader.page_positions(tail, 4, tpos);
  EXPECT_EQ(follower.relayout_tail(4, tpos), B * H);
  std::vector<int64_t> ftpos(tpos.size());
  follower.page_positions(tail, 4, ftpos);
  EXPECT_EQ(ftpos, tpos);
  for (int64_t s = 0; s < B * H; ++s)
    for (int64_t j = 0; j < 4; ++j) {
      follower.read_page(s, P + j, pk, pv);
      for (int64_t t = 0; t < ps; ++t) {
        const int64_t q = ftpos[(s * 4 + j) * ps + t] - 100;
        EXPECT_EQ(std::memcmp(&pk[t * D], &kb[(s * 4 * ps + q) * D], D * 4), 0);
      }
    }
  const int64_t misses = follower.stats().misses;
  follower.recall(last, 1, kst, vst, slots, lens);
  EXPECT_EQ(follower.stats().misses, misses + B * H);  // the stale copy was dropped
  // the same order again rewrites nothing; all -1 leaves a stream alone
  EXPECT_EQ(follower.relayout_tail(4, tpos), 0);
  std::vector<int64_t> none(tpos.size(), -1);
  EXPECT_EQ(follower.relayout_tail(4, none), 0);
  // prefetch and wait are no-ops on the CPU but keep the contract
  follower.recall(last, 1, kst, vst, slots, lens, nullptr, /*wait=*/false);
  follower.wait_transfers(nullptr);
}

TEST(ClusteredCache, FollowerLayoutRejectsBadInput) {
  const int64_t D = 4, ps = 4, N = 8;
  auto c = small_config(1, 1, 1, D, true, PageScore::Bounds);
  ClusteredCache cache(c);
  auto k = randn(N * D, 61);
  auto kv = view(k.data(), DType::Float32, {1, 1, N, D});
  std::vector<int64_t> pos{0, 1, 2, 3, 4, 5, 6, 7};
  std::vector<int64_t> too_big{0, 5, 8};  // a page of 5 > page_size
  EXPECT_THROW(cache.build_paged(kv, kv, pos, too_big, 2), Error);
  std::vector<int64_t> gap{0, 0, 4};  // an empty page before a full one
  EXPECT_THROW(cache.build_paged(kv, kv, pos, gap, 2), Error);
  std::vector<int64_t> past{0, 4, 9};  // past N
  EXPECT_THROW(cache.build_paged(kv, kv, pos, past, 2), Error);
  EXPECT_EQ(cache.num_pages(), 0);  // nothing was added by a rejected call
  std::vector<int64_t> ok{0, 4, 8};
  cache.build_paged(kv, kv, pos, ok, 2);
  EXPECT_EQ(cache.num_pages(), 2);
  std::vector<int64_t> missing{0, 1, 2, 3, 4, 5, 6, 99};
  EXPECT_THROW(cache.relayout_tail(2, missing), Error);
  std::vector<int64_t> twice{0, 1, 2, 3, 4, 5, 6, 6};
  EXPECT_THROW(cache.relayout_tail(2, twice), Error);
  std::vector<int64_t> short_list{0, 1, 2, 3, 4, 5, 6, -1};  // names 7 of the 8 tokens
  EXPECT_THROW(cache.relayout_tail(2, short_list), Error);
  std::vector<int64_t> three_pages{0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1};
  EXPECT_THROW(cache.relayout_tail(3, three_pages), Error);  // more pages than the stream has
  EXPECT_THROW(cache.relayout_tail(-1, pos), Error);
  std::vector<int64_t> after(2 * ps);
  std::vector<int32_t> both{0, 1};
  cache.page_positions(both, 2, after);
  EXPECT_EQ(after, pos);  // unchanged by the rejected calls
}

TEST(ClusteredCache, ExportSummariesAreThePageMeans) {
  const int64_t B = 1, H = 2, D = 8, N = 22;
  ClusteredCache cache(small_config(B, H, 2, D, true, PageScore::Bounds));
  auto k = randn(B * H * N * D, 41), v = randn(B * H * N * D, 42);
  cache.build(view(k.data(), DType::Float32, {B, H, N, D}), view(v.data(), DType::Float32, {B, H, N, D}), nullptr);
  auto k2 = randn(B * H * 4 * D, 43), v2 = randn(B * H * 4 * D, 44);
  cache.append_page(view(k2.data(), DType::Float32, {B, H, 4, D}), view(v2.data(), DType::Float32, {B, H, 4, D}),
                    N);
  const int64_t P = cache.num_pages(), n = P + 2;  // two rows past the last page
  std::vector<float> km(B * H * n * D), vm(km.size()), pk(4 * D), pv(4 * D);
  std::vector<int32_t> lens(B * H * n);
  cache.export_summaries(0, n, km, vm, lens);
  for (int64_t s = 0; s < B * H; ++s)
    for (int64_t p = 0; p < n; ++p) {
      if (p >= P) {
        EXPECT_EQ(lens[s * n + p], 0);
        continue;
      }
      const int64_t len = cache.read_page(s, p, pk, pv);
      ASSERT_EQ(lens[s * n + p], len);
      for (int64_t d = 0; d < D; ++d) {
        double mk = 0, mv = 0;
        for (int64_t t = 0; t < len; ++t) mk += pk[t * D + d], mv += pv[t * D + d];
        EXPECT_NEAR(km[(s * n + p) * D + d], mk / len, 1e-5);
        EXPECT_NEAR(vm[(s * n + p) * D + d], mv / len, 1e-5);
      }
    }
}

TEST(PagedDecodeAttention, RejectsBadInput) {
  std::vector<float> q(2 * 4 * 8), ks(4 * 16 * 8), out(q.size());
  std::vector<int32_t> table{0, 5}, lens{16, 16};
  PagedAttentionArgs a;
  a.query = view(q.data(), DType::Float32, {2, 4, 8});
  a.k_store = view(ks.data(), DType::Float32, {4, 16, 8});
  a.v_store = a.k_store;
  a.out = view(out.data(), DType::Float32, {2, 4, 8});
  a.page_table = table;
  a.page_lens = lens;
  a.pages_per_stream = 1;
  a.kv_heads = 3;  // does not divide 4
  EXPECT_THROW(paged_decode_attention(a), Error);
  a.kv_heads = 1;
  EXPECT_THROW(paged_decode_attention(a), Error);  // row 5 outside the store
  table[1] = 1;
  lens[1] = 17;
  EXPECT_THROW(paged_decode_attention(a), Error);  // length > page size
  lens[1] = 3;
  a.out = view(out.data(), DType::Float16, {2, 4, 8});
  EXPECT_THROW(paged_decode_attention(a), Error);  // dtype mismatch
}
