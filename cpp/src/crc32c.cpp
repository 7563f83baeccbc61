// CRC-32C (Castagnoli): the portable slicing-by-8 implementation and the runtime choice of the
// SSE4.2 instruction (crc32c_avx2.cpp) on CPUs that have it.
#include "scrimp/crc32c.h"

#include <cstring>

#include "scrimp/build_info.h"

namespace scrimp {

namespace {

// Slicing-by-8 tables for the reflected CRC-32C polynomial 0x82F63B78.
struct Crc32cTables {
  uint32_t t[8][256];
  Crc32cTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
  }
};
const Crc32cTables& crc_tables() {
  static const Crc32cTables tables;
  return tables;
}

}  // namespace

#if defined(SCRIMP_X86_SIMD)
namespace detail {
uint32_t crc32c_sse42(const void* data, std::size_t len, uint32_t crc);
}
#endif

uint32_t crc32c(const void* data, std::size_t len, uint32_t crc) {
#if defined(SCRIMP_X86_SIMD)
  if (std::strcmp(cpu_simd_level(), "generic") != 0) return detail::crc32c_sse42(data, len, crc);
#endif
  return crc32c_portable(data, len, crc);
}

uint32_t crc32c_portable(const void* data, std::size_t len, uint32_t crc) {
  const auto& T = crc_tables().t;
  const uint8_t* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  while (len >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= crc;  // little-endian hosts (x86-64, aarch64)
    crc = T[7][lo & 0xff] ^ T[6][(lo >> 8) & 0xff] ^ T[5][(lo >> 16) & 0xff] ^ T[4][lo >> 24] ^
          T[3][hi & 0xff] ^ T[2][(hi >> 8) & 0xff] ^ T[1][(hi >> 16) & 0xff] ^ T[0][hi >> 24];
    p += 8; len -= 8;
  }
  while (len--) crc = (crc >> 8) ^ T[0][(crc ^ *p++) & 0xff];
  return ~crc;
}

}  // namespace scrimp
