// IceCache's page storage: the host page pool, the pages and representatives of every stream (build,
// append, re-cluster and re-layout of the tail, exports), and recall into the fixed-size device page
// cache (LRU slots; copies on the CPU or through the CUDA gather).
#include "scrimp/clustered_cache.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <vector>

#include "clustered_cache_cuda.h"
#include "clustered_cache_stream.h"
#include "dtype_dispatch.h"
#include "span_checks.h"
#include "scrimp/error.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace scrimp {

bool clustered_cache_cuda_usable() {
#if defined(SCRIMP_WITH_CUDA)
  return cuda::usable();
#else
  return false;
#endif
}

// ---- host page pool ----------------------------------------------------------------------------

HostPagePool::HostPagePool(int64_t num_pages, int64_t page_size, int64_t head_dim, DType dtype, bool pin) {
  SCRIMP_CHECK(num_pages >= 1, "page pool: expected at least one page, got " << num_pages);
  SCRIMP_CHECK(page_size >= 1 && head_dim >= 1, "page pool: page_size and head_dim must be >= 1");
  num_pages_ = num_pages;
  page_bytes_ = 2 * page_size * head_dim * static_cast<int64_t>(dtype_size(dtype));
  SCRIMP_CHECK(num_pages_ <= std::numeric_limits<int64_t>::max() / page_bytes_,
               "page pool: " << num_pages << " pages of " << page_bytes_ << " bytes overflow");
  const std::size_t bytes = static_cast<std::size_t>(num_pages_ * page_bytes_);
#if defined(SCRIMP_WITH_CUDA)
  if (pin && cuda::usable()) {
    base_ = static_cast<char*>(cuda::host_alloc_mapped(bytes, &device_base_));
    if (base_ != nullptr) {
      pinned_ = true;
      return;
    }
    SCRIMP_FAIL("page pool: cudaHostAlloc of " << bytes << " pinned bytes failed (lower max_context or the "
                                               "budget, or pass pin_memory=False)");
  }
#else
  (void)pin;
#endif
  const std::size_t rounded = (bytes + 63) / 64 * 64;
  base_ = static_cast<char*>(std::aligned_alloc(64, rounded));
  if (base_ == nullptr) SCRIMP_FAIL("page pool: allocation of " << bytes << " host bytes failed");
}

HostPagePool::~HostPagePool() {
#if defined(SCRIMP_WITH_CUDA)
  if (pinned_) {
    cuda::host_free(base_);
    return;
  }
#endif
  std::free(base_);
}

namespace {

void check_kv(const TensorView& t, const char* name, const ClusteredCacheConfig& c, int64_t max_tokens) {
  SCRIMP_CHECK(t.ndim() == 4, name << ": expected [B, Hkv, N, D], got " << describe(t));
  SCRIMP_CHECK(t.device.type == DeviceType::CPU, name << ": expected a CPU tensor, got " << describe(t));
  SCRIMP_CHECK_TYPE(t.dtype == c.dtype, name << ": expected dtype " << dtype_name(c.dtype) << " (the cache's), got "
                                             << describe(t));
  SCRIMP_CHECK(t.shape[0] == c.batch && t.shape[1] == c.kv_heads && t.shape[3] == c.head_dim,
               name << ": expected [" << c.batch << ", " << c.kv_heads << ", N, " << c.head_dim << "], got "
                    << describe(t));
  SCRIMP_CHECK(max_tokens < 0 || t.shape[2] <= max_tokens,
               name << ": at most " << max_tokens << " tokens per call, got " << describe(t));
  SCRIMP_CHECK(t.is_contiguous(), name << ": expected a contiguous tensor, got " << describe(t));
  SCRIMP_CHECK(t.numel() == 0 || t.data != nullptr, name << ": null data pointer");
}

}  // namespace

ClusteredCache::ClusteredCache(const ClusteredCacheConfig& c) : cfg_(c) {
  SCRIMP_CHECK(c.batch >= 1, "batch must be >= 1, got " << c.batch);
  SCRIMP_CHECK(c.kv_heads >= 1, "kv_heads must be >= 1, got " << c.kv_heads);
  SCRIMP_CHECK(c.q_heads >= 1 && c.q_heads % c.kv_heads == 0,
               "q_heads must be a positive multiple of kv_heads (" << c.kv_heads << "), got " << c.q_heads);
  SCRIMP_CHECK(c.head_dim >= 1, "head_dim must be >= 1, got " << c.head_dim);
  SCRIMP_CHECK(c.page_size >= 1, "page_size must be >= 1, got " << c.page_size);
  SCRIMP_CHECK(c.max_pages >= 1, "max_pages must be >= 1, got " << c.max_pages);
  SCRIMP_CHECK(c.cache_pages >= 0, "cache_pages must be >= 0, got " << c.cache_pages);
  SCRIMP_CHECK(c.max_pages <= std::numeric_limits<int32_t>::max() / (c.batch * c.kv_heads),
               "max_pages too large");
  SCRIMP_CHECK_TYPE(dtype::is_float_kv(c.dtype), "dtype: expected float32, float16 or bfloat16, got "
                                                   << dtype_name(c.dtype));
  SCRIMP_CHECK(c.kmeans_iters >= 0, "kmeans_iters must be >= 0");
  const int64_t S = c.batch * c.kv_heads;
  pool_ = std::make_unique<HostPagePool>(S * c.max_pages, c.page_size, c.head_dim, c.dtype, c.pin_memory);
  streams_.resize(static_cast<std::size_t>(S));
  for (Stream& st : streams_) {
    st.slot_page.assign(static_cast<std::size_t>(c.cache_pages), -1);
    st.slot_tick.assign(static_cast<std::size_t>(c.cache_pages), 0);
  }
}

ClusteredCache::~ClusteredCache() {
#if defined(SCRIMP_WITH_CUDA)
  cuda::transfers_destroy(static_cast<cuda::Transfers*>(transfers_));
#endif
}

int64_t ClusteredCache::num_pages(int64_t s) const {
  SCRIMP_CHECK(s >= 0 && s < static_cast<int64_t>(streams_.size()), "stream " << s << " out of range");
  return static_cast<int64_t>(streams_[static_cast<std::size_t>(s)].len.size());
}

int64_t ClusteredCache::num_pages() const {
  std::size_t n = 0;
  for (const Stream& st : streams_) n = std::max(n, st.len.size());
  return static_cast<int64_t>(n);
}

void ClusteredCache::add_page(Stream& st, int64_t s, const char* k, const char* v, int64_t row_bytes,
                              const int32_t* rows, int64_t n, const int64_t* positions) {
  const int64_t D = cfg_.head_dim, ps = cfg_.page_size;
  const int64_t local = static_cast<int64_t>(st.len.size());
  const int64_t page = s * cfg_.max_pages + local;
  char* pk = pool_->keys(page);
  char* pv = pool_->values(page);
  st.cen.resize(static_cast<std::size_t>((local + 1) * D));
  st.lo.resize(st.cen.size());
  st.hi.resize(st.cen.size());
  st.vmean.resize(st.cen.size());
  st.pos.resize(static_cast<std::size_t>((local + 1) * ps), -1);
  float* cen = st.cen.data() + local * D;
  float* lo = st.lo.data() + local * D;
  float* hi = st.hi.data() + local * D;
  float* vm = st.vmean.data() + local * D;
  std::fill(cen, cen + D, 0.0f);
  std::fill(vm, vm + D, 0.0f);
  std::fill(lo, lo + D, std::numeric_limits<float>::infinity());
  std::fill(hi, hi + D, -std::numeric_limits<float>::infinity());
  std::vector<float> row(static_cast<std::size_t>(D));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rows ? rows[i] : i;
    std::memcpy(pk + i * row_bytes, k + r * row_bytes, static_cast<std::size_t>(row_bytes));
    std::memcpy(pv + i * row_bytes, v + r * row_bytes, static_cast<std::size_t>(row_bytes));
    dtype::load_row(k + r * row_bytes, cfg_.dtype, D, row.data());
    for (int64_t d = 0; d < D; ++d) {
      cen[d] += row[d];
      lo[d] = std::min(lo[d], row[d]);
      hi[d] = std::max(hi[d], row[d]);
    }
    dtype::load_row(v + r * row_bytes, cfg_.dtype, D, row.data());
    for (int64_t d = 0; d < D; ++d) vm[d] += row[d];
    st.pos[static_cast<std::size_t>(local * ps + i)] = positions ? positions[r] : r;
  }
  // Unused rows are zeroed so a whole-page copy never moves uninitialised bytes.
  if (n < ps) {
    std::memset(pk + n * row_bytes, 0, static_cast<std::size_t>((ps - n) * row_bytes));
    std::memset(pv + n * row_bytes, 0, static_cast<std::size_t>((ps - n) * row_bytes));
  }
  for (int64_t d = 0; d < D; ++d) {
    cen[d] /= static_cast<float>(std::max<int64_t>(n, 1));
    vm[d] /= static_cast<float>(std::max<int64_t>(n, 1));
  }
  st.len.push_back(static_cast<int32_t>(n));
  st.page_slot.push_back(-1);
}

void ClusteredCache::build(const TensorView& keys, const TensorView& values, Span<const int64_t> positions,
                           int64_t batch_row) {
  build_tokens(keys, values, positions, false, Span<const int64_t>(), 0, batch_row);
}

void ClusteredCache::build_grouped(const TensorView& keys, const TensorView& values, Span<const int64_t> positions,
                                   bool positions_per_stream, Span<const int64_t> group_bounds, int64_t groups,
                                   int64_t batch_row) {
  SCRIMP_CHECK(groups >= 1, "group_bounds: expected at least one group, got groups = " << groups);
  build_tokens(keys, values, positions, positions_per_stream, group_bounds, groups, batch_row);
}

void ClusteredCache::build_tokens(const TensorView& keys, const TensorView& values, Span<const int64_t> positions_in,
                                  bool positions_per_stream, Span<const int64_t> group_bounds_in, int64_t groups,
                                  int64_t batch_row) {
  SCRIMP_CHECK(batch_row >= -1 && batch_row < cfg_.batch, "batch_row " << batch_row << " out of range [-1, "
                                                                       << cfg_.batch << ")");
  ClusteredCacheConfig shape_cfg = cfg_;
  if (batch_row >= 0) shape_cfg.batch = 1;
  check_kv(keys, "keys", shape_cfg, -1);
  check_kv(values, "values", shape_cfg, -1);
  SCRIMP_CHECK(values.shape == keys.shape, "values: expected the keys' shape " << describe(keys) << ", got "
                                                                              << describe(values));
  const int64_t N = keys.shape[2], D = cfg_.head_dim, ps = cfg_.page_size;
  const int64_t S = shape_cfg.batch * cfg_.kv_heads;
  SCRIMP_CHECK(!positions_per_stream || positions_in.given(), "positions: required when positions_per_stream");
  if (positions_in.given() || positions_per_stream)
    check_span(positions_in, positions_per_stream ? S * N : N, "positions");
  if (groups > 0) check_span(group_bounds_in, S * (groups + 1), "group_bounds");
  const int64_t* positions = positions_in.data;
  const int64_t* group_bounds = group_bounds_in.data;
  if (N == 0) return;
  for (int64_t i = 0; i < S && groups > 0; ++i) {
    const int64_t* gb = group_bounds + i * (groups + 1);
    SCRIMP_CHECK(gb[0] == 0 && gb[groups] == N, "group_bounds of stream " << i << " must run from 0 to " << N);
    for (int64_t g = 0; g < groups; ++g)
      SCRIMP_CHECK(gb[g] <= gb[g + 1], "group_bounds of stream " << i << " must be non-decreasing");
  }
  // Each group gives full pages and at most one partial page.
  const int64_t new_pages = (N + ps - 1) / ps + std::max<int64_t>(groups - 1, 0);
  const int64_t s0 = batch_row >= 0 ? batch_row * cfg_.kv_heads : 0;
  for (int64_t s = s0; s < s0 + S; ++s)
    SCRIMP_CHECK(num_pages(s) + new_pages <= cfg_.max_pages,
                 "page pool full: " << num_pages(s) << " + " << new_pages << " pages exceed max_pages = "
                                    << cfg_.max_pages << " per stream (raise max_context)");
  const int64_t row_bytes = D * static_cast<int64_t>(dtype_size(cfg_.dtype));
  const char* kb = static_cast<const char*>(keys.data);
  const char* vb = static_cast<const char*>(values.data);
#pragma omp parallel for schedule(dynamic, 1) if (S > 1)
  for (int64_t i = 0; i < S; ++i) {
    const int64_t s = s0 + i;
    const char* ks = kb + i * N * row_bytes;
    const char* vs = vb + i * N * row_bytes;
    const int64_t* pos = positions ? (positions_per_stream ? positions + i * N : positions) : nullptr;
    std::vector<int64_t> ranges{0, N};
    if (groups > 0) ranges.assign(group_bounds + i * (groups + 1), group_bounds + (i + 1) * (groups + 1));
    std::vector<int32_t> rows(static_cast<std::size_t>(ps));
    std::vector<float> kf;
    std::vector<int64_t> order;
    for (std::size_t r = 0; r + 1 < ranges.size(); ++r) {
      const int64_t g0 = ranges[r], n_g = ranges[r + 1] - ranges[r];
      if (n_g == 0) continue;
      order.resize(static_cast<std::size_t>(n_g));
      std::vector<int64_t> bounds;
      if (cfg_.cluster) {
        kf.resize(static_cast<std::size_t>(n_g * D));
        for (int64_t t = 0; t < n_g; ++t) dtype::load_row(ks + (g0 + t) * row_bytes, cfg_.dtype, D, kf.data() + t * D);
        bounds = cluster_into_pages(kf, n_g, D, ps, cfg_.kmeans_iters,
                                    cfg_.seed + static_cast<uint64_t>(s * 7919 + static_cast<int64_t>(r)), order);
      } else {
        std::iota(order.begin(), order.end(), int64_t{0});
        for (int64_t b = 0; b < n_g; b += ps) bounds.push_back(b);
        bounds.push_back(n_g);
      }
      for (std::size_t p = 0; p + 1 < bounds.size(); ++p) {
        const int64_t n = bounds[p + 1] - bounds[p];
        for (int64_t t = 0; t < n; ++t)
          rows[static_cast<std::size_t>(t)] = static_cast<int32_t>(g0 + order[bounds[p] + t]);
        add_page(streams_[static_cast<std::size_t>(s)], s, ks, vs, row_bytes, rows.data(), n, pos);
      }
    }
  }
}

void ClusteredCache::append_page(const TensorView& keys, const TensorView& values, int64_t first_position,
                                 Span<const int64_t> skip_in) {
  if (skip_in.given()) check_span(skip_in, cfg_.batch, "skip");
  const int64_t* skip = skip_in.data;
  check_kv(keys, "keys", cfg_, cfg_.page_size);
  check_kv(values, "values", cfg_, cfg_.page_size);
  SCRIMP_CHECK(values.shape == keys.shape, "values: expected the keys' shape " << describe(keys) << ", got "
                                                                              << describe(values));
  const int64_t T = keys.shape[2];
  SCRIMP_CHECK(T >= 1, "append_page: expected at least one token");
  SCRIMP_CHECK(num_pages() + 1 <= cfg_.max_pages,
               "page pool full: max_pages = " << cfg_.max_pages << " per stream (raise max_context)");
  if (skip)
    for (int64_t b = 0; b < cfg_.batch; ++b)
      SCRIMP_CHECK(skip[b] >= 0, "append_page: skip must be >= 0, got " << skip[b] << " for batch row " << b);
  const int64_t S = cfg_.batch * cfg_.kv_heads;
  const int64_t row_bytes = cfg_.head_dim * static_cast<int64_t>(dtype_size(cfg_.dtype));
  std::vector<int64_t> positions(static_cast<std::size_t>(T));
  std::iota(positions.begin(), positions.end(), first_position);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t k0 = skip ? std::min(skip[s / cfg_.kv_heads], T) : 0;
    if (k0 == T) continue;  // only padding: no page for this stream
    add_page(streams_[static_cast<std::size_t>(s)], s,
             static_cast<const char*>(keys.data) + (s * T + k0) * row_bytes,
             static_cast<const char*>(values.data) + (s * T + k0) * row_bytes, row_bytes, nullptr, T - k0,
             positions.data() + k0);
  }
}

void ClusteredCache::drop_tail(Stream& st, int64_t n) {
  const int64_t P = static_cast<int64_t>(st.len.size()), D = cfg_.head_dim, ps = cfg_.page_size;
  for (int64_t p = P - n; p < P; ++p) {
    const int32_t slot = st.page_slot[static_cast<std::size_t>(p)];
    if (slot >= 0) {
      st.slot_page[static_cast<std::size_t>(slot)] = -1;
      st.slot_tick[static_cast<std::size_t>(slot)] = 0;
    }
  }
  st.len.resize(static_cast<std::size_t>(P - n));
  st.page_slot.resize(static_cast<std::size_t>(P - n));
  st.cen.resize(static_cast<std::size_t>((P - n) * D));
  st.lo.resize(st.cen.size());
  st.hi.resize(st.cen.size());
  st.vmean.resize(st.cen.size());
  st.pos.resize(static_cast<std::size_t>((P - n) * ps));
}

int64_t ClusteredCache::relayout_tail(int64_t n, Span<const int64_t> positions_in) {
  SCRIMP_CHECK(n >= 0, "relayout_tail: n must be >= 0, got " << n);
  const int64_t S = cfg_.batch * cfg_.kv_heads, D = cfg_.head_dim, ps = cfg_.page_size;
  check_span(positions_in, S * n * ps, "positions");
  const int64_t* positions = positions_in.data;
  if (n == 0) return 0;
  const int64_t row_bytes = D * static_cast<int64_t>(dtype_size(cfg_.dtype));
  // Validate every stream before changing any (an error leaves the cache as it was).
  std::vector<std::vector<int32_t>> rows_of(static_cast<std::size_t>(S));  // tail row of each entry, -1 skipped
  for (int64_t s = 0; s < S; ++s) {
    const Stream& st = streams_[static_cast<std::size_t>(s)];
    const int64_t* want = positions + s * n * ps;
    if (std::all_of(want, want + n * ps, [](int64_t p) { return p < 0; })) continue;
    const int64_t P = static_cast<int64_t>(st.len.size());
    SCRIMP_CHECK(P >= n, "relayout_tail: stream " << s << " has " << P << " pages, fewer than " << n);
    // tail row r = page (P - n + r / ps), token r % ps
    std::vector<std::pair<int64_t, int32_t>> have;  // (position, tail row)
    for (int64_t p = 0; p < n; ++p)
      for (int64_t t = 0; t < st.len[static_cast<std::size_t>(P - n + p)]; ++t)
        have.emplace_back(st.pos[static_cast<std::size_t>((P - n + p) * ps + t)], static_cast<int32_t>(p * ps + t));
    std::sort(have.begin(), have.end());
    std::vector<int32_t>& rows = rows_of[static_cast<std::size_t>(s)];
    rows.assign(static_cast<std::size_t>(n * ps), -1);
    int64_t count = 0;
    bool same = true;
    for (int64_t i = 0; i < n * ps; ++i) {
      if (want[i] < 0) continue;
      auto it = std::lower_bound(have.begin(), have.end(),
                                 std::make_pair(want[i], std::numeric_limits<int32_t>::min()));
      SCRIMP_CHECK(it != have.end() && it->first == want[i],
                   "relayout_tail: position " << want[i] << " is not in the last " << n << " pages of stream " << s);
      SCRIMP_CHECK(it->second >= 0, "relayout_tail: position " << want[i] << " given twice for stream " << s);
      rows[static_cast<std::size_t>(i)] = it->second;
      same = same && it->second == i;
      it->second = -1 - it->second;  // mark it used
      ++count;
    }
    SCRIMP_CHECK(count == static_cast<int64_t>(have.size()),
                 "relayout_tail: stream " << s << " holds " << have.size() << " tokens in its last " << n
                                          << " pages, positions name " << count);
    if (same) rows.clear();  // already in that order
  }
  int64_t done = 0;
  for (int64_t s = 0; s < S; ++s) {
    const std::vector<int32_t>& rows = rows_of[static_cast<std::size_t>(s)];
    if (rows.empty()) continue;
    Stream& st = streams_[static_cast<std::size_t>(s)];
    const int64_t P = static_cast<int64_t>(st.len.size());
    std::vector<char> kb(static_cast<std::size_t>(n * ps * row_bytes)), vb(kb.size());
    std::vector<int64_t> pos(static_cast<std::size_t>(n * ps), -1);
    for (int64_t p = 0; p < n; ++p) {
      const int64_t page = s * cfg_.max_pages + (P - n + p);
      std::memcpy(kb.data() + p * ps * row_bytes, pool_->keys(page), static_cast<std::size_t>(ps * row_bytes));
      std::memcpy(vb.data() + p * ps * row_bytes, pool_->values(page), static_cast<std::size_t>(ps * row_bytes));
      for (int64_t t = 0; t < ps; ++t) pos[static_cast<std::size_t>(p * ps + t)] = st.pos[static_cast<std::size_t>((P - n + p) * ps + t)];
    }
    drop_tail(st, n);
    std::vector<int32_t> page_rows;
    for (int64_t j = 0; j < n; ++j) {
      page_rows.clear();
      for (int64_t t = 0; t < ps; ++t)
        if (rows[static_cast<std::size_t>(j * ps + t)] >= 0) page_rows.push_back(rows[static_cast<std::size_t>(j * ps + t)]);
      if (!page_rows.empty())
        add_page(st, s, kb.data(), vb.data(), row_bytes, page_rows.data(), static_cast<int64_t>(page_rows.size()),
                 pos.data());
    }
    ++done;
  }
  return done;
}

void ClusteredCache::build_paged(const TensorView& keys, const TensorView& values, Span<const int64_t> positions_in,
                                 Span<const int64_t> page_bounds_in, int64_t pages) {
  check_kv(keys, "keys", cfg_, -1);
  check_kv(values, "values", cfg_, -1);
  SCRIMP_CHECK(values.shape == keys.shape, "values: expected the keys' shape " << describe(keys) << ", got "
                                                                              << describe(values));
  SCRIMP_CHECK(pages >= 0, "build_paged: pages must be >= 0, got " << pages);
  const int64_t N = keys.shape[2], ps = cfg_.page_size, S = cfg_.batch * cfg_.kv_heads;
  check_span(positions_in, S * N, "positions");
  check_span(page_bounds_in, S * (pages + 1), "page_bounds");
  const int64_t* positions = positions_in.data;
  const int64_t* page_bounds = page_bounds_in.data;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t* pb = page_bounds + s * (pages + 1);
    SCRIMP_CHECK(pb[0] == 0 && pb[pages] <= N, "page_bounds of stream " << s << " must run from 0 to at most " << N);
    bool ended = false;
    int64_t used = 0;
    for (int64_t p = 0; p < pages; ++p) {
      const int64_t n = pb[p + 1] - pb[p];
      SCRIMP_CHECK(n >= 0 && n <= ps, "page_bounds of stream " << s << ": page " << p << " has " << n
                                                              << " tokens (expected 0.." << ps << ")");
      SCRIMP_CHECK(n == 0 || !ended, "page_bounds of stream " << s << ": an empty page before a non-empty one");
      ended = ended || n == 0;
      used += n > 0;
    }
    SCRIMP_CHECK(num_pages(s) + used <= cfg_.max_pages,
                 "page pool full: " << num_pages(s) << " + " << used << " pages exceed max_pages = " << cfg_.max_pages
                                    << " per stream (raise max_context)");
  }
  const int64_t row_bytes = cfg_.head_dim * static_cast<int64_t>(dtype_size(cfg_.dtype));
  const char* kb = static_cast<const char*>(keys.data);
  const char* vb = static_cast<const char*>(values.data);
#pragma omp parallel for schedule(dynamic, 1) if (S > 1)
  for (int64_t s = 0; s < S; ++s) {
    const int64_t* pb = page_bounds + s * (pages + 1);
    std::vector<int32_t> rows(static_cast<std::size_t>(ps));
    for (int64_t p = 0; p < pages; ++p) {
      const int64_t n = pb[p + 1] - pb[p];
      if (n == 0) break;
      for (int64_t t = 0; t < n; ++t) rows[static_cast<std::size_t>(t)] = static_cast<int32_t>(pb[p] + t);
      add_page(streams_[static_cast<std::size_t>(s)], s, kb + s * N * row_bytes, vb + s * N * row_bytes, row_bytes,
               rows.data(), n, positions + s * N);
    }
  }
}

int64_t ClusteredCache::recluster_tail(int64_t n) {
  SCRIMP_CHECK(n >= 0, "recluster_tail: n must be >= 0, got " << n);
  if (n < 2) return 0;
  const int64_t S = cfg_.batch * cfg_.kv_heads, D = cfg_.head_dim, ps = cfg_.page_size;
  const int64_t row_bytes = D * static_cast<int64_t>(dtype_size(cfg_.dtype));
  int64_t done = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : done) if (S > 1)
  for (int64_t s = 0; s < S; ++s) {
    Stream& st = streams_[static_cast<std::size_t>(s)];
    const int64_t P = static_cast<int64_t>(st.len.size());
    if (P < n) continue;
    bool full = true;
    for (int64_t p = P - n; p < P; ++p) full = full && st.len[static_cast<std::size_t>(p)] == ps;
    if (!full) continue;
    const int64_t N = n * ps;
    // Copy the tokens out (the pages are rewritten below).
    std::vector<char> kb(static_cast<std::size_t>(N * row_bytes)), vb(kb.size());
    std::vector<int64_t> pos(static_cast<std::size_t>(N));
    for (int64_t p = 0; p < n; ++p) {
      const int64_t page = s * cfg_.max_pages + (P - n + p);
      std::memcpy(kb.data() + p * ps * row_bytes, pool_->keys(page), static_cast<std::size_t>(ps * row_bytes));
      std::memcpy(vb.data() + p * ps * row_bytes, pool_->values(page), static_cast<std::size_t>(ps * row_bytes));
      for (int64_t t = 0; t < ps; ++t) pos[p * ps + t] = st.pos[static_cast<std::size_t>((P - n + p) * ps + t)];
    }
    std::vector<float> kf(static_cast<std::size_t>(N * D));
    for (int64_t t = 0; t < N; ++t) dtype::load_row(kb.data() + t * row_bytes, cfg_.dtype, D, kf.data() + t * D);
    std::vector<int64_t> order(static_cast<std::size_t>(N));
    const auto bounds = cluster_into_pages(kf, N, D, ps, cfg_.kmeans_iters,
                                           cfg_.seed + static_cast<uint64_t>(s * 104729 + P), order);
    // Drop the old pages (and their device slots), then add the re-clustered ones in their place.
    drop_tail(st, n);
    std::vector<int32_t> rows(static_cast<std::size_t>(ps));
    for (std::size_t b = 0; b + 1 < bounds.size(); ++b) {
      const int64_t m = bounds[b + 1] - bounds[b];
      for (int64_t t = 0; t < m; ++t) rows[static_cast<std::size_t>(t)] = static_cast<int32_t>(order[bounds[b] + t]);
      add_page(st, s, kb.data(), vb.data(), row_bytes, rows.data(), m, pos.data());
    }
    ++done;
  }
  return done;
}

void ClusteredCache::export_rows(int64_t first_page, int64_t n, bool summaries, Span<float> a_out, Span<float> b_out,
                                 Span<int32_t> lens_out, const char* a_name, const char* b_name) const {
  SCRIMP_CHECK(first_page >= 0 && n >= 0, (summaries ? "export_summaries" : "export_bounds")
                                              << ": expected first_page >= 0 and n >= 0, got " << first_page << " and "
                                              << n);
  const int64_t D = cfg_.head_dim, S = static_cast<int64_t>(streams_.size());
  check_span(a_out, S * n * D, a_name);
  check_span(b_out, S * n * D, b_name);
  check_span(lens_out, S * n, "lens");
  float* out_a = a_out.data;
  float* out_b = b_out.data;
  int32_t* lens = lens_out.data;
  const std::size_t row = static_cast<std::size_t>(D) * sizeof(float);
  for (std::size_t s = 0; s < streams_.size(); ++s) {
    const Stream& st = streams_[s];
    const float* a = summaries ? st.cen.data() : st.lo.data();
    const float* b = summaries ? st.vmean.data() : st.hi.data();
    const int64_t P = static_cast<int64_t>(st.len.size());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = first_page + i, out = static_cast<int64_t>(s) * n + i;
      if (p < P) {
        std::memcpy(out_a + out * D, a + p * D, row);
        std::memcpy(out_b + out * D, b + p * D, row);
        lens[out] = st.len[static_cast<std::size_t>(p)];
      } else {
        std::fill(out_a + out * D, out_a + (out + 1) * D, 0.0f);
        std::fill(out_b + out * D, out_b + (out + 1) * D, 0.0f);
        lens[out] = 0;
      }
    }
  }
}

void ClusteredCache::export_bounds(int64_t first_page, int64_t n, Span<float> lower, Span<float> upper,
                                   Span<int32_t> lens) const {
  export_rows(first_page, n, false, lower, upper, lens, "lower", "upper");
}

void ClusteredCache::export_summaries(int64_t first_page, int64_t n, Span<float> key_means, Span<float> value_means,
                                      Span<int32_t> lens) const {
  export_rows(first_page, n, true, key_means, value_means, lens, "key_means", "value_means");
}

const float* ClusteredCache::centroid(int64_t s, int64_t p) const {
  return streams_.at(static_cast<std::size_t>(s)).cen.data() + p * cfg_.head_dim;
}
const float* ClusteredCache::lower(int64_t s, int64_t p) const {
  return streams_.at(static_cast<std::size_t>(s)).lo.data() + p * cfg_.head_dim;
}
const float* ClusteredCache::upper(int64_t s, int64_t p) const {
  return streams_.at(static_cast<std::size_t>(s)).hi.data() + p * cfg_.head_dim;
}

int64_t ClusteredCache::read_page(int64_t s, int64_t p, Span<float> keys_out, Span<float> values_out) const {
  SCRIMP_CHECK(s >= 0 && s < static_cast<int64_t>(streams_.size()), "stream " << s << " out of range");
  check_span(keys_out, cfg_.page_size * cfg_.head_dim, "keys");
  check_span(values_out, cfg_.page_size * cfg_.head_dim, "values");
  float* keys = keys_out.data;
  float* values = values_out.data;
  const Stream& st = streams_[static_cast<std::size_t>(s)];
  SCRIMP_CHECK(p >= 0 && p < static_cast<int64_t>(st.len.size()), "page " << p << " out of range");
  const int64_t D = cfg_.head_dim, ps = cfg_.page_size, n = st.len[static_cast<std::size_t>(p)];
  const int64_t page = s * cfg_.max_pages + p;
  const int64_t row_bytes = D * static_cast<int64_t>(dtype_size(cfg_.dtype));
  std::fill(keys, keys + ps * D, 0.0f);
  std::fill(values, values + ps * D, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    dtype::load_row(pool_->keys(page) + i * row_bytes, cfg_.dtype, D, keys + i * D);
    dtype::load_row(pool_->values(page) + i * row_bytes, cfg_.dtype, D, values + i * D);
  }
  return n;
}

int64_t ClusteredCache::representative_bytes() const {
  int64_t b = 0;
  for (const Stream& st : streams_)
    b += static_cast<int64_t>((st.cen.size() + st.lo.size() + st.hi.size() + st.vmean.size()) * sizeof(float) +
                              st.pos.size() * sizeof(int64_t) + st.len.size() * 8);
  return b;
}

void ClusteredCache::recall(Span<const int32_t> pages_in, int64_t k, const TensorView& k_store,
                            const TensorView& v_store, Span<int32_t> slots_out, Span<int32_t> lens_out, void* stream,
                            bool wait) {
  const int64_t S = cfg_.batch * cfg_.kv_heads, C = cfg_.cache_pages, ps = cfg_.page_size, D = cfg_.head_dim;
  SCRIMP_CHECK(k >= 0 && k <= C, "recall: k = " << k << " pages exceed the device page cache (cache_pages = " << C
                                                << " per stream)");
  check_span(pages_in, S * k, "pages");
  check_span(slots_out, S * k, "out_slots");
  check_span(lens_out, S * k, "out_lens");
  const int32_t* pages = pages_in.data;
  int32_t* out_slots = slots_out.data;
  int32_t* out_lens = lens_out.data;
  for (const TensorView* t : {&k_store, &v_store}) {
    SCRIMP_CHECK(t->ndim() == 3 && t->shape[0] == S * C && t->shape[1] == ps && t->shape[2] == D,
                 "page store: expected [" << S * C << ", " << ps << ", " << D << "], got " << describe(*t));
    SCRIMP_CHECK_TYPE(t->dtype == cfg_.dtype, "page store: expected dtype " << dtype_name(cfg_.dtype) << ", got "
                                                                            << describe(*t));
    SCRIMP_CHECK(t->is_contiguous(), "page store: expected a contiguous tensor, got " << describe(*t));
  }
  SCRIMP_CHECK(k_store.device == v_store.device, "k_store and v_store are on different devices");
  if (k == 0) {
    if (wait) wait_transfers(stream);
    return;
  }
  ++tick_;
  std::vector<int32_t> src, dst;  // pool page -> store row copies
  for (int64_t s = 0; s < S; ++s) {
    Stream& st = streams_[static_cast<std::size_t>(s)];
    const int64_t P = static_cast<int64_t>(st.len.size());
    // First pass: hits (mark them used this step so the misses never evict them).
    for (int64_t i = 0; i < k; ++i) {
      const int32_t p = pages[s * k + i];
      SCRIMP_CHECK(p >= -1 && p < P, "recall: page index " << p << " out of range [0, " << P << ")");
      if (p >= 0 && st.page_slot[static_cast<std::size_t>(p)] >= 0)
        st.slot_tick[static_cast<std::size_t>(st.page_slot[static_cast<std::size_t>(p)])] = tick_;
    }
    for (int64_t i = 0; i < k; ++i) {
      const int32_t p = pages[s * k + i];
      if (p < 0) {
        out_slots[s * k + i] = -1;
        out_lens[s * k + i] = 0;
        continue;
      }
      int32_t slot = st.page_slot[static_cast<std::size_t>(p)];
      if (slot >= 0) {
        ++stats_.hits;
      } else {
        // Least recently used slot not used this step (free slots have tick 0).
        uint64_t oldest = std::numeric_limits<uint64_t>::max();
        for (int64_t c = 0; c < C; ++c) {
          if (st.slot_tick[static_cast<std::size_t>(c)] < oldest && st.slot_tick[static_cast<std::size_t>(c)] != tick_) {
            oldest = st.slot_tick[static_cast<std::size_t>(c)];
            slot = static_cast<int32_t>(c);
          }
        }
        SCRIMP_CHECK(slot >= 0, "recall: no free slot (duplicate page indices in one stream?)");
        const int32_t old = st.slot_page[static_cast<std::size_t>(slot)];
        if (old >= 0) st.page_slot[static_cast<std::size_t>(old)] = -1;
        st.slot_page[static_cast<std::size_t>(slot)] = p;
        st.page_slot[static_cast<std::size_t>(p)] = slot;
        st.slot_tick[static_cast<std::size_t>(slot)] = tick_;
        src.push_back(static_cast<int32_t>(s * cfg_.max_pages + p));
        dst.push_back(static_cast<int32_t>(s * C + slot));
        ++stats_.misses;
      }
      out_slots[s * k + i] = static_cast<int32_t>(s * C + slot);
      out_lens[s * k + i] = st.len[static_cast<std::size_t>(p)];
    }
  }
  const int64_t row_bytes = ps * D * static_cast<int64_t>(dtype_size(cfg_.dtype));  // one page of K (or V)
  stats_.bytes_copied += static_cast<int64_t>(src.size()) * 2 * row_bytes;
  if (k_store.device.type == DeviceType::CUDA) {
#if defined(SCRIMP_WITH_CUDA)
    if (!src.empty()) {
      SCRIMP_CHECK(pool_->pinned(), "recall: a CUDA page store needs a pinned page pool (pin_memory=True with a "
                                    "usable CUDA device when the cache was created)");
      if (transfers_ == nullptr) transfers_ = cuda::transfers_create(k_store.device.index);
      cuda::gather_pages(static_cast<cuda::Transfers*>(transfers_), pool_->device_base(),
                             pool_->page_bytes(), src.data(), dst.data(), static_cast<int64_t>(src.size()),
                             k_store.data, v_store.data, row_bytes, stream, wait);
    }
    // hits of a prefetch still in flight: the attention after this call must wait for it too
    if (wait) wait_transfers(stream);
    return;
#else
    SCRIMP_FAIL("page store is on " << device_name(k_store.device) << " but this build has no CUDA backend");
#endif
  }
  (void)stream;
  (void)wait;
  if (src.empty()) return;
  char* kd = static_cast<char*>(k_store.data);
  char* vd = static_cast<char*>(v_store.data);
  const int64_t n = static_cast<int64_t>(src.size());
#pragma omp parallel for schedule(static) if (n > 64)
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(kd + dst[i] * row_bytes, pool_->keys(src[i]), static_cast<std::size_t>(row_bytes));
    std::memcpy(vd + dst[i] * row_bytes, pool_->values(src[i]), static_cast<std::size_t>(row_bytes));
  }
}

void ClusteredCache::wait_transfers(void* stream) {
#if defined(SCRIMP_WITH_CUDA)
  cuda::wait_transfers(static_cast<cuda::Transfers*>(transfers_), stream);
#else
  (void)stream;
#endif
}

void ClusteredCache::page_positions(Span<const int32_t> pages_in, int64_t k, Span<int64_t> out_in) const {
  const int64_t S = cfg_.batch * cfg_.kv_heads, ps = cfg_.page_size;
  SCRIMP_CHECK(k >= 0, "page_positions: k must be >= 0, got " << k);
  check_span(pages_in, S * k, "pages");
  check_span(out_in, S * k * ps, "out");
  const int32_t* pages = pages_in.data;
  int64_t* out = out_in.data;
  for (int64_t s = 0; s < S; ++s) {
    const Stream& st = streams_[static_cast<std::size_t>(s)];
    const int64_t P = static_cast<int64_t>(st.len.size());
    for (int64_t i = 0; i < k; ++i) {
      const int32_t p = pages[s * k + i];
      SCRIMP_CHECK(p >= -1 && p < P, "page index " << p << " out of range");
      for (int64_t t = 0; t < ps; ++t)
        out[(s * k + i) * ps + t] = p < 0 ? -1 : st.pos[static_cast<std::size_t>(p * ps + t)];
    }
  }
}

}  // namespace scrimp
