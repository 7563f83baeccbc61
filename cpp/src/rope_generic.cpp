// Portable build
// (any architecture; SSE2 on x86-64 baseline builds) of the CPU RoPE re-rotation / assembly kernel (rope_kernel.inc).
#define SCRIMP_VEC_BYTES 16
#define SCRIMP_ISA generic
#include "rope_kernel.inc"
