// AVX-512
// (F/BW/VL/DQ) build of the CPU token-scoring kernel (scoring_kernel.inc); compiled with -mavx512*, run only after runtime dispatch.
#define SCRIMP_VEC_BYTES 64
#define SCRIMP_ENTRY score_rows_avx512
#include "scoring_kernel.inc"
