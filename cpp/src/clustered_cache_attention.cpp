// paged_decode_attention and nearest_centroid: validation, CPU kernels, CUDA dispatch.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "clustered_cache_cuda.h"
#include "dtype_dispatch.h"
#include "span_checks.h"
#include "scrimp/clustered_cache.h"
#include "scrimp/error.h"

namespace scrimp {

namespace {

void check_float_tensor(const TensorView& t, const char* name, int64_t ndim) {
  SCRIMP_CHECK(t.ndim() == ndim, name << ": expected " << ndim << " dimensions, got " << describe(t));
  SCRIMP_CHECK_TYPE(dtype::is_float_kv(t.dtype), name << ": expected float32, float16 or bfloat16, got " << describe(t));
  SCRIMP_CHECK(t.is_contiguous(), name << ": expected a contiguous tensor, got " << describe(t));
  SCRIMP_CHECK(t.numel() == 0 || t.data != nullptr, name << ": null data pointer");
}

// Partial softmax state of one split for G query heads: running max m, sum l, weighted values acc.
struct Partial {
  std::vector<float> m, l, acc;
  Partial(int64_t G, int64_t D)
      : m(static_cast<std::size_t>(G), -std::numeric_limits<float>::infinity()),
        l(static_cast<std::size_t>(G), 0.0f),
        acc(static_cast<std::size_t>(G * D), 0.0f) {}
};

// Attention of G queries (already scaled, float) over n rows of keys/values; result merged into `tot`.
// mask (optional): 0 skips a row; bias (optional): added to each row's score, -inf leaves the row out
// (bias_stride 0: one bias per row for every head; else head g reads bias[g * bias_stride + t]).
void attend_split(const float* q, int64_t G, int64_t D, const char* k, const char* v, int64_t n, DType dt,
                  const uint8_t* mask, const float* bias, int64_t bias_stride, std::vector<float>& scores,
                  std::vector<float>& krow, Partial& part, Partial& tot) {
  const int64_t esz = static_cast<int64_t>(dtype_size(dt));
  scores.resize(static_cast<std::size_t>(G * n));
  for (int64_t g = 0; g < G; ++g) part.m[g] = -std::numeric_limits<float>::infinity(), part.l[g] = 0;
  std::fill(part.acc.begin(), part.acc.end(), 0.0f);
  const auto skipped = [&](int64_t t) {
    return (mask && !mask[t]) || (bias && bias_stride == 0 && bias[t] == -std::numeric_limits<float>::infinity());
  };
  for (int64_t t = 0; t < n; ++t) {
    if (skipped(t)) {
      for (int64_t g = 0; g < G; ++g) scores[g * n + t] = -std::numeric_limits<float>::infinity();
      continue;
    }
    if (k) dtype::load_row(k + t * D * esz, dt, D, krow.data());
    for (int64_t g = 0; g < G; ++g) {
      float s = 0;  // no keys (k == nullptr): the row's score is its bias alone
      const float* qg = q + g * D;
      if (k) {
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += qg[d] * krow[d];
      }
      if (bias) s += bias[g * bias_stride + t];
      scores[g * n + t] = s;
      part.m[g] = std::max(part.m[g], s);
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    if (skipped(t)) continue;
    dtype::load_row(v + t * D * esz, dt, D, krow.data());
    for (int64_t g = 0; g < G; ++g) {
      if (scores[g * n + t] == -std::numeric_limits<float>::infinity()) continue;  // (a per-head -inf bias)
      const float p = std::exp(scores[g * n + t] - part.m[g]);
      part.l[g] += p;
      float* a = part.acc.data() + g * D;
      for (int64_t d = 0; d < D; ++d) a[d] += p * krow[d];
    }
  }
  // Log-sum-exp merge of this split into the total.
  for (int64_t g = 0; g < G; ++g) {
    if (part.l[g] == 0) continue;
    const float m = std::max(tot.m[g], part.m[g]);
    const float a = std::exp(tot.m[g] - m), b = std::exp(part.m[g] - m);
    tot.l[g] = tot.l[g] * a + part.l[g] * b;
    float* ta = tot.acc.data() + g * D;
    const float* pa = part.acc.data() + g * D;
    for (int64_t d = 0; d < D; ++d) ta[d] = ta[d] * a + pa[d] * b;
    tot.m[g] = m;
  }
}

}  // namespace

void paged_decode_attention(const PagedAttentionArgs& a) {
  check_float_tensor(a.query, "query", 3);
  check_float_tensor(a.out, "out", 3);
  check_float_tensor(a.k_store, "k_store", 3);
  check_float_tensor(a.v_store, "v_store", 3);
  const int64_t B = a.query.shape[0], Hq = a.query.shape[1], D = a.query.shape[2], H = a.kv_heads;
  SCRIMP_CHECK(H >= 1 && Hq % H == 0, "kv_heads = " << H << " must divide the query heads " << Hq);
  SCRIMP_CHECK(a.out.shape == a.query.shape, "out: expected the query's shape " << describe(a.query) << ", got "
                                                                                << describe(a.out));
  const DType dt = a.query.dtype;
  const Device dev = a.query.device;
  for (const TensorView* t : {&a.out, &a.k_store, &a.v_store}) {
    SCRIMP_CHECK_TYPE(t->dtype == dt, "expected every tensor in the query's dtype " << dtype_name(dt) << ", got "
                                                                                    << describe(*t));
    SCRIMP_CHECK(t->device == dev, "expected every tensor on " << device_name(dev) << ", got " << describe(*t));
  }
  SCRIMP_CHECK(a.k_store.shape == a.v_store.shape && a.k_store.shape[2] == D,
               "k_store/v_store: expected [S, page_size, " << D << "], got " << describe(a.k_store) << " and "
                                                           << describe(a.v_store));
  const int64_t P = a.pages_per_stream;
  SCRIMP_CHECK(P >= 0, "pages_per_stream must be >= 0");
  if (P > 0 || a.page_table.given() || a.page_lens.given()) {
    check_span(a.page_table, B * H * P, "page_table");
    check_span(a.page_lens, B * H * P, "page_lens");
  }
  int64_t T = 0;
  if (a.k_dense || a.v_dense) {
    SCRIMP_CHECK(a.k_dense && a.v_dense, "k_dense and v_dense must be given together");
    check_float_tensor(*a.k_dense, "k_dense", 4);
    check_float_tensor(*a.v_dense, "v_dense", 4);
    SCRIMP_CHECK(a.k_dense->shape == a.v_dense->shape && a.k_dense->shape[0] == B && a.k_dense->shape[1] == H &&
                     a.k_dense->shape[3] == D,
                 "k_dense/v_dense: expected [" << B << ", " << H << ", T, " << D << "], got " << describe(*a.k_dense)
                                               << " and " << describe(*a.v_dense));
    for (const TensorView* t : {a.k_dense, a.v_dense}) {
      SCRIMP_CHECK_TYPE(t->dtype == dt, "dense K/V: expected dtype " << dtype_name(dt) << ", got " << describe(*t));
      SCRIMP_CHECK(t->device == dev, "dense K/V: expected device " << device_name(dev) << ", got " << describe(*t));
    }
    T = a.k_dense->shape[2];
  }
  SCRIMP_CHECK(!a.dense_mask.given() || a.k_dense, "dense_mask: given without k_dense / v_dense");
  if (a.dense_mask.given()) check_span(a.dense_mask, B * T, "dense_mask");
  int64_t R = 0;
  if (a.summary_keys || a.summary_values || a.summary_bias.given()) {
    SCRIMP_CHECK(a.summary_values && a.summary_bias.given(),
                 "summary_keys, summary_values and summary_bias must be given together (summary_keys may be left "
                 "out: each row is then scored by its bias alone)");
    check_float_tensor(*a.summary_values, "summary_values", 4);
    const TensorView& sv = *a.summary_values;
    SCRIMP_CHECK(sv.shape[0] == B && sv.shape[1] == H && sv.shape[3] == D,
                 "summary_values: expected [" << B << ", " << H << ", R, " << D << "], got " << describe(sv));
    if (a.summary_keys) {
      check_float_tensor(*a.summary_keys, "summary_keys", 4);
      SCRIMP_CHECK(a.summary_keys->shape == sv.shape, "summary_keys/summary_values: expected [" << B << ", " << H
                                                          << ", R, " << D << "], got " << describe(*a.summary_keys)
                                                          << " and " << describe(sv));
    }
    for (const TensorView* t : {a.summary_keys, a.summary_values}) {
      if (!t) continue;
      SCRIMP_CHECK_TYPE(t->dtype == dt, "summaries: expected dtype " << dtype_name(dt) << ", got " << describe(*t));
      SCRIMP_CHECK(t->device == dev, "summaries: expected device " << device_name(dev) << ", got " << describe(*t));
    }
    R = sv.shape[2];
    check_span(a.summary_bias, B * (a.summary_bias_per_query_head ? Hq : H) * R, "summary_bias");
  }
  if (B == 0 || Hq == 0) return;
  const float scale = a.scale != 0.0f ? a.scale : 1.0f / std::sqrt(static_cast<float>(D));
  if (dev.type == DeviceType::CUDA) {
#if defined(SCRIMP_WITH_CUDA)
    cuda::paged_decode_attention(a);
    return;
#else
    SCRIMP_FAIL("query is on " << device_name(dev) << " but this build has no CUDA backend");
#endif
  }
  const int64_t G = Hq / H, ps = a.k_store.shape[1], S = a.k_store.shape[0];
  const int64_t esz = static_cast<int64_t>(dtype_size(dt));
  // Validate the page table up front (no exceptions inside the parallel region).
  for (int64_t i = 0; i < B * H * P; ++i) {
    const int32_t r = a.page_table[i], n = a.page_lens[i];
    SCRIMP_CHECK(r >= -1 && r < S, "page_table: row " << r << " outside the store [0, " << S << ")");
    SCRIMP_CHECK(n >= 0 && n <= ps, "page_lens: " << n << " outside [0, " << ps << "]");
  }
  const int64_t bias_heads = a.summary_bias_per_query_head ? Hq : H;
  for (int64_t i = 0; i < B * bias_heads * R; ++i) {
    const float x = a.summary_bias[i];
    SCRIMP_CHECK(x == -std::numeric_limits<float>::infinity() || std::isfinite(x),
                 "summary_bias: expected finite values or -inf, got " << x << " at " << i);
  }
  const char* kd = static_cast<const char*>(a.k_store.data);
  const char* vd = static_cast<const char*>(a.v_store.data);
#pragma omp parallel for schedule(static) if (B * H > 1)
  for (int64_t s = 0; s < B * H; ++s) {
    const int64_t b = s / H, h = s % H;
    std::vector<float> q(static_cast<std::size_t>(G * D)), scores, krow(static_cast<std::size_t>(D));
    Partial tot(G, D), part(G, D);
    for (int64_t g = 0; g < G; ++g) {
      dtype::load_row(static_cast<const char*>(a.query.data) + ((b * Hq + h * G + g) * D) * esz, dt, D,
                    q.data() + g * D);
      for (int64_t d = 0; d < D; ++d) q[static_cast<std::size_t>(g * D + d)] *= scale;
    }
    if (T > 0) {
      const char* kb = static_cast<const char*>(a.k_dense->data) + s * T * D * esz;
      const char* vb = static_cast<const char*>(a.v_dense->data) + s * T * D * esz;
      for (int64_t t0 = 0; t0 < T; t0 += ps)
        attend_split(q.data(), G, D, kb + t0 * D * esz, vb + t0 * D * esz, std::min(ps, T - t0), dt,
                     a.dense_mask.given() ? a.dense_mask.data + b * T + t0 : nullptr, nullptr, 0, scores, krow, part,
                     tot);
    }
    for (int64_t p = 0; p < P; ++p) {
      const int32_t r = a.page_table[s * P + p], n = a.page_lens[s * P + p];
      if (r < 0 || n == 0) continue;
      attend_split(q.data(), G, D, kd + r * ps * D * esz, vd + r * ps * D * esz, n, dt, nullptr, nullptr, 0, scores,
                   krow, part, tot);
    }
    if (R > 0) {
      const char* kb = a.summary_keys ? static_cast<const char*>(a.summary_keys->data) + s * R * D * esz : nullptr;
      const char* vb = static_cast<const char*>(a.summary_values->data) + s * R * D * esz;
      for (int64_t r0 = 0; r0 < R; r0 += ps)
        attend_split(q.data(), G, D, kb ? kb + r0 * D * esz : nullptr, vb + r0 * D * esz, std::min(ps, R - r0), dt, nullptr,
                     a.summary_bias_per_query_head ? a.summary_bias.data + s * G * R + r0 : a.summary_bias.data + s * R + r0,
                     a.summary_bias_per_query_head ? R : 0, scores, krow, part, tot);
    }
    char* o = static_cast<char*>(a.out.data);
    for (int64_t g = 0; g < G; ++g) {
      const float inv = tot.l[g] > 0 ? 1.0f / tot.l[g] : 0.0f;  // no tokens at all: zeros
      for (int64_t d = 0; d < D; ++d)
        dtype::store(o, dt, (b * Hq + h * G + g) * D + d, tot.acc[static_cast<std::size_t>(g * D + d)] * inv);
    }
  }
}

void nearest_centroid(const TensorView& keys, const TensorView& centroids, Span<int32_t> out_in, void* stream) {
  check_float_tensor(keys, "keys", 2);
  check_float_tensor(centroids, "centroids", 2);
  SCRIMP_CHECK(centroids.shape[0] >= 1 && centroids.shape[1] == keys.shape[1],
               "centroids: expected [C >= 1, " << keys.shape[1] << "], got " << describe(centroids));
  SCRIMP_CHECK_TYPE(centroids.dtype == keys.dtype, "centroids: expected the keys' dtype, got " << describe(centroids));
  SCRIMP_CHECK(centroids.device == keys.device, "centroids: expected the keys' device, got " << describe(centroids));
  const int64_t N = keys.shape[0], C = centroids.shape[0], D = keys.shape[1];
  check_span(out_in, N, "out");
  int32_t* out = out_in.data;
  if (N == 0) return;
  if (keys.device.type == DeviceType::CUDA) {
#if defined(SCRIMP_WITH_CUDA)
    cuda::nearest_centroid(keys, centroids, out, stream);
    return;
#else
    SCRIMP_FAIL("keys are on " << device_name(keys.device) << " but this build has no CUDA backend");
#endif
  }
  (void)stream;
  std::vector<float> cf(static_cast<std::size_t>(C * D));
  const int64_t esz = static_cast<int64_t>(dtype_size(keys.dtype));
  for (int64_t c = 0; c < C; ++c)
    dtype::load_row(static_cast<const char*>(centroids.data) + c * D * esz, keys.dtype, D, cf.data() + c * D);
#pragma omp parallel for schedule(static) if (N * C * D > 1 << 16)
  for (int64_t n = 0; n < N; ++n) {
    std::vector<float> k(static_cast<std::size_t>(D));
    dtype::load_row(static_cast<const char*>(keys.data) + n * D * esz, keys.dtype, D, k.data());
    float best = -std::numeric_limits<float>::infinity();
    int32_t arg = 0;
    for (int64_t c = 0; c < C; ++c) {
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += k[static_cast<std::size_t>(d)] * cf[static_cast<std::size_t>(c * D + d)];
      if (s > best) best = s, arg = static_cast<int32_t>(c);
    }
    out[n] = arg;
  }
}

}  // namespace scrimp
