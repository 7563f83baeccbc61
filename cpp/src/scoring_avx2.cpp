// AVX2 + FMA + F16C build of the CPU token-scoring kernel
// (scoring_kernel.inc); compiled with -mavx2 -mfma -mf16c, run only after runtime dispatch.
#define SCRIMP_VEC_BYTES 32
#define SCRIMP_ENTRY score_rows_avx2
#include "scoring_kernel.inc"
