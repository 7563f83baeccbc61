// Replays every input of the packet-file fuzz corpus and its regressions (fuzz/corpus/packet_file,
// fuzz/regressions/packet_file) through the fuzz target's check: each must be rejected cleanly or
// accepted consistently. The seeds must be accepted (they are real files written by the store).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>

#include "packet_file_check.h"
#include "scrimp/error.h"

namespace fs = std::filesystem;

namespace {
std::vector<uint8_t> read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}
}  // namespace

TEST(FuzzRegressions, PacketFileCorpusReplays) {
  int seeds = 0, files = 0;
  for (const char* sub : {"corpus/packet_file", "regressions/packet_file"}) {
    const fs::path dir = fs::path(SCRIMP_SOURCE_DIR) / "fuzz" / sub;
    if (!fs::exists(dir)) continue;
    for (const auto& e : fs::directory_iterator(dir)) {
      const auto bytes = read_file(e.path());
      const bool ok = scrimp_fuzz::check_packet_file_bytes(bytes.data(), bytes.size());
      if (e.path().filename().string().rfind("seed-", 0) == 0) {
        EXPECT_TRUE(ok) << e.path() << " is a seed written by the store and must parse";
        ++seeds;
      }
      ++files;
    }
  }
  EXPECT_GE(seeds, 3);
  EXPECT_GE(files, seeds);
}

TEST(FuzzRegressions, OverflowingLayoutIsRejected) {
  // A layout whose payload_bytes() would wrap around 2^64 when multiplied out (files are untrusted).
  scrimp::PacketMeta m;
  m.model_fingerprint = "fp";
  m.num_layers = 1 << 30;
  m.num_kv_heads = 1 << 30;
  m.head_dim = 1 << 30;
  m.num_tokens = 1;
  m.token_ids = {1};
  EXPECT_THROW(m.validate(), scrimp::Error);
}
