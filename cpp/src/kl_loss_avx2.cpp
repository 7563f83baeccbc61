// AVX2 + FMA + F16C build of the CPU fused KL-loss kernel
// (kl_loss_kernel.inc); compiled with -mavx2 -mfma -mf16c, run only after runtime dispatch.
#define SCRIMP_VEC_BYTES 32
#define SCRIMP_ENTRY kl_rows_avx2
#include "kl_loss_kernel.inc"
