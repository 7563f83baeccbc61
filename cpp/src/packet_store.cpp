// The packet store's public API: put (key derived from the metadata; immutable), get with promotion
// to the wanted tier and pinning handles, contains / meta / evict / shrink, counters and messages.
// The tier policy is in packet_store_tiers.cpp, the state in packet_store_state.h.
#include "scrimp/packet_store.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "packet_store_state.h"
#include "scrimp/error.h"

namespace scrimp {

using detail::Buffer;
using detail::Entry;
using detail::StoreState;

namespace detail {
PacketKey put_impl(const std::shared_ptr<StoreState>& state, const PacketMeta& meta, const void* payload, Device device,
                   std::shared_ptr<Buffer> owned);
}

// ---------------------------------------------------------------------------- handle

const PacketMeta& PacketHandle::meta() const {
  SCRIMP_CHECK(pin_, "empty packet handle");
  return *pin_->entry->meta;
}
const PacketKey& PacketHandle::key() const {
  SCRIMP_CHECK(pin_, "empty packet handle");
  return pin_->entry->key;
}
const void* PacketHandle::data() const {
  SCRIMP_CHECK(pin_, "empty packet handle");
  return pin_->buf->ptr;
}
Device PacketHandle::device() const {
  SCRIMP_CHECK(pin_, "empty packet handle");
  return pin_->buf->where();
}
Tier PacketHandle::tier() const {
  SCRIMP_CHECK(pin_, "empty packet handle");
  return pin_->tier;
}
uint64_t PacketHandle::bytes() const {
  SCRIMP_CHECK(pin_, "empty packet handle");
  return pin_->entry->bytes;
}

namespace {
TensorView layer_view(const PacketHandle& h, int layer, int kv) {
  const PacketMeta& m = h.meta();
  SCRIMP_CHECK(layer >= 0 && layer < m.num_layers, "layer " << layer << " out of range [0, " << m.num_layers << ")");
  const uint64_t per = static_cast<uint64_t>(m.num_kv_heads) * m.num_tokens * m.head_dim;
  char* base = static_cast<char*>(const_cast<void*>(h.data())) + (2 * static_cast<uint64_t>(layer) + kv) * per * dtype_size(m.dtype);
  return TensorView::contiguous(base, m.dtype, h.device(), {m.num_kv_heads, m.num_tokens, m.head_dim});
}
}  // namespace

TensorView PacketHandle::key_view(int layer) const { return layer_view(*this, layer, 0); }
TensorView PacketHandle::value_view(int layer) const { return layer_view(*this, layer, 1); }

// ---------------------------------------------------------------------------- store

#if defined(SCRIMP_WITH_CUDA)
static const char* const kNoGpuWhy = "machine has none";
#else
static const char* const kNoGpuWhy = "build has no CUDA backend";
#endif

PacketStore::PacketStore(const PacketStoreConfig& config) : state_(std::make_shared<StoreState>()) {
  StoreState& s = *state_;
  s.cfg = config;
  const int ndev = detail::cuda_devices();
  if (config.gpu_bytes > 0) {
    SCRIMP_CHECK(ndev > 0, "gpu_bytes=" << config.gpu_bytes << " needs a usable CUDA device, and this "
                                        << kNoGpuWhy
                                        << "; pass gpu_bytes=0");
    SCRIMP_CHECK(config.cuda_device >= 0 && config.cuda_device < ndev,
                 "cuda_device " << config.cuda_device << " out of range (" << ndev << " devices)");
    s.gpu = true;
  }
  s.pinned_host = ndev > 0;
  s.disk = !config.disk_path.empty() && config.disk_bytes > 0;
  SCRIMP_CHECK(config.disk_path.empty() || config.disk_bytes > 0,
               "a disk directory was given but disk_bytes is 0; give the disk tier a capacity");
  s.cap[int(Tier::GPU)] = s.gpu ? config.gpu_bytes : 0;
  s.cap[int(Tier::Host)] = config.host_bytes;
  s.cap[int(Tier::Disk)] = s.disk ? config.disk_bytes : 0;
  SCRIMP_CHECK(s.cap[0] + s.cap[1] + s.cap[2] > 0, "every tier has capacity 0: the store could hold nothing");
  if (s.disk) s.open_directory();
}

PacketStore::~PacketStore() = default;

bool PacketStore::gpu_enabled() const { return state_->gpu; }
const PacketStoreConfig& PacketStore::config() const { return state_->cfg; }

PacketKey PacketStore::put(const PacketMeta& meta, const std::vector<TensorView>& keys,
                           const std::vector<TensorView>& values) {
  meta.validate();
  SCRIMP_CHECK(static_cast<int64_t>(keys.size()) == meta.num_layers && static_cast<int64_t>(values.size()) == meta.num_layers,
               "expected " << meta.num_layers << " key and value tensors, got " << keys.size() << " and " << values.size());
  const std::vector<int64_t> want{meta.num_kv_heads, meta.num_tokens, meta.head_dim};
  auto norm = [&](const TensorView& t, const char* what, int l) {
    TensorView v = t;
    if (v.ndim() == 4) {
      SCRIMP_CHECK(v.shape[0] == 1, what << "[" << l << "]: expected batch 1, got " << describe(t));
      v.shape.erase(v.shape.begin());
      v.strides.erase(v.strides.begin());
    }
    SCRIMP_CHECK_TYPE(v.dtype == meta.dtype, what << "[" << l << "]: dtype " << dtype_name(v.dtype)
                                                   << " does not match the packet dtype " << dtype_name(meta.dtype));
    SCRIMP_CHECK(v.shape == want, what << "[" << l << "]: expected [" << want[0] << ", " << want[1] << ", " << want[2]
                                       << "] (kv_heads, tokens, head_dim), got " << describe(t));
    SCRIMP_CHECK(v.strides[2] == 1 || v.shape[2] == 1, what << "[" << l << "]: head_dim must be contiguous");
    SCRIMP_CHECK(v.device == keys[0].device, what << "[" << l << "]: all tensors must be on one device");
    return v;
  };
  std::vector<TensorView> ks, vs;
  for (int l = 0; l < meta.num_layers; ++l) {
    ks.push_back(norm(keys[l], "keys", l));
    vs.push_back(norm(values[l], "values", l));
  }
  // Stage into one contiguous host buffer, then hand to put_payload (which moves it into a tier).
  const std::size_t elem = dtype_size(meta.dtype);
  const uint64_t per = static_cast<uint64_t>(meta.num_kv_heads) * meta.num_tokens * meta.head_dim * elem;
  auto staging = detail::alloc_host(meta.payload_bytes(), state_->pinned_host);
  for (int l = 0; l < meta.num_layers; ++l) {
    detail::copy_kv_rows(static_cast<char*>(staging->ptr) + 2 * l * per, Device{}, ks[l], elem);
    detail::copy_kv_rows(static_cast<char*>(staging->ptr) + (2 * l + 1) * per, Device{}, vs[l], elem);
  }
  return detail::put_impl(state_, meta, staging->ptr, Device{}, staging);
}

PacketKey PacketStore::put_payload(const PacketMeta& meta_in, const void* payload, Device device) {
  return detail::put_impl(state_, meta_in, payload, device, nullptr);
}

namespace detail {
// `owned`: a host buffer already holding the payload (allocated with the host tier's pinning), used
// as the tier buffer instead of a second copy.
PacketKey put_impl(const std::shared_ptr<StoreState>& state, const PacketMeta& meta_in, const void* payload,
                   Device device, std::shared_ptr<Buffer> owned) {
  meta_in.validate();
  SCRIMP_CHECK(payload != nullptr, "put_payload: null payload");
  const PacketKey key = packet_key(meta_in);
  StoreState& s = *state;
  const uint64_t bytes = meta_in.payload_bytes();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.index.count(key)) {
      ++s.st.duplicate_puts;
      s.touch(s.index[key].get());
      return key;
    }
  }
  // Copy into the top tier's memory outside the lock.
  Tier top = s.gpu && bytes <= s.cap[int(Tier::GPU)] ? Tier::GPU
           : bytes <= s.cap[int(Tier::Host)]         ? Tier::Host
                                                      : Tier::Disk;
  std::shared_ptr<Buffer> buf;
  if (top == Tier::GPU) {
    buf = detail::alloc_device(bytes, s.cfg.cuda_device);
    detail::copy_bytes(buf->ptr, buf->where(), payload, device, bytes);
  } else if (top == Tier::Host && owned) {
    buf = std::move(owned);
  } else if (top == Tier::Host) {
    buf = detail::alloc_host(bytes, s.pinned_host);
    detail::copy_bytes(buf->ptr, Device{}, payload, device, bytes);
  }
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.index.count(key)) {
    ++s.st.duplicate_puts;
    return key;
  }
  auto e = std::make_shared<Entry>();
  e->key = key;
  e->bytes = bytes;
  e->meta = std::make_shared<PacketMeta>(meta_in);
  s.index[key] = e;
  // Place it in the highest tier with room, falling through to lower tiers.
  for (Tier t : {Tier::GPU, Tier::Host}) {
    if (!buf || int(t) < int(top)) continue;
    if (s.make_room(t, bytes, e.get())) {
      if (t == Tier::Host && buf->kind == Buffer::Kind::Device) {
        auto hb = detail::alloc_host(bytes, s.pinned_host);
        detail::copy_bytes(hb->ptr, Device{}, buf->ptr, buf->where(), bytes);
        buf = hb;
      }
      s.attach_mem(e.get(), t, buf);
      ++s.st.puts;
      return key;
    }
  }
  const void* src = buf ? buf->ptr : payload;
  const Device src_dev = buf ? buf->where() : device;
  if (s.ensure_on_disk(e.get(), src, src_dev)) {
    ++s.st.puts;
    return key;
  }
  s.index.erase(key);
  if (s.disk && detail::packet_file_bytes(meta_in) <= s.cap[int(Tier::Disk)])
    SCRIMP_FAIL("cannot store packet " << key_hex(key) << " (" << bytes << " bytes): no memory tier has room "
                "(capacities gpu=" << s.cap[0] << " host=" << s.cap[1] << " bytes, packets in use are never evicted) "
                "and the " << (s.msgs.empty() ? std::string("disk write failed") : s.msgs.back()));
  SCRIMP_CHECK(false, "cannot store packet " << key_hex(key) << " (" << bytes << " bytes): no tier has room "
                      "(capacities gpu=" << s.cap[0] << " host=" << s.cap[1] << " disk=" << s.cap[2]
                      << " bytes, packets in use are never evicted)");
  return key;
}
}  // namespace detail

namespace {
void check_expect(const PacketMeta& m, const PacketExpect* x, const PacketKey& key) {
  if (!x) return;
  const std::string k = key_hex(key).substr(0, 12);
  SCRIMP_CHECK(!x->model_fingerprint || *x->model_fingerprint == m.model_fingerprint,
               "packet " << k << " belongs to model '" << m.model_fingerprint << "', expected '" << *x->model_fingerprint << "'");
  SCRIMP_CHECK(!x->adapter_id || *x->adapter_id == m.adapter_id,
               "packet " << k << " was built with adapter '" << m.adapter_id << "', expected '" << *x->adapter_id << "'");
  SCRIMP_CHECK_TYPE(!x->dtype || *x->dtype == m.dtype,
                    "packet " << k << " has dtype " << dtype_name(m.dtype) << ", expected " << dtype_name(*x->dtype));
  SCRIMP_CHECK(!x->num_layers || *x->num_layers == m.num_layers,
               "packet " << k << " has " << m.num_layers << " layers, expected " << *x->num_layers);
  SCRIMP_CHECK((!x->num_kv_heads || *x->num_kv_heads == m.num_kv_heads) && (!x->head_dim || *x->head_dim == m.head_dim),
               "packet " << k << " has head layout " << m.num_kv_heads << " kv heads x " << m.head_dim
                         << " head_dim, expected " << (x->num_kv_heads ? *x->num_kv_heads : m.num_kv_heads) << " x "
                         << (x->head_dim ? *x->head_dim : m.head_dim));
}
}  // namespace

PacketHandle PacketStore::get(const PacketKey& key, Tier want, const PacketExpect* expect) {
  SCRIMP_CHECK(want != Tier::Disk, "get: the wanted tier must be gpu or host");
  StoreState& s = *state_;
  std::unique_lock<std::mutex> lock(s.mu);
  auto it = s.index.find(key);
  if (it == s.index.end()) {
    ++s.st.misses;
    return PacketHandle();
  }
  std::shared_ptr<Entry> e = it->second;
  check_expect(*e->meta, expect, key);
  // Pin first: nothing below may evict this entry from a memory tier while we promote it.
  if (e->pins++ == 0) ++s.st.pinned;
  struct Unpin {
    StoreState& s;
    Entry* e;
    bool active = true;
    ~Unpin() {
      if (active && --e->pins == 0) --s.st.pinned;
    }
  } unpin{s, e.get()};
  auto keep_indexed = [&] {
    // A disk eviction made room by deleting this entry's own file: it lives on in memory.
    if (!s.index.count(key)) s.index[key] = e;
  };
  Tier served = e->mem ? e->mem_tier : Tier::Disk;
  std::shared_ptr<Buffer> buf = e->mem;
  if (!buf) {
    // Disk only: read and verify without holding the lock (our pin keeps the entry alive), then
    // promote into host memory when it fits.
    detail::FileHeader h;
    const std::string path = s.path_of(key);
    const uint64_t bytes = e->bytes;
    const bool pinned_host = s.pinned_host;
    std::string err;
    std::shared_ptr<Buffer> b;
    lock.unlock();
    try {
      err = detail::read_packet_header(path, &h);
      if (err.empty() && (h.key != key || h.payload_bytes != bytes)) err = path + ": the file was replaced (corrupt)";
      if (err.empty()) {
        b = detail::alloc_host(bytes, pinned_host);
        err = detail::read_packet_payload(path, h, b->ptr);
      }
    } catch (...) {
      lock.lock();
      throw;
    }
    lock.lock();
    if (e->mem) {
      // Another thread promoted it meanwhile.
      buf = e->mem;
      served = e->mem_tier;
    } else if (!err.empty()) {
      ++s.st.misses;
      if (!e->on_disk) return PacketHandle();  // evicted or removed meanwhile: a plain miss
      if (err.rfind("cannot ", 0) == 0) ++s.st.io_errors;
      else ++s.st.corrupt_files;
      s.report("dropped packet " + key_hex(key) + " on read: " + err);
      s.detach_disk(e.get(), true);
      s.forget_if_gone(e.get());
      return PacketHandle();
    } else {
      s.st.bytes_read += h.file_bytes;
      buf = b;
      // Promote only if this entry is still the one indexed (it may have been evicted and re-put
      // while we read; then the copy is served privately).
      auto cur = s.index.find(key);
      const bool current = cur != s.index.end() && cur->second == e;
      if (current && s.make_room(Tier::Host, e->bytes, e.get())) {
        keep_indexed();
        s.attach_mem(e.get(), Tier::Host, b);
        ++s.st.promotions;
      }
    }
  }
  Tier tier_out = e->mem == buf ? e->mem_tier : Tier::Host;
  if (want == Tier::GPU && buf->kind != Buffer::Kind::Device) {
    const bool movable = e->mem == buf && e->pins == 1;  // only our own pin
    if (s.gpu && movable && s.make_room(Tier::GPU, e->bytes, e.get())) {
      auto g = detail::alloc_device(e->bytes, s.cfg.cuda_device);
      detail::copy_bytes(g->ptr, g->where(), buf->ptr, Device{}, e->bytes);
      s.detach_mem(e.get());
      s.attach_mem(e.get(), Tier::GPU, g);
      ++s.st.promotions;
      buf = g;
      tier_out = Tier::GPU;
    } else {
      SCRIMP_CHECK(detail::cuda_devices() > 0, "get(..., gpu): no usable CUDA device");
      auto g = detail::alloc_device(e->bytes, s.cfg.cuda_device);
      detail::copy_bytes(g->ptr, g->where(), buf->ptr, Device{}, e->bytes);
      buf = g;  // a private copy, not accounted in the GPU tier
    }
  } else if (want == Tier::Host && buf->kind == Buffer::Kind::Device) {
    auto hb = detail::alloc_host(e->bytes, s.pinned_host);
    detail::copy_bytes(hb->ptr, Device{}, buf->ptr, buf->where(), e->bytes);
    buf = hb;  // a private host copy of a GPU-resident packet
    tier_out = Tier::Host;
  }
  ++s.st.hits;
  if (served == Tier::GPU) ++s.st.hits_gpu;
  else if (served == Tier::Host) ++s.st.hits_host;
  else ++s.st.hits_disk;
  if (e->mem || e->on_disk) s.touch(e.get());
  unpin.active = false;  // the pin now belongs to the handle
  auto pin = std::make_shared<detail::Pin>();
  pin->state = state_;
  pin->entry = e;
  pin->buf = buf;
  pin->tier = tier_out;
  PacketHandle out;
  out.pin_ = std::move(pin);
  return out;
}

bool PacketStore::contains(const PacketKey& key) const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->index.count(key) > 0;
}

std::optional<PacketMeta> PacketStore::meta(const PacketKey& key) const {
  std::lock_guard<std::mutex> lock(state_->mu);
  auto it = state_->index.find(key);
  if (it == state_->index.end()) return std::nullopt;
  return *it->second->meta;
}

bool PacketStore::evict(const PacketKey& key) {
  StoreState& s = *state_;
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.index.find(key);
  if (it == s.index.end() || it->second->pins > 0) return false;
  std::shared_ptr<Entry> e = it->second;
  s.detach_mem(e.get());
  s.detach_disk(e.get(), true);
  s.index.erase(key);
  return true;
}

void PacketStore::shrink(Tier tier, uint64_t target_bytes) {
  StoreState& s = *state_;
  std::lock_guard<std::mutex> lock(s.mu);
  while (s.used[int(tier)] > target_bytes) {
    Entry* v = s.victim(tier, nullptr);
    if (!v) break;
    if (tier == Tier::Disk) {
      ++s.st.evictions_disk;
      s.detach_disk(v, true);
      s.forget_if_gone(v);
    } else {
      s.demote(v);
    }
  }
}

std::vector<PacketKey> PacketStore::keys() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  std::vector<PacketKey> out;
  for (const auto& kv : state_->index) out.push_back(kv.first);
  return out;
}

PacketStoreStats PacketStore::stats() const {
  const StoreState& s = *state_;
  std::lock_guard<std::mutex> lock(s.mu);
  PacketStoreStats st = s.st;
  st.bytes_gpu = s.used[0];
  st.bytes_host = s.used[1];
  st.bytes_disk = s.used[2];
  st.packets = s.index.size();
  st.packets_gpu = s.lru[0].size();
  st.packets_host = s.lru[1].size();
  st.packets_disk = s.lru[2].size();
  return st;
}

std::vector<std::string> PacketStore::messages() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return std::vector<std::string>(state_->msgs.begin(), state_->msgs.end());
}

std::vector<std::string> PacketStore::take_messages() {
  std::lock_guard<std::mutex> lock(state_->mu);
  std::vector<std::string> out(state_->msgs.begin(), state_->msgs.end());
  state_->msgs.clear();
  return out;
}

}  // namespace scrimp
