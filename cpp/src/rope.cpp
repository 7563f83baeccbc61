// RoPE re-rotation and packet assembly: argument checks, then the CUDA backend or the CPU kernel of
// the CPU's SIMD level (rope_kernel.inc).
#include "scrimp/rope.h"

#include <cmath>
#include <cstring>

#include "rope_cpu.h"
#include "scrimp/build_info.h"
#include "scrimp/error.h"

#if defined(SCRIMP_WITH_CUDA)
#include "rope_cuda.h"
#endif


namespace scrimp {

namespace {

// The kernel built for the CPU's SIMD level (scrimp::cpu_simd_level, read on every call).
template <class Args>
void run_isa(const Args& a, void (*generic)(const Args&), void (*avx2)(const Args&), void (*avx512)(const Args&)) {
  const char* level = cpu_simd_level();
  if (avx512 && std::strcmp(level, "avx512") == 0) return avx512(a);
  if (avx2 && std::strcmp(level, "avx2") == 0) return avx2(a);
  generic(a);
}

void check_rope(const std::vector<double>& inv_freq, int64_t D, const char* what) {
  SCRIMP_CHECK(!inv_freq.empty(), what << ": inv_freq is empty");
  SCRIMP_CHECK(static_cast<int64_t>(inv_freq.size()) * 2 <= D,
               what << ": inv_freq has " << inv_freq.size() << " entries, more than head_dim/2 = " << D / 2);
  for (double f : inv_freq) SCRIMP_CHECK(std::isfinite(f), what << ": inv_freq must be finite");
}

bool is_float_kind(DType t) {
  return t == DType::Float32 || t == DType::Float16 || t == DType::BFloat16 || t == DType::Float64;
}

}  // namespace

void rerotate_keys(const RerotateArgs& a) {
  SCRIMP_CHECK(a.keys.ndim() == 4, "keys: expected [batch, kv_heads, seq, head_dim], got " << describe(a.keys));
  SCRIMP_CHECK_TYPE(is_float_kind(a.keys.dtype), "keys: expected a floating dtype, got " << describe(a.keys));
  SCRIMP_CHECK(a.out.shape == a.keys.shape, "out: expected the shape of keys " << describe(a.keys) << ", got " << describe(a.out));
  SCRIMP_CHECK_TYPE(a.out.dtype == a.keys.dtype, "out: expected dtype " << dtype_name(a.keys.dtype) << ", got " << describe(a.out));
  SCRIMP_CHECK(a.out.device == a.keys.device, "out: expected device " << device_name(a.keys.device));
  SCRIMP_CHECK(a.keys.shape[3] <= 1 || a.keys.strides[3] == 1, "keys: head_dim must be contiguous, got strides of " << describe(a.keys));
  SCRIMP_CHECK(a.out.shape[3] <= 1 || a.out.strides[3] == 1, "out: head_dim must be contiguous");
  check_rope(a.inv_freq, a.keys.shape[3], "rerotate_keys");
  if (a.delta_per_pos) {
    const TensorView& d = *a.delta_per_pos;
    SCRIMP_CHECK_TYPE(d.dtype == DType::Int64, "delta: expected an int64 tensor, got " << describe(d));
    SCRIMP_CHECK(d.ndim() == 1 && d.shape[0] == a.keys.shape[2],
                 "delta: expected shape [seq] = [" << a.keys.shape[2] << "], got " << describe(d));
    SCRIMP_CHECK(d.device == a.keys.device, "delta: expected device " << device_name(a.keys.device));
  }
  if (a.keys.numel() == 0) return;
  if (a.keys.device.type == DeviceType::CUDA) {
#if defined(SCRIMP_WITH_CUDA)
    cuda::rerotate_keys(a);
    return;
#else
    SCRIMP_FAIL("CUDA tensors given, but this build of scrimp has no CUDA backend");
#endif
  }
#if defined(SCRIMP_X86_SIMD)
  run_isa(a, cpu::rerotate_keys_generic, cpu::rerotate_keys_avx2, cpu::rerotate_keys_avx512);
#else
  run_isa<RerotateArgs>(a, cpu::rerotate_keys_generic, nullptr, nullptr);
#endif
}

void assemble_kv(const AssembleArgs& a) {
  const int64_t L = static_cast<int64_t>(a.out_keys.size());
  SCRIMP_CHECK(L > 0 && static_cast<int64_t>(a.out_values.size()) == L,
               "assemble: expected the same number (> 0) of key and value outputs, got " << a.out_keys.size() << " and "
                                                                                       << a.out_values.size());
  SCRIMP_CHECK(!a.parts.empty(), "assemble: no packets given");
  const TensorView& o0 = a.out_keys[0];
  SCRIMP_CHECK(o0.ndim() == 4 && o0.shape[0] == 1, "assemble: outputs must be [1, H, S, D], got " << describe(o0));
  const int64_t H = o0.shape[1], S = o0.shape[2], D = o0.shape[3];
  for (int64_t l = 0; l < L; ++l)
    for (const TensorView* o : {&a.out_keys[l], &a.out_values[l]}) {
      SCRIMP_CHECK(o->shape == o0.shape, "assemble: output " << l << " is " << describe(*o) << ", expected the shape of " << describe(o0));
      SCRIMP_CHECK_TYPE(o->dtype == o0.dtype, "assemble: outputs must share one dtype");
      SCRIMP_CHECK(o->device == o0.device, "assemble: outputs must share one device");
      SCRIMP_CHECK(D <= 1 || o->strides[3] == 1, "assemble: output head_dim must be contiguous");
    }
  int64_t total = a.seq_offset;
  SCRIMP_CHECK(a.seq_offset >= 0, "assemble: seq_offset must be >= 0");
  for (std::size_t p = 0; p < a.parts.size(); ++p) {
    const AssemblePart& part = a.parts[p];
    SCRIMP_CHECK(static_cast<int64_t>(part.keys.size()) == L && static_cast<int64_t>(part.values.size()) == L,
                 "assemble: packet " << p << " has " << part.keys.size() << " layers, the output " << L);
    const int64_t T = part.keys[0].shape[1];
    for (int64_t l = 0; l < L; ++l)
      for (const TensorView* t : {&part.keys[l], &part.values[l]}) {
        SCRIMP_CHECK_TYPE(t->dtype == o0.dtype, "assemble: packet " << p << " has dtype " << dtype_name(t->dtype)
                                                                   << ", the output " << dtype_name(o0.dtype));
        SCRIMP_CHECK(t->ndim() == 3 && t->shape[0] == H && t->shape[1] == T && t->shape[2] == D && t->is_contiguous(),
                     "assemble: packet " << p << " layer " << l << " is " << describe(*t) << ", expected contiguous ["
                                         << H << ", " << T << ", " << D << "] (kv_heads x head_dim must match the output)");
        SCRIMP_CHECK(t->device == o0.device, "assemble: packet " << p << " is on " << device_name(t->device)
                                                                 << ", the output on " << device_name(o0.device));
      }
    check_rope(part.inv_freq, D, "assemble");
    total += T;
  }
  SCRIMP_CHECK(total <= S, "assemble: the packets need " << total << " positions (from seq_offset " << a.seq_offset
                                                         << "), the output holds " << S);
  if (o0.device.type == DeviceType::CUDA) {
#if defined(SCRIMP_WITH_CUDA)
    cuda::assemble_kv(a);
    return;
#else
    SCRIMP_FAIL("CUDA tensors given, but this build of scrimp has no CUDA backend");
#endif
  }
  SCRIMP_CHECK_TYPE(is_float_kind(o0.dtype), "assemble: unsupported dtype " << dtype_name(o0.dtype));
#if defined(SCRIMP_X86_SIMD)
  run_isa(a, cpu::assemble_kv_generic, cpu::assemble_kv_avx2, cpu::assemble_kv_avx512);
#else
  run_isa<AssembleArgs>(a, cpu::assemble_kv_generic, nullptr, nullptr);
#endif
}

}  // namespace scrimp
