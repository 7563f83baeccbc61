// Internal: the CUDA runtime queries (cuda/runtime.cu). Only called when SCRIMP_WITH_CUDA.
// Naming rule of the backend headers: cpp/src/<unit>_cuda.h declares the entry points of
// cuda/<unit>*.cu (namespace scrimp::cuda); <kernel>_cpu.h declares the per-ISA entry points of
// <kernel>_kernel.inc (namespace scrimp::cpu).
#pragma once
#include <string>

namespace scrimp {
namespace cuda {

// Number of usable devices; 0 with `status` saying why (no driver, no device...).
int device_count(std::string* status);

}  // namespace cuda
}  // namespace scrimp
