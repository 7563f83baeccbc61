// IceCache's page selection: scores every page of a stream against the decode query (bounds,
// centroid, oracle or random, GQA heads merged) and keeps the best k (select), and re-scores
// candidates by the exact max q.k over their keys (rerank); the exact attention mass of every page
// (page_log_mass).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "clustered_cache_rows.h"
#include "clustered_cache_stream.h"
#include "dtype_dispatch.h"
#include "span_checks.h"
#include "scrimp/clustered_cache.h"
#include "scrimp/error.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace scrimp {

namespace {

// Moves the min(k, idx.size()) entries of idx with the highest score[idx] to the front, best first,
// ties to the lower index (deterministic); returns how many that is.
int64_t best_first(std::vector<int32_t>& idx, const std::vector<float>& score, int64_t k) {
  const int64_t take = std::min<int64_t>(k, static_cast<int64_t>(idx.size()));
  std::partial_sort(idx.begin(), idx.begin() + take, idx.end(), [&](int32_t a, int32_t c) {
    const float x = score[static_cast<std::size_t>(a)], y = score[static_cast<std::size_t>(c)];
    return x > y || (x == y && a < c);
  });
  return take;
}

// GQA merge: folds one query head's page scores sc into merged (max over the group's heads). With
// `relative`, each score counts relative to that head's best, so every head's best pages compete on
// equal terms. -inf scores (no page) stay out.
void merge_head_scores(const std::vector<float>& sc, bool relative, std::vector<float>& merged) {
  float best = -std::numeric_limits<float>::infinity();
  for (float v : sc) best = std::max(best, v);
  for (std::size_t i = 0; i < sc.size(); ++i)
    if (sc[i] != -std::numeric_limits<float>::infinity())
      merged[i] = std::max(merged[i], relative ? sc[i] - best : sc[i]);
}

}  // namespace

void ClusteredCache::check_query(const TensorView& query) const {
  const int64_t B = cfg_.batch, Hq = cfg_.q_heads, D = cfg_.head_dim;
  SCRIMP_CHECK(query.ndim() == 3 && query.shape[0] == B && query.shape[1] == Hq && query.shape[2] == D,
               "query: expected [" << B << ", " << Hq << ", " << D << "], got " << describe(query));
  SCRIMP_CHECK_TYPE(query.dtype == DType::Float32, "query: expected float32, got " << describe(query));
  SCRIMP_CHECK(query.device.type == DeviceType::CPU && query.is_contiguous(),
               "query: expected a contiguous CPU tensor, got " << describe(query));
}

float ClusteredCache::page_max_dot(int64_t s, int64_t p, const float* q, float* kr) const {
  const Stream& st = streams_[static_cast<std::size_t>(s)];
  const int64_t D = cfg_.head_dim;
  const int64_t row_bytes = D * static_cast<int64_t>(dtype_size(cfg_.dtype));
  const char* kp = pool_->keys(s * cfg_.max_pages + p);
  float v = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < st.len[static_cast<std::size_t>(p)]; ++i) {
    dtype::load_row(kp + i * row_bytes, cfg_.dtype, D, kr);
    v = std::max(v, ice::dot(q, kr, D));
  }
  return v;
}

void ClusteredCache::rerank(const TensorView& query, Span<const int32_t> candidates_in, int64_t kc, int64_t k,
                            Span<int32_t> out_pages_in) const {
  const int64_t B = cfg_.batch, H = cfg_.kv_heads, Hq = cfg_.q_heads, D = cfg_.head_dim, G = Hq / H;
  check_query(query);
  SCRIMP_CHECK(k >= 0 && kc >= k, "rerank: expected 0 <= k <= kc = " << kc << ", got k = " << k);
  check_span(candidates_in, B * H * kc, "candidates");
  check_span(out_pages_in, B * H * k, "out_pages");
  SCRIMP_CHECK(k == 0 || static_cast<const void*>(candidates_in.data) != static_cast<const void*>(out_pages_in.data),
               "rerank: candidates and out_pages must be different tensors");
  const int32_t* candidates = candidates_in.data;
  int32_t* out_pages = out_pages_in.data;
  if (k == 0) return;
  // Validate everything before writing anything.
  for (int64_t s = 0; s < B * H; ++s) {
    const int64_t P = static_cast<int64_t>(streams_[static_cast<std::size_t>(s)].len.size());
    std::vector<char> seen(static_cast<std::size_t>(P), 0);
    for (int64_t i = 0; i < kc; ++i) {
      const int32_t p = candidates[s * kc + i];
      if (p < 0) continue;
      SCRIMP_CHECK(p < P, "rerank: candidate page " << p << " of stream " << s << " out of range [0, " << P << ")");
      SCRIMP_CHECK(!seen[static_cast<std::size_t>(p)], "rerank: candidate page " << p << " of stream " << s
                                                                                 << " given twice");
      seen[static_cast<std::size_t>(p)] = 1;
    }
  }
  const float* q = static_cast<const float*>(query.data);
#pragma omp parallel for schedule(static) if (B * H > 1 && kc * cfg_.page_size * G * D > 4096)
  for (int64_t s = 0; s < B * H; ++s) {
    const int64_t b = s / H, h = s % H;
    const int32_t* cand = candidates + s * kc;
    std::vector<float> merged(static_cast<std::size_t>(kc), -std::numeric_limits<float>::infinity());
    std::vector<float> sc(static_cast<std::size_t>(kc));
    std::vector<float> kr(static_cast<std::size_t>(D));
    for (int64_t g = 0; g < G; ++g) {
      const float* qh = q + (b * Hq + h * G + g) * D;
      for (int64_t i = 0; i < kc; ++i)
        sc[static_cast<std::size_t>(i)] = cand[i] < 0 ? -std::numeric_limits<float>::infinity()
                                                      : page_max_dot(s, cand[i], qh, kr.data());
      merge_head_scores(sc, true, merged);
    }
    std::vector<int32_t> idx;
    for (int64_t i = 0; i < kc; ++i)
      if (cand[i] >= 0) idx.push_back(static_cast<int32_t>(i));
    const int64_t take = best_first(idx, merged, k);
    for (int64_t i = 0; i < k; ++i) out_pages[s * k + i] = i < take ? cand[idx[static_cast<std::size_t>(i)]] : -1;
  }
}

void ClusteredCache::page_log_mass(const TensorView& query, float scale, int64_t P, Span<float> out_in) const {
  const int64_t B = cfg_.batch, H = cfg_.kv_heads, Hq = cfg_.q_heads, D = cfg_.head_dim, G = Hq / H;
  check_query(query);
  SCRIMP_CHECK(std::isfinite(scale) && scale > 0, "page_log_mass: scale must be finite and > 0, got " << scale);
  SCRIMP_CHECK(P >= num_pages(), "page_log_mass: out holds " << P << " pages per head, the index has "
                                                              << num_pages());
  check_span(out_in, B * Hq * P, "out");
  const float* q = static_cast<const float*>(query.data);
  float* out = out_in.data;
  const int64_t row_bytes = D * static_cast<int64_t>(dtype_size(cfg_.dtype));
  // One work item per (stream, page), so batch-1 decoding with few KV heads still spreads the scan
  // over every thread; each item writes its own G entries of out. Columns past the longest stream
  // (up to P) are -inf.
  const int64_t n_max = num_pages();
  for (int64_t r = 0; r < B * Hq; ++r)
    for (int64_t p = n_max; p < P; ++p) out[r * P + p] = -std::numeric_limits<float>::infinity();
#pragma omp parallel if (n_max * cfg_.page_size * B * Hq * D > 65536)
  {
    std::vector<float> kr(static_cast<std::size_t>(D)), sc(static_cast<std::size_t>(cfg_.page_size * G));
#pragma omp for collapse(2) schedule(static)
    for (int64_t s = 0; s < B * H; ++s) {
      for (int64_t p = 0; p < n_max; ++p) {
        const Stream& st = streams_[static_cast<std::size_t>(s)];
        const int64_t b = s / H, h = s % H;
        const float* qs = q + (b * Hq + h * G) * D;  // the group's G query rows
        float* os = out + (b * Hq + h * G) * P;      // its G output rows of P
        const int64_t n = p < static_cast<int64_t>(st.len.size()) ? st.len[static_cast<std::size_t>(p)] : 0;
        const char* kp = n > 0 ? pool_->keys(s * cfg_.max_pages + p) : nullptr;
        for (int64_t i = 0; i < n; ++i) {
          dtype::load_row(kp + i * row_bytes, cfg_.dtype, D, kr.data());
          for (int64_t g = 0; g < G; ++g)
            sc[static_cast<std::size_t>(g * n + i)] = scale * ice::dot(qs + g * D, kr.data(), D);
        }
        for (int64_t g = 0; g < G; ++g) {  // log-sum-exp, shifted by the max (float64 sum); no keys: -inf
          const float* x = sc.data() + g * n;
          float m = -std::numeric_limits<float>::infinity();
          for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
          double acc = 0;
          for (int64_t i = 0; i < n; ++i) acc += std::exp(static_cast<double>(x[i] - m));
          os[g * P + p] = n == 0 ? -std::numeric_limits<float>::infinity() : m + static_cast<float>(std::log(acc));
        }
      }
    }
  }
}

void ClusteredCache::select(const TensorView& query, int64_t k, Span<int32_t> out_pages_in,
                            Span<float> out_scores_in) const {
  const int64_t B = cfg_.batch, H = cfg_.kv_heads, Hq = cfg_.q_heads, D = cfg_.head_dim, G = Hq / H;
  check_query(query);
  SCRIMP_CHECK(k >= 0, "k must be >= 0, got " << k);
  check_span(out_pages_in, B * H * k, "out_pages");
  if (out_scores_in.given()) check_span(out_scores_in, B * H * k, "out_scores");
  int32_t* out_pages = out_pages_in.data;
  float* out_scores = out_scores_in.data;
  if (k == 0) return;
  const float* q = static_cast<const float*>(query.data);
  const uint64_t step = tick_;
#pragma omp parallel for schedule(static) if (B * H > 1 && num_pages() * G * D > 4096)
  for (int64_t s = 0; s < B * H; ++s) {
    const Stream& st = streams_[static_cast<std::size_t>(s)];
    const int64_t P = static_cast<int64_t>(st.len.size());
    const int64_t b = s / H, h = s % H;
    std::vector<float> merged(static_cast<std::size_t>(P), -std::numeric_limits<float>::infinity());
    std::vector<float> sc(static_cast<std::size_t>(P));
    std::vector<float> kr(static_cast<std::size_t>(D));
    for (int64_t g = 0; g < G; ++g) {
      const float* qh = q + (b * Hq + h * G + g) * D;
      for (int64_t p = 0; p < P; ++p) {
        float v = 0;
        switch (cfg_.score) {
          case PageScore::Bounds: {
            const float* lo = st.lo.data() + p * D;
            const float* hi = st.hi.data() + p * D;
#pragma omp simd reduction(+ : v)
            for (int64_t d = 0; d < D; ++d) v += std::max(qh[d] * lo[d], qh[d] * hi[d]);
            break;
          }
          case PageScore::Centroid: v = ice::dot(qh, st.cen.data() + p * D, D); break;
          case PageScore::Oracle: v = page_max_dot(s, p, qh, kr.data()); break;
          case PageScore::Random: {
            // splitmix64 of (seed, step, stream, page): a fresh ranking every step.
            uint64_t z = cfg_.seed + 0x9e3779b97f4a7c15ull * (step * 1315423911ull + static_cast<uint64_t>(s * P + p) + 1);
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
            v = static_cast<float>((z ^ (z >> 31)) >> 40);
            break;
          }
        }
        sc[static_cast<std::size_t>(p)] = v;
      }
      merge_head_scores(sc, cfg_.score != PageScore::Random, merged);
    }
    std::vector<int32_t> idx(static_cast<std::size_t>(P));
    std::iota(idx.begin(), idx.end(), 0);
    const int64_t take = best_first(idx, merged, k);
    for (int64_t i = 0; i < k; ++i) {
      out_pages[s * k + i] = i < take ? idx[static_cast<std::size_t>(i)] : -1;
      if (out_scores)
        out_scores[s * k + i] = i < take ? merged[static_cast<std::size_t>(idx[static_cast<std::size_t>(i)])]
                                         : -std::numeric_limits<float>::infinity();
    }
  }
}

}  // namespace scrimp
