// AVX-512
// (F/BW/VL/DQ) build of the CPU RoPE re-rotation / assembly kernel (rope_kernel.inc); compiled with -mavx512*, run only after runtime dispatch.
#define SCRIMP_VEC_BYTES 64
#define SCRIMP_ISA avx512
#include "rope_kernel.inc"
