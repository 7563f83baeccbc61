// The packet store's tier policy: where a packet lives (GPU, host, disk), least-recently-used
// victims, demotion one tier down when a tier is full, and the residency bookkeeping behind it.
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "packet_store_state.h"

namespace scrimp {
namespace detail {

void StoreState::attach_mem(Entry* e, Tier t, std::shared_ptr<Buffer> b) {
  e->mem = std::move(b);
  e->mem_tier = t;
  lru[int(t)].push_front(e);
  e->mem_it = lru[int(t)].begin();
  used[int(t)] += e->bytes;
}

void StoreState::detach_mem(Entry* e) {
  if (!e->mem) return;
  lru[int(e->mem_tier)].erase(e->mem_it);
  used[int(e->mem_tier)] -= e->bytes;
  e->mem.reset();
}

void StoreState::attach_disk(Entry* e, uint64_t fb) {
  e->on_disk = true;
  e->file_bytes = fb;
  lru[int(Tier::Disk)].push_front(e);
  e->disk_it = lru[int(Tier::Disk)].begin();
  used[int(Tier::Disk)] += fb;
}

void StoreState::detach_disk(Entry* e, bool unlink_file) {
  if (!e->on_disk) return;
  lru[int(Tier::Disk)].erase(e->disk_it);
  used[int(Tier::Disk)] -= e->file_bytes;
  e->on_disk = false;
  if (unlink_file && ::unlink(path_of(e->key).c_str()) != 0 && errno != ENOENT) {
    ++st.io_errors;
    report("cannot delete " + path_of(e->key) + ": " + std::strerror(errno));
  }
}

void StoreState::forget_if_gone(Entry* e) {
  if (!e->mem && !e->on_disk) index.erase(e->key);  // may destroy e
}

void StoreState::touch(Entry* e) {
  if (e->mem) lru[int(e->mem_tier)].splice(lru[int(e->mem_tier)].begin(), lru[int(e->mem_tier)], e->mem_it);
  if (e->on_disk) lru[int(Tier::Disk)].splice(lru[int(Tier::Disk)].begin(), lru[int(Tier::Disk)], e->disk_it);
}

// Least recently used entry of tier t that may leave it (memory tiers: not handed out).
Entry* StoreState::victim(Tier t, const Entry* keep) {
  auto& l = lru[int(t)];
  for (auto it = l.rbegin(); it != l.rend(); ++it) {
    Entry* e = *it;
    if (e == keep) continue;
    if (t != Tier::Disk && e->pins > 0) continue;
    return e;
  }
  return nullptr;
}

// Write e's payload (at `src` on `src_dev`) to disk unless it is there already.
bool StoreState::ensure_on_disk(Entry* e, const void* src, Device src_dev) {
  if (e->on_disk) return true;
  if (!disk) return false;
  const uint64_t need = packet_file_bytes(*e->meta);
  if (need > cap[int(Tier::Disk)]) return false;
  if (!make_room(Tier::Disk, need, e)) return false;
  std::shared_ptr<Buffer> staging;
  if (src_dev.type != DeviceType::CPU) {
    staging = alloc_host(e->bytes, false);
    copy_bytes(staging->ptr, Device{}, src, src_dev, e->bytes);
    src = staging->ptr;
  }
  uint64_t fb = 0;
  const std::string err = write_packet_file(cfg.disk_path, e->key, *e->meta, src, cfg.fsync, &fb);
  if (!err.empty()) {
    ++st.io_errors;
    report("disk write failed for packet " + key_hex(e->key) + ": " + err);
    return false;
  }
  st.bytes_written += fb;
  attach_disk(e, fb);
  return true;
}

// Move e out of its memory tier one level down (GPU -> host -> disk -> gone).
void StoreState::demote(Entry* e) {
  const Tier t = e->mem_tier;
  if (t == Tier::GPU) {
    ++st.evictions_gpu;
    if (cap[int(Tier::Host)] >= e->bytes && make_room(Tier::Host, e->bytes, e)) {
      auto b = alloc_host(e->bytes, pinned_host);
      copy_bytes(b->ptr, Device{}, e->mem->ptr, e->mem->where(), e->bytes);
      detach_mem(e);
      attach_mem(e, Tier::Host, std::move(b));
      return;
    }
  } else {
    ++st.evictions_host;
  }
  if (!ensure_on_disk(e, e->mem->ptr, e->mem->where()) && disk)
    report("packet " + key_hex(e->key) + " dropped: it could not be written to the disk tier");
  detach_mem(e);
  forget_if_gone(e);
}

// Free space in tier t for `bytes` more bytes by demoting LRU entries (never `keep`).
bool StoreState::make_room(Tier t, uint64_t bytes, const Entry* keep) {
  if (bytes > cap[int(t)]) return false;
  while (used[int(t)] + bytes > cap[int(t)]) {
    Entry* v = victim(t, keep);
    if (!v) return false;
    if (t == Tier::Disk) {
      ++st.evictions_disk;
      detach_disk(v, true);
      forget_if_gone(v);
    } else {
      demote(v);
    }
  }
  return true;
}

}  // namespace detail
}  // namespace scrimp
