// Bindings of the packet store (scrimp/packet_store.h) and RoPE re-rotation / assembly (scrimp/rope.h).
// Packet data leaves as DLPack capsules that own a copy of the handle (zero-copy, pinned while alive).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dlpack.h"
#include "dlpack_view.h"
#include "registry.h"
#include "scrimp/error.h"
#include "scrimp/crc32c.h"
#include "scrimp/packet_store.h"
#include "scrimp/rope.h"

namespace py = pybind11;
using scrimp::bindings::BorrowedTensor;

namespace {

scrimp::RopeLayout layout_from_name(const std::string& s) {
  if (s == "half") return scrimp::RopeLayout::Half;
  if (s == "interleaved") return scrimp::RopeLayout::Interleaved;
  SCRIMP_CHECK(false, "layout must be 'half' or 'interleaved', got '" << s << "'");
  return scrimp::RopeLayout::Half;
}

scrimp::Tier tier_from_name(const std::string& s) {
  if (s == "gpu") return scrimp::Tier::GPU;
  if (s == "host") return scrimp::Tier::Host;
  SCRIMP_CHECK(false, "tier must be 'gpu' or 'host', got '" << s << "'");
  return scrimp::Tier::Host;
}

py::dict meta_dict(const scrimp::PacketMeta& m) {
  py::dict d;
  d["model_fingerprint"] = m.model_fingerprint;
  d["adapter_id"] = m.adapter_id;
  d["dtype"] = std::string(scrimp::dtype_name(m.dtype));
  d["num_layers"] = m.num_layers;
  d["num_kv_heads"] = m.num_kv_heads;
  d["head_dim"] = m.head_dim;
  d["num_tokens"] = m.num_tokens;
  d["position_start"] = m.position_start;
  d["token_ids"] = m.token_ids;
  d["rope_layout"] = std::string(m.rope_layout == scrimp::RopeLayout::Half ? "half" : "interleaved");
  d["inv_freq"] = m.inv_freq;
  d["extra"] = m.extra;
  d["pruning"] = m.pruning;
  d["kept"] = m.kept;
  return d;
}

// ---- DLPack export of packet memory ----
struct Export {
  scrimp::PacketHandle handle;  // keeps the packet pinned and its memory alive
  std::vector<int64_t> shape;
  DLManagedTensor managed{};
};

void export_deleter(DLManagedTensor* self) { delete static_cast<Export*>(self->manager_ctx); }

void capsule_destructor(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "dltensor")) {  // never consumed
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    if (m && m->deleter) m->deleter(m);
  }
}

py::object export_view(const scrimp::PacketHandle& h, const void* data, std::vector<int64_t> shape) {
  auto* ex = new Export();
  ex->handle = h;
  ex->shape = std::move(shape);
  DLTensor& t = ex->managed.dl_tensor;
  t.data = const_cast<void*>(data);
  const scrimp::Device dev = h.device();
  t.device = DLDevice{dev.type == scrimp::DeviceType::CUDA ? kScrimpDLCUDA : kScrimpDLCPU, dev.index};
  t.ndim = static_cast<int32_t>(ex->shape.size());
  switch (h.meta().dtype) {
    case scrimp::DType::Float32: t.dtype = DLDataType{kScrimpDLFloat, 32, 1}; break;
    case scrimp::DType::Float16: t.dtype = DLDataType{kScrimpDLFloat, 16, 1}; break;
    default: t.dtype = DLDataType{kScrimpDLBfloat, 16, 1}; break;
  }
  t.shape = ex->shape.data();
  t.strides = nullptr;
  t.byte_offset = 0;
  ex->managed.manager_ctx = ex;
  ex->managed.deleter = export_deleter;
  PyObject* cap = PyCapsule_New(&ex->managed, "dltensor", capsule_destructor);
  if (!cap) {
    delete ex;
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(cap);
}

scrimp::PacketHandle& live(scrimp::PacketHandle& h) {
  SCRIMP_CHECK(static_cast<bool>(h), "this packet handle was released");
  return h;
}

// ---- store ----
std::string store_put(scrimp::PacketStore& s, const std::string& fingerprint, const std::string& adapter_id,
                      const std::vector<int64_t>& token_ids, int64_t position_start, const std::string& layout,
                      const std::vector<float>& inv_freq, const std::string& extra, const py::list& keys,
                      const py::list& values, const std::vector<int64_t>& kept, const std::string& pruning) {
  std::vector<std::unique_ptr<BorrowedTensor>> keep;
  std::vector<scrimp::TensorView> ks, vs;
  for (size_t i = 0; i < keys.size(); ++i) {
    keep.push_back(std::make_unique<BorrowedTensor>(keys[i], "keys"));
    ks.push_back(keep.back()->view());
  }
  for (size_t i = 0; i < values.size(); ++i) {
    keep.push_back(std::make_unique<BorrowedTensor>(values[i], "values"));
    vs.push_back(keep.back()->view());
  }
  SCRIMP_CHECK(!ks.empty(), "put: no layers given");
  const scrimp::TensorView& k0 = ks[0];
  SCRIMP_CHECK(k0.ndim() == 3 || k0.ndim() == 4, "keys[0]: expected [1, kv_heads, tokens, head_dim], got " << describe(k0));
  const int64_t off = k0.ndim() == 4 ? 1 : 0;
  scrimp::PacketMeta m;
  m.model_fingerprint = fingerprint;
  m.adapter_id = adapter_id;
  m.dtype = k0.dtype;
  m.num_layers = static_cast<int32_t>(ks.size());
  m.num_kv_heads = static_cast<int32_t>(k0.shape[off]);
  m.num_tokens = k0.shape[off + 1];
  m.head_dim = static_cast<int32_t>(k0.shape[off + 2]);
  m.position_start = position_start;
  m.token_ids = token_ids;
  m.rope_layout = layout_from_name(layout);
  m.inv_freq = inv_freq;
  m.extra = extra;
  m.kept = kept;
  m.pruning = pruning;
  scrimp::PacketKey key;
  {
    py::gil_scoped_release release;
    key = s.put(m, ks, vs);
  }
  return scrimp::key_hex(key);
}

py::object store_get(scrimp::PacketStore& s, const std::string& key, const std::string& tier, const py::object& fingerprint,
                     const py::object& adapter_id, const py::object& dtype, const py::object& num_layers,
                     const py::object& num_kv_heads, const py::object& head_dim) {
  const scrimp::PacketKey k = scrimp::key_from_hex(key);
  scrimp::PacketExpect x;
  if (!fingerprint.is_none()) x.model_fingerprint = fingerprint.cast<std::string>();
  if (!adapter_id.is_none()) x.adapter_id = adapter_id.cast<std::string>();
  if (!dtype.is_none()) x.dtype = scrimp::bindings::float_dtype_from_name(dtype.cast<std::string>(), "packet dtype");
  if (!num_layers.is_none()) x.num_layers = num_layers.cast<int32_t>();
  if (!num_kv_heads.is_none()) x.num_kv_heads = num_kv_heads.cast<int32_t>();
  if (!head_dim.is_none()) x.head_dim = head_dim.cast<int32_t>();
  const scrimp::Tier t = tier_from_name(tier);
  scrimp::PacketHandle h;
  {
    py::gil_scoped_release release;
    h = s.get(k, t, &x);
  }
  if (!h) return py::none();
  return py::cast(std::move(h));
}

py::dict stats_dict(const scrimp::PacketStore& s) {
  scrimp::PacketStoreStats st;
  {
    py::gil_scoped_release release;  // the store lock may be held by a thread doing disk I/O
    st = s.stats();
  }
  py::dict d;
#define F(name) d[#name] = st.name
  F(hits); F(misses); F(hits_gpu); F(hits_host); F(hits_disk); F(puts); F(duplicate_puts);
  F(evictions_gpu); F(evictions_host); F(evictions_disk); F(promotions); F(bytes_gpu); F(bytes_host);
  F(bytes_disk); F(packets); F(packets_gpu); F(packets_host); F(packets_disk); F(pinned); F(corrupt_files);
  F(io_errors); F(bytes_written); F(bytes_read);
#undef F
  return d;
}

// ---- rope ----
void rerotate(const py::object& keys, const py::object& out, int64_t delta, const py::object& delta_tensor,
              const std::vector<double>& inv_freq, const std::string& layout, uintptr_t stream) {
  BorrowedTensor k(keys, "keys");
  std::unique_ptr<BorrowedTensor> o, d;
  scrimp::RerotateArgs a;
  a.keys = k.view();
  if (out.is(keys)) {
    a.out = a.keys;
  } else {
    o = std::make_unique<BorrowedTensor>(out, "out");
    a.out = o->view();
  }
  if (!delta_tensor.is_none()) {
    d = std::make_unique<BorrowedTensor>(delta_tensor, "delta");
    a.delta_per_pos = &d->view();
  }
  a.delta = delta;
  a.inv_freq = inv_freq;
  a.layout = layout_from_name(layout);
  a.stream = reinterpret_cast<void*>(stream);
  py::gil_scoped_release release;
  scrimp::rerotate_keys(a);
}

void assemble(const std::vector<scrimp::PacketHandle>& packets, const std::vector<int64_t>& new_starts,
              const py::list& out_keys, const py::list& out_values, int64_t seq_offset, uintptr_t stream) {
  SCRIMP_CHECK(packets.size() == new_starts.size(), "assemble: " << packets.size() << " packets but " << new_starts.size()
                                                                  << " start positions");
  std::vector<std::unique_ptr<BorrowedTensor>> keep;
  scrimp::AssembleArgs a;
  for (size_t i = 0; i < out_keys.size(); ++i) {
    keep.push_back(std::make_unique<BorrowedTensor>(out_keys[i], "out_keys"));
    a.out_keys.push_back(keep.back()->view());
  }
  for (size_t i = 0; i < out_values.size(); ++i) {
    keep.push_back(std::make_unique<BorrowedTensor>(out_values[i], "out_values"));
    a.out_values.push_back(keep.back()->view());
  }
  for (size_t p = 0; p < packets.size(); ++p) {
    const scrimp::PacketHandle& h = packets[p];
    SCRIMP_CHECK(static_cast<bool>(h), "assemble: packet " << p << " was released");
    const scrimp::PacketMeta& m = h.meta();
    scrimp::AssemblePart part;
    for (int l = 0; l < m.num_layers; ++l) {
      part.keys.push_back(h.key_view(l));
      part.values.push_back(h.value_view(l));
    }
    part.delta = new_starts[p] - m.position_start;
    part.inv_freq.assign(m.inv_freq.begin(), m.inv_freq.end());
    part.layout = m.rope_layout;
    a.parts.push_back(std::move(part));
  }
  a.seq_offset = seq_offset;
  a.stream = reinterpret_cast<void*>(stream);
  py::gil_scoped_release release;
  scrimp::assemble_kv(a);
}

}  // namespace

SCRIMP_BINDINGS(packets) {
  py::class_<scrimp::PacketHandle>(m, "PacketHandle", "A handed-out KV packet (pinned in the store while alive).")
      .def_property_readonly("key", [](scrimp::PacketHandle& h) { return scrimp::key_hex(live(h).key()); })
      .def_property_readonly("meta", [](scrimp::PacketHandle& h) { return meta_dict(live(h).meta()); })
      .def_property_readonly("tier", [](scrimp::PacketHandle& h) { return std::string(scrimp::tier_name(live(h).tier())); })
      .def_property_readonly("device", [](scrimp::PacketHandle& h) { return scrimp::device_name(live(h).device()); })
      .def_property_readonly("nbytes", [](scrimp::PacketHandle& h) { return live(h).bytes(); })
      .def_property_readonly("released", [](const scrimp::PacketHandle& h) { return !static_cast<bool>(h); })
      .def("release", &scrimp::PacketHandle::release)
      .def("payload_dlpack", [](scrimp::PacketHandle& h) {
        const scrimp::PacketMeta& mm = live(h).meta();
        return export_view(h, h.data(), {mm.num_layers, 2, mm.num_kv_heads, mm.num_tokens, mm.head_dim});
      }, "DLPack capsule of the whole payload [layers, 2, kv_heads, tokens, head_dim] (zero-copy).");

  py::class_<scrimp::PacketStore>(m, "PacketStore")
      .def(py::init([](const std::string& path, uint64_t gpu_bytes, uint64_t host_bytes, uint64_t disk_bytes, int cuda_device,
                       bool fsync, bool verify_on_open) {
             scrimp::PacketStoreConfig c;
             c.disk_path = path;
             c.gpu_bytes = gpu_bytes;
             c.host_bytes = host_bytes;
             c.disk_bytes = disk_bytes;
             c.cuda_device = cuda_device;
             c.fsync = fsync;
             c.verify_on_open = verify_on_open;
             py::gil_scoped_release release;
             return std::make_unique<scrimp::PacketStore>(c);
           }),
           py::arg("path"), py::arg("gpu_bytes"), py::arg("host_bytes"), py::arg("disk_bytes"), py::arg("cuda_device") = 0,
           py::arg("fsync") = true, py::arg("verify_on_open") = false)
      .def("put", &store_put, py::arg("fingerprint"), py::arg("adapter_id"), py::arg("token_ids"), py::arg("position_start"),
           py::arg("layout"), py::arg("inv_freq"), py::arg("extra"), py::arg("keys"), py::arg("values"),
           py::arg("kept") = std::vector<int64_t>(), py::arg("pruning") = "")
      .def("get", &store_get, py::arg("key"), py::arg("tier") = "host", py::arg("fingerprint") = py::none(),
           py::arg("adapter_id") = py::none(), py::arg("dtype") = py::none(), py::arg("num_layers") = py::none(),
           py::arg("num_kv_heads") = py::none(), py::arg("head_dim") = py::none())
      .def("contains", [](const scrimp::PacketStore& s, const std::string& key) {
        const scrimp::PacketKey k = scrimp::key_from_hex(key);
        py::gil_scoped_release release;
        return s.contains(k);
      })
      .def("meta", [](const scrimp::PacketStore& s, const std::string& key) -> py::object {
        const scrimp::PacketKey k = scrimp::key_from_hex(key);
        std::optional<scrimp::PacketMeta> m;
        {
          py::gil_scoped_release release;
          m = s.meta(k);
        }
        if (!m) return py::none();
        return meta_dict(*m);
      })
      .def("evict", [](scrimp::PacketStore& s, const std::string& key) {
        const scrimp::PacketKey k = scrimp::key_from_hex(key);
        py::gil_scoped_release release;
        return s.evict(k);
      })
      .def("shrink", [](scrimp::PacketStore& s, const std::string& tier, uint64_t target) {
        const scrimp::Tier t = tier == "disk" ? scrimp::Tier::Disk : tier_from_name(tier);
        py::gil_scoped_release release;
        s.shrink(t, target);
      })
      .def("keys", [](const scrimp::PacketStore& s) {
        std::vector<std::string> out;
        py::gil_scoped_release release;
        for (const auto& k : s.keys()) out.push_back(scrimp::key_hex(k));
        return out;
      })
      .def("stats", &stats_dict)
      .def("messages", &scrimp::PacketStore::messages, py::call_guard<py::gil_scoped_release>())
      .def("take_messages", &scrimp::PacketStore::take_messages, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("gpu_enabled", &scrimp::PacketStore::gpu_enabled);

  m.def("packet_key", [](const std::string& fp, const std::string& adapter, const std::vector<int64_t>& ids,
                         const std::string& pruning) {
    return scrimp::key_hex(scrimp::packet_key(fp, adapter, ids.data(), static_cast<int64_t>(ids.size()), pruning));
  }, py::arg("fingerprint"), py::arg("adapter_id"), py::arg("token_ids"), py::arg("pruning") = "");
  m.def("sha256_hex", [](const py::bytes& b) {
    std::string s = b;
    return scrimp::Sha256::hex(scrimp::Sha256::hash(s.data(), s.size()));
  });
  m.def("crc32c", [](const py::bytes& b, uint32_t crc) {
    std::string s = b;
    return scrimp::crc32c(s.data(), s.size(), crc);
  }, py::arg("data"), py::arg("crc") = 0);
  m.def("rerotate_keys", &rerotate, py::arg("keys"), py::arg("out"), py::arg("delta"), py::arg("delta_tensor"),
        py::arg("inv_freq"), py::arg("layout"), py::arg("stream") = 0);
  m.def("assemble", &assemble, py::arg("packets"), py::arg("new_starts"), py::arg("out_keys"), py::arg("out_values"),
        py::arg("seq_offset"), py::arg("stream") = 0);
}
