// Internal: what every CPU row kernel (token scoring, KL loss) shares: finding row r of a tensor with
// arbitrary leading strides, and running a per-ISA row function over all rows on OpenMP threads.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "scrimp/build_info.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace scrimp {
namespace cpu {

struct LeadingDims {
  std::vector<int64_t> lead_shape;  // leading dims of the logits (row index space)

  // Element offset of row `row` for a tensor with the given leading strides.
  int64_t offset(int64_t row, const std::vector<int64_t>& strides) const {
    int64_t off = 0;
    for (int64_t d = static_cast<int64_t>(lead_shape.size()) - 1; d >= 0; --d) {
      off += (row % lead_shape[d]) * strides[d];
      row /= lead_shape[d];
    }
    return off;
  }
};

template <class Job>
using RowsFn = void (*)(const Job&, int64_t begin, int64_t end);

// Picks the row function for the CPU's SIMD level (scrimp::cpu_simd_level) and runs it over
// contiguous row ranges, one per OpenMP thread; a row is already ~V/16 vector iterations of work.
template <class Job>
void run_rows(const Job& job, int64_t rows, RowsFn<Job> generic, RowsFn<Job> avx2, RowsFn<Job> avx512) {
  RowsFn<Job> kernel = generic;
  const char* level = cpu_simd_level();
  if (avx512 && std::strcmp(level, "avx512") == 0) kernel = avx512;
  else if (avx2 && std::strcmp(level, "avx2") == 0) kernel = avx2;
#ifdef _OPENMP
#pragma omp parallel if (rows > 1)
  {
    const int64_t nt = omp_get_num_threads();
    const int64_t id = omp_get_thread_num();
    const int64_t begin = rows * id / nt;
    const int64_t end = rows * (id + 1) / nt;
    if (begin < end) kernel(job, begin, end);
  }
#else
  kernel(job, 0, rows);
#endif
}

}  // namespace cpu
}  // namespace scrimp
