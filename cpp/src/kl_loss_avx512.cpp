// AVX-512
// (F/BW/VL/DQ) build of the CPU fused KL-loss kernel (kl_loss_kernel.inc); compiled with -mavx512*, run only after runtime dispatch.
#define SCRIMP_VEC_BYTES 64
#define SCRIMP_ENTRY kl_rows_avx512
#include "kl_loss_kernel.inc"
