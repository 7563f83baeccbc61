// Scores a few rows of logits with the scrimp C++ core, as an inference server would.
#include <scrimp/build_info.h>
#include <scrimp/error.h>
#include <scrimp/scoring.h>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const int64_t rows = 3, vocab = 5;
  std::vector<float> student = {0, 0, 0, 0, 0, 1, 2, 3, 4, 5, -INFINITY, 0, 0, -INFINITY, 0};
  std::vector<float> teacher = {0, 0, 0, 0, 0, 5, 4, 3, 2, 1, -INFINITY, 1, 0, -INFINITY, 0};
  std::vector<float> entropy(rows), kl(rows);

  scrimp::TokenScoresArgs args;
  args.student = scrimp::TensorView::contiguous(student.data(), scrimp::DType::Float32, {}, {rows, vocab});
  scrimp::TensorView t = scrimp::TensorView::contiguous(teacher.data(), scrimp::DType::Float32, {}, {rows, vocab});
  args.teacher = &t;
  args.student_entropy = entropy.data();
  args.kl_reverse = kl.data();
  scrimp::token_scores(args);

  const scrimp::BuildInfo info = scrimp::build_info();
  std::printf("scrimp %s (cpu path %s, cuda compiled %d)\n", info.version.c_str(), info.cpu_simd.c_str(),
              int(info.cuda_compiled));
  for (int64_t r = 0; r < rows; ++r) std::printf("row %lld: H(S) = %.6f  KL(S||T) = %.6f\n", (long long)r, entropy[r], kl[r]);
  // Row 0 is uniform over 5 tokens: H = log 5, KL = 0.
  if (std::fabs(entropy[0] - std::log(5.0f)) > 1e-5f || std::fabs(kl[0]) > 1e-6f) return 1;

  try {  // bad input is an exception, not a crash
    args.temperature = -1.f;
    scrimp::token_scores(args);
    return 1;
  } catch (const scrimp::Error& e) {
    std::printf("rejected as expected: %s\n", e.what());
  }
  return 0;
}
