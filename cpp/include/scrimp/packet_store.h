// KV packet store: immutable KV packets (the K and V of every layer for one wrapped document) kept
// in up to three tiers - GPU memory, host memory (pinned when CUDA is usable), a disk directory -
// with byte capacities, LRU eviction to the next tier, promotion on use, refcounted handles (a
// handed-out packet is never evicted or freed), crash-safe disk files with checksums, and counters.
//
// Payload layout of a packet (one contiguous buffer, `dtype` elements):
//   [num_layers][2 (K, V)][num_kv_heads][num_tokens][head_dim]
// Key of a packet: SHA-256 over (model fingerprint, adapter id, token ids[, pruning]), see packet_key().
//
// A pruned packet (score-based KV pruning, e.g. key norm) keeps only some of its document's tokens:
// `token_ids` still lists the whole wrapped document (its identity and key), `kept` the indices into
// it of the `num_tokens` tokens whose K/V the payload holds, and `pruning` names the rule that chose
// them (part of the key, so the pruned and the full packet of a document never share a key).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "scrimp/rope.h"
#include "scrimp/sha256.h"
#include "scrimp/tensor.h"

namespace scrimp {

struct PacketMeta {
  std::string model_fingerprint;  // identifies the model weights the KV belongs to
  std::string adapter_id;         // identifies the header/trailer adapters ("" for none)
  DType dtype = DType::Float32;   // float32, float16 or bfloat16
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int64_t num_tokens = 0;
  int64_t position_start = 0;     // the keys were rotated for positions start .. start+num_tokens-1
                                  // (pruned: start + kept[i] for payload token i)
  std::vector<int64_t> token_ids; // [num_tokens], or [document tokens] when pruned (part of the key)
  std::vector<int64_t> kept;      // pruned: [num_tokens] strictly increasing indices into token_ids;
                                  // empty: not pruned
  std::string pruning;            // pruned: the rule that chose `kept` (non-empty, part of the key)
  RopeLayout rope_layout = RopeLayout::Half;
  std::vector<float> inv_freq;    // [rotary_dim / 2]: what moving the packet needs
  std::string extra;              // free-form caller metadata (e.g. JSON), stored verbatim

  uint64_t payload_bytes() const;
  bool pruned() const { return !kept.empty(); }
  // The position payload token i was rotated for.
  int64_t position(int64_t i) const { return position_start + (kept.empty() ? i : kept[static_cast<std::size_t>(i)]); }
  // Throws ValueError/TypeError on an inconsistent description.
  void validate() const;
};

using PacketKey = Sha256::Digest;
PacketKey packet_key(const std::string& model_fingerprint, const std::string& adapter_id,
                     const int64_t* token_ids, int64_t n);
// With a pruning rule ("" gives the key above): the key of the packet of these tokens pruned by it.
PacketKey packet_key(const std::string& model_fingerprint, const std::string& adapter_id,
                     const int64_t* token_ids, int64_t n, const std::string& pruning);
PacketKey packet_key(const PacketMeta& meta);  // the key a packet with this metadata is stored under
std::string key_hex(const PacketKey& key);
PacketKey key_from_hex(const std::string& hex);  // ValueError unless 64 hex digits

enum class Tier : int { GPU = 0, Host = 1, Disk = 2 };
const char* tier_name(Tier t);

struct PacketStoreConfig {
  std::string disk_path;     // "" -> no disk tier
  uint64_t gpu_bytes = 0;    // 0 -> no GPU tier; > 0 needs a usable CUDA device
  uint64_t host_bytes = 1ull << 30;
  uint64_t disk_bytes = 0;   // capacity of the disk tier (ignored without disk_path)
  int cuda_device = 0;
  bool fsync = true;         // fsync files and the directory when writing
  bool verify_on_open = false;  // also check payload checksums when reopening a directory
};

struct PacketStoreStats {
  uint64_t hits = 0, misses = 0;
  uint64_t hits_gpu = 0, hits_host = 0, hits_disk = 0;
  uint64_t puts = 0, duplicate_puts = 0;
  uint64_t evictions_gpu = 0, evictions_host = 0, evictions_disk = 0;  // moved out of / deleted from
  uint64_t promotions = 0;
  uint64_t bytes_gpu = 0, bytes_host = 0, bytes_disk = 0;
  uint64_t packets = 0, packets_gpu = 0, packets_host = 0, packets_disk = 0;
  uint64_t pinned = 0;                // packets currently handed out
  uint64_t corrupt_files = 0;         // detected and dropped
  uint64_t io_errors = 0;             // failed writes/reads/deletes (disk full...)
  uint64_t bytes_written = 0, bytes_read = 0;
};

namespace detail {
struct StoreState;
struct Pin;
}  // namespace detail

// A handed-out packet: while any copy of the handle lives, its memory stays valid and the store
// neither evicts nor frees it. Copying shares the pin; release() (or destruction) drops this copy.
class PacketHandle {
 public:
  PacketHandle() = default;
  explicit operator bool() const { return pin_ != nullptr; }
  const PacketMeta& meta() const;
  const PacketKey& key() const;
  const void* data() const;       // the whole payload (layout above)
  Device device() const;          // where data() lives
  Tier tier() const;              // the tier it was served from (after promotion)
  uint64_t bytes() const;
  // [num_kv_heads, num_tokens, head_dim] contiguous views of layer l's K / V.
  TensorView key_view(int layer) const;
  TensorView value_view(int layer) const;
  void release() { pin_.reset(); }

 private:
  friend class PacketStore;
  std::shared_ptr<detail::Pin> pin_;
};

// What a caller expects of a packet; a mismatch on get is a clear error (not a silent miss).
struct PacketExpect {
  std::optional<std::string> model_fingerprint, adapter_id;
  std::optional<DType> dtype;
  std::optional<int32_t> num_layers, num_kv_heads, head_dim;
};

class PacketStore {
 public:
  explicit PacketStore(const PacketStoreConfig& config);
  ~PacketStore();
  PacketStore(const PacketStore&) = delete;
  PacketStore& operator=(const PacketStore&) = delete;

  // Store a packet. keys[l] / values[l]: [num_kv_heads, num_tokens, head_dim] or
  // [1, num_kv_heads, num_tokens, head_dim] (head_dim contiguous, any other strides), on the CPU or
  // (CUDA builds) a CUDA device, dtype == meta.dtype. The key is derived from the metadata; a packet
  // already stored under it is kept (immutable) and its key returned. The packet goes to the highest
  // tier configured, evicting least recently used unpinned packets downwards as needed.
  PacketKey put(const PacketMeta& meta, const std::vector<TensorView>& keys, const std::vector<TensorView>& values);
  // Same from one contiguous payload buffer on `device` (layout above).
  PacketKey put_payload(const PacketMeta& meta, const void* payload, Device device);

  // A miss returns an empty handle. `want` is the tier the caller wants the data in (GPU or Host);
  // the packet is promoted there (from disk, or host -> GPU) when capacity allows, otherwise served
  // from a private copy in host memory. A packet whose file fails its checksum is dropped, reported
  // and counted as a miss.
  PacketHandle get(const PacketKey& key, Tier want = Tier::Host, const PacketExpect* expect = nullptr);
  bool contains(const PacketKey& key) const;
  std::optional<PacketMeta> meta(const PacketKey& key) const;
  // Remove a packet from every tier (and delete its file). False when absent or handed out.
  bool evict(const PacketKey& key);
  // Move unpinned packets out of `tier` until it holds at most `target_bytes`.
  void shrink(Tier tier, uint64_t target_bytes);
  std::vector<PacketKey> keys() const;

  PacketStoreStats stats() const;
  // Problems seen (corrupt files, I/O errors...), oldest first; take_messages() also clears them.
  std::vector<std::string> messages() const;
  std::vector<std::string> take_messages();
  const PacketStoreConfig& config() const;
  bool gpu_enabled() const;

 private:
  std::shared_ptr<detail::StoreState> state_;
};

}  // namespace scrimp
