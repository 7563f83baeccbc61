// Packet store: SHA-256 / CRC32C against published vectors, tiers, LRU, pins, disk format,
// corruption, a full disk, reopening, and a concurrency stress test.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "scrimp/error.h"
#include "scrimp/packet_store.h"
#include "scrimp/crc32c.h"
#include "scrimp/sha256.h"

using namespace scrimp;

namespace {

std::string sha_hex(const std::string& s) { return Sha256::hex(Sha256::hash(s.data(), s.size())); }

// ---- FIPS 180-2 appendix B / NIST CAVP examples ----
TEST(Sha256, NistVectors) {
  EXPECT_EQ(sha_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha_hex("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu"),
            "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
  // One million 'a', fed in uneven chunks.
  Sha256 h;
  std::string chunk(997, 'a');
  std::size_t left = 1000000;
  while (left) {
    const std::size_t n = std::min(left, chunk.size());
    h.update(chunk.data(), n);
    left -= n;
  }
  EXPECT_EQ(Sha256::hex(h.finish()), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, IncrementalEqualsOneShotAtEveryLength) {
  std::mt19937 rng(1);
  std::string data(300, '\0');
  for (auto& c : data) c = static_cast<char>(rng());
  for (std::size_t n = 0; n <= data.size(); n += 7) {
    for (std::size_t split : {std::size_t(0), n / 3, n / 2, n}) {
      Sha256 h;
      h.update(data.data(), split);
      h.update(data.data() + split, n - split);
      EXPECT_EQ(h.finish(), Sha256::hash(data.data(), n)) << n << " " << split;
    }
  }
}

TEST(Crc32c, CheckValueAndChaining) {
  const char* s = "123456789";
  EXPECT_EQ(crc32c(s, 9), 0xE3069283u);
  EXPECT_EQ(crc32c(s + 4, 5, crc32c(s, 4)), 0xE3069283u);
  // RFC 3720 B.4: 32 bytes of zeros -> 0x8A9136AA, 32 bytes of 0xFF -> 0x62A8AB43.
  std::vector<uint8_t> z(32, 0), f(32, 0xff);
  EXPECT_EQ(crc32c(z.data(), 32), 0x8A9136AAu);
  EXPECT_EQ(crc32c(f.data(), 32), 0x62A8AB43u);
}

TEST(Crc32c, HardwareAndPortablePathsAgree) {
  std::mt19937 rng(5);
  std::vector<uint8_t> d(5000);
  for (auto& b : d) b = static_cast<uint8_t>(rng());
  for (std::size_t n : {0, 1, 7, 8, 9, 63, 64, 1000, 4999, 5000})
    for (std::size_t off : {0, 1, 3}) {
      if (off + n > d.size()) continue;
      EXPECT_EQ(crc32c(d.data() + off, n, 0x1234u), crc32c_portable(d.data() + off, n, 0x1234u)) << n << " " << off;
    }
  EXPECT_EQ(crc32c_portable("123456789", 9), 0xE3069283u);
}

// ---- helpers ----
struct TmpDir {
  std::string path;
  TmpDir() {
    char tmpl[] = "/tmp/scrimp_pkt_XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TmpDir() { std::system(("rm -rf '" + path + "'").c_str()); }
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    std::string cmd = "ls -A '" + path + "'";
    FILE* p = ::popen(cmd.c_str(), "r");
    char line[512];
    while (p && std::fgets(line, sizeof line, p)) {
      std::string s(line);
      s.pop_back();
      out.push_back(s);
    }
    if (p) ::pclose(p);
    return out;
  }
};

constexpr int L = 2, H = 2, D = 8;

PacketMeta make_meta(int64_t seed, int64_t T, const std::string& fp = "model-A") {
  PacketMeta m;
  m.model_fingerprint = fp;
  m.adapter_id = "adapter-1";
  m.dtype = DType::Float32;
  m.num_layers = L;
  m.num_kv_heads = H;
  m.head_dim = D;
  m.num_tokens = T;
  m.position_start = 0;
  for (int64_t t = 0; t < T; ++t) m.token_ids.push_back(seed * 1000 + t);
  for (int i = 0; i < D / 2; ++i) m.inv_freq.push_back(std::pow(10000.f, -2.f * i / D));
  return m;
}

float pattern(int64_t seed, uint64_t i) { return static_cast<float>((seed * 7919 + i * 31) % 100003) * 0.5f; }

std::vector<float> make_payload(int64_t seed, const PacketMeta& m) {
  std::vector<float> p(m.payload_bytes() / 4);
  for (uint64_t i = 0; i < p.size(); ++i) p[i] = pattern(seed, i);
  return p;
}

PacketKey put_seed(PacketStore& s, int64_t seed, int64_t T) {
  PacketMeta m = make_meta(seed, T);
  auto p = make_payload(seed, m);
  return s.put_payload(m, p.data(), Device{});
}

bool payload_ok(const PacketHandle& h, int64_t seed) {
  const float* d = static_cast<const float*>(h.data());
  for (uint64_t i = 0; i < h.bytes() / 4; ++i)
    if (d[i] != pattern(seed, i)) return false;
  return true;
}

uint64_t pkt_bytes(int64_t T) { return uint64_t(L) * 2 * H * T * D * 4; }

// ---- basics ----
TEST(PacketStore, PutGetRoundTripAndKey) {
  PacketStoreConfig c;
  c.host_bytes = 1 << 20;
  PacketStore s(c);
  const PacketKey k = put_seed(s, 1, 5);
  PacketMeta m = make_meta(1, 5);
  EXPECT_EQ(k, packet_key(m.model_fingerprint, m.adapter_id, m.token_ids.data(), 5));
  EXPECT_NE(k, packet_key("model-B", m.adapter_id, m.token_ids.data(), 5));
  EXPECT_NE(k, packet_key(m.model_fingerprint, "", m.token_ids.data(), 5));
  EXPECT_NE(k, packet_key(m.model_fingerprint, m.adapter_id, m.token_ids.data(), 4));
  EXPECT_EQ(key_from_hex(key_hex(k)), k);
  EXPECT_TRUE(s.contains(k));
  PacketHandle h = s.get(k);
  ASSERT_TRUE(h);
  EXPECT_TRUE(payload_ok(h, 1));
  EXPECT_EQ(h.tier(), Tier::Host);
  EXPECT_EQ(h.meta().token_ids, m.token_ids);
  // layer views: K of layer 1 starts after K and V of layer 0
  TensorView kv1 = h.key_view(1);
  EXPECT_EQ(static_cast<const float*>(kv1.data) - static_cast<const float*>(h.data()), 2 * H * 5 * D);
  EXPECT_EQ(kv1.shape, (std::vector<int64_t>{H, 5, D}));
  // a miss is a result
  PacketKey other = k;
  other[0] ^= 1;
  EXPECT_FALSE(s.get(other));
  auto st = s.stats();
  EXPECT_EQ(st.hits, 1u);
  EXPECT_EQ(st.misses, 1u);
  EXPECT_EQ(st.bytes_host, pkt_bytes(5));
  EXPECT_EQ(st.pinned, 1u);
  h.release();
  EXPECT_EQ(s.stats().pinned, 0u);
  // duplicate put keeps the original
  put_seed(s, 1, 5);
  EXPECT_EQ(s.stats().duplicate_puts, 1u);
  EXPECT_TRUE(s.evict(k));
  EXPECT_FALSE(s.contains(k));
  EXPECT_EQ(s.stats().bytes_host, 0u);
}

TEST(PacketStore, PutFromStridedLayerTensors) {
  PacketStoreConfig c;
  PacketStore s(c);
  PacketMeta m = make_meta(3, 4);
  // [1, H, T, D] views into a bigger [1, H, 6, D] buffer (token stride D, head stride 6*D).
  std::vector<std::vector<float>> bufs;
  std::vector<TensorView> ks, vs;
  for (int l = 0; l < L; ++l)
    for (int kv = 0; kv < 2; ++kv) {
      bufs.emplace_back(H * 6 * D);
      auto& b = bufs.back();
      for (std::size_t i = 0; i < b.size(); ++i) b[i] = float(l * 1000 + kv * 100 + i);
      TensorView t = TensorView::contiguous(b.data(), DType::Float32, Device{}, {1, H, 6, D});
      t.shape[2] = 4;
      (kv ? vs : ks).push_back(t);
    }
  PacketKey k = s.put(m, ks, vs);
  PacketHandle h = s.get(k);
  for (int l = 0; l < L; ++l) {
    TensorView v = h.value_view(l);
    const float* d = static_cast<const float*>(v.data);
    for (int hh = 0; hh < H; ++hh)
      for (int t = 0; t < 4; ++t)
        for (int e = 0; e < D; ++e)
          ASSERT_EQ(d[(hh * 4 + t) * D + e], float(l * 1000 + 100 + hh * 6 * D + t * D + e));
  }
  // dtype / layout mismatches are clear errors
  PacketMeta bad = make_meta(4, 4);
  bad.dtype = DType::Float16;
  try {
    s.put(bad, ks, vs);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Type);
    EXPECT_NE(std::string(e.what()).find("does not match the packet dtype"), std::string::npos);
  }
  PacketMeta bad2 = make_meta(4, 5);
  EXPECT_THROW(s.put(bad2, ks, vs), Error);
}

TEST(PacketStore, ExpectMismatchIsAnError) {
  PacketStore s(PacketStoreConfig{});
  PacketKey k = put_seed(s, 1, 3);
  PacketExpect x;
  x.model_fingerprint = "model-B";
  try {
    s.get(k, Tier::Host, &x);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("belongs to model 'model-A'"), std::string::npos);
  }
  PacketExpect y;
  y.dtype = DType::BFloat16;
  EXPECT_THROW(s.get(k, Tier::Host, &y), Error);
  PacketExpect z;
  z.head_dim = 16;
  EXPECT_THROW(s.get(k, Tier::Host, &z), Error);
  PacketExpect ok;
  ok.model_fingerprint = "model-A";
  ok.num_kv_heads = H;
  EXPECT_TRUE(s.get(k, Tier::Host, &ok));
  EXPECT_EQ(s.stats().pinned, 0u);  // failed gets leave no pin behind
}

TEST(PacketStore, GpuTierWithoutCudaIsAClearError) {
  PacketStoreConfig c;
  c.gpu_bytes = 1 << 20;
  if (PacketStore(PacketStoreConfig{}).gpu_enabled()) GTEST_SKIP();
  try {
    PacketStore s(c);
    // A machine with a CUDA device gets here.
    EXPECT_TRUE(s.gpu_enabled());
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("CUDA"), std::string::npos);
  }
}

// ---- tiers ----
TEST(PacketStore, LruEvictsToDiskAndPromotesOnUse) {
  TmpDir dir;
  PacketStoreConfig c;
  c.host_bytes = 3 * pkt_bytes(8);
  c.disk_path = dir.path;
  c.disk_bytes = 1 << 20;
  c.fsync = false;
  PacketStore s(c);
  std::vector<PacketKey> k;
  for (int i = 0; i < 5; ++i) k.push_back(put_seed(s, i, 8));
  auto st = s.stats();
  EXPECT_EQ(st.packets, 5u);
  EXPECT_EQ(st.packets_host, 3u);
  EXPECT_EQ(st.packets_disk, 2u);
  EXPECT_EQ(st.evictions_host, 2u);
  EXPECT_LE(st.bytes_host, c.host_bytes);
  // 0 and 1 (oldest) went to disk; getting 0 promotes it and pushes out the LRU one (2).
  PacketHandle h0 = s.get(k[0]);
  ASSERT_TRUE(h0);
  EXPECT_TRUE(payload_ok(h0, 0));
  st = s.stats();
  EXPECT_EQ(st.hits_disk, 1u);
  EXPECT_EQ(st.promotions, 1u);
  EXPECT_EQ(st.packets_host, 3u);
  PacketHandle h0b = s.get(k[0]);
  EXPECT_EQ(s.stats().hits_host, 1u);
  for (int i = 0; i < 5; ++i) {
    PacketHandle h = s.get(k[i]);
    ASSERT_TRUE(h) << i;
    EXPECT_TRUE(payload_ok(h, i)) << i;
  }
  EXPECT_EQ(s.stats().misses, 0u);
}

TEST(PacketStore, HandedOutPacketsAreNeverEvicted) {
  PacketStoreConfig c;
  c.host_bytes = 2 * pkt_bytes(8);  // no disk tier
  PacketStore s(c);
  PacketKey a = put_seed(s, 1, 8), b = put_seed(s, 2, 8);
  PacketHandle ha = s.get(a), hb = s.get(b);
  // Both slots are handed out: a third packet has nowhere to go.
  EXPECT_THROW(put_seed(s, 3, 8), Error);
  EXPECT_FALSE(s.evict(a));
  s.shrink(Tier::Host, 0);
  EXPECT_TRUE(s.contains(a) && s.contains(b));
  EXPECT_TRUE(payload_ok(ha, 1) && payload_ok(hb, 2));
  // A copy of a handle keeps the pin after the original is released.
  PacketHandle ha2 = ha;
  ha.release();
  hb.release();
  PacketKey c3 = put_seed(s, 3, 8);  // evicts b (unpinned, LRU), keeps a
  EXPECT_TRUE(s.contains(a));
  EXPECT_FALSE(s.contains(b));
  EXPECT_TRUE(s.contains(c3));
  EXPECT_TRUE(payload_ok(ha2, 1));
  EXPECT_EQ(s.stats().evictions_host, 1u);
}

TEST(PacketStore, PacketLargerThanHostGoesStraightToDisk) {
  TmpDir dir;
  PacketStoreConfig c;
  c.host_bytes = pkt_bytes(4);
  c.disk_path = dir.path;
  c.disk_bytes = 1 << 20;
  c.fsync = false;
  PacketStore s(c);
  PacketKey k = put_seed(s, 9, 16);
  EXPECT_EQ(s.stats().packets_disk, 1u);
  EXPECT_EQ(s.stats().packets_host, 0u);
  PacketHandle h = s.get(k);  // served from a private copy (does not fit the host tier)
  ASSERT_TRUE(h);
  EXPECT_TRUE(payload_ok(h, 9));
  EXPECT_EQ(s.stats().bytes_host, 0u);
}

TEST(PacketStore, DiskTierLruDeletesOldestFiles) {
  TmpDir dir;
  PacketStoreConfig c;
  c.host_bytes = 0;
  c.disk_path = dir.path;
  c.disk_bytes = 3 * (pkt_bytes(8) + 400);
  c.fsync = false;
  PacketStore s(c);
  std::vector<PacketKey> k;
  for (int i = 0; i < 6; ++i) k.push_back(put_seed(s, i, 8));
  auto st = s.stats();
  EXPECT_LE(st.bytes_disk, c.disk_bytes);
  EXPECT_GE(st.evictions_disk, 1u);
  EXPECT_TRUE(s.contains(k[5]));
  EXPECT_FALSE(s.contains(k[0]));
  EXPECT_EQ(dir.files().size(), st.packets_disk);
  uint64_t on_disk = 0;
  for (const auto& f : dir.files()) {
    struct stat sb;
    ASSERT_EQ(::stat((dir.path + "/" + f).c_str(), &sb), 0);
    on_disk += static_cast<uint64_t>(sb.st_size);
  }
  EXPECT_EQ(on_disk, st.bytes_disk);  // the disk tier accounts exact file sizes
}

// ---- disk format ----
PacketStoreConfig disk_cfg(const std::string& path) {
  PacketStoreConfig c;
  c.host_bytes = 0;  // everything on disk
  c.disk_path = path;
  c.disk_bytes = 1 << 24;
  c.fsync = true;
  return c;
}

std::string file_of(const std::string& dir, const PacketKey& k) { return dir + "/" + key_hex(k) + ".kvp"; }

void flip_byte(const std::string& path, long offset_from_end) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(0, std::ios::end);
  const long size = f.tellg();
  const long pos = offset_from_end >= 0 ? size - 1 - offset_from_end : -offset_from_end - 1;
  f.seekg(pos);
  char c;
  f.read(&c, 1);
  c ^= 0x40;
  f.seekp(pos);
  f.write(&c, 1);
}

TEST(PacketStoreDisk, ReopenRebuildsTheIndex) {
  TmpDir dir;
  std::vector<PacketKey> k;
  {
    PacketStore s(disk_cfg(dir.path));
    for (int i = 0; i < 4; ++i) k.push_back(put_seed(s, i, 3 + i));
  }
  PacketStore s(disk_cfg(dir.path));
  EXPECT_EQ(s.stats().packets, 4u);
  EXPECT_TRUE(s.messages().empty());
  for (int i = 0; i < 4; ++i) {
    auto m = s.meta(k[i]);
    ASSERT_TRUE(m.has_value());
    EXPECT_EQ(m->num_tokens, 3 + i);
    EXPECT_EQ(m->adapter_id, "adapter-1");
    PacketHandle h = s.get(k[i]);
    ASSERT_TRUE(h);
    EXPECT_TRUE(payload_ok(h, i));
  }
}

// ---- pruned packets (score-based pruning keeps some tokens; format v2) ----
PacketMeta make_pruned_meta(int64_t seed) {
  PacketMeta m = make_meta(seed, 8);  // a wrapped document of 8 tokens ...
  m.kept = {0, 2, 5, 7};              // ... of which the payload holds 4
  m.num_tokens = 4;
  m.pruning = "key_norm:0.5";
  m.position_start = 3;
  return m;
}

bool throws_value_error(const PacketMeta& m) {
  try {
    m.validate();
  } catch (const Error& e) {
    return e.kind() == ErrorKind::Value;
  }
  return false;
}

TEST(PacketStore, PrunedPacketKeyPositionsAndValidation) {
  PacketStore s(PacketStoreConfig{});
  const PacketMeta m = make_pruned_meta(2);
  auto p = make_payload(2, m);
  const PacketKey k = s.put_payload(m, p.data(), Device{});
  EXPECT_EQ(k, packet_key(m));
  EXPECT_EQ(k, packet_key(m.model_fingerprint, m.adapter_id, m.token_ids.data(), 8, "key_norm:0.5"));
  // never the key of the full packet of the same document, nor of another rule
  EXPECT_NE(k, packet_key(m.model_fingerprint, m.adapter_id, m.token_ids.data(), 8));
  EXPECT_NE(k, packet_key(m.model_fingerprint, m.adapter_id, m.token_ids.data(), 8, "key_norm:0.6"));
  // "" is exactly the unpruned key
  EXPECT_EQ(packet_key(m.model_fingerprint, m.adapter_id, m.token_ids.data(), 8, ""),
            packet_key(m.model_fingerprint, m.adapter_id, m.token_ids.data(), 8));
  PacketHandle h = s.get(k);
  ASSERT_TRUE(h);
  EXPECT_TRUE(payload_ok(h, 2));
  EXPECT_EQ(h.bytes(), pkt_bytes(4));
  EXPECT_EQ(h.meta().kept, m.kept);
  EXPECT_EQ(h.meta().position(0), 3);
  EXPECT_EQ(h.meta().position(3), 10);
  EXPECT_EQ(make_meta(1, 5).position(4), 4);

  PacketMeta bad = m;
  bad.kept = {0, 2, 2, 7};  // not strictly increasing
  EXPECT_TRUE(throws_value_error(bad));
  bad.kept = {0, 2, 5, 8};  // past the 8 token ids
  EXPECT_TRUE(throws_value_error(bad));
  bad.kept = {-1, 2, 5, 7};
  EXPECT_TRUE(throws_value_error(bad));
  bad.kept = {0, 2, 5};  // != num_tokens
  EXPECT_TRUE(throws_value_error(bad));
  bad = m;
  bad.pruning = "";  // kept without a rule
  EXPECT_TRUE(throws_value_error(bad));
  bad = make_meta(1, 5);
  bad.pruning = "key_norm:0.5";  // a rule without kept
  EXPECT_TRUE(throws_value_error(bad));
  EXPECT_THROW(s.put_payload(bad, p.data(), Device{}), Error);
  EXPECT_EQ(s.stats().packets, 1u);
}

TEST(PacketStoreDisk, PrunedPacketSurvivesReopenAndVersion1FilesAreRead) {
  TmpDir dir;
  PacketKey kp, k1;
  {
    PacketStore s(disk_cfg(dir.path));
    const PacketMeta m = make_pruned_meta(4);
    auto p = make_payload(4, m);
    kp = s.put_payload(m, p.data(), Device{});
    k1 = put_seed(s, 5, 6);
  }
  // Rewrite the unpruned packet's file as format version 1 (no pruning fields): what a store written
  // by an earlier build holds. v2 appends an empty pruning string (8-byte length) and a 0 kept count.
  const std::string path = dir.path + "/" + key_hex(k1) + ".kvp";
  std::vector<uint8_t> f;
  {
    std::ifstream in(path, std::ios::binary);
    f.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  uint32_t version, H;
  std::memcpy(&version, f.data() + 8, 4);
  std::memcpy(&H, f.data() + 12, 4);
  ASSERT_EQ(version, 2u);
  std::vector<uint8_t> zeros(16, 0);
  ASSERT_TRUE(std::equal(zeros.begin(), zeros.end(), f.begin() + (H - 4 - 16)));
  f.erase(f.begin() + (H - 4 - 16), f.begin() + (H - 4));
  const uint32_t v1 = 1, H1 = H - 16;
  std::memcpy(f.data() + 8, &v1, 4);
  std::memcpy(f.data() + 12, &H1, 4);
  const uint32_t crc = crc32c(f.data(), H1 - 4);
  std::memcpy(f.data() + H1 - 4, &crc, 4);
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(f.data()), static_cast<std::streamsize>(f.size()));
  }
  PacketStoreConfig c = disk_cfg(dir.path);
  c.verify_on_open = true;
  PacketStore s(c);
  EXPECT_TRUE(s.messages().empty());
  EXPECT_EQ(s.stats().packets, 2u);
  PacketHandle hp = s.get(kp), h1 = s.get(k1);
  ASSERT_TRUE(hp);
  ASSERT_TRUE(h1);
  EXPECT_TRUE(payload_ok(hp, 4));
  EXPECT_TRUE(payload_ok(h1, 5));
  EXPECT_EQ(hp.meta().kept, (std::vector<int64_t>{0, 2, 5, 7}));
  EXPECT_EQ(hp.meta().pruning, "key_norm:0.5");
  EXPECT_EQ(hp.meta().token_ids.size(), 8u);
  EXPECT_TRUE(h1.meta().kept.empty());
  EXPECT_TRUE(h1.meta().pruning.empty());
}

TEST(PacketStoreDisk, CorruptPayloadIsDetectedOnGetAndNeverServed) {
  TmpDir dir;
  PacketStore s(disk_cfg(dir.path));
  PacketKey a = put_seed(s, 1, 8), b = put_seed(s, 2, 8);
  flip_byte(file_of(dir.path, a), 5);  // inside the payload
  EXPECT_FALSE(s.get(a));
  auto st = s.stats();
  EXPECT_EQ(st.corrupt_files, 1u);
  EXPECT_EQ(st.misses, 1u);
  EXPECT_FALSE(s.contains(a));
  auto msgs = s.take_messages();
  ASSERT_EQ(msgs.size(), 1u);
  EXPECT_NE(msgs[0].find("payload checksum mismatch"), std::string::npos) << msgs[0];
  EXPECT_TRUE(s.take_messages().empty());
  PacketHandle hb = s.get(b);  // the store keeps serving
  ASSERT_TRUE(hb);
  EXPECT_TRUE(payload_ok(hb, 2));
}

TEST(PacketStoreDisk, VerifyOnOpenCatchesPayloadCorruption) {
  TmpDir dir;
  PacketKey a, b;
  {
    PacketStore s(disk_cfg(dir.path));
    a = put_seed(s, 1, 8);
    b = put_seed(s, 2, 8);
  }
  flip_byte(file_of(dir.path, a), 0);
  PacketStoreConfig c = disk_cfg(dir.path);
  c.verify_on_open = true;
  PacketStore s(c);
  EXPECT_EQ(s.stats().corrupt_files, 1u);
  EXPECT_FALSE(s.contains(a));
  EXPECT_TRUE(s.contains(b));
}

TEST(PacketStoreDisk, TruncatedHeaderCorruptGarbageAndTempFilesOnReopen) {
  TmpDir dir;
  PacketKey k[4];
  {
    PacketStore s(disk_cfg(dir.path));
    for (int i = 0; i < 4; ++i) k[i] = put_seed(s, i, 8);
  }
  // 0: truncated payload; 1: header byte flipped; 2: the file renamed to another key; 3: intact.
  ASSERT_EQ(::truncate(file_of(dir.path, k[0]).c_str(), 300), 0);
  flip_byte(file_of(dir.path, k[1]), -40);  // offset 39: inside the key / metadata
  PacketKey fake = k[2];
  fake[5] ^= 1;
  ASSERT_EQ(::rename(file_of(dir.path, k[2]).c_str(), file_of(dir.path, fake).c_str()), 0);
  // garbage under a packet name, an interrupted write, an unrelated file
  PacketKey junk{};
  junk[0] = 0xab;
  { std::ofstream(file_of(dir.path, junk)) << "not a packet at all, just some garbage bytes......................"; }
  { std::ofstream(dir.path + "/." + key_hex(junk) + ".tmp.1.0") << "partial"; }
  { std::ofstream(dir.path + "/README") << "hello"; }
  PacketStore s(disk_cfg(dir.path));
  auto st = s.stats();
  EXPECT_EQ(st.corrupt_files, 4u);
  EXPECT_EQ(st.packets, 1u);
  EXPECT_TRUE(s.contains(k[3]));
  PacketHandle h = s.get(k[3]);
  ASSERT_TRUE(h);
  EXPECT_TRUE(payload_ok(h, 3));
  auto msgs = s.messages();
  std::string all;
  for (auto& m : msgs) all += m + "\n";
  EXPECT_NE(all.find("truncated"), std::string::npos) << all;
  EXPECT_NE(all.find("header checksum mismatch"), std::string::npos) << all;
  EXPECT_NE(all.find("does not match its key"), std::string::npos) << all;
  EXPECT_NE(all.find("bad magic"), std::string::npos) << all;
  EXPECT_NE(all.find("incomplete temporary file"), std::string::npos) << all;
  EXPECT_NE(all.find("not a packet: "), std::string::npos) << all;
  // corrupt files and the temp file are gone; the unrelated file is left alone
  auto files = dir.files();
  EXPECT_EQ(files.size(), 2u);
}

TEST(PacketStoreDisk, FileTruncatedWhileOpenIsDroppedOnGet) {
  TmpDir dir;
  PacketStore s(disk_cfg(dir.path));
  PacketKey a = put_seed(s, 1, 8);
  ASSERT_EQ(::truncate(file_of(dir.path, a).c_str(), 100), 0);
  EXPECT_FALSE(s.get(a));
  EXPECT_EQ(s.stats().corrupt_files, 1u);
  EXPECT_FALSE(s.contains(a));
}

TEST(PacketStoreDisk, DiskFullIsReportedAndTheStoreKeepsServing) {
  TmpDir dir;
  PacketStore s(disk_cfg(dir.path));
  PacketKey small = put_seed(s, 1, 2);
  // Limit the size of any file this process writes: a real write error (EFBIG), like a full disk.
  struct rlimit old;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = 2048;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &lim), 0);
  bool threw = false;
  try {
    put_seed(s, 2, 64);  // ~8 KB: fails half-way
  } catch (const Error& e) {
    threw = true;
    EXPECT_EQ(e.kind(), ErrorKind::Runtime);
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_TRUE(threw);
  auto st = s.stats();
  EXPECT_EQ(st.io_errors, 1u);
  EXPECT_EQ(st.packets, 1u);
  auto msgs = s.messages();
  ASSERT_FALSE(msgs.empty());
  EXPECT_NE(msgs.back().find("disk write failed"), std::string::npos) << msgs.back();
  EXPECT_EQ(dir.files().size(), 1u);  // no partial file left behind
  PacketHandle h = s.get(small);
  ASSERT_TRUE(h);
  EXPECT_TRUE(payload_ok(h, 1));
  PacketKey later = put_seed(s, 3, 64);  // space is back: works again
  EXPECT_TRUE(s.get(later));
}

// ---- concurrency ----
TEST(PacketStore, ConcurrentPutGetEvictStress) {
  TmpDir dir;
  PacketStoreConfig c;
  c.host_bytes = 6 * pkt_bytes(8);
  c.disk_path = dir.path;
  c.disk_bytes = 12 * (pkt_bytes(8) + 400);
  c.fsync = false;
  PacketStore s(c);
  constexpr int kThreads = 8, kOps = 400, kSeeds = 24;
  std::atomic<int> bad{0}, served{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::vector<PacketHandle> held;
      for (int op = 0; op < kOps; ++op) {
        const int seed = static_cast<int>(rng() % kSeeds);
        const int what = static_cast<int>(rng() % 10);
        PacketMeta m = make_meta(seed, 8);
        const PacketKey k = packet_key(m.model_fingerprint, m.adapter_id, m.token_ids.data(), 8);
        try {
          if (what < 4) {
            put_seed(s, seed, 8);
          } else if (what < 8) {
            PacketHandle h = s.get(k);
            if (h) {
              ++served;
              if (!payload_ok(h, seed)) ++bad;
              if (held.size() < 2 && rng() % 4 == 0) held.push_back(h);
            }
          } else if (what < 9) {
            s.evict(k);
          } else if (!held.empty()) {
            const int64_t hs = held.back().meta().token_ids[0] / 1000;
            if (!payload_ok(held.back(), hs)) ++bad;
            held.pop_back();
          }
        } catch (const Error& e) {
          // Allowed only when every slot is held by other threads' handles.
          if (std::string(e.what()).find("no tier has room") == std::string::npos) ++bad;
        }
      }
      for (auto& h : held) {
        if (!payload_ok(h, h.meta().token_ids[0] / 1000)) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(served.load(), 100);
  auto st = s.stats();
  EXPECT_EQ(st.pinned, 0u);
  EXPECT_LE(st.bytes_host, c.host_bytes);
  EXPECT_LE(st.bytes_disk, c.disk_bytes);
  EXPECT_EQ(st.packets_disk, dir.files().size());
  EXPECT_EQ(st.corrupt_files, 0u);
  // The index agrees with the files: a fresh store over the directory serves every packet on it.
  PacketStoreConfig c2 = c;
  c2.verify_on_open = true;
  PacketStore s2(c2);
  EXPECT_EQ(s2.stats().corrupt_files, 0u);
  EXPECT_EQ(s2.stats().packets, st.packets_disk);
}

// 8 threads x 10,000 mixed operations on one store (put, get + verify, hold/release, evict, contains,
// meta, shrink), then exact accounting: every call is counted once in the store's counters, nothing is
// left pinned, the capacities hold, and a verifying reopen of the directory agrees with the index.
// Also the workload of the ThreadSanitizer run (tests/hardening.sh).
TEST(PacketStore, EightThreadsTenThousandOpsExactAccounting) {
  TmpDir dir;
  PacketStoreConfig c;
  c.host_bytes = 10 * pkt_bytes(4);
  c.disk_path = dir.path;
  c.disk_bytes = 20 * (pkt_bytes(4) + 400);
  c.fsync = false;
  PacketStore s(c);
  constexpr int kThreads = 8, kOps = 10000, kSeeds = 40;
  std::atomic<uint64_t> puts{0}, gets{0}, hits{0}, misses{0}, bad{0}, full{0}, evicted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(1000 + t);
      std::vector<std::pair<PacketHandle, int64_t>> held;
      for (int op = 0; op < kOps; ++op) {
        const int64_t seed = static_cast<int64_t>(rng() % kSeeds);
        const int what = static_cast<int>(rng() % 100);
        PacketMeta m = make_meta(seed, 4);
        const PacketKey k = packet_key(m.model_fingerprint, m.adapter_id, m.token_ids.data(), 4);
        try {
          if (what < 35) {
            ++puts;  // counted before the call: a failed put is counted as "full" below instead
            put_seed(s, seed, 4);
          } else if (what < 75) {
            ++gets;
            PacketHandle h = s.get(k);
            if (h) {
              ++hits;
              if (!payload_ok(h, seed) || h.meta().token_ids[0] != seed * 1000) ++bad;
              if (held.size() < 3 && rng() % 3 == 0) held.emplace_back(h, seed);
            } else {
              ++misses;
            }
          } else if (what < 85) {
            if (s.evict(k)) ++evicted;
          } else if (what < 92) {
            const bool has = s.contains(k);
            const auto meta = s.meta(k);
            if (meta && meta->token_ids[0] != seed * 1000) ++bad;
            (void)has;
          } else if (what < 94) {
            s.shrink(Tier::Host, c.host_bytes / 2);
          } else if (!held.empty()) {
            if (!payload_ok(held.back().first, held.back().second)) ++bad;
            held.pop_back();
          }
        } catch (const Error& e) {
          if (std::string(e.what()).find("no memory tier has room") == std::string::npos &&
              std::string(e.what()).find("no tier has room") == std::string::npos)
            ++bad;
          else
            ++full, --puts;
        }
      }
      for (auto& [h, seed] : held)
        if (!payload_ok(h, seed)) ++bad;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0u);
  const auto st = s.stats();
  EXPECT_EQ(st.puts + st.duplicate_puts, puts.load());
  EXPECT_EQ(st.hits, hits.load());
  EXPECT_EQ(st.misses, misses.load());
  EXPECT_EQ(st.hits + st.misses, gets.load());
  EXPECT_EQ(st.hits_gpu + st.hits_host + st.hits_disk, st.hits);
  EXPECT_EQ(st.pinned, 0u);
  EXPECT_EQ(st.packets, s.keys().size());
  EXPECT_LE(st.bytes_host, c.host_bytes);
  EXPECT_LE(st.bytes_disk, c.disk_bytes);
  EXPECT_EQ(st.corrupt_files, 0u);
  EXPECT_EQ(st.io_errors, 0u);
  EXPECT_GT(st.hits, 1000u);
  EXPECT_GT(evicted.load(), 100u);
  EXPECT_EQ(st.packets_disk, dir.files().size());
  PacketStoreConfig c2 = c;
  c2.verify_on_open = true;
  PacketStore s2(c2);
  EXPECT_EQ(s2.stats().corrupt_files, 0u);
  EXPECT_EQ(s2.stats().packets, st.packets_disk);
  for (const auto& k : s2.keys()) {
    PacketHandle h = s2.get(k);
    ASSERT_TRUE(h);
    EXPECT_TRUE(payload_ok(h, h.meta().token_ids[0] / 1000));
  }
}

}  // namespace
