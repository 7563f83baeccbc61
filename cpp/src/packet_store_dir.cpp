// The packet store's disk I/O at open: indexes the packet files of a directory (oldest first in the
// LRU), removes interrupted temporary files, drops corrupt or misnamed packets (counted and reported),
// and trims the disk tier to its capacity. Reading and writing single files: packet_store_disk.cpp.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "packet_store_state.h"
#include "scrimp/error.h"

namespace scrimp {
namespace detail {

void StoreState::open_directory() {
  ::mkdir(cfg.disk_path.c_str(), 0755);
  DIR* d = ::opendir(cfg.disk_path.c_str());
  SCRIMP_CHECK(d != nullptr, "cannot open the packet directory " << cfg.disk_path << ": " << std::strerror(errno));
  struct Found {
    FileHeader h;
    int64_t mtime;
  };
  std::vector<Found> found;
  std::vector<std::string> names;
  while (dirent* de = ::readdir(d)) names.emplace_back(de->d_name);
  ::closedir(d);
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    if (name == "." || name == "..") continue;
    const std::string path = cfg.disk_path + "/" + name;
    if (name[0] == '.' && name.find(".tmp.") != std::string::npos) {
      ::unlink(path.c_str());
      report("removed an incomplete temporary file " + path + " (a write was interrupted)");
      continue;
    }
    if (name.size() != 68 || name.compare(64, 4, ".kvp") != 0) {
      report("ignored a file that is not a packet: " + path);
      continue;
    }
    FileHeader h;
    std::string err = read_packet_header(path, &h);
    if (err.empty() && key_hex(h.key) + ".kvp" != name) err = path + ": the file name does not match its key";
    if (err.empty() && cfg.verify_on_open) {
      auto b = alloc_host(h.payload_bytes, false);
      err = read_packet_payload(path, h, b->ptr);
    }
    if (!err.empty()) {
      ++st.corrupt_files;
      report("dropped corrupt packet file: " + err);
      ::unlink(path.c_str());
      continue;
    }
    struct stat sb;
    const int64_t mt = ::stat(path.c_str(), &sb) == 0 ? int64_t(sb.st_mtim.tv_sec) * 1000000000 + sb.st_mtim.tv_nsec : 0;
    found.push_back({std::move(h), mt});
  }
  // Oldest first, so the newest end up at the front of the LRU list.
  std::sort(found.begin(), found.end(), [](const Found& a, const Found& b) { return a.mtime < b.mtime; });
  for (Found& f : found) {
    auto e = std::make_shared<Entry>();
    e->key = f.h.key;
    e->bytes = f.h.payload_bytes;
    e->meta = std::make_shared<PacketMeta>(std::move(f.h.meta));
    index[e->key] = e;
    attach_disk(e.get(), f.h.file_bytes);
  }
  while (used[int(Tier::Disk)] > cap[int(Tier::Disk)]) {
    Entry* v = victim(Tier::Disk, nullptr);
    if (!v) break;
    ++st.evictions_disk;
    detach_disk(v, true);
    forget_if_gone(v);
  }
}

}  // namespace detail
}  // namespace scrimp
