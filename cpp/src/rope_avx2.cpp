// AVX2 + FMA + F16C build of the CPU RoPE re-rotation / assembly kernel
// (rope_kernel.inc); compiled with -mavx2 -mfma -mf16c, run only after runtime dispatch.
#define SCRIMP_VEC_BYTES 32
#define SCRIMP_ISA avx2
#include "rope_kernel.inc"
