// IceCache core: a clustered, offloaded KV page index for one attention layer, plus decode attention
// over a page list.
//
// Terms. A *stream* is one (batch row b, KV head h) pair; streams are numbered s = b * kv_heads + h.
// Sink and recent-window tokens stay resident on the device (kept by the caller); every other token
// of a stream lives in a host *page pool* in pages of `page_size` tokens (keys and values in the
// model's dtype). At prefill the middle tokens are clustered (a balanced hierarchical spherical
// 2-means tree whose leaves are pages) so that close keys share a page; pages evicted from the window
// are inserted incrementally. Each page has a representative: the mean key (centroid) and the
// per-dimension min/max key bounds.
//
// Every entry point checks its arguments (shapes, dtypes, and the sizes of the Span buffers, given
// below as [dims]) and throws scrimp::Error on bad input.
//
// Each decode step the caller (1) scores the query against the representatives with select(): the
// query heads of a GQA group are merged by taking the max page score over them, and the best `k`
// pages per stream are returned; (2) makes them resident in a fixed-size device page cache with
// recall(): pages already in a slot are hits (LRU), the others are copied from the host pool into a
// free or least-recently-used slot; (3) runs paged_decode_attention() over the selected slots plus the
// resident sink + window tokens.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "scrimp/span.h"
#include "scrimp/tensor.h"

namespace scrimp {

// How select() ranks pages.
enum class PageScore : int {
  Bounds = 0,    // upper bound of q.k over the page from per-dimension min/max keys (Quest-style)
  Centroid = 1,  // q . mean key
  Oracle = 2,    // exact max_t q.k_t over the page's keys (reads the host pool; a baseline)
  Random = 3,    // a seeded pseudo-random ranking (a baseline)
};

struct ClusteredCacheConfig {
  int64_t batch = 1;
  int64_t kv_heads = 1;
  int64_t q_heads = 1;        // a multiple of kv_heads (GQA group = q_heads / kv_heads)
  int64_t head_dim = 0;
  int64_t page_size = 16;     // tokens per page, >= 1
  int64_t max_pages = 0;      // host pool capacity per stream, in pages (the pool is allocated once)
  int64_t cache_pages = 0;    // device page-cache slots per stream (>= the k passed to select/recall)
  DType dtype = DType::Float32;  // of keys/values: float32, float16 or bfloat16
  bool cluster = true;        // false: pages keep time order (Quest / random / oracle baselines)
  PageScore score = PageScore::Bounds;
  int kmeans_iters = 6;       // 2-means iterations per tree node
  uint64_t seed = 0;
  bool pin_memory = true;     // use pinned (cudaHostAlloc, mapped) memory when a CUDA device is usable
};

// Host page pool: one allocation of streams * max_pages pages, each [2][page_size][head_dim] (keys
// then values) in the model's dtype. Pinned and mapped into the device address space when CUDA is
// usable and requested, 64-byte aligned plain memory otherwise. Allocation failure throws.
class HostPagePool {
 public:
  HostPagePool(int64_t num_pages, int64_t page_size, int64_t head_dim, DType dtype, bool pin);
  ~HostPagePool();
  HostPagePool(const HostPagePool&) = delete;
  HostPagePool& operator=(const HostPagePool&) = delete;

  int64_t num_pages() const { return num_pages_; }
  int64_t page_bytes() const { return page_bytes_; }  // keys + values of one page
  int64_t bytes() const { return num_pages_ * page_bytes_; }
  bool pinned() const { return pinned_; }
  char* keys(int64_t page) { return base_ + page * page_bytes_; }
  char* values(int64_t page) { return base_ + page * page_bytes_ + page_bytes_ / 2; }
  const char* keys(int64_t page) const { return base_ + page * page_bytes_; }
  const char* values(int64_t page) const { return base_ + page * page_bytes_ + page_bytes_ / 2; }
  char* base() { return base_; }
  void* device_base() const { return device_base_; }  // the mapped device pointer (pinned only)

 private:
  int64_t num_pages_ = 0, page_bytes_ = 0;
  bool pinned_ = false;
  char* base_ = nullptr;
  void* device_base_ = nullptr;
};

struct ClusteredCacheStats {
  int64_t hits = 0;     // selected pages found in the device page cache
  int64_t misses = 0;   // selected pages copied from the host pool
  int64_t bytes_copied = 0;
};

class ClusteredCache {
 public:
  explicit ClusteredCache(const ClusteredCacheConfig& config);
  ~ClusteredCache();
  ClusteredCache(const ClusteredCache&) = delete;
  ClusteredCache& operator=(const ClusteredCache&) = delete;

  const ClusteredCacheConfig& config() const { return cfg_; }

  // Prefill: adds the middle tokens of every stream. keys, values: [B, Hkv, N, D] CPU, cfg.dtype,
  // contiguous. positions: N absolute token positions (not given: 0..N-1). With cfg.cluster the
  // tokens of each stream are clustered into pages (full pages except at most one); otherwise they
  // fill pages in order. May be called once per stream set before any append_page (more calls add
  // more pages).
  // batch_row >= 0: keys/values are [1, Hkv, N, D] and only that batch row's streams get the pages
  // (rows of a left-padded batch have different numbers of real tokens).
  void build(const TensorView& keys, const TensorView& values, Span<const int64_t> positions = {},
             int64_t batch_row = -1);

  // Two-level build: the tokens of each stream arrive grouped (e.g. by a coarse k-means on the device,
  // see nearest_centroid): stream i's group g is tokens [group_bounds[i][g], group_bounds[i][g + 1]) of
  // keys, group_bounds [S, groups + 1] (S = the streams in this call, groups >= 1). Each group is
  // clustered into pages separately (full pages but at most one per group). positions: [S, N] when
  // positions_per_stream (the tokens were permuted per stream), else [N] or not given.
  void build_grouped(const TensorView& keys, const TensorView& values, Span<const int64_t> positions,
                     bool positions_per_stream, Span<const int64_t> group_bounds, int64_t groups,
                     int64_t batch_row = -1);

  // Follower build, for a layer that reuses another layer's page selection (so it must hold the same
  // tokens in the same pages): stream i's tokens form exactly the given pages, in order. Page p of
  // stream i holds rows [page_bounds[i][p], page_bounds[i][p + 1]) of that stream's keys/values (at
  // most page_size rows; empty ranges add no page and may only come last). keys, values
  // [B, Hkv, N, D] as for build (rows past a stream's last bound are ignored); positions [S, N]
  // (S = B * Hkv); page_bounds [S, pages + 1] from 0, non-decreasing, at most N.
  void build_paged(const TensorView& keys, const TensorView& values, Span<const int64_t> positions,
                   Span<const int64_t> page_bounds, int64_t pages);

  // Incremental insertion of tokens evicted from the window: keys, values [B, Hkv, T, D] with
  // 1 <= T <= page_size, CPU, cfg.dtype, contiguous; first_position: the position of token 0.
  // Each stream gets one new page. skip (optional) [B]: leading tokens of each batch row to leave out
  // (left padding); a stream whose tokens are all skipped gets no page.
  void append_page(const TensorView& keys, const TensorView& values, int64_t first_position,
                   Span<const int64_t> skip = {});

  // Re-clusters the tokens of the last n pages of every stream (normally pages appended from the
  // window) with the page tree, rewriting those pages in place and dropping them from the device page
  // cache. Streams whose last n pages are not all full are left as they are. Returns the number of
  // streams re-clustered.
  int64_t recluster_tail(int64_t n);

  // Rewrites the last n pages of every stream to hold their tokens in the order of `positions`
  // [S, n * page_size]: the absolute positions of exactly the tokens now in those pages, page after
  // page (page j of the tail holds the entries [j * page_size, (j + 1) * page_size), -1 entries
  // skipped). A stream whose row is all -1, or already in that order, is left as it is. Gives a
  // follower the leader's re-clustered tail (recluster_tail); rewritten pages leave the device page
  // cache. Returns the number of streams rewritten.
  int64_t relayout_tail(int64_t n, Span<const int64_t> positions);

  // Pages in stream s; without an argument, the most pages of any stream.
  int64_t num_pages(int64_t stream) const;
  int64_t num_pages() const;

  // Scores every page against query [B, Hq, D] (CPU, float32, contiguous) and writes the best k
  // page indices per stream to out_pages [B, Hkv, k] (descending score; -1 where a stream has fewer
  // than k pages). out_scores [B, Hkv, k] (optional) receives the merged scores.
  void select(const TensorView& query, int64_t k, Span<int32_t> out_pages, Span<float> out_scores = {}) const;

  // Second selection stage: re-scores candidate pages (from select with more than k pages, or from a
  // device-side top-k) by the exact max_t q.k_t over each page's keys, read from the host pool, and
  // writes the best k per stream to out_pages [B, Hkv, k]. candidates [B, Hkv, kc] (kc >= k; -1
  // entries ignored; each page at most once per stream; a different buffer from out_pages). GQA heads are merged as in select (each
  // head's scores relative to its best candidate, max over the group); ties keep candidate order.
  // A page bound ranks a page by the best key its box could hold; the exact max ranks it by the best
  // key it does hold, which is what attention rewards. Cost: kc * page_size * G dot products per stream.
  void rerank(const TensorView& query, Span<const int32_t> candidates, int64_t kc, int64_t k,
              Span<int32_t> out_pages) const;

  // Exact attention mass of every page per query head: out[b, hq, p] = log sum_t exp(scale * q[b, hq] .
  // k_t) over the keys of page p of stream (b, hq / G), read from the host pool; -inf where the stream
  // has fewer than p + 1 pages. query [B, Hq, D] (CPU, float32, contiguous); out [B, Hq, P] float32
  // with P >= num_pages(). Each key is read once for the G heads of its group. Cost: every indexed
  // token's key times G dot products per stream, a full-context q.K on the host.
  void page_log_mass(const TensorView& query, float scale, int64_t P, Span<float> out) const;

  // Makes the pages in `pages` [B, Hkv, k] (from select; -1 entries ignored) resident in the device
  // page cache k_store / v_store, each [B * Hkv * cache_pages, page_size, D] of cfg.dtype (CPU or
  // CUDA, contiguous), and writes out_slots [B, Hkv, k] (store row of each page, -1 for padding) and
  // out_lens [B, Hkv, k] (valid tokens in it, 0 for padding). Hits are reused (LRU order); misses are
  // copied (on CUDA: a gather kernel on a dedicated copy stream reading mapped pinned memory, ordered
  // after the work queued on `stream`). With `wait` (the default) the work queued on `stream` after
  // this call waits for the copy; wait = false is a prefetch: the wait is added by the next recall
  // with wait, or by wait_transfers, just before the attention that reads the pages. On the CPU the
  // copy is done when recall returns.
  void recall(Span<const int32_t> pages, int64_t k, const TensorView& k_store, const TensorView& v_store,
              Span<int32_t> out_slots, Span<int32_t> out_lens, void* stream = nullptr, bool wait = true);

  // Makes `stream` wait for this cache's prefetched copies (recall with wait = false) not yet waited
  // for. A no-op on the CPU or when none is owed.
  void wait_transfers(void* stream);

  // Absolute token positions of the given pages [B, Hkv, k]: out [B, Hkv, k, page_size], -1 for padding.
  void page_positions(Span<const int32_t> pages, int64_t k, Span<int64_t> out) const;

  // Copies the keys/values of one page to float32 buffers [page_size, D] (rows past the page's length
  // are zero); returns the page's length.
  int64_t read_page(int64_t stream, int64_t page, Span<float> keys, Span<float> values) const;

  // Copies the bounds of pages [first_page, first_page + n) of every stream to lower/upper
  // [S, n, D] float32 (host) and their token counts to lens [S, n] int32 (0 past a stream's pages),
  // for scoring on the device.
  void export_bounds(int64_t first_page, int64_t n, Span<float> lower, Span<float> upper, Span<int32_t> lens) const;

  // Page summaries for PagedAttentionArgs::summary_*: the mean key and mean value of pages
  // [first_page, first_page + n) of every stream to key_means / value_means [S, n, D] float32 (host),
  // token counts to lens [S, n] int32 (0 past a stream's pages).
  void export_summaries(int64_t first_page, int64_t n, Span<float> key_means, Span<float> value_means,
                        Span<int32_t> lens) const;

  // Representatives: centroid, min, max, each [D] floats of page `page` of stream `stream`.
  const float* centroid(int64_t stream, int64_t page) const;
  const float* lower(int64_t stream, int64_t page) const;
  const float* upper(int64_t stream, int64_t page) const;

  ClusteredCacheStats stats() const { return stats_; }
  void reset_stats() { stats_ = ClusteredCacheStats(); }
  const HostPagePool& pool() const { return *pool_; }
  int64_t representative_bytes() const;  // host bytes of the index (representatives + page tables)

 private:
  struct Stream;
  void add_page(Stream& st, int64_t stream, const char* k, const char* v, int64_t k_row_stride,
                const int32_t* rows, int64_t n, const int64_t* positions);
  void drop_tail(Stream& st, int64_t n);
  // build and build_grouped (groups = 0: one group per stream).
  void build_tokens(const TensorView& keys, const TensorView& values, Span<const int64_t> positions,
                    bool positions_per_stream, Span<const int64_t> group_bounds, int64_t groups, int64_t batch_row);
  // export_bounds (lo, hi) or export_summaries (mean key, mean value) of pages [first_page, +n).
  void export_rows(int64_t first_page, int64_t n, bool summaries, Span<float> out_a, Span<float> out_b,
                   Span<int32_t> lens, const char* a_name, const char* b_name) const;
  void check_query(const TensorView& query) const;
  // max_t q.k_t over the keys of page p of stream s (kr: a scratch row of head_dim floats)
  float page_max_dot(int64_t s, int64_t p, const float* q, float* kr) const;
  ClusteredCacheConfig cfg_;
  std::unique_ptr<HostPagePool> pool_;
  std::vector<Stream> streams_;
  ClusteredCacheStats stats_;
  uint64_t tick_ = 0;
  [[maybe_unused]] void* transfers_ = nullptr;  // CUDA backend state (page lists, events), made on the first CUDA recall
};

// Clusters the rows of keys [N, D] (float32, contiguous) into pages of at most page_size rows with a
// balanced hierarchical spherical 2-means tree. Writes a permutation of 0..N-1 to `order` [N] and
// returns the page boundaries (page p holds order[bounds[p] .. bounds[p+1])). All pages are full
// except at most one. keys: [N * D] floats; order: [N].
std::vector<int64_t> cluster_into_pages(Span<const float> keys, int64_t N, int64_t D, int64_t page_size,
                                        int iterations, uint64_t seed, Span<int64_t> order);

// Decode attention over a page list (one query token per batch row), split over pages: every page
// (and the dense segment, and each chunk of page_size summary rows) yields a partial (max, sum,
// weighted values) merged with log-sum-exp.
struct PagedAttentionArgs {
  TensorView query;    // [B, Hq, D] float32/float16/bfloat16, contiguous
  TensorView k_store;  // [S, page_size, D] same dtype and device, contiguous
  TensorView v_store;  // [S, page_size, D]
  Span<const int32_t> page_table;       // [B, Hkv, P] rows of the stores, -1 = skip (device memory)
  Span<const int32_t> page_lens;        // [B, Hkv, P] valid tokens per page (device memory)
  int64_t pages_per_stream = 0;         // P (may be 0)
  const TensorView* k_dense = nullptr;  // optional [B, Hkv, T, D] resident tokens (sink + window)
  const TensorView* v_dense = nullptr;  // optional [B, Hkv, T, D]
  Span<const uint8_t> dense_mask;       // optional [B, T]: 0 = skip the token (padding) (device memory)
  // Optional page summaries (scrimp's extension of IceCache): each row r stands for a page that is not
  // attended exactly, as one key/value pair scored q . key_r * scale + bias_r; with the page's mean key
  // and value and bias = log(tokens in the page) it approximates the page's n * exp(q . k) * v terms,
  // so the softmax keeps the mass of unselected pages. bias -inf skips a row (e.g. a selected page).
  // summary_keys may be left out (nullptr): each row is then scored by its bias alone (exact row masses).
  const TensorView* summary_keys = nullptr;    // [B, Hkv, R, D], the query's dtype and device
  const TensorView* summary_values = nullptr;  // [B, Hkv, R, D]
  Span<const float> summary_bias;              // [B, Hkv, R] float32 (device memory), or [B, Hq, R]:
  bool summary_bias_per_query_head = false;    // one bias per query head and row (e.g. exact row masses)
  int64_t kv_heads = 0;                 // Hkv (Hq must be a multiple)
  float scale = 0.0f;                   // softmax scale (0: 1/sqrt(D))
  TensorView out;                       // [B, Hq, D] same dtype as query
  void* stream = nullptr;               // cudaStream_t for CUDA tensors
};

void paged_decode_attention(const PagedAttentionArgs& args);

// out[n] = argmax_c keys[n] . centroids[c] (first index on ties): the assignment step of clustering.
// keys [N, D], centroids [C, D] (C >= 1): same float dtype and device, contiguous; out: int32 [N] on
// that device. On CUDA the call is asynchronous on `stream`.
void nearest_centroid(const TensorView& keys, const TensorView& centroids, Span<int32_t> out, void* stream = nullptr);

// True when pinned host memory and the CUDA kernels of this module can be used right now.
bool clustered_cache_cuda_usable();

}  // namespace scrimp
