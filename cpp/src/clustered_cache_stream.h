// Internal: the per-stream state of a ClusteredCache (page table, representatives, device-cache
// slots), shared by the storage (clustered_cache_store.cpp) and selection (clustered_cache_select.cpp)
// units.
#pragma once
#include <cstdint>
#include <vector>

#include "scrimp/clustered_cache.h"

namespace scrimp {

struct ClusteredCache::Stream {
  std::vector<int32_t> len;          // tokens per page
  std::vector<float> cen, lo, hi;    // [P, D]
  std::vector<float> vmean;          // [P, D] mean value (page summaries)
  std::vector<int64_t> pos;          // [P, page_size]
  std::vector<int32_t> slot_page;    // [cache_pages] page held by each slot, -1 free
  std::vector<uint64_t> slot_tick;   // last step the slot was used
  std::vector<int32_t> page_slot;    // [P] slot holding the page, -1 if not resident
};

}  // namespace scrimp
