// What this build of scrimp contains and what the running machine offers.
#pragma once
#include <string>

namespace scrimp {

struct BuildInfo {
  std::string version;
  bool cuda_compiled = false;        // CUDA kernels are in this binary
  std::string cuda_architectures;    // e.g. "80;90" ("" without CUDA)
  bool cutlass = false;              // CUTLASS / CuTe tensor-core kernels are in this binary
  bool cuda_device_usable = false;   // a driver and at least one device are present right now
  int cuda_device_count = 0;
  std::string cuda_status;           // why no device is usable, when it is not
  std::string cpu_simd;              // "avx512", "avx2" or "generic": the scoring path in use
  int openmp_threads = 1;            // threads a parallel CPU kernel uses (1 without OpenMP)
};

BuildInfo build_info();

// The CPU SIMD level the kernels dispatch to: "avx512", "avx2" or "generic".
// SCRIMP_CPU_SIMD=generic|avx2|avx512 in the environment caps it (for testing every path).
const char* cpu_simd_level();

}  // namespace scrimp
