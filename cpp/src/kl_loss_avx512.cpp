// AVX-512 (F/BW/VL/DQ) CPU fused KL-loss kernel; compiled with -mavx512*, run only after dispatch.
#include <immintrin.h>

#include "half.h"

#define SCRIMP_VEC_BYTES 64
#define SCRIMP_ENTRY kl_rows_avx512
#define SCRIMP_LOAD_HALF8_SCALAR(src, dst) (*(dst) = ::scrimp::half_to_float(*(src)))
#define SCRIMP_LOAD_HALF8(src, dst) \
  _mm256_storeu_ps((dst), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))))
#include "kl_loss_kernel.inc"
