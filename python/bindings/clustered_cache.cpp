// Bindings of the IceCache core (cpp/include/scrimp/clustered_cache.h): convert and check only.
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

// A contiguous CPU tensor of `dtype` with exactly `numel` elements; returns its data pointer.
template <typename T>
T* host_buffer(const BorrowedTensor& t, scrimp::DType dtype, int64_t numel, const char* name) {
  const scrimp::TensorView& v = t.view();
  SCRIMP_CHECK_TYPE(v.dtype == dtype, name << ": expected " << scrimp::dtype_name(dtype) << ", got " << describe(v));
  SCRIMP_CHECK(v.device.type == scrimp::DeviceType::CPU && v.is_contiguous() && v.numel() == numel,
               name << ": expected a contiguous CPU tensor of " << numel << " elements, got " << describe(v));
  return static_cast<T*>(v.data);
}

// Same on the given device (for page tables handed to the attention kernel).
template <typename T>
const T* device_buffer(const BorrowedTensor& t, scrimp::DType dtype, int64_t numel, const scrimp::Device& dev,
                       const char* name) {
  const scrimp::TensorView& v = t.view();
  SCRIMP_CHECK_TYPE(v.dtype == dtype, name << ": expected " << scrimp::dtype_name(dtype) << ", got " << describe(v));
  SCRIMP_CHECK(v.device == dev && v.is_contiguous() && v.numel() == numel,
               name << ": expected a contiguous tensor of " << numel << " elements on " << scrimp::device_name(dev)
                    << ", got " << describe(v));
  return static_cast<const T*>(v.data);
}

// A contiguous CPU int64 table [S, n + 1] of per-stream bounds with n >= min_n; returns its data and n.
const int64_t* bounds_table(const BorrowedTensor& t, int64_t S, int64_t min_n, const char* name, const char* what,
                            int64_t* n) {
  const auto& v = t.view();
  SCRIMP_CHECK(v.ndim() == 2 && v.shape[0] == S && v.shape[1] >= min_n + 1,
               name << ": expected [" << S << ", " << what << " + 1], got " << describe(v));
  *n = v.shape[1] - 1;
  return host_buffer<int64_t>(t, scrimp::DType::Int64, S * (*n + 1), name);
}

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
    const int64_t* pos = nullptr;
    if (!positions.is_none()) {
      p = std::make_unique<BorrowedTensor>(positions, "positions");
      const int64_t N = k.view().ndim() == 4 ? k.view().shape[2] : -1;
      pos = host_buffer<int64_t>(*p, scrimp::DType::Int64, N, "positions");
    }
    py::gil_scoped_release release;
    impl_->build(k.view(), v.view(), pos, batch_row);
  }

  void build_grouped(const py::object& keys, const py::object& values, const py::object& positions,
                     const py::object& group_bounds, int64_t batch_row) {
    BorrowedTensor k(keys, "keys"), v(values, "values"), p(positions, "positions"), g(group_bounds, "group_bounds");
    const auto& kv = k.view();
    SCRIMP_CHECK(kv.ndim() == 4, "keys: expected [B, Hkv, N, D], got " << describe(kv));
    const int64_t S = kv.shape[0] * kv.shape[1], N = kv.shape[2];
    int64_t groups = 0;
    const int64_t* gb = bounds_table(g, S, 1, "group_bounds", "groups", &groups);
    const int64_t* pos = host_buffer<int64_t>(p, scrimp::DType::Int64, S * N, "positions");
    py::gil_scoped_release release;
    impl_->build_grouped(kv, v.view(), pos, true, gb, groups, batch_row);
  }

  void build_paged(const py::object& keys, const py::object& values, const py::object& positions,
                   const py::object& page_bounds) {
    BorrowedTensor k(keys, "keys"), v(values, "values"), p(positions, "positions"), b(page_bounds, "page_bounds");
    const auto& kv = k.view();
    SCRIMP_CHECK(kv.ndim() == 4, "keys: expected [B, Hkv, N, D], got " << describe(kv));
    const int64_t S = kv.shape[0] * kv.shape[1], N = kv.shape[2];
    int64_t pages = 0;
    const int64_t* pb = bounds_table(b, S, 0, "page_bounds", "pages", &pages);
    const int64_t* pos = host_buffer<int64_t>(p, scrimp::DType::Int64, S * N, "positions");
    py::gil_scoped_release release;
    impl_->build_paged(kv, v.view(), pos, pb, pages);
  }

  int64_t relayout_tail(int64_t n, const py::object& positions) {
    const auto& c = impl_->config();
    SCRIMP_CHECK(n >= 0, "relayout_tail: n must be >= 0, got " << n);
    BorrowedTensor p(positions, "positions");
    const int64_t* pos = host_buffer<int64_t>(p, scrimp::DType::Int64, c.batch * c.kv_heads * n * c.page_size,
                                              "positions");
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
    const int64_t* ps = nullptr;
    if (!skip.is_none()) {
      sk = std::make_unique<BorrowedTensor>(skip, "skip");
      ps = host_buffer<int64_t>(*sk, scrimp::DType::Int64, impl_->config().batch, "skip");
    }
    py::gil_scoped_release release;
    impl_->append_page(k.view(), v.view(), first_position, ps);
  }

  void select(const py::object& query, int64_t k, const py::object& out_pages, const py::object& out_scores) {
    const auto& c = impl_->config();
    BorrowedTensor q(query, "query"), op(out_pages, "out_pages");
    int32_t* pages = host_buffer<int32_t>(op, scrimp::DType::Int32, c.batch * c.kv_heads * k, "out_pages");
    std::unique_ptr<BorrowedTensor> os;
    float* scores = nullptr;
    if (!out_scores.is_none()) {
      os = std::make_unique<BorrowedTensor>(out_scores, "out_scores");
      scores = host_buffer<float>(*os, scrimp::DType::Float32, c.batch * c.kv_heads * k, "out_scores");
    }
    py::gil_scoped_release release;
    impl_->select(q.view(), k, pages, scores);
  }

  void rerank(const py::object& query, const py::object& candidates, int64_t k, const py::object& out_pages) {
    const auto& c = impl_->config();
    BorrowedTensor q(query, "query"), cd(candidates, "candidates"), op(out_pages, "out_pages");
    const auto& cv = cd.view();
    SCRIMP_CHECK(cv.ndim() == 3 && cv.shape[0] == c.batch && cv.shape[1] == c.kv_heads,
                 "candidates: expected [" << c.batch << ", " << c.kv_heads << ", kc], got " << describe(cv));
    const int64_t kc = cv.shape[2];
    SCRIMP_CHECK(cv.data != op.view().data, "rerank: candidates and out_pages must be different tensors");
    SCRIMP_CHECK(k >= 0 && k <= kc, "rerank: expected 0 <= k <= kc = " << kc << ", got k = " << k);
    const int32_t* cand = host_buffer<int32_t>(cd, scrimp::DType::Int32, c.batch * c.kv_heads * kc, "candidates");
    int32_t* pages = host_buffer<int32_t>(op, scrimp::DType::Int32, c.batch * c.kv_heads * k, "out_pages");
    py::gil_scoped_release release;
    impl_->rerank(q.view(), cand, kc, k, pages);
  }

  void recall(const py::object& pages, int64_t k, const py::object& k_store, const py::object& v_store,
              const py::object& out_slots, const py::object& out_lens, uintptr_t stream, bool wait) {
    const auto& c = impl_->config();
    const int64_t n = c.batch * c.kv_heads * k;
    BorrowedTensor p(pages, "pages"), ks(k_store, "k_store"), vs(v_store, "v_store"), sl(out_slots, "out_slots"),
        ln(out_lens, "out_lens");
    const int32_t* pp = host_buffer<int32_t>(p, scrimp::DType::Int32, n, "pages");
    int32_t* slots = host_buffer<int32_t>(sl, scrimp::DType::Int32, n, "out_slots");
    int32_t* lens = host_buffer<int32_t>(ln, scrimp::DType::Int32, n, "out_lens");
    py::gil_scoped_release release;
    impl_->recall(pp, k, ks.view(), vs.view(), slots, lens, reinterpret_cast<void*>(stream), wait);
  }

  void page_positions(const py::object& pages, int64_t k, const py::object& out) {
    const auto& c = impl_->config();
    BorrowedTensor p(pages, "pages"), o(out, "out");
    const int32_t* pp = host_buffer<int32_t>(p, scrimp::DType::Int32, c.batch * c.kv_heads * k, "pages");
    int64_t* po = host_buffer<int64_t>(o, scrimp::DType::Int64, c.batch * c.kv_heads * k * c.page_size, "out");
    impl_->page_positions(pp, k, po);
  }

  int64_t read_page(int64_t stream, int64_t page, const py::object& keys, const py::object& values) {
    const auto& c = impl_->config();
    BorrowedTensor k(keys, "keys"), v(values, "values");
    float* kp = host_buffer<float>(k, scrimp::DType::Float32, c.page_size * c.head_dim, "keys");
    float* vp = host_buffer<float>(v, scrimp::DType::Float32, c.page_size * c.head_dim, "values");
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
    const auto& c = impl_->config();
    const int64_t S = c.batch * c.kv_heads;
    BorrowedTensor ta(a, a_name), tb(b, b_name), tl(lens, "lens");
    float* pa = host_buffer<float>(ta, scrimp::DType::Float32, S * n * c.head_dim, a_name);
    float* pb = host_buffer<float>(tb, scrimp::DType::Float32, S * n * c.head_dim, b_name);
    int32_t* pl = host_buffer<int32_t>(tl, scrimp::DType::Int32, S * n, "lens");
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
  SCRIMP_CHECK(a.query.ndim() == 3, "query: expected [B, Hq, D], got " << describe(a.query));
  const int64_t B = a.query.shape[0];
  std::unique_ptr<BorrowedTensor> pt, pl, kd, vd, dm;
  if (!page_table.is_none()) {
    pt = std::make_unique<BorrowedTensor>(page_table, "page_table");
    pl = std::make_unique<BorrowedTensor>(page_lens, "page_lens");
    const auto& v = pt->view();
    SCRIMP_CHECK(v.ndim() == 3 && v.shape[0] == B && v.shape[1] == kv_heads,
                 "page_table: expected [B, Hkv, P], got " << describe(v));
    a.pages_per_stream = v.shape[2];
    const int64_t n = B * kv_heads * a.pages_per_stream;
    a.page_table = device_buffer<int32_t>(*pt, scrimp::DType::Int32, n, a.query.device, "page_table");
    a.page_lens = device_buffer<int32_t>(*pl, scrimp::DType::Int32, n, a.query.device, "page_lens");
  }
  if (!k_dense.is_none()) {
    kd = std::make_unique<BorrowedTensor>(k_dense, "k_dense");
    vd = std::make_unique<BorrowedTensor>(v_dense, "v_dense");
    a.k_dense = &kd->view();
    a.v_dense = &vd->view();
    if (!dense_mask.is_none()) {
      dm = std::make_unique<BorrowedTensor>(dense_mask, "dense_mask");
      const int64_t T = a.k_dense->ndim() == 4 ? a.k_dense->shape[2] : 0;
      a.dense_mask = device_buffer<uint8_t>(*dm, scrimp::DType::UInt8, B * T, a.query.device, "dense_mask");
    }
  }
  std::unique_ptr<BorrowedTensor> sk, sv, sb;
  if (!summary_keys.is_none() || !summary_values.is_none() || !summary_bias.is_none()) {
    SCRIMP_CHECK(!summary_keys.is_none() && !summary_values.is_none() && !summary_bias.is_none(),
                 "summary_keys, summary_values and summary_bias must be given together");
    sk = std::make_unique<BorrowedTensor>(summary_keys, "summary_keys");
    sv = std::make_unique<BorrowedTensor>(summary_values, "summary_values");
    sb = std::make_unique<BorrowedTensor>(summary_bias, "summary_bias");
    a.summary_keys = &sk->view();
    a.summary_values = &sv->view();
    const auto& kv = sk->view();
    SCRIMP_CHECK(kv.ndim() == 4 && kv.shape[0] == B && kv.shape[1] == kv_heads,
                 "summary_keys: expected [B, Hkv, R, D], got " << describe(kv));
    SCRIMP_CHECK(sb->view().ndim() == 3 && sb->view().shape[0] == B && sb->view().shape[1] == kv_heads &&
                     sb->view().shape[2] == kv.shape[2],
                 "summary_bias: expected [" << B << ", " << kv_heads << ", " << kv.shape[2] << "], got "
                                            << describe(sb->view()));
    a.summary_bias = device_buffer<float>(*sb, scrimp::DType::Float32, B * kv_heads * kv.shape[2], a.query.device,
                                          "summary_bias");
  }
  py::gil_scoped_release release;
  scrimp::paged_decode_attention(a);
}

void nearest_centroid(const py::object& keys, const py::object& centroids, const py::object& out, uintptr_t stream) {
  BorrowedTensor k(keys, "keys"), c(centroids, "centroids"), o(out, "out");
  SCRIMP_CHECK(k.view().ndim() == 2, "keys: expected [N, D], got " << describe(k.view()));
  int32_t* po = const_cast<int32_t*>(
      device_buffer<int32_t>(o, scrimp::DType::Int32, k.view().shape[0], k.view().device, "out"));
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
