// Portable CPU fused KL-loss kernel (any architecture; SSE2 on x86-64 baseline builds).
#include "half.h"

#define SCRIMP_VEC_BYTES 16
#define SCRIMP_ENTRY kl_rows_generic
#define SCRIMP_LOAD_HALF8_SCALAR(src, dst) (*(dst) = ::scrimp::half_to_float(*(src)))
#define SCRIMP_LOAD_HALF8(src, dst) \
  for (int h_ = 0; h_ < 8; ++h_) (dst)[h_] = ::scrimp::half_to_float((src)[h_])
#include "kl_loss_kernel.inc"
