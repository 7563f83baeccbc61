/* Uses the scrimp core from plain C (scrimp/scrimp.h): a packet store on disk (put,
 * get back byte for byte after a reopen, a miss, a refused argument with its message) and fused token
 * scoring. Prints what it did; exits 1 on any mismatch.
 *   scrimp_c_test [DIR]     (DIR: the packet directory; default: a new directory under /tmp) */
#include <scrimp/scrimp.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failures = 0;

static void check(int ok, const char* what) {
  if (!ok) {
    ++failures;
    printf("MISMATCH: %s\n", what);
  }
}

enum { LAYERS = 2, HEADS = 2, HEAD_DIM = 8, TOKENS = 5, PACKETS = 3 };
#define PAYLOAD_FLOATS (LAYERS * 2 * HEADS * TOKENS * HEAD_DIM)

static void fill_packet(int id, scrimp_packet_meta* meta, int64_t* ids, float* inv_freq, float* payload) {
  memset(meta, 0, sizeof(*meta));
  for (int t = 0; t < TOKENS; ++t) ids[t] = 100 * id + t;
  for (int i = 0; i < HEAD_DIM / 2; ++i) inv_freq[i] = powf(10000.0f, -2.0f * i / HEAD_DIM);
  for (int i = 0; i < PAYLOAD_FLOATS; ++i) payload[i] = (float)(id * PAYLOAD_FLOATS + i) * 0.25f - 3.0f;
  meta->model_fingerprint = "c-example-model";
  meta->dtype = SCRIMP_FLOAT32;
  meta->num_layers = LAYERS;
  meta->num_kv_heads = HEADS;
  meta->head_dim = HEAD_DIM;
  meta->num_tokens = TOKENS;
  meta->token_ids = ids;
  meta->num_token_ids = TOKENS;
  meta->inv_freq = inv_freq;
  meta->num_inv_freq = HEAD_DIM / 2;
}

static int run_store(const char* dir) {
  scrimp_packet_store_config cfg;
  scrimp_packet_store_config_init(&cfg);
  cfg.disk_path = dir;
  cfg.host_bytes = 0; /* every packet goes straight to its file (a memory tier is a cache: what only
                         it holds is gone when the store is closed) */
  cfg.disk_bytes = 1 << 20;
  scrimp_packet_store* store = NULL;
  if (scrimp_packet_store_open(&cfg, &store) != SCRIMP_OK) {
    printf("open failed: %s\n", scrimp_last_error());
    return 1;
  }
  uint8_t keys[PACKETS][SCRIMP_KEY_BYTES];
  scrimp_packet_meta meta;
  int64_t ids[TOKENS];
  float inv_freq[HEAD_DIM / 2], payload[PAYLOAD_FLOATS], back[PAYLOAD_FLOATS];
  for (int p = 0; p < PACKETS; ++p) {
    fill_packet(p, &meta, ids, inv_freq, payload);
    check(scrimp_packet_put(store, &meta, payload, sizeof(payload), keys[p]) == SCRIMP_OK, "put");
  }
  char hex[2 * SCRIMP_KEY_BYTES + 1];
  scrimp_packet_key_hex(keys[0], hex);
  scrimp_packet_store_stats st;
  scrimp_packet_store_get_stats(store, &st);
  printf("C ABI (scrimp %s): put %llu packets (%llu on disk in %s); first key %.16s...\n", scrimp_version(),
         (unsigned long long)st.puts, (unsigned long long)st.packets_disk, dir, hex);
  check(st.puts == PACKETS && st.packets_disk == PACKETS, "every packet on disk");

  /* a refused argument: status and message, nothing stored */
  fill_packet(9, &meta, ids, inv_freq, payload);
  meta.num_layers = 0;
  const scrimp_status bad = scrimp_packet_put(store, &meta, payload, sizeof(payload), NULL);
  printf("refused as expected (status %d): %s\n", (int)bad, scrimp_last_error());
  check(bad == SCRIMP_ERROR_VALUE && strstr(scrimp_last_error(), "num_layers=0") != NULL, "bad layout refused");
  meta.num_layers = LAYERS;
  check(scrimp_packet_put(store, &meta, payload, sizeof(payload) - 4, NULL) == SCRIMP_ERROR_VALUE,
        "wrong payload size refused");
  scrimp_packet_store_close(store);

  /* reopen: every packet back byte for byte; a miss is SCRIMP_NOT_FOUND */
  cfg.verify_on_open = 1;
  check(scrimp_packet_store_open(&cfg, &store) == SCRIMP_OK, "reopen");
  int verified = 0;
  for (int p = 0; p < PACKETS; ++p) {
    uint64_t n = 0;
    fill_packet(p, &meta, ids, inv_freq, payload);
    if (scrimp_packet_get(store, keys[p], back, sizeof(back), &n) == SCRIMP_OK && n == sizeof(payload) &&
        memcmp(back, payload, sizeof(payload)) == 0)
      ++verified;
  }
  uint8_t missing[SCRIMP_KEY_BYTES] = {0};
  const scrimp_status miss = scrimp_packet_get(store, missing, back, sizeof(back), NULL);
  uint64_t need = 0;
  const scrimp_status small = scrimp_packet_get(store, keys[1], back, 16, &need);
  printf("reopened: %d of %d packets verified; unknown key -> status %d; 16-byte buffer -> status %d (needs %llu)\n",
         verified, PACKETS, (int)miss, (int)small, (unsigned long long)need);
  check(verified == PACKETS, "packets survive a reopen");
  check(miss == SCRIMP_NOT_FOUND, "a miss is SCRIMP_NOT_FOUND");
  check(small == SCRIMP_ERROR_VALUE && need == sizeof(payload), "a short buffer is refused with the size needed");
  check(scrimp_packet_evict(store, keys[2]) == SCRIMP_OK && scrimp_packet_contains(store, keys[2]) == SCRIMP_NOT_FOUND,
        "evict");
  scrimp_packet_store_close(store);
  return 0;
}

static void run_scoring(void) {
  float student[2 * 4] = {0, 0, 0, 0, 1, 2, 3, 4};
  float teacher[2 * 4] = {0, 0, 0, 0, 4, 3, 2, 1};
  int64_t targets[2] = {1, 3};
  float entropy[2], kl[2], logp[2];
  scrimp_token_scores_args a;
  memset(&a, 0, sizeof(a));
  a.student = student;
  a.teacher = teacher;
  a.dtype = SCRIMP_FLOAT32;
  a.rows = 2;
  a.vocab = 4;
  a.targets = targets;
  a.temperature = 1.0f;
  a.student_entropy = entropy;
  a.kl_reverse = kl;
  a.student_logprob = logp;
  check(scrimp_token_scores(&a) == SCRIMP_OK, "token_scores");
  printf("token scores: H = %.6f %.6f, KL(S||T) = %.6f %.6f, log p(target) = %.6f %.6f\n", entropy[0], entropy[1],
         kl[0], kl[1], logp[0], logp[1]);
  check(fabsf(entropy[0] - logf(4.0f)) < 1e-5f && fabsf(kl[0]) < 1e-6f && fabsf(logp[0] + logf(4.0f)) < 1e-5f,
        "row 0 is uniform");
  a.temperature = 0.0f;
  check(scrimp_token_scores(&a) == SCRIMP_ERROR_VALUE && strstr(scrimp_last_error(), "temperature") != NULL,
        "temperature 0 is refused");
}

int main(int argc, char** argv) {
  char tmpl[] = "/tmp/scrimp-c-XXXXXX";
  const char* dir = argc > 1 ? argv[1] : mkdtemp(tmpl);
  if (dir == NULL) {
    perror("mkdtemp");
    return 2;
  }
  if (run_store(dir) != 0) return 2;
  run_scoring();
  if (argc <= 1) { /* remove what this run created */
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0) printf("could not remove %s\n", dir);
  }
  printf(failures == 0 ? "all checks passed\n" : "checks FAILED\n");
  return failures == 0 ? 0 : 1;
}
