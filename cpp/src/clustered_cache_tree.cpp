// IceCache's page tree: clusters the keys of a stream into pages with a balanced hierarchical
// spherical 2-means tree (cluster_into_pages), so that close keys share a page.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "clustered_cache_rows.h"
#include "scrimp/clustered_cache.h"
#include "scrimp/error.h"
#include "span_checks.h"

namespace scrimp {


std::vector<int64_t> cluster_into_pages(Span<const float> keys_in, int64_t N, int64_t D, int64_t page_size,
                                        int iterations, uint64_t seed, Span<int64_t> order_in) {
  SCRIMP_CHECK(page_size >= 1, "page_size must be >= 1, got " << page_size);
  SCRIMP_CHECK(N >= 0 && D >= 1, "cluster_into_pages: bad shape [" << N << ", " << D << "]");
  SCRIMP_CHECK(iterations >= 0, "cluster_into_pages: iterations must be >= 0, got " << iterations);
  check_span(keys_in, N * D, "keys");
  check_span(order_in, N, "order");
  const float* keys = keys_in.data;
  int64_t* order = order_in.data;
  std::vector<int64_t> bounds{0};
  if (N == 0) return bounds;
  std::vector<float> kn(keys, keys + N * D);
  for (int64_t i = 0; i < N; ++i) ice::normalize(kn.data() + i * D, D);
  std::iota(order, order + N, int64_t{0});
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
  std::vector<float> c1(D), c2(D), dir(D);
  std::vector<std::pair<float, int64_t>> proj;
  // Explicit stack of ranges; the left child is processed first so leaves come out in tree order.
  std::vector<std::pair<int64_t, int64_t>> stack{{0, N}};
  while (!stack.empty()) {
    const auto [b, e] = stack.back();
    stack.pop_back();
    const int64_t n = e - b;
    if (n <= page_size) {
      bounds.push_back(e);
      continue;
    }
    const int64_t pages = (n + page_size - 1) / page_size;
    int64_t left_n = (pages / 2) * page_size;
    // Seed: a random member, then the member least similar to it.
    const int64_t first = order[b + static_cast<int64_t>(rng() % static_cast<uint64_t>(n))];
    std::copy(kn.data() + first * D, kn.data() + (first + 1) * D, c1.begin());
    float worst = std::numeric_limits<float>::infinity();
    int64_t second = first;
    for (int64_t i = b; i < e; ++i) {
      const float s = ice::dot(kn.data() + order[i] * D, c1.data(), D);
      if (s < worst) worst = s, second = order[i];
    }
    std::copy(kn.data() + second * D, kn.data() + (second + 1) * D, c2.begin());
    proj.resize(static_cast<std::size_t>(n));
    for (int it = 0; it <= iterations; ++it) {
      for (int64_t d = 0; d < D; ++d) dir[d] = c1[d] - c2[d];
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = order[b + i];
        proj[i] = {-ice::dot(kn.data() + r * D, dir.data(), D), r};
      }
      // 2-means assignment (nearer centroid = positive projection), with the left size rounded to a
      // whole number of pages so that every leaf but one is full; the members closest to c1 (relative
      // to c2) go left.
      int64_t closer = 0;
      for (int64_t i = 0; i < n; ++i) closer += proj[i].first < 0;
      left_n = std::min(std::max((closer + page_size / 2) / page_size, int64_t{1}), pages - 1) * page_size;
      std::nth_element(proj.begin(), proj.begin() + left_n, proj.end());
      for (int64_t i = 0; i < n; ++i) order[b + i] = proj[i].second;
      if (it == iterations) break;
      std::fill(c1.begin(), c1.end(), 0.0f);
      std::fill(c2.begin(), c2.end(), 0.0f);
      for (int64_t i = 0; i < n; ++i) {
        float* c = i < left_n ? c1.data() : c2.data();
        const float* k = kn.data() + order[b + i] * D;
        for (int64_t d = 0; d < D; ++d) c[d] += k[d];
      }
      ice::normalize(c1.data(), D);
      ice::normalize(c2.data(), D);
    }
    stack.push_back({b + left_n, e});
    stack.push_back({b, b + left_n});
  }
  return bounds;
}

}  // namespace scrimp
