// Portable build
// (any architecture; SSE2 on x86-64 baseline builds) of the CPU token-scoring kernel (scoring_kernel.inc).
#define SCRIMP_VEC_BYTES 16
#define SCRIMP_ENTRY score_rows_generic
#include "scoring_kernel.inc"
