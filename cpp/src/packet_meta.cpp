// KV packet identity and metadata: PacketMeta validation and payload size, the content key
// (SHA-256 over model, adapter, tokens and pruning), key <-> hex, tier names.
#include <cstring>
#include <limits>
#include <string>

#include "scrimp/error.h"
#include "scrimp/packet_store.h"

namespace scrimp {

uint64_t PacketMeta::payload_bytes() const {
  return static_cast<uint64_t>(num_layers) * 2 * static_cast<uint64_t>(num_kv_heads) *
         static_cast<uint64_t>(num_tokens) * static_cast<uint64_t>(head_dim) * dtype_size(dtype);
}

void PacketMeta::validate() const {
  SCRIMP_CHECK_TYPE(dtype == DType::Float32 || dtype == DType::Float16 || dtype == DType::BFloat16,
                    "packet dtype must be float32, float16 or bfloat16, got " << dtype_name(dtype));
  SCRIMP_CHECK(num_layers > 0 && num_kv_heads > 0 && head_dim > 0,
               "packet layout must be positive: num_layers=" << num_layers << " num_kv_heads=" << num_kv_heads
                                                            << " head_dim=" << head_dim);
  SCRIMP_CHECK(num_tokens > 0, "a packet needs at least one token, got num_tokens=" << num_tokens);
  if (kept.empty()) {
    SCRIMP_CHECK(static_cast<int64_t>(token_ids.size()) == num_tokens,
                 "token_ids has " << token_ids.size() << " entries but num_tokens=" << num_tokens);
  } else {
    SCRIMP_CHECK(!pruning.empty(), "a pruned packet (kept given) needs a non-empty pruning rule");
    SCRIMP_CHECK(static_cast<int64_t>(kept.size()) == num_tokens,
                 "kept has " << kept.size() << " entries but num_tokens=" << num_tokens);
    for (std::size_t i = 0; i < kept.size(); ++i) {
      SCRIMP_CHECK(kept[i] >= 0 && kept[i] < static_cast<int64_t>(token_ids.size()),
                   "kept[" << i << "] = " << kept[i] << " is not an index into the " << token_ids.size()
                           << " token_ids");
      SCRIMP_CHECK(i == 0 || kept[i] > kept[i - 1], "kept must be strictly increasing (kept[" << i << "] = "
                                                        << kept[i] << " after " << kept[i - 1] << ")");
    }
  }
  SCRIMP_CHECK(!kept.empty() || pruning.empty(),
               "pruning rule '" << pruning << "' given without kept indices");
  SCRIMP_CHECK(position_start >= 0, "position_start must be >= 0, got " << position_start);
  SCRIMP_CHECK(static_cast<int64_t>(inv_freq.size()) * 2 <= head_dim,
               "inv_freq has " << inv_freq.size() << " entries; at most head_dim/2 = " << head_dim / 2);
  SCRIMP_CHECK(!model_fingerprint.empty(), "a packet needs a model fingerprint");
  // payload_bytes() must not wrap around: layouts read back from files are untrusted
  constexpr uint64_t kMaxPayload = 1ull << 48;
  uint64_t bytes = dtype_size(dtype);
  for (uint64_t f : {static_cast<uint64_t>(num_layers), uint64_t{2}, static_cast<uint64_t>(num_kv_heads),
                     static_cast<uint64_t>(num_tokens), static_cast<uint64_t>(head_dim)}) {
    SCRIMP_CHECK(bytes <= kMaxPayload / f, "packet layout num_layers=" << num_layers << " num_kv_heads=" << num_kv_heads
                                               << " num_tokens=" << num_tokens << " head_dim=" << head_dim
                                               << " exceeds the 2^48-byte payload limit");
    bytes *= f;
  }
}

PacketKey packet_key(const std::string& fp, const std::string& adapter, const int64_t* ids, int64_t n) {
  return packet_key(fp, adapter, ids, n, std::string());
}

PacketKey packet_key(const PacketMeta& m) {
  return packet_key(m.model_fingerprint, m.adapter_id, m.token_ids.data(), static_cast<int64_t>(m.token_ids.size()),
                    m.pruning);
}

PacketKey packet_key(const std::string& fp, const std::string& adapter, const int64_t* ids, int64_t n,
                     const std::string& pruning) {
  Sha256 h;
  const char domain[] = "scrimp-kv-packet-key-v1";
  h.update(domain, sizeof(domain));
  const uint64_t lf = fp.size(), la = adapter.size(), ln = static_cast<uint64_t>(n);
  h.update(&lf, 8);
  h.update(fp.data(), fp.size());
  h.update(&la, 8);
  h.update(adapter.data(), adapter.size());
  h.update(&ln, 8);
  if (n > 0) h.update(ids, static_cast<std::size_t>(n) * 8);
  if (!pruning.empty()) {  // unpruned keys stay as they were (format v1 files keep their names)
    const char tag[] = "pruning";
    const uint64_t lp = pruning.size();
    h.update(tag, sizeof(tag));
    h.update(&lp, 8);
    h.update(pruning.data(), pruning.size());
  }
  return h.finish();
}

std::string key_hex(const PacketKey& key) { return Sha256::hex(key); }

PacketKey key_from_hex(const std::string& hex) {
  SCRIMP_CHECK(hex.size() == 64, "a packet key is 64 hex digits, got " << hex.size() << " characters");
  PacketKey k{};
  auto val = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    SCRIMP_CHECK(false, "a packet key is 64 hex digits, got the character '" << c << "'");
    return 0;
  };
  for (int i = 0; i < 32; ++i) k[i] = static_cast<uint8_t>(val(hex[2 * i]) * 16 + val(hex[2 * i + 1]));
  return k;
}

const char* tier_name(Tier t) {
  switch (t) {
    case Tier::GPU: return "gpu";
    case Tier::Host: return "host";
    case Tier::Disk: return "disk";
  }
  return "?";
}

}  // namespace scrimp
