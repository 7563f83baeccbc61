// Portable build
// (any architecture; SSE2 on x86-64 baseline builds) of the CPU fused KL-loss kernel (kl_loss_kernel.inc).
#define SCRIMP_VEC_BYTES 16
#define SCRIMP_ENTRY kl_rows_generic
#include "kl_loss_kernel.inc"
