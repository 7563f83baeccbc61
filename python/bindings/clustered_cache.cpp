// Bindings of the IceCache core (cpp/include/scrimp/clustered_cache.h): tensors in, Spans and
// TensorViews out; the C++ API checks every argument.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "dlpack_view.h"
#include "registry.h"
#include "scrimp/clustered_cache.h"
#include "scrimp/error.h"

namespace py = pybind11;
using scrimp::bindings::BorrowedTensor;

namespace {

scrimp::PageScore parse_score(const std::string& s) {
  if (s == "bounds") return scrimp::PageScore::Bounds;
  if (s == "centroid") return scrimp::PageScore::Centroid;
  if (s == "oracle") return scrimp::PageScore::Oracle;
  if (s == "random") return scrimp::PageScore::Random;
  SCRIMP_CHECK(false, "score: expected bounds, centroid, oracle or random, got " << s);
  return scrimp::PageScore::Bounds;
}

// A contiguous tensor of `dtype` (on the CPU, or on `device` when given) as the Span the C++ API
// takes; the C++ API checks its size.
template <typename T>
scrimp::Span<T> span_of(const BorrowedTensor& t, scrimp::DType dtype, const char* name,
                        const scrimp::Device* device = nullptr) {
  const scrimp::TensorView& v = t.view();
  const scrimp::Device want = device ? *device : scrimp::Device{};
  SCRIMP_CHECK_TYPE(v.dtype == dtype, name << ": expected " << scrimp::dtype_name(dtype) << ", got " << describe(v));
  SCRIMP_CHECK(v.device == want && v.is_contiguous(),
               name << ": expected a contiguous tensor on " << scrimp::device_name(want) << ", got " << describe(v));
  return scrimp::Span<T>(static_cast<T*>(v.data), v.numel());
}

// An optional tensor argument: empty span for None.
template <typename T>
scrimp::Span<T> optional_span(const py::object& obj, std::unique_ptr<BorrowedTensor>& keep, scrimp::DType dtype,
                              const char* name, const scrimp::Device* device = nullptr) {
  if (obj.is_none()) return {};
  keep = std::make_unique<BorrowedTensor>(obj, name);
  return span_of<T>(*keep, dtype, name, device);
}

// The trailing size of a [S, n + 1] bounds table (the C++ API checks S and the element count).
int64_t bounds_count(const BorrowedTensor& t, const char* name, const char* what) {
  const auto& v = t.view();
  SCRIMP_CHECK(v.ndim() == 2 && v.shape[1] >= 1, name << ": expected [streams, " << what << " + 1], got " << describe(v));
  return v.shape[1] - 1;
}

constexpr scrimp::DType kI64 = scrimp::DType::Int64, kI32 = scrimp::DType::Int32, kF32 = scrimp::DType::Float32;

class PyClusteredCache {
 public:
  PyClusteredCache(int64_t batch, int64_t kv_heads, int64_t q_heads, int64_t head_dim, int64_t page_size,
                   int64_t max_pages, int64_t cache_pages, const std::string& dtype, bool cluster,
                   const std::string& score, int kmeans_iters, uint64_t seed, bool pin_memory) {
    scrimp::ClusteredCacheConfig c;
    c.batch = batch;
    c.kv_heads = kv_heads;
    c.q_heads = q_heads;
    c.head_dim = head_dim;
    c.page_size = page_size;
    c.max_pages = max_pages;
    c.cache_pages = cache_pages;
    c.dtype = scrimp::bindings::float_dtype_from_name(dtype, "dtype");
    c.cluster = cluster;
    c.score = parse_score(score);
    c.kmeans_iters = kmeans_iters;
    c.seed = seed;
    c.pin_memory = pin_memory;
    py::gil_scoped_release release;
    impl_ = std::make_unique<scrimp::ClusteredCache>(c);
  }

  void build(const py::object& keys, const py::object& values, const py::object& positions, int64_t batch_row) {
    BorrowedTensor k(keys, "keys"), v(values, "values");
    std::unique_ptr<BorrowedTensor> p;
    const auto pos = optional_span<const int64_t>(positions, p, kI64, "positions");
    py::gil_scoped_release release;
    impl_->build(k.view(), v.view(), pos, batch_row);
  }

  void build_grouped(const py::object& keys, const py::object& values, const py::object& positions,
                     const py::object& group_bounds, int64_t batch_row) {
    BorrowedTensor k(keys, "keys"), v(values, "values"), p(positions, "positions"), g(group_bounds, "group_bounds");
    const int64_t groups = bounds_count(g, "group_bounds", "groups");
    const auto gb = span_of<const int64_t>(g, kI64, "group_bounds");
    const auto pos = span_of<const int64_t>(p, kI64, "positions");
    py::gil_scoped_release release;
    impl_->build_grouped(k.view(), v.view(), pos, true, gb, groups, batch_row);
  }

  void build_paged(const py::object& keys, const py::object& values, const py::object& positions,
                   const py::object& page_bounds) {
    BorrowedTensor k(keys, "keys"), v(values, "values"), p(positions, "positions"), b(page_bounds, "page_bounds");
    const int64_t pages = bounds_count(b, "page_bounds", "pages");
    const auto pb = span_of<const int64_t>(b, kI64, "page_bounds");
    const auto pos = span_of<const int64_t>(p, kI64, "positions");
    py::gil_scoped_release release;
    impl_->build_paged(k.view(), v.view(), pos, pb, pages);
  }

  int64_t relayout_tail(int64_t n, const py::object& positions) {
    BorrowedTensor p(positions, "positions");
    const auto pos = span_of<const int64_t>(p, kI64, "positions");
    py::gil_scoped_release release;
    return impl_->relayout_tail(n, pos);
  }

  void wait_transfers(uintptr_t stream) {
    py::gil_scoped_release release;
    impl_->wait_transfers(reinterpret_cast<void*>(stream));
  }

  void append_page(const py::object& keys, const py::object& values, int64_t first_position,
                   const py::object& skip) {
    BorrowedTensor k(keys, "keys"), v(values, "values");
    std::unique_ptr<BorrowedTensor> sk;
    const auto ps = optional_span<const int64_t>(skip, sk, kI64, "skip");
    py::gil_scoped_release release;
    impl_->append_page(k.view(), v.view(), first_position, ps);
  }

  void select(const py::object& query, int64_t k, const py::object& out_pages, const py::object& out_scores) {
    BorrowedTensor q(query, "query"), op(out_pages, "out_pages");
    const auto pages = span_of<int32_t>(op, kI32, "out_pages");
    std::unique_ptr<BorrowedTensor> os;
    const auto scores = optional_span<float>(out_scores, os, kF32, "out_scores");
    py::gil_scoped_release release;
    impl_->select(q.view(), k, pages, scores);
  }

  void rerank(const py::object& query, const py::object& candidates, int64_t k, const py::object& out_pages) {
    BorrowedTensor q(query, "query"), cd(candidates, "candidates"), op(out_pages, "out_pages");
    const auto& cv = cd.view();
    SCRIMP_CHECK(cv.ndim() == 3, "candidates: expected [B, Hkv, kc], got " << describe(cv));
    const int64_t kc = cv.shape[2];
    const auto cand = span_of<const int32_t>(cd, kI32, "candidates");
    const auto pages = span_of<int32_t>(op, kI32, "out_pages");
    py::gil_scoped_release release;
    impl_->rerank(q.view(), cand, kc, k, pages);
  }

  void page_log_mass(const py::object& query, float scale, const py::object& out) {
    BorrowedTensor q(query, "query"), o(out, "out");
    const auto& ov = o.view();
    SCRIMP_CHECK(ov.ndim() == 3, "out: expected [B, Hq, P], got " << describe(ov));
    const auto os = span_of<float>(o, kF32, "out");
    py::gil_scoped_release release;
    impl_->page_log_mass(q.view(), scale, ov.shape[2], os);
  }

  void recall(const py::object& pages, int64_t k, const py::object& k_store, const py::object& v_store,
              const py::object& out_slots, const py::object& out_lens, uintptr_t stream, bool wait) {
    BorrowedTensor p(pages, "pages"), ks(k_store, "k_store"), vs(v_store, "v_store"), sl(out_slots, "out_slots"),
        ln(out_lens, "out_lens");
    const auto pp = span_of<const int32_t>(p, kI32, "pages");
    const auto slots = span_of<int32_t>(sl, kI32, "out_slots");
    const auto lens = span_of<int32_t>(ln, kI32, "out_lens");
    py::gil_scoped_release release;
    impl_->recall(pp, k, ks.view(), vs.view(), slots, lens, reinterpret_cast<void*>(stream), wait);
  }

  void page_positions(const py::object& pages, int64_t k, const py::object& out) {
    BorrowedTensor p(pages, "pages"), o(out, "out");
    const auto pp = span_of<const int32_t>(p, kI32, "pages");
    const auto po = span_of<int64_t>(o, kI64, "out");
    impl_->page_positions(pp, k, po);
  }

  int64_t read_page(int64_t stream, int64_t page, const py::object& keys, const py::object& values) {
    BorrowedTensor k(keys, "keys"), v(values, "values");
    const auto kp = span_of<float>(k, kF32, "keys");
    const auto vp = span_of<float>(v, kF32, "values");
    return impl_->read_page(stream, page, kp, vp);
  }

  void export_bounds(int64_t first_page, int64_t n, const py::object& lower, const py::object& upper,
                     const py::object& lens) {
    export_rows(first_page, n, false, lower, "lower", upper, "upper", lens);
  }

  void export_summaries(int64_t first_page, int64_t n, const py::object& key_means, const py::object& value_means,
                        const py::object& lens) {
    export_rows(first_page, n, true, key_means, "key_means", value_means, "value_means", lens);
  }

  int64_t recluster_tail(int64_t n) {
    py::gil_scoped_release release;
    return impl_->recluster_tail(n);
  }

  int64_t num_pages(int64_t stream) const { return stream < 0 ? impl_->num_pages() : impl_->num_pages(stream); }

  py::dict stats() const {
    const auto s = impl_->stats();
    py::dict d;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["bytes_copied"] = s.bytes_copied;
    d["pool_bytes"] = impl_->pool().bytes();
    d["pool_pinned"] = impl_->pool().pinned();
    d["index_bytes"] = impl_->representative_bytes();
    return d;
  }

  void reset_stats() { impl_->reset_stats(); }

 private:
  // Host float32 outputs a, b [S, n, D] and int32 lens [S, n] for ClusteredCache::export_rows.
  void export_rows(int64_t first_page, int64_t n, bool summaries, const py::object& a, const char* a_name,
                   const py::object& b, const char* b_name, const py::object& lens) {
    BorrowedTensor ta(a, a_name), tb(b, b_name), tl(lens, "lens");
    const auto pa = span_of<float>(ta, kF32, a_name);
    const auto pb = span_of<float>(tb, kF32, b_name);
    const auto pl = span_of<int32_t>(tl, kI32, "lens");
    if (summaries)
      impl_->export_summaries(first_page, n, pa, pb, pl);
    else
      impl_->export_bounds(first_page, n, pa, pb, pl);
  }

  std::unique_ptr<scrimp::ClusteredCache> impl_;
};

void paged_decode_attention(const py::object& query, const py::object& k_store, const py::object& v_store,
                            const py::object& page_table, const py::object& page_lens, const py::object& k_dense,
                            const py::object& v_dense, const py::object& dense_mask, int64_t kv_heads, double scale,
                            const py::object& out, uintptr_t stream, const py::object& summary_keys,
                            const py::object& summary_values, const py::object& summary_bias) {
  BorrowedTensor q(query, "query"), ks(k_store, "k_store"), vs(v_store, "v_store"), o(out, "out");
  scrimp::PagedAttentionArgs a;
  a.query = q.view();
  a.k_store = ks.view();
  a.v_store = vs.view();
  a.out = o.view();
  a.kv_heads = kv_heads;
  a.scale = static_cast<float>(scale);
  a.stream = reinterpret_cast<void*>(stream);
  const scrimp::Device dev = a.query.device;
  std::unique_ptr<BorrowedTensor> pt, pl, kd, vd, dm;
  if (!page_table.is_none()) {
    a.page_table = optional_span<const int32_t>(page_table, pt, kI32, "page_table", &dev);
    a.page_lens = optional_span<const int32_t>(page_lens, pl, kI32, "page_lens", &dev);
    const auto& v = pt->view();
    SCRIMP_CHECK(v.ndim() == 3, "page_table: expected [B, Hkv, P], got " << describe(v));
    a.pages_per_stream = v.shape[2];
  }
  if (!k_dense.is_none()) {
    kd = std::make_unique<BorrowedTensor>(k_dense, "k_dense");
    vd = std::make_unique<BorrowedTensor>(v_dense, "v_dense");
    a.k_dense = &kd->view();
    a.v_dense = &vd->view();
    a.dense_mask = optional_span<const uint8_t>(dense_mask, dm, scrimp::DType::UInt8, "dense_mask", &dev);
  }
  std::unique_ptr<BorrowedTensor> sk, sv, sb;
  if (!summary_keys.is_none()) {
    sk = std::make_unique<BorrowedTensor>(summary_keys, "summary_keys");
    a.summary_keys = &sk->view();
  }
  if (!summary_values.is_none()) {
    sv = std::make_unique<BorrowedTensor>(summary_values, "summary_values");
    a.summary_values = &sv->view();
  }
  a.summary_bias = optional_span<const float>(summary_bias, sb, kF32, "summary_bias", &dev);
  if (sb) {  // [B, Hkv, R]: one bias per row; [B, Hq, R]: one per query head and row
    const auto& bv = sb->view();
    const int64_t Hq = a.query.ndim() == 3 ? a.query.shape[1] : -1;
    SCRIMP_CHECK(bv.ndim() == 3 && (bv.shape[1] == kv_heads || bv.shape[1] == Hq),
                 "summary_bias: expected [B, Hkv = " << kv_heads << ", R] or [B, Hq = " << Hq << ", R], got "
                                                     << describe(bv));
    a.summary_bias_per_query_head = bv.shape[1] == Hq && Hq != kv_heads;
  }
  py::gil_scoped_release release;
  scrimp::paged_decode_attention(a);
}

void nearest_centroid(const py::object& keys, const py::object& centroids, const py::object& out, uintptr_t stream) {
  BorrowedTensor k(keys, "keys"), c(centroids, "centroids"), o(out, "out");
  const auto po = span_of<int32_t>(o, kI32, "out", &k.view().device);
  py::gil_scoped_release release;
  scrimp::nearest_centroid(k.view(), c.view(), po, reinterpret_cast<void*>(stream));
}

}  // namespace

SCRIMP_BINDINGS(clustered_cache) {
  py::class_<PyClusteredCache>(m, "ClusteredCache", "One layer of the IceCache page index (see clustered_cache.h).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const std::string&, bool,
                    const std::string&, int, uint64_t, bool>(),
           py::arg("batch"), py::arg("kv_heads"), py::arg("q_heads"), py::arg("head_dim"), py::arg("page_size"),
           py::arg("max_pages"), py::arg("cache_pages"), py::arg("dtype"), py::arg("cluster") = true,
           py::arg("score") = "bounds", py::arg("kmeans_iters") = 6, py::arg("seed") = 0,
           py::arg("pin_memory") = true)
      .def("build", &PyClusteredCache::build, py::arg("keys"), py::arg("values"), py::arg("positions") = py::none(),
           py::arg("batch_row") = -1)
      .def("build_grouped", &PyClusteredCache::build_grouped, py::arg("keys"), py::arg("values"),
           py::arg("positions"), py::arg("group_bounds"), py::arg("batch_row") = -1)
      .def("build_paged", &PyClusteredCache::build_paged, py::arg("keys"), py::arg("values"), py::arg("positions"),
           py::arg("page_bounds"))
      .def("relayout_tail", &PyClusteredCache::relayout_tail, py::arg("n"), py::arg("positions"))
      .def("append_page", &PyClusteredCache::append_page, py::arg("keys"), py::arg("values"),
           py::arg("first_position"), py::arg("skip") = py::none())
      .def("select", &PyClusteredCache::select, py::arg("query"), py::arg("k"), py::arg("out_pages"),
           py::arg("out_scores") = py::none())
      .def("rerank", &PyClusteredCache::rerank, py::arg("query"), py::arg("candidates"), py::arg("k"),
           py::arg("out_pages"))
      .def("page_log_mass", &PyClusteredCache::page_log_mass, py::arg("query"), py::arg("scale"), py::arg("out"))
      .def("recall", &PyClusteredCache::recall, py::arg("pages"), py::arg("k"), py::arg("k_store"),
           py::arg("v_store"), py::arg("out_slots"), py::arg("out_lens"), py::arg("stream") = 0,
           py::arg("wait") = true)
      .def("wait_transfers", &PyClusteredCache::wait_transfers, py::arg("stream") = 0)
      .def("page_positions", &PyClusteredCache::page_positions, py::arg("pages"), py::arg("k"), py::arg("out"))
      .def("read_page", &PyClusteredCache::read_page, py::arg("stream"), py::arg("page"), py::arg("keys"),
           py::arg("values"))
      .def("export_bounds", &PyClusteredCache::export_bounds, py::arg("first_page"), py::arg("n"),
           py::arg("lower"), py::arg("upper"), py::arg("lens"))
      .def("export_summaries", &PyClusteredCache::export_summaries, py::arg("first_page"), py::arg("n"),
           py::arg("key_means"), py::arg("value_means"), py::arg("lens"))
      .def("recluster_tail", &PyClusteredCache::recluster_tail, py::arg("n"))
      .def("num_pages", &PyClusteredCache::num_pages, py::arg("stream") = -1)
      .def("stats", &PyClusteredCache::stats)
      .def("reset_stats", &PyClusteredCache::reset_stats);
  m.def("paged_decode_attention", &paged_decode_attention, py::arg("query"), py::arg("k_store"), py::arg("v_store"),
        py::arg("page_table"), py::arg("page_lens"), py::arg("k_dense"), py::arg("v_dense"), py::arg("dense_mask"),
        py::arg("kv_heads"), py::arg("scale"), py::arg("out"), py::arg("stream") = 0,
        py::arg("summary_keys") = py::none(), py::arg("summary_values") = py::none(),
        py::arg("summary_bias") = py::none(),
        "Decode attention over a page list plus an optional dense (sink + window) segment and optional page "
        "summaries (one key/value row per unselected page, scored with an additive bias).");
  m.def("nearest_centroid", &nearest_centroid, py::arg("keys"), py::arg("centroids"), py::arg("out"),
        py::arg("stream") = 0, "out[n] = argmax_c keys[n] . centroids[c].");
  m.def("clustered_cache_cuda_usable", &scrimp::clustered_cache_cuda_usable);
}
