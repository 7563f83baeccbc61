// A small server-side program that embeds the scrimp C++ core without Python, as an inference server
// would: a KV packet store with host and disk tiers written by several threads, reopened from its
// directory and verified byte for byte, a corrupted file detected; a clustered KV page cache built,
// queried and recalled over random keys; token scores of a few rows. It prints what it did and exits
// non-zero on any mismatch (1) or any scrimp::Error (2).
//   embed_server [DIR]     (DIR: the packet directory, kept; default: a new directory under /tmp,
//                           removed at exit)
#include <scrimp/build_info.h>
#include <scrimp/clustered_cache.h>
#include <scrimp/error.h>
#include <scrimp/packet_store.h>
#include <scrimp/scoring.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("MISMATCH: %s\n", what.c_str());
  }
}

// ---- packet store ----------------------------------------------------------------------------------

constexpr int kLayers = 2, kHeads = 2, kHeadDim = 16, kTokens = 24;
constexpr int kThreads = 4, kPacketsPerThread = 8;

scrimp::PacketMeta packet_meta(int id) {
  scrimp::PacketMeta m;
  m.model_fingerprint = "embed-example-model";
  m.dtype = scrimp::DType::Float32;
  m.num_layers = kLayers;
  m.num_kv_heads = kHeads;
  m.head_dim = kHeadDim;
  m.num_tokens = kTokens;
  m.position_start = 0;
  for (int t = 0; t < kTokens; ++t) m.token_ids.push_back(1000 * id + t);
  for (int i = 0; i < kHeadDim / 2; ++i) m.inv_freq.push_back(std::pow(10000.0f, -2.0f * i / kHeadDim));
  return m;
}

// The payload of packet `id`: [layers][K, V][heads][tokens][head_dim] floats.
std::vector<float> packet_payload(int id) {
  std::mt19937 rng(static_cast<uint32_t>(id) * 7919u + 1u);
  std::normal_distribution<float> nd;
  std::vector<float> p(static_cast<std::size_t>(kLayers) * 2 * kHeads * kTokens * kHeadDim);
  for (float& x : p) x = nd(rng);
  return p;
}

bool same_bytes(const scrimp::PacketHandle& h, const std::vector<float>& want) {
  return h && h.bytes() == want.size() * sizeof(float) && std::memcmp(h.data(), want.data(), h.bytes()) == 0;
}

void run_packet_store(const std::string& dir) {
  const int n = kThreads * kPacketsPerThread;
  const uint64_t packet_bytes = packet_payload(0).size() * sizeof(float);
  scrimp::PacketStoreConfig cfg;
  cfg.disk_path = dir;
  cfg.host_bytes = packet_bytes * (n / 4);  // a quarter fits in memory: the rest lives on disk
  cfg.disk_bytes = packet_bytes * (2 * n);
  std::map<int, scrimp::PacketKey> keys;
  {
    scrimp::PacketStore store(cfg);
    std::mutex mu;
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, t] {
        for (int i = 0; i < kPacketsPerThread; ++i) {
          const int id = t * kPacketsPerThread + i;
          const std::vector<float> payload = packet_payload(id);
          const scrimp::PacketKey key = store.put_payload(packet_meta(id), payload.data(), scrimp::Device{});
          std::lock_guard<std::mutex> lock(mu);
          keys[id] = key;
        }
      });
    for (std::thread& th : threads) th.join();
    const scrimp::PacketStoreStats st = store.stats();
    std::printf("packet store: %d threads put %llu packets (%llu in host memory, %llu on disk) in %s\n", kThreads,
                (unsigned long long)st.puts, (unsigned long long)st.packets_host, (unsigned long long)st.packets_disk,
                dir.c_str());
    check(st.puts == static_cast<uint64_t>(n), "every put stored a new packet");
    check(st.packets_disk > 0 && st.packets_host > 0, "both tiers hold packets");
    for (const auto& kv : keys)
      check(same_bytes(store.get(kv.second), packet_payload(kv.first)), "packet " + std::to_string(kv.first) + " read back");
    // Before shutdown: move what only host memory holds to disk (a memory tier is a cache; closing the
    // store drops it).
    store.shrink(scrimp::Tier::Host, 0);
    std::printf("flushed the host tier to disk: %llu packets on disk\n",
                (unsigned long long)store.stats().packets_disk);
  }

  {  // reopen the directory: every packet comes back verified
    scrimp::PacketStoreConfig again = cfg;
    again.verify_on_open = true;
    scrimp::PacketStore store(again);
    int verified = 0;
    for (const auto& kv : keys) verified += same_bytes(store.get(kv.second), packet_payload(kv.first));
    std::printf("reopened %s: %d of %d packets verified byte for byte\n", dir.c_str(), verified, n);
    check(verified == n, "every packet survives a reopen");
    check(store.stats().corrupt_files == 0, "no corrupt file after a clean reopen");
  }

  // corrupt one payload byte of packet 5's file: the store drops it as a miss and says so
  const std::string victim = dir + "/" + scrimp::key_hex(keys[5]) + ".kvp";
  {
    std::fstream f(victim, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-7, std::ios::end);
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x5a);
    f.seekp(-7, std::ios::end);
    f.write(&c, 1);
    check(static_cast<bool>(f), "corrupting " + victim);
  }
  scrimp::PacketStore store(cfg);
  const scrimp::PacketHandle bad = store.get(keys[5]);
  int intact = 0;
  for (const auto& kv : keys)
    if (kv.first != 5) intact += same_bytes(store.get(kv.second), packet_payload(kv.first));
  const uint64_t corrupt = store.stats().corrupt_files;
  std::printf("corrupted one byte of %s: get -> %s, corrupt files counted %llu, %d other packets intact\n",
              victim.c_str(), bad ? "a packet (wrong)" : "a miss", (unsigned long long)corrupt, intact);
  for (const std::string& m : store.take_messages()) std::printf("  store says: %s\n", m.c_str());
  check(!bad, "a corrupted packet is a miss");
  check(corrupt == 1, "the corrupted file is counted");
  check(intact == n - 1, "the other packets are untouched");
}

// ---- clustered page cache ----------------------------------------------------------------------------

void run_clustered_cache() {
  const int64_t B = 1, H = 2, G = 2, D = 32, ps = 8, N = 256, k = 6;
  const int64_t S = B * H;
  scrimp::ClusteredCacheConfig cfg;
  cfg.batch = B;
  cfg.kv_heads = H;
  cfg.q_heads = H * G;
  cfg.head_dim = D;
  cfg.page_size = ps;
  cfg.max_pages = N / ps + 4;
  cfg.cache_pages = k;
  cfg.pin_memory = false;
  scrimp::ClusteredCache cache(cfg);

  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  std::vector<float> keys(B * H * N * D), values(keys.size()), query(B * H * G * D);
  for (float& x : keys) x = nd(rng);
  for (float& x : values) x = nd(rng);
  for (float& x : query) x = nd(rng);
  std::vector<int64_t> positions(N);
  for (int64_t i = 0; i < N; ++i) positions[i] = 100 + i;
  cache.build(scrimp::TensorView::contiguous(keys.data(), scrimp::DType::Float32, {}, {B, H, N, D}),
              scrimp::TensorView::contiguous(values.data(), scrimp::DType::Float32, {}, {B, H, N, D}), positions);

  // every token sits in exactly one page
  const int64_t P = cache.num_pages();
  std::vector<int32_t> all(S * P);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t p = 0; p < P; ++p) all[s * P + p] = p < cache.num_pages(s) ? static_cast<int32_t>(p) : -1;
  std::vector<int64_t> where(S * P * ps);
  cache.page_positions(all, P, where);
  for (int64_t s = 0; s < S; ++s) {
    std::multiset<int64_t> seen;
    for (int64_t i = 0; i < P * ps; ++i)
      if (where[s * P * ps + i] >= 0) seen.insert(where[s * P * ps + i]);
    bool each_once = seen.size() == static_cast<std::size_t>(N);
    for (int64_t i = 0; i < N && each_once; ++i) each_once = seen.count(100 + i) == 1;
    check(each_once, "stream " + std::to_string(s) + ": every token in exactly one page");
  }

  // select k pages per stream, recall them into a CPU page store, compare with the host pool
  std::vector<int32_t> pages(S * k), slots(S * k), lens(S * k);
  std::vector<float> scores(S * k);
  const scrimp::TensorView q = scrimp::TensorView::contiguous(query.data(), scrimp::DType::Float32, {}, {B, H * G, D});
  cache.select(q, k, pages, scores);
  std::vector<float> k_store(S * k * ps * D), v_store(k_store.size());
  const auto ks = scrimp::TensorView::contiguous(k_store.data(), scrimp::DType::Float32, {}, {S * k, ps, D});
  const auto vs = scrimp::TensorView::contiguous(v_store.data(), scrimp::DType::Float32, {}, {S * k, ps, D});
  cache.recall(pages, k, ks, vs, slots, lens);
  std::vector<float> pk(ps * D), pv(ps * D);
  int matched = 0;
  for (int64_t s = 0; s < S; ++s) {
    std::set<int32_t> distinct(pages.begin() + s * k, pages.begin() + (s + 1) * k);
    check(distinct.size() == static_cast<std::size_t>(k) && *distinct.begin() >= 0, "k distinct pages selected");
    for (int64_t i = 0; i + 1 < k; ++i) check(scores[s * k + i] >= scores[s * k + i + 1], "scores in descending order");
    for (int64_t i = 0; i < k; ++i) {
      const int64_t n = cache.read_page(s, pages[s * k + i], pk, pv);
      const float* kr = k_store.data() + slots[s * k + i] * ps * D;
      const float* vr = v_store.data() + slots[s * k + i] * ps * D;
      const bool same = n == lens[s * k + i] && std::memcmp(kr, pk.data(), n * D * sizeof(float)) == 0 &&
                        std::memcmp(vr, pv.data(), n * D * sizeof(float)) == 0;
      matched += same;
      check(same, "recalled page equals the host pool's page");
    }
  }
  cache.recall(pages, k, ks, vs, slots, lens);  // the same pages again: all hits
  const scrimp::ClusteredCacheStats st = cache.stats();
  std::printf("clustered cache: %lld tokens x %lld streams in %lld pages of %lld; selected %lld pages per stream, "
              "%d recalled pages equal the host pool, second recall %lld hits / %lld misses\n",
              (long long)N, (long long)S, (long long)P, (long long)ps, (long long)k, matched, (long long)st.hits,
              (long long)st.misses);
  check(st.misses == S * k && st.hits == S * k, "first recall misses, second recall hits");

  // a wrong-sized buffer is refused with a clear error, not written
  try {
    std::vector<int32_t> too_few(S * k - 1);
    cache.select(q, k, too_few);
    check(false, "a short out_pages buffer is refused");
  } catch (const scrimp::Error& e) {
    std::printf("refused as expected: %s\n", e.what());
  }
}

// ---- token scoring ---------------------------------------------------------------------------------

void run_scoring() {
  const int64_t rows = 3, vocab = 5;
  std::vector<float> student = {0, 0, 0, 0, 0, 1, 2, 3, 4, 5, -INFINITY, 0, 0, -INFINITY, 0};
  std::vector<float> teacher = {0, 0, 0, 0, 0, 5, 4, 3, 2, 1, -INFINITY, 1, 0, -INFINITY, 0};
  std::vector<float> entropy(rows), kl(rows);
  scrimp::TokenScoresArgs args;
  args.student = scrimp::TensorView::contiguous(student.data(), scrimp::DType::Float32, {}, {rows, vocab});
  const scrimp::TensorView t = scrimp::TensorView::contiguous(teacher.data(), scrimp::DType::Float32, {}, {rows, vocab});
  args.teacher = &t;
  args.student_entropy = entropy;
  args.kl_reverse = kl;
  scrimp::token_scores(args);
  for (int64_t r = 0; r < rows; ++r)
    std::printf("token scores row %lld: H(S) = %.6f  KL(S||T) = %.6f\n", (long long)r, entropy[r], kl[r]);
  check(std::fabs(entropy[0] - std::log(5.0f)) < 1e-5f && std::fabs(kl[0]) < 1e-6f, "row 0 is uniform: H = log 5, KL = 0");
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  bool made_dir = false;
  if (argc > 1) {
    dir = argv[1];
  } else {
    char tmpl[] = "/tmp/scrimp-embed-XXXXXX";
    if (!mkdtemp(tmpl)) {
      std::perror("mkdtemp");
      return 2;
    }
    dir = tmpl;
    made_dir = true;
  }
  const scrimp::BuildInfo info = scrimp::build_info();
  std::printf("scrimp %s (cpu path %s, cuda compiled %d, cuda usable %d)\n", info.version.c_str(),
              info.cpu_simd.c_str(), int(info.cuda_compiled), int(info.cuda_device_usable));
  try {
    run_packet_store(dir);
    run_clustered_cache();
    run_scoring();
  } catch (const scrimp::Error& e) {
    std::printf("scrimp error: %s\n", e.what());
    failures = -1;
  }
  if (made_dir) std::filesystem::remove_all(dir);
  if (failures < 0) return 2;
  std::printf(failures == 0 ? "all checks passed\n" : "%d checks FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
