// CRC-32C with the SSE4.2 crc32 instruction (built with the AVX2 flags, which include SSE4.2; called
// only after runtime dispatch says the CPU has AVX2).
#include <nmmintrin.h>

#include <cstdint>
#include <cstring>

namespace scrimp {
namespace detail {

uint32_t crc32c_sse42(const void* data, std::size_t len, uint32_t crc) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint64_t c = ~crc;
  while (len >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    len -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (len--) c32 = _mm_crc32_u8(c32, *p++);
  return ~c32;
}

}  // namespace detail
}  // namespace scrimp
