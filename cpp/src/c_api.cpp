// The plain C ABI (scrimp/scrimp.h) over the C++ packet store and token scoring: converts C structs to
// the C++ API, catches every exception at the boundary and turns it into a status plus a per-thread
// last-error message.
#include "scrimp/scrimp.h"

#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "scrimp/build_info.h"
#include "scrimp/error.h"
#include "scrimp/packet_store.h"
#include "scrimp/scoring.h"

struct scrimp_packet_store {
  explicit scrimp_packet_store(const scrimp::PacketStoreConfig& c) : store(c) {}
  scrimp::PacketStore store;
};

namespace {

thread_local std::string last_error;

scrimp_status fail(scrimp_status status, const std::string& message) {
  last_error = message;
  return status;
}

// Runs f (returning a scrimp_status); every exception becomes a status and the last-error message.
template <typename F>
scrimp_status guarded(F&& f) noexcept {
  try {
    last_error.clear();
    return f();
  } catch (const scrimp::Error& e) {
    switch (e.kind()) {
      case scrimp::ErrorKind::Value: return fail(SCRIMP_ERROR_VALUE, e.what());
      case scrimp::ErrorKind::Type: return fail(SCRIMP_ERROR_TYPE, e.what());
      case scrimp::ErrorKind::Runtime: return fail(SCRIMP_ERROR_RUNTIME, e.what());
    }
    return fail(SCRIMP_ERROR_RUNTIME, e.what());
  } catch (const std::bad_alloc&) {
    return fail(SCRIMP_ERROR_RUNTIME, "out of memory");
  } catch (const std::exception& e) {
    return fail(SCRIMP_ERROR_RUNTIME, e.what());
  } catch (...) {
    return fail(SCRIMP_ERROR_RUNTIME, "unknown error");
  }
}

scrimp::DType to_dtype(scrimp_dtype d) {
  switch (d) {
    case SCRIMP_FLOAT32: return scrimp::DType::Float32;
    case SCRIMP_FLOAT16: return scrimp::DType::Float16;
    case SCRIMP_BFLOAT16: return scrimp::DType::BFloat16;
  }
  SCRIMP_CHECK_TYPE(false, "dtype: expected SCRIMP_FLOAT32, SCRIMP_FLOAT16 or SCRIMP_BFLOAT16, got " << int(d));
  return scrimp::DType::Float32;
}

scrimp::PacketKey to_key(const uint8_t* key) {
  SCRIMP_CHECK(key != nullptr, "key: null pointer");
  scrimp::PacketKey k;
  std::memcpy(k.data(), key, k.size());
  return k;
}

#define SCRIMP_C_REQUIRE(ptr, name) SCRIMP_CHECK((ptr) != nullptr, name << ": null pointer")

}  // namespace

extern "C" {

const char* scrimp_last_error(void) { return last_error.c_str(); }

const char* scrimp_version(void) {
  static const std::string version = scrimp::build_info().version;
  return version.c_str();
}

void scrimp_packet_store_config_init(scrimp_packet_store_config* config) {
  if (config == nullptr) return;
  const scrimp::PacketStoreConfig d;
  config->disk_path = nullptr;
  config->host_bytes = d.host_bytes;
  config->disk_bytes = d.disk_bytes;
  config->fsync = d.fsync ? 1 : 0;
  config->verify_on_open = d.verify_on_open ? 1 : 0;
}

scrimp_status scrimp_packet_store_open(const scrimp_packet_store_config* config, scrimp_packet_store** out) {
  return guarded([&] {
    SCRIMP_C_REQUIRE(config, "config");
    SCRIMP_C_REQUIRE(out, "out");
    *out = nullptr;
    scrimp::PacketStoreConfig c;
    c.disk_path = config->disk_path ? config->disk_path : "";
    c.host_bytes = config->host_bytes;
    c.disk_bytes = config->disk_bytes;
    c.gpu_bytes = 0;
    c.fsync = config->fsync != 0;
    c.verify_on_open = config->verify_on_open != 0;
    *out = new scrimp_packet_store(c);
    return SCRIMP_OK;
  });
}

void scrimp_packet_store_close(scrimp_packet_store* store) { delete store; }

scrimp_status scrimp_packet_put(scrimp_packet_store* store, const scrimp_packet_meta* meta, const void* payload,
                                uint64_t payload_bytes, uint8_t key_out[SCRIMP_KEY_BYTES]) {
  return guarded([&] {
    SCRIMP_C_REQUIRE(store, "store");
    SCRIMP_C_REQUIRE(meta, "meta");
    SCRIMP_C_REQUIRE(payload, "payload");
    SCRIMP_C_REQUIRE(meta->model_fingerprint, "model_fingerprint");
    SCRIMP_CHECK(meta->num_token_ids >= 0 && (meta->num_token_ids == 0 || meta->token_ids != nullptr),
                 "token_ids: expected " << meta->num_token_ids << " ids, got a null pointer");
    SCRIMP_CHECK(meta->num_inv_freq >= 0 && (meta->num_inv_freq == 0 || meta->inv_freq != nullptr),
                 "inv_freq: expected " << meta->num_inv_freq << " values, got a null pointer");
    scrimp::PacketMeta m;
    m.model_fingerprint = meta->model_fingerprint;
    m.adapter_id = meta->adapter_id ? meta->adapter_id : "";
    m.dtype = to_dtype(meta->dtype);
    m.num_layers = meta->num_layers;
    m.num_kv_heads = meta->num_kv_heads;
    m.head_dim = meta->head_dim;
    m.num_tokens = meta->num_tokens;
    m.position_start = meta->position_start;
    m.token_ids.assign(meta->token_ids, meta->token_ids + meta->num_token_ids);
    m.inv_freq.assign(meta->inv_freq, meta->inv_freq + meta->num_inv_freq);
    m.rope_layout = meta->rope_interleaved ? scrimp::RopeLayout::Interleaved : scrimp::RopeLayout::Half;
    m.validate();
    SCRIMP_CHECK(payload_bytes == m.payload_bytes(), "payload: expected " << m.payload_bytes()
                                                         << " bytes for this layout, got " << payload_bytes);
    const scrimp::PacketKey key = store->store.put_payload(m, payload, scrimp::Device{});
    if (key_out) std::memcpy(key_out, key.data(), key.size());
    return SCRIMP_OK;
  });
}

scrimp_status scrimp_packet_get(scrimp_packet_store* store, const uint8_t key[SCRIMP_KEY_BYTES], void* dst,
                                uint64_t dst_bytes, uint64_t* payload_bytes) {
  return guarded([&] {
    SCRIMP_C_REQUIRE(store, "store");
    const scrimp::PacketHandle h = store->store.get(to_key(key), scrimp::Tier::Host);
    if (!h) return SCRIMP_NOT_FOUND;
    if (payload_bytes) *payload_bytes = h.bytes();
    SCRIMP_CHECK(dst_bytes >= h.bytes(), "dst: the packet holds " << h.bytes() << " bytes, the buffer " << dst_bytes);
    SCRIMP_C_REQUIRE(dst, "dst");
    std::memcpy(dst, h.data(), h.bytes());
    return SCRIMP_OK;
  });
}

scrimp_status scrimp_packet_contains(scrimp_packet_store* store, const uint8_t key[SCRIMP_KEY_BYTES]) {
  return guarded([&] {
    SCRIMP_C_REQUIRE(store, "store");
    return store->store.contains(to_key(key)) ? SCRIMP_OK : SCRIMP_NOT_FOUND;
  });
}

scrimp_status scrimp_packet_evict(scrimp_packet_store* store, const uint8_t key[SCRIMP_KEY_BYTES]) {
  return guarded([&] {
    SCRIMP_C_REQUIRE(store, "store");
    return store->store.evict(to_key(key)) ? SCRIMP_OK : SCRIMP_NOT_FOUND;
  });
}

scrimp_status scrimp_packet_key_hex(const uint8_t key[SCRIMP_KEY_BYTES], char out[2 * SCRIMP_KEY_BYTES + 1]) {
  return guarded([&] {
    SCRIMP_C_REQUIRE(out, "out");
    const std::string hex = scrimp::key_hex(to_key(key));
    std::memcpy(out, hex.c_str(), hex.size() + 1);
    return SCRIMP_OK;
  });
}

scrimp_status scrimp_packet_store_get_stats(scrimp_packet_store* store, scrimp_packet_store_stats* out) {
  return guarded([&] {
    SCRIMP_C_REQUIRE(store, "store");
    SCRIMP_C_REQUIRE(out, "out");
    const scrimp::PacketStoreStats s = store->store.stats();
    out->packets = s.packets;
    out->packets_host = s.packets_host;
    out->packets_disk = s.packets_disk;
    out->hits = s.hits;
    out->misses = s.misses;
    out->puts = s.puts;
    out->duplicate_puts = s.duplicate_puts;
    out->bytes_host = s.bytes_host;
    out->bytes_disk = s.bytes_disk;
    out->corrupt_files = s.corrupt_files;
    out->io_errors = s.io_errors;
    return SCRIMP_OK;
  });
}

scrimp_status scrimp_token_scores(const scrimp_token_scores_args* args) {
  return guarded([&] {
    SCRIMP_C_REQUIRE(args, "args");
    SCRIMP_CHECK(args->rows >= 0 && args->vocab >= 1,
                 "expected rows >= 0 and vocab >= 1, got rows = " << args->rows << ", vocab = " << args->vocab);
    const scrimp::DType dt = to_dtype(args->dtype);
    scrimp::TokenScoresArgs a;
    a.student = scrimp::TensorView::contiguous(const_cast<void*>(args->student), dt, {}, {args->rows, args->vocab});
    scrimp::TensorView teacher, targets;
    if (args->teacher) {
      teacher = scrimp::TensorView::contiguous(const_cast<void*>(args->teacher), dt, {}, {args->rows, args->vocab});
      a.teacher = &teacher;
    }
    if (args->targets) {
      targets = scrimp::TensorView::contiguous(const_cast<int64_t*>(args->targets), scrimp::DType::Int64, {},
                                               {args->rows});
      a.targets = &targets;
    }
    a.temperature = args->temperature;
    const auto out = [&](float* p) { return p ? scrimp::Span<float>(p, args->rows) : scrimp::Span<float>(); };
    a.student_entropy = out(args->student_entropy);
    a.teacher_entropy = out(args->teacher_entropy);
    a.kl_forward = out(args->kl_forward);
    a.kl_reverse = out(args->kl_reverse);
    a.student_logprob = out(args->student_logprob);
    a.teacher_logprob = out(args->teacher_logprob);
    scrimp::token_scores(a);
    return SCRIMP_OK;
  });
}

}  // extern "C"
