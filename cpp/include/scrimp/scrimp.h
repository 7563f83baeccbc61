/* The plain C ABI of the scrimp core, for servers written in C, Rust, Go...: the KV packet store and
 * fused token scoring behind opaque handles. Every function returns a scrimp_status; on failure
 * scrimp_last_error() gives the message (the same text the C++ API and Python raise), valid until
 * the next call on the same thread. No function aborts or throws across the ABI.
 *
 *   scrimp_packet_store* store;
 *   scrimp_packet_store_config cfg;
 *   scrimp_packet_store_config_init(&cfg);
 *   cfg.disk_path = "/var/cache/kv";
 *   if (scrimp_packet_store_open(&cfg, &store) != SCRIMP_OK) fprintf(stderr, "%s\n", scrimp_last_error());
 *
 * Link scrimp::scrimp (find_package(scrimp)); the library needs no Python. Host memory only. */
#ifndef SCRIMP_SCRIMP_H_
#define SCRIMP_SCRIMP_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum scrimp_status {
  SCRIMP_OK = 0,
  SCRIMP_ERROR_VALUE = 1,   /* bad argument value or shape (Python: ValueError) */
  SCRIMP_ERROR_TYPE = 2,    /* bad dtype or kind (Python: TypeError) */
  SCRIMP_ERROR_RUNTIME = 3, /* I/O, memory or device failure (Python: RuntimeError) */
  SCRIMP_NOT_FOUND = 4      /* a packet store miss: a result, not an error (no message) */
} scrimp_status;

/* Element types (the values of scrimp::DType). */
typedef enum scrimp_dtype { SCRIMP_FLOAT32 = 0, SCRIMP_FLOAT16 = 1, SCRIMP_BFLOAT16 = 2 } scrimp_dtype;

/* The error message of the last call made on this thread ("" when it succeeded). */
const char* scrimp_last_error(void);
/* The library version, e.g. "0.1.0". */
const char* scrimp_version(void);

/* ---- KV packet store ----------------------------------------------------------------------------- */
#define SCRIMP_KEY_BYTES 32

typedef struct scrimp_packet_store scrimp_packet_store; /* opaque */

typedef struct scrimp_packet_store_config {
  const char* disk_path;  /* NULL or "": no disk tier */
  uint64_t host_bytes;    /* host tier capacity */
  uint64_t disk_bytes;    /* disk tier capacity (with disk_path) */
  int fsync;              /* nonzero: fsync files and the directory when writing */
  int verify_on_open;     /* nonzero: check payload checksums when reopening a directory */
} scrimp_packet_store_config;

/* Defaults: no disk tier, 1 GiB host tier, fsync on, no verification on open. */
void scrimp_packet_store_config_init(scrimp_packet_store_config* config);
scrimp_status scrimp_packet_store_open(const scrimp_packet_store_config* config, scrimp_packet_store** out);
/* Closes the store (NULL is ignored). Packets on disk stay for the next open. */
void scrimp_packet_store_close(scrimp_packet_store* store);

/* What a packet holds: the payload is [num_layers][2 (K, V)][num_kv_heads][num_tokens][head_dim]
 * elements of dtype; the key is SHA-256 over (model_fingerprint, adapter_id, token_ids). */
typedef struct scrimp_packet_meta {
  const char* model_fingerprint; /* required */
  const char* adapter_id;        /* NULL or "": none */
  scrimp_dtype dtype;
  int32_t num_layers, num_kv_heads, head_dim;
  int64_t num_tokens;
  int64_t position_start;        /* the keys were rotated for positions start .. start + num_tokens - 1 */
  const int64_t* token_ids;      /* [num_token_ids] (== num_tokens) */
  int64_t num_token_ids;
  const float* inv_freq;         /* [num_inv_freq] rotary frequencies, num_inv_freq <= head_dim / 2 */
  int64_t num_inv_freq;
  int rope_interleaved;          /* 0: rotate_half pairs (HF), nonzero: GPT-J interleaved pairs */
} scrimp_packet_meta;

/* Stores a packet (a packet already stored under the same key is kept) and writes its key. */
scrimp_status scrimp_packet_put(scrimp_packet_store* store, const scrimp_packet_meta* meta, const void* payload,
                                uint64_t payload_bytes, uint8_t key_out[SCRIMP_KEY_BYTES]);
/* Copies a packet's payload into dst (dst_bytes >= its size) and writes its size to *payload_bytes
 * (may be NULL). SCRIMP_NOT_FOUND on a miss (a corrupt file is dropped and counted as one); a too
 * small dst is SCRIMP_ERROR_VALUE with *payload_bytes set, so a caller can size a buffer. */
scrimp_status scrimp_packet_get(scrimp_packet_store* store, const uint8_t key[SCRIMP_KEY_BYTES], void* dst,
                                uint64_t dst_bytes, uint64_t* payload_bytes);
/* SCRIMP_OK when the store holds the key, SCRIMP_NOT_FOUND otherwise. */
scrimp_status scrimp_packet_contains(scrimp_packet_store* store, const uint8_t key[SCRIMP_KEY_BYTES]);
/* Removes a packet from every tier (and its file). SCRIMP_NOT_FOUND when absent or handed out. */
scrimp_status scrimp_packet_evict(scrimp_packet_store* store, const uint8_t key[SCRIMP_KEY_BYTES]);
/* The key as 64 lowercase hex digits and a terminating NUL. */
scrimp_status scrimp_packet_key_hex(const uint8_t key[SCRIMP_KEY_BYTES], char out[2 * SCRIMP_KEY_BYTES + 1]);

typedef struct scrimp_packet_store_stats {
  uint64_t packets, packets_host, packets_disk;
  uint64_t hits, misses, puts, duplicate_puts;
  uint64_t bytes_host, bytes_disk;
  uint64_t corrupt_files, io_errors;
} scrimp_packet_store_stats;
scrimp_status scrimp_packet_store_get_stats(scrimp_packet_store* store, scrimp_packet_store_stats* out);

/* ---- fused token scoring (CPU) ------------------------------------------------------------------- */
/* Per-row entropies, KL divergences and target log-probabilities of softmax(logits / T) over
 * contiguous host logits [rows, vocab] (scrimp/scoring.h has the definitions). Outputs are float
 * [rows] or NULL; teacher outputs need teacher logits, log-probabilities need targets. */
typedef struct scrimp_token_scores_args {
  const void* student;       /* [rows, vocab] */
  const void* teacher;       /* NULL or [rows, vocab], same dtype */
  scrimp_dtype dtype;
  int64_t rows, vocab;
  const int64_t* targets;    /* NULL or [rows], values in [0, vocab) */
  float temperature;         /* > 0 */
  float* student_entropy;
  float* teacher_entropy;
  float* kl_forward;         /* KL(teacher || student) */
  float* kl_reverse;         /* KL(student || teacher) */
  float* student_logprob;
  float* teacher_logprob;
} scrimp_token_scores_args;

scrimp_status scrimp_token_scores(const scrimp_token_scores_args* args);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SCRIMP_SCRIMP_H_ */
