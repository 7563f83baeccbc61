// Disk format of a KV packet (little-endian):
//   0   magic "SCRIMPKV"            8 bytes
//   8   format version (2; 1 is read) u32
//   12  header bytes H              u32  (everything before the payload, header checksum included)
//   16  payload bytes P             u64
//   24  payload CRC32C              u32
//   28  key (SHA-256)               32 bytes
//   60  metadata                    (length-prefixed fields, see put_meta; v2 adds pruning + kept)
//   H-4 header CRC32C over [0, H-4) u32
//   H   payload                     P bytes; file size must be exactly H + P
// Written to "<dir>/.<hex>.tmp.<pid>.<n>", fsynced, renamed to "<dir>/<hex>.kvp", directory fsynced:
// a crash leaves either the old state or the complete new file (plus a temp file removed on reopen).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <vector>

#include "packet_store_internal.h"
#include "scrimp/crc32c.h"
#include "scrimp/error.h"

namespace scrimp {
namespace detail {

namespace {

const char kMagic[8] = {'S', 'C', 'R', 'I', 'M', 'P', 'K', 'V'};
constexpr uint32_t kMaxHeaderBytes = 64u << 20;

struct Writer {
  std::vector<uint8_t> b;
  void raw(const void* p, std::size_t n) {
    const uint8_t* c = static_cast<const uint8_t*>(p);
    b.insert(b.end(), c, c + n);
  }
  void u32(uint32_t v) { raw(&v, 4); }
  void u64(uint64_t v) { raw(&v, 8); }
  void i32(int32_t v) { raw(&v, 4); }
  void i64(int64_t v) { raw(&v, 8); }
  void str(const std::string& s) { u64(s.size()); raw(s.data(), s.size()); }
};

struct Reader {
  const uint8_t* p;
  std::size_t n, off = 0;
  void raw(void* dst, std::size_t k) {
    if (k > n - off) throw std::runtime_error("metadata runs past the header");
    if (k) std::memcpy(dst, p + off, k);  // an empty field may have no buffer (dst == nullptr)
    off += k;
  }
  uint32_t u32() { uint32_t v; raw(&v, 4); return v; }
  uint64_t u64() { uint64_t v; raw(&v, 8); return v; }
  int32_t i32() { int32_t v; raw(&v, 4); return v; }
  int64_t i64() { int64_t v; raw(&v, 8); return v; }
  std::string str() {
    const uint64_t k = u64();
    if (k > n - off) throw std::runtime_error("string length runs past the header");
    std::string s(reinterpret_cast<const char*>(p + off), k);
    off += k;
    return s;
  }
};

void put_meta(Writer& w, const PacketMeta& m) {
  w.str(m.model_fingerprint);
  w.str(m.adapter_id);
  w.i32(static_cast<int32_t>(m.dtype));
  w.i32(m.num_layers);
  w.i32(m.num_kv_heads);
  w.i32(m.head_dim);
  w.i64(m.num_tokens);
  w.i64(m.position_start);
  w.i32(static_cast<int32_t>(m.rope_layout));
  w.u64(m.token_ids.size());
  w.raw(m.token_ids.data(), m.token_ids.size() * 8);
  w.u64(m.inv_freq.size());
  w.raw(m.inv_freq.data(), m.inv_freq.size() * 4);
  w.str(m.extra);
  w.str(m.pruning);  // format v2
  w.u64(m.kept.size());
  w.raw(m.kept.data(), m.kept.size() * 8);
}

PacketMeta get_meta(Reader& r, uint32_t version) {
  PacketMeta m;
  m.model_fingerprint = r.str();
  m.adapter_id = r.str();
  const int32_t dt = r.i32();
  if (dt != int(DType::Float32) && dt != int(DType::Float16) && dt != int(DType::BFloat16))
    throw std::runtime_error("bad dtype code " + std::to_string(dt));
  m.dtype = static_cast<DType>(dt);
  m.num_layers = r.i32();
  m.num_kv_heads = r.i32();
  m.head_dim = r.i32();
  m.num_tokens = r.i64();
  m.position_start = r.i64();
  const int32_t lay = r.i32();
  if (lay != 0 && lay != 1) throw std::runtime_error("bad rope layout code");
  m.rope_layout = static_cast<RopeLayout>(lay);
  const uint64_t nt = r.u64();
  if (nt > (r.n - r.off) / 8) throw std::runtime_error("token count runs past the header");
  m.token_ids.resize(nt);
  r.raw(m.token_ids.data(), nt * 8);
  const uint64_t nf = r.u64();
  if (nf > (r.n - r.off) / 4) throw std::runtime_error("inv_freq count runs past the header");
  m.inv_freq.resize(nf);
  r.raw(m.inv_freq.data(), nf * 4);
  m.extra = r.str();
  if (version >= 2) {
    m.pruning = r.str();
    const uint64_t nk = r.u64();
    if (nk > (r.n - r.off) / 8) throw std::runtime_error("kept count runs past the header");
    m.kept.resize(nk);
    r.raw(m.kept.data(), nk * 8);
  }
  return m;
}

std::string errno_text(const char* what, const std::string& path) {
  return std::string(what) + " " + path + ": " + std::strerror(errno);
}

bool write_all(int fd, const void* data, uint64_t n) {
  const char* p = static_cast<const char*>(data);
  while (n) {
    const ssize_t w = ::write(fd, p, n > (1u << 30) ? (1u << 30) : n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (w == 0) { errno = ENOSPC; return false; }
    p += w;
    n -= static_cast<uint64_t>(w);
  }
  return true;
}

bool read_all(int fd, void* data, uint64_t n, uint64_t offset) {
  char* p = static_cast<char*>(data);
  while (n) {
    const ssize_t r = ::pread(fd, p, n > (1u << 30) ? (1u << 30) : n, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (r == 0) { errno = EIO; return false; }
    p += r; n -= static_cast<uint64_t>(r); offset += static_cast<uint64_t>(r);
  }
  return true;
}

std::atomic<uint64_t> g_tmp_counter{0};

}  // namespace

std::string packet_file_name(const PacketKey& key) { return key_hex(key) + ".kvp"; }

uint64_t packet_file_bytes(const PacketMeta& meta) {
  Writer w;
  put_meta(w, meta);
  return 60 + w.b.size() + 4 + meta.payload_bytes();
}

std::string write_packet_file(const std::string& dir, const PacketKey& key, const PacketMeta& meta,
                              const void* payload, bool do_fsync, uint64_t* file_bytes) {
  const uint64_t P = meta.payload_bytes();
  Writer w;
  w.raw(kMagic, 8);
  w.u32(kFormatVersion);
  w.u32(0);  // header bytes, patched below
  w.u64(P);
  w.u32(crc32c(payload, P));
  w.raw(key.data(), key.size());
  put_meta(w, meta);
  const uint32_t H = static_cast<uint32_t>(w.b.size() + 4);
  std::memcpy(w.b.data() + 12, &H, 4);
  w.u32(crc32c(w.b.data(), w.b.size()));

  const std::string final_path = dir + "/" + packet_file_name(key);
  const std::string tmp = dir + "/." + key_hex(key) + ".tmp." + std::to_string(::getpid()) + "." +
                          std::to_string(g_tmp_counter.fetch_add(1));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return errno_text("cannot create", tmp);
  std::string err;
  if (!write_all(fd, w.b.data(), w.b.size()) || !write_all(fd, payload, P)) err = errno_text("cannot write", tmp);
  if (err.empty() && do_fsync && ::fsync(fd) != 0) err = errno_text("cannot fsync", tmp);
  if (::close(fd) != 0 && err.empty()) err = errno_text("cannot close", tmp);
  if (err.empty() && ::rename(tmp.c_str(), final_path.c_str()) != 0) err = errno_text("cannot rename to", final_path);
  if (!err.empty()) {
    ::unlink(tmp.c_str());
    return err;
  }
  if (do_fsync) {
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
  }
  if (file_bytes) *file_bytes = H + P;
  return "";
}

std::string parse_packet_header(const uint8_t* data, uint64_t available, uint64_t file_size, FileHeader* out) {
  constexpr uint64_t kFixed = 60;
  if (available < kFixed + 4 || file_size < kFixed + 4)
    return "truncated (" + std::to_string(file_size) + " bytes, no complete header)";
  if (std::memcmp(data, kMagic, 8) != 0) return "not a scrimp packet file (bad magic)";
  uint32_t version, H, pcrc;
  uint64_t P;
  std::memcpy(&version, data + 8, 4);
  std::memcpy(&H, data + 12, 4);
  std::memcpy(&P, data + 16, 8);
  std::memcpy(&pcrc, data + 24, 4);
  if (version != kFormatVersion && version != 1)
    return "unsupported format version " + std::to_string(version) + " (this build reads 1 to " +
           std::to_string(kFormatVersion) + ")";
  if (H < kFixed + 4 || H > kMaxHeaderBytes || H > file_size) return "truncated or corrupt header";
  if (H > available) return "header of " + std::to_string(H) + " bytes not fully read";
  uint32_t stored_crc;
  std::memcpy(&stored_crc, data + H - 4, 4);
  if (crc32c(data, H - 4) != stored_crc) return "header checksum mismatch (corrupt)";
  // P comes from the file: compare without overflowing H + P
  if (P > file_size || file_size - P != H)
    return "size " + std::to_string(file_size) + " != header " + std::to_string(H) + " + payload " +
           std::to_string(P) + " (truncated or corrupt)";
  FileHeader h;
  std::memcpy(h.key.data(), data + 28, 32);
  try {
    Reader r{data + kFixed, H - kFixed - 4};
    h.meta = get_meta(r, version);
    if (r.off != r.n) return "trailing bytes in the header";
    h.meta.validate();
  } catch (const std::exception& e) {
    return std::string("bad metadata: ") + e.what();
  }
  if (h.meta.payload_bytes() != P) return "payload size does not match the metadata";
  const PacketKey expect = packet_key(h.meta);
  if (expect != h.key) return "the stored key does not match the metadata";
  h.payload_bytes = P;
  h.payload_crc = pcrc;
  h.header_bytes = H;
  h.file_bytes = file_size;
  *out = std::move(h);
  return "";
}

std::string read_packet_header(const std::string& path, FileHeader* out) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_text("cannot open", path);
  struct Closer { int fd; ~Closer() { ::close(fd); } } closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) return errno_text("cannot stat", path);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  // the fixed part first (it holds the header size), then the whole header
  std::vector<uint8_t> hdr(std::min<uint64_t>(size, 64));
  if (!read_all(fd, hdr.data(), hdr.size(), 0)) return errno_text("cannot read", path);
  if (hdr.size() >= 16) {
    uint32_t H;
    std::memcpy(&H, hdr.data() + 12, 4);
    if (H > hdr.size() && H <= size && H <= kMaxHeaderBytes) {
      hdr.resize(H);
      if (!read_all(fd, hdr.data(), H, 0)) return errno_text("cannot read", path);
    }
  }
  const std::string why = parse_packet_header(hdr.data(), hdr.size(), size, out);
  return why.empty() ? why : path + ": " + why;
}

std::string read_packet_payload(const std::string& path, const FileHeader& header, void* dst) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_text("cannot open", path);
  struct Closer { int fd; ~Closer() { ::close(fd); } } closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) return errno_text("cannot stat", path);
  if (static_cast<uint64_t>(st.st_size) != header.file_bytes)
    return path + ": file size changed to " + std::to_string(st.st_size) + " (truncated)";
  if (!read_all(fd, dst, header.payload_bytes, header.header_bytes)) return errno_text("cannot read", path);
  if (crc32c(dst, header.payload_bytes) != header.payload_crc) return path + ": payload checksum mismatch (corrupt)";
  return "";
}

}  // namespace detail
}  // namespace scrimp
