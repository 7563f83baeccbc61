// SCRIMP_CUDA_CHECK(expr): every CUDA runtime call and launch in cuda/ goes through it; a failure
// becomes scrimp::Error (RuntimeError in Python) naming the call and the CUDA error, never an abort.
#pragma once
#include <cuda_runtime.h>

#include "scrimp/error.h"

#define SCRIMP_CUDA_CHECK(expr)                                                               \
  do {                                                                                        \
    const cudaError_t scrimp_err_ = (expr);                                                   \
    if (scrimp_err_ != cudaSuccess) {                                                         \
      SCRIMP_FAIL("CUDA error in " << #expr << ": " << cudaGetErrorName(scrimp_err_) << " (" \
                                   << cudaGetErrorString(scrimp_err_) << ")");               \
    }                                                                                         \
  } while (0)
