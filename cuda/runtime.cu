// CUDA runtime queries for build_info(). The runtime is linked statically, so this must work (and
// return 0 with a reason) on machines with no driver or no device.
#include <cuda_runtime.h>

#include <sstream>
#include <string>

#include "runtime_cuda.h"

namespace scrimp {
namespace cuda {

namespace {
std::string describe_error(const char* what, cudaError_t e) {
  std::ostringstream os;
  os << what << ": " << cudaGetErrorName(e) << " (" << cudaGetErrorString(e) << ")";
  return os.str();
}
}  // namespace

int device_count(std::string* status) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so later calls start clean
    if (status) *status = describe_error("cudaGetDeviceCount", e);
    return 0;
  }
  if (n <= 0) {
    if (status) *status = "no CUDA device found";
    return 0;
  }
  // The kernels are built for compute capability >= 8.0 (sm_80 / sm_90 code, compute_90 PTX).
  int usable = 0;
  std::ostringstream os;
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  os << n << " CUDA device(s), driver " << driver / 1000 << "." << (driver % 1000) / 10 << ", runtime "
     << runtime / 1000 << "." << (runtime % 1000) / 10;
  for (int d = 0; d < n; ++d) {
    int major = 0, minor = 0;
    const cudaError_t e1 = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d);
    const cudaError_t e2 = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d);
    if (e1 != cudaSuccess || e2 != cudaSuccess) {
      cudaGetLastError();
      os << "; device " << d << ": " << describe_error("cudaDeviceGetAttribute", e1 != cudaSuccess ? e1 : e2);
      continue;
    }
    if (major >= 8) {
      ++usable;
    } else {
      os << "; device " << d << " has compute capability " << major << "." << minor
         << " (< 8.0, not supported by this build)";
    }
  }
  if (status) *status = os.str();
  return usable;
}

}  // namespace cuda
}  // namespace scrimp
