// SHA-256 (FIPS 180-4): the content hash of a KV packet's key. A plain, dependency-free
// implementation, tested against the NIST published vectors (tests/cpp/test_packet_store.cpp).
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

}  // namespace scrimp
