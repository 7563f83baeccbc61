#include "scrimp/build_info.h"

#include "runtime_cuda.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef SCRIMP_VERSION
#define SCRIMP_VERSION "0.0.0"
#endif

namespace scrimp {

BuildInfo build_info() {
  BuildInfo info;
  info.version = SCRIMP_VERSION;
#if defined(SCRIMP_WITH_CUDA)
  info.cuda_compiled = true;
  info.cuda_architectures = SCRIMP_CUDA_ARCHS;
#if defined(SCRIMP_WITH_CUTLASS)
  info.cutlass = true;
#endif
  info.cuda_device_count = cuda::device_count(&info.cuda_status);
  info.cuda_device_usable = info.cuda_device_count > 0;
#else
  info.cuda_status = "built without CUDA";
#endif
  info.cpu_simd = cpu_simd_level();
#ifdef _OPENMP
  info.openmp_threads = omp_get_max_threads();
#endif
  return info;
}

}  // namespace scrimp
