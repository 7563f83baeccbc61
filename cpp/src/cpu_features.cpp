#include <cstdlib>
#include <cstring>
#if defined(SCRIMP_X86_SIMD)
#include <cpuid.h>
#endif

#include "scrimp/build_info.h"

namespace scrimp {

namespace {
#if defined(SCRIMP_X86_SIMD)
// F16C from CPUID leaf 1, ECX bit 29 (older clang has no __builtin_cpu_supports("f16c")).
bool cpu_has_f16c() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  return (ecx & bit_F16C) != 0;
}
#endif

const char* detect_simd() {
#if defined(SCRIMP_X86_SIMD)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    cpu_has_f16c();
  const char* best = avx512 ? "avx512" : avx2 ? "avx2" : "generic";
  // SCRIMP_CPU_SIMD caps the level (never raises it above what the CPU has).
  if (const char* cap = std::getenv("SCRIMP_CPU_SIMD")) {
    if (std::strcmp(cap, "generic") == 0) return "generic";
    if (std::strcmp(cap, "avx2") == 0) return avx2 ? "avx2" : "generic";
  }
  return best;
#else
  return "generic";
#endif
}
}  // namespace

// Not cached: SCRIMP_CPU_SIMD may change between calls (tests run every path in one process).
const char* cpu_simd_level() { return detect_simd(); }

}  // namespace scrimp
