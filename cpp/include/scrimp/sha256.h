// SHA-256 (FIPS 180-4) and CRC32C (Castagnoli): the content hash of a KV packet's key and the
// checksums of its disk format. Plain, dependency-free implementations, tested against the NIST
// published vectors (tests/cpp/test_packet_store.cpp).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace scrimp {

class Sha256 {
 public:
  using Digest = std::array<uint8_t, 32>;
  Sha256();
  void update(const void* data, std::size_t len);
  Digest finish();  // the object must not be updated afterwards
  static Digest hash(const void* data, std::size_t len);
  static std::string hex(const Digest& d);

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  std::size_t buf_len_ = 0;
  uint64_t total_ = 0;
  bool finished_ = false;
};

// CRC-32C (polynomial 0x1EDC6F41, reflected), as used by iSCSI/ext4. `crc` chains calls:
// crc32c(b, crc32c(a)) == crc32c(a + b). Check value: crc32c("123456789") == 0xE3069283.
// Uses the SSE4.2 crc32 instruction when the CPU has it (runtime dispatch), else crc32c_portable.
uint32_t crc32c(const void* data, std::size_t len, uint32_t crc = 0);
// The table-driven (slicing-by-8) implementation, on every CPU.
uint32_t crc32c_portable(const void* data, std::size_t len, uint32_t crc = 0);

}  // namespace scrimp
