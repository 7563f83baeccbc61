// Internal pieces of the packet store shared by packet_store*.cpp: owned memory buffers of each tier,
// byte copies across devices, and the disk format.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "scrimp/packet_store.h"

namespace scrimp {
namespace detail {

// One owned allocation: aligned host memory, pinned host memory (cudaHostAlloc) or device memory.
struct Buffer {
  enum class Kind { Aligned, Pinned, Device };
  void* ptr = nullptr;
  uint64_t bytes = 0;
  Kind kind = Kind::Aligned;
  int device = 0;
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();
  Device where() const { return kind == Kind::Device ? Device{DeviceType::CUDA, device} : Device{}; }
};

// Host memory; pinned when `pinned` (needs a usable CUDA device), else 64-byte aligned.
std::shared_ptr<Buffer> alloc_host(uint64_t bytes, bool pinned);
std::shared_ptr<Buffer> alloc_device(uint64_t bytes, int device);
// Copies between any two of host / CUDA memory (blocking).
void copy_bytes(void* dst, Device dst_dev, const void* src, Device src_dev, uint64_t bytes);
// Strided [heads, tokens, head_dim] -> contiguous copy (head_dim rows contiguous in the source).
void copy_kv_rows(void* dst, Device dst_dev, const TensorView& src, std::size_t elem);
// Number of usable CUDA devices (0 without CUDA).
int cuda_devices();

// ---- disk format (see packet_store_disk.cpp) ----
constexpr uint32_t kFormatVersion = 2;  // 2: pruned packets (pruning rule + kept indices); 1 is still read
std::string packet_file_name(const PacketKey& key);  // "<64 hex>.kvp"
uint64_t packet_file_bytes(const PacketMeta& meta);  // exact size of the file write_packet_file makes
// Writes atomically (temp file, fsync, rename, fsync dir). Returns "" or an error message.
std::string write_packet_file(const std::string& dir, const PacketKey& key, const PacketMeta& meta,
                              const void* payload, bool do_fsync, uint64_t* file_bytes);
struct FileHeader {
  PacketKey key{};
  PacketMeta meta;
  uint64_t payload_bytes = 0;
  uint32_t payload_crc = 0;
  uint64_t header_bytes = 0;
  uint64_t file_bytes = 0;
};
// Parses and checks a packet file's header from memory: `data` holds the first `available` bytes of a
// file of `file_size` bytes. "" or why it is bad (never throws; the fuzz target calls it directly).
std::string parse_packet_header(const uint8_t* data, uint64_t available, uint64_t file_size, FileHeader* header);
// Reads and checks a file's header (magic, version, header checksum, sizes, key). "" or why it is bad.
std::string read_packet_header(const std::string& path, FileHeader* header);
// Reads the payload described by `header` into `dst` (header.payload_bytes) and checks its checksum.
std::string read_packet_payload(const std::string& path, const FileHeader& header, void* dst);

}  // namespace detail
}  // namespace scrimp
