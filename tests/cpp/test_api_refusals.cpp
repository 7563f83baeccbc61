// Every public entry point checks its own arguments: each Span of the wrong size (and each other
// argument a caller can get wrong: ranges, missing companions, aliasing) is a scrimp::Error with the
// message the Python user sees, thrown before anything is written.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "scrimp/clustered_cache.h"
#include "scrimp/error.h"
#include "scrimp/kl_loss.h"
#include "scrimp/scoring.h"

using namespace scrimp;

namespace {

TensorView view(void* p, DType dt, std::vector<int64_t> shape) { return TensorView::contiguous(p, dt, Device{}, shape); }

// Runs f, expects a scrimp::Error of `kind` whose message contains `text`.
void expect_refusal(const std::function<void()>& f, const std::string& text, ErrorKind kind = ErrorKind::Value) {
  try {
    f();
    ADD_FAILURE() << "no error; expected: " << text;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << "got: " << e.what() << "\nexpected: " << text;
    EXPECT_EQ(e.kind(), kind) << e.what();
  }
}

struct SmallCache {
  static constexpr int64_t B = 1, H = 2, G = 2, D = 4, ps = 4, N = 16;
  ClusteredCacheConfig cfg;
  std::vector<float> k, v, q;
  std::unique_ptr<ClusteredCache> cache;
  SmallCache() {
    cfg.batch = B;
    cfg.kv_heads = H;
    cfg.q_heads = H * G;
    cfg.head_dim = D;
    cfg.page_size = ps;
    cfg.max_pages = 16;
    cfg.cache_pages = 4;
    cfg.pin_memory = false;
    k.resize(B * H * N * D);
    v.resize(k.size());
    q.resize(B * H * G * D);
    for (std::size_t i = 0; i < k.size(); ++i) k[i] = std::sin(0.37f * i), v[i] = std::cos(0.11f * i);
    for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::cos(0.5f * i);
    cache = std::make_unique<ClusteredCache>(cfg);
  }
  TensorView keys() { return view(k.data(), DType::Float32, {B, H, N, D}); }
  TensorView values() { return view(v.data(), DType::Float32, {B, H, N, D}); }
  TensorView query() { return view(q.data(), DType::Float32, {B, H * G, D}); }
};

TEST(ApiRefusals, ClusteredCacheBuildChecksPositionsAndBounds) {
  SmallCache c;
  std::vector<int64_t> short_pos(SmallCache::N - 1, 0);
  expect_refusal([&] { c.cache->build(c.keys(), c.values(), short_pos); }, "positions: expected 16 elements, got 15");
  std::vector<int64_t> pos(2 * SmallCache::N, 0), bounds{0, 16, 0};  // S = 2 streams need 2 x (groups + 1)
  expect_refusal([&] { c.cache->build_grouped(c.keys(), c.values(), pos, true, bounds, 1); },
                 "group_bounds: expected 4 elements, got 3");
  expect_refusal([&] { c.cache->build_grouped(c.keys(), c.values(), pos, true, bounds, 0); },
                 "group_bounds: expected at least one group");
  std::vector<int64_t> pos_short(2 * SmallCache::N - 1, 0), gb{0, 16, 0, 16};
  expect_refusal([&] { c.cache->build_grouped(c.keys(), c.values(), pos_short, true, gb, 1); },
                 "positions: expected 32 elements, got 31");
  expect_refusal([&] { c.cache->build_grouped(c.keys(), c.values(), {}, true, gb, 1); },
                 "positions: required when positions_per_stream");
  std::vector<int64_t> pb{0, 4, 0};
  expect_refusal([&] { c.cache->build_paged(c.keys(), c.values(), pos, pb, 1); }, "page_bounds: expected 4 elements, got 3");
  expect_refusal([&] { c.cache->build_paged(c.keys(), c.values(), pos_short, gb, 1); },
                 "positions: expected 32 elements, got 31");
  EXPECT_EQ(c.cache->num_pages(), 0);  // nothing was built by a refused call
}

TEST(ApiRefusals, ClusteredCacheSelectRerankRecallChecksSizes) {
  SmallCache c;
  c.cache->build(c.keys(), c.values());
  const int64_t S = SmallCache::B * SmallCache::H, k = 2;
  std::vector<int32_t> pages(S * k), few(S * k - 1);
  std::vector<float> scores(S * k - 1);
  expect_refusal([&] { c.cache->select(c.query(), k, few); }, "out_pages: expected 4 elements, got 3");
  expect_refusal([&] { c.cache->select(c.query(), k, pages, scores); }, "out_scores: expected 4 elements, got 3");
  c.cache->select(c.query(), k, pages);

  std::vector<int32_t> cand = pages, out(S * k);
  expect_refusal([&] { c.cache->rerank(c.query(), cand, k + 1, k, out); }, "candidates: expected 6 elements, got 4");
  expect_refusal([&] { c.cache->rerank(c.query(), cand, k, k + 1, out); }, "rerank: expected 0 <= k <= kc = 2, got k = 3");
  expect_refusal([&] { c.cache->rerank(c.query(), cand, k, k, few); }, "out_pages: expected 4 elements, got 3");
  expect_refusal([&] { c.cache->rerank(c.query(), Span<const int32_t>(cand.data(), S * k), k, k, cand); },
                 "rerank: candidates and out_pages must be different tensors");

  std::vector<float> store(S * c.cfg.cache_pages * SmallCache::ps * SmallCache::D);
  const TensorView ks = view(store.data(), DType::Float32, {S * c.cfg.cache_pages, SmallCache::ps, SmallCache::D});
  std::vector<int32_t> slots(S * k), lens(S * k);
  expect_refusal([&] { c.cache->recall(few, k, ks, ks, slots, lens); }, "pages: expected 4 elements, got 3");
  expect_refusal([&] { c.cache->recall(pages, k, ks, ks, few, lens); }, "out_slots: expected 4 elements, got 3");
  expect_refusal([&] { c.cache->recall(pages, k, ks, ks, slots, few); }, "out_lens: expected 4 elements, got 3");
  EXPECT_EQ(c.cache->stats().misses, 0);  // nothing was recalled by a refused call

  std::vector<int64_t> positions(S * k * SmallCache::ps - 1);
  expect_refusal([&] { c.cache->page_positions(pages, k, positions); }, "out: expected 16 elements, got 15");
  expect_refusal([&] { c.cache->page_positions(few, k, positions); }, "pages: expected 4 elements, got 3");
}

TEST(ApiRefusals, ClusteredCacheTailReadAndExportChecksSizes) {
  SmallCache c;
  c.cache->build(c.keys(), c.values());
  const int64_t S = SmallCache::B * SmallCache::H, ps = SmallCache::ps, D = SmallCache::D;
  std::vector<int64_t> tail(S * ps - 1);
  expect_refusal([&] { c.cache->relayout_tail(1, tail); }, "positions: expected 8 elements, got 7");
  expect_refusal([&] { c.cache->relayout_tail(-1, tail); }, "relayout_tail: n must be >= 0, got -1");
  std::vector<float> page(ps * D - 1), ok(ps * D);
  expect_refusal([&] { c.cache->read_page(0, 0, page, ok); }, "keys: expected 16 elements, got 15");
  expect_refusal([&] { c.cache->read_page(0, 0, ok, page); }, "values: expected 16 elements, got 15");
  std::vector<float> lo(S * 2 * D), short_lo(S * 2 * D - 1);
  std::vector<int32_t> lens(S * 2), short_lens(S * 2 - 1);
  expect_refusal([&] { c.cache->export_bounds(0, 2, short_lo, lo, lens); }, "lower: expected 16 elements, got 15");
  expect_refusal([&] { c.cache->export_bounds(0, 2, lo, short_lo, lens); }, "upper: expected 16 elements, got 15");
  expect_refusal([&] { c.cache->export_summaries(0, 2, short_lo, lo, lens); }, "key_means: expected 16 elements, got 15");
  expect_refusal([&] { c.cache->export_summaries(0, 2, lo, lo, short_lens); }, "lens: expected 4 elements, got 3");
  std::vector<float> kv(SmallCache::B * SmallCache::H * ps * D);
  const TensorView win = view(kv.data(), DType::Float32, {SmallCache::B, SmallCache::H, ps, D});
  std::vector<int64_t> skip(SmallCache::B + 1);
  expect_refusal([&] { c.cache->append_page(win, win, 100, skip); }, "skip: expected 1 elements, got 2");
}

TEST(ApiRefusals, PagedAttentionAndNearestCentroidCheckSizes) {
  const int64_t B = 1, H = 2, Hq = 4, D = 4, ps = 4, P = 2, S = 4;
  std::vector<float> q(B * Hq * D, 0.5f), out(B * Hq * D), store(S * ps * D, 0.25f);
  std::vector<int32_t> table{0, 1, 2, 3}, lens{4, 4, 4, 4}, short_table{0, 1, 2};
  PagedAttentionArgs a;
  a.query = view(q.data(), DType::Float32, {B, Hq, D});
  a.out = view(out.data(), DType::Float32, {B, Hq, D});
  a.k_store = a.v_store = view(store.data(), DType::Float32, {S, ps, D});
  a.kv_heads = H;
  a.pages_per_stream = P;
  a.page_table = short_table;
  a.page_lens = lens;
  expect_refusal([&] { paged_decode_attention(a); }, "page_table: expected 4 elements, got 3");
  a.page_table = table;
  a.page_lens = short_table;
  expect_refusal([&] { paged_decode_attention(a); }, "page_lens: expected 4 elements, got 3");
  a.page_lens = lens;
  std::vector<float> dense(B * H * 3 * D);
  const TensorView kd = view(dense.data(), DType::Float32, {B, H, 3, D});
  std::vector<uint8_t> mask(B * 3 + 1, 1);
  a.k_dense = a.v_dense = &kd;
  a.dense_mask = mask;
  expect_refusal([&] { paged_decode_attention(a); }, "dense_mask: expected 3 elements, got 4");
  a.dense_mask = {};
  std::vector<float> sum(B * H * 2 * D), bias(B * H * 2 - 1);
  const TensorView sk = view(sum.data(), DType::Float32, {B, H, 2, D});
  a.summary_keys = a.summary_values = &sk;
  expect_refusal([&] { paged_decode_attention(a); }, "summary_keys, summary_values and summary_bias must be given together");
  a.summary_bias = bias;
  expect_refusal([&] { paged_decode_attention(a); }, "summary_bias: expected 4 elements, got 3");

  std::vector<float> keys(6 * D), cents(2 * D);
  std::vector<int32_t> assign(5);
  expect_refusal([&] { nearest_centroid(view(keys.data(), DType::Float32, {6, D}), view(cents.data(), DType::Float32, {2, D}), assign); },
                 "out: expected 6 elements, got 5");
  std::vector<int64_t> order(5);
  expect_refusal([&] { cluster_into_pages(keys, 6, D, 2, 2, 0, order); }, "order: expected 6 elements, got 5");
  expect_refusal([&] { cluster_into_pages(Span<const float>(keys.data(), 5 * D), 6, D, 2, 2, 0, order); },
                 "keys: expected 24 elements, got 20");
}

TEST(ApiRefusals, ScoringAndKLLossCheckOutputSizes) {
  std::vector<float> logits(4 * 10, 0.0f), out3(3), out4(4);
  TokenScoresArgs s;
  s.student = view(logits.data(), DType::Float32, {4, 10});
  s.student_entropy = out3;
  expect_refusal([&] { token_scores(s); }, "student_entropy: expected a contiguous output of 4 elements, got 3");
  s.student_entropy = out4;
  expect_refusal([&] { s.student = view(logits.data(), DType::Float32, {}); token_scores(s); },
                 "student_logits: expected shape [..., V], got a 0-d tensor");

  KLLossArgs k;
  k.student = k.teacher = view(logits.data(), DType::Float32, {4, 10});
  expect_refusal([&] { kl_loss(k); }, "loss: an output is required");
  k.loss = out3;
  expect_refusal([&] { kl_loss(k); }, "loss: expected a contiguous output of 4 elements, got 3");
  k.loss = out4;
  k.kind = static_cast<KLKind>(7);
  expect_refusal([&] { kl_loss(k); }, "kind: expected reverse, forward or jsd");
}

}  // namespace
