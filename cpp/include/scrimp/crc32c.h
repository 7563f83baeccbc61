// CRC-32C (Castagnoli): the checksums of the KV packet disk format. Tested against the published
// check value and the portable implementation (tests/cpp/test_packet_store.cpp).
#pragma once
#include <cstddef>
#include <cstdint>

namespace scrimp {

// CRC-32C (polynomial 0x1EDC6F41, reflected), as used by iSCSI/ext4. `crc` chains calls:
// crc32c(b, crc32c(a)) == crc32c(a + b). Check value: crc32c("123456789") == 0xE3069283.
// Uses the SSE4.2 crc32 instruction when the CPU has it (runtime dispatch), else crc32c_portable.
uint32_t crc32c(const void* data, std::size_t len, uint32_t crc = 0);
// The table-driven (slicing-by-8) implementation, on every CPU.
uint32_t crc32c_portable(const void* data, std::size_t len, uint32_t crc = 0);

}  // namespace scrimp
