// Internal: the state behind a PacketStore (index, per-tier LRU lists, capacities, counters) shared by
// the store's units: the public API (packet_store.cpp), the tier policy (packet_store_tiers.cpp) and
// the reopening of a directory (packet_store_dir.cpp). One mutex guards it all.
#pragma once
#include <cstdint>
#include <cstring>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "packet_store_internal.h"
#include "scrimp/packet_store.h"

namespace scrimp {
namespace detail {

struct Entry {
  PacketKey key{};
  std::shared_ptr<const PacketMeta> meta;
  uint64_t bytes = 0;                 // payload bytes
  std::shared_ptr<Buffer> mem;        // resident copy (GPU or host tier), or null
  Tier mem_tier = Tier::Host;
  bool on_disk = false;
  uint64_t file_bytes = 0;
  int pins = 0;
  std::list<Entry*>::iterator mem_it, disk_it;
};

struct KeyHash {
  std::size_t operator()(const PacketKey& k) const {
    std::size_t h;
    std::memcpy(&h, k.data(), sizeof(h));
    return h;
  }
};

struct StoreState {
  PacketStoreConfig cfg;
  bool gpu = false, pinned_host = false, disk = false;
  mutable std::mutex mu;
  std::unordered_map<PacketKey, std::shared_ptr<Entry>, KeyHash> index;
  std::list<Entry*> lru[3];  // front = most recently used; GPU and host hold memory, disk files
  uint64_t used[3] = {0, 0, 0};
  uint64_t cap[3] = {0, 0, 0};
  PacketStoreStats st;
  std::deque<std::string> msgs;

  void report(const std::string& m) {
    msgs.push_back(m);
    while (msgs.size() > 1000) msgs.pop_front();
  }
  std::string path_of(const PacketKey& k) const { return cfg.disk_path + "/" + packet_file_name(k); }
  Device mem_device() const { return Device{DeviceType::CUDA, cfg.cuda_device}; }

  // -- tier policy (packet_store_tiers.cpp; all under mu) --
  void attach_mem(Entry* e, Tier t, std::shared_ptr<Buffer> b);
  void detach_mem(Entry* e);
  void attach_disk(Entry* e, uint64_t file_bytes);
  void detach_disk(Entry* e, bool unlink_file);
  void forget_if_gone(Entry* e);  // drops e from the index when no tier holds it (may destroy e)
  void touch(Entry* e);           // most recently used in every tier that holds it
  // Least recently used entry of tier t that may leave it (memory tiers: not handed out).
  Entry* victim(Tier t, const Entry* keep);
  // Write e's payload (at `src` on `src_dev`) to disk unless it is there already.
  bool ensure_on_disk(Entry* e, const void* src, Device src_dev);
  // Move e out of its memory tier one level down (GPU -> host -> disk -> gone).
  void demote(Entry* e);
  // Free space in tier t for `bytes` more bytes by demoting LRU entries (never `keep`).
  bool make_room(Tier t, uint64_t bytes, const Entry* keep);

  // -- disk I/O (packet_store_dir.cpp) --
  // Indexes the packet files of cfg.disk_path (creating it), dropping corrupt and temporary files.
  void open_directory();
};

struct Pin {
  std::shared_ptr<StoreState> state;
  std::shared_ptr<Entry> entry;
  std::shared_ptr<Buffer> buf;
  Tier tier = Tier::Host;
  ~Pin() {
    std::lock_guard<std::mutex> lock(state->mu);
    if (--entry->pins == 0) --state->st.pinned;
  }
};

}  // namespace detail
}  // namespace scrimp
