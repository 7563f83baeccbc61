// The packet-file check shared by the fuzz target (fuzz_packet_file.cpp) and its regression replay in
// the C++ test suite (tests/cpp/test_fuzz_regressions.cpp).
//
// Most mutations would only ever hit the checksum checks, so the check first repairs both CRC32C
// fields where the layout allows (payload CRC at byte 24, header CRC at H-4): the fuzzer then explores
// the metadata parser, the size/overflow checks and the key check behind them, exactly as the store
// runs them. An input must either be rejected with a message or parse into a packet that satisfies
// everything the store relies on; anything else aborts (a finding).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "packet_store_internal.h"
#include "scrimp/crc32c.h"
#include "scrimp/sha256.h"

namespace scrimp_fuzz {

// Returns true when the (repaired) file was accepted.
inline bool check_packet_file_bytes(const uint8_t* data, size_t size) {
  using namespace scrimp;
  std::vector<uint8_t> file(data, data + size);
  if (size >= 64) {
    uint32_t H;
    uint64_t P;
    std::memcpy(&H, file.data() + 12, 4);
    std::memcpy(&P, file.data() + 16, 8);
    if (H >= 64 && H <= size) {
      if (P == size - H) {
        const uint32_t pcrc = crc32c(file.data() + H, P);
        std::memcpy(file.data() + 24, &pcrc, 4);
      }
      const uint32_t hcrc = crc32c(file.data(), H - 4);
      std::memcpy(file.data() + H - 4, &hcrc, 4);
    }
  }
  detail::FileHeader header;
  const std::string why = detail::parse_packet_header(file.data(), file.size(), file.size(), &header);
  if (!why.empty()) return false;
  if (header.header_bytes + header.payload_bytes != file.size()) std::abort();
  if (header.meta.payload_bytes() != header.payload_bytes) std::abort();
  const PacketMeta& m = header.meta;
  if (m.kept.empty() ? m.token_ids.size() != static_cast<size_t>(m.num_tokens)
                     : (m.kept.size() != static_cast<size_t>(m.num_tokens) || m.pruning.empty()))
    std::abort();
  for (size_t i = 0; i < m.kept.size(); ++i)
    if (m.kept[i] < 0 || static_cast<size_t>(m.kept[i]) >= m.token_ids.size() || (i && m.kept[i] <= m.kept[i - 1]))
      std::abort();
  if (crc32c(file.data() + header.header_bytes, header.payload_bytes) != header.payload_crc) std::abort();
  return true;
}

}  // namespace scrimp_fuzz
