// Device code of the CUDA token-scoring kernel (launched from cuda/scoring.cu).
//
// The math mirrors cpp/src/scoring_kernel.inc (the CPU kernel), in base 2:
//   y = x * c with c = log2(e) / T, reference r = running max of y (0 while no finite y was seen),
//   Zs = sum 2^(ys-rs)   As = sum 2^(ys-rs) (ys-rs)   Bs = sum 2^(ys-rs) (yt-rt)
//   Zt = sum 2^(yt-rt)   At = sum 2^(yt-rt) (yt-rt)   Bt = sum 2^(yt-rt) (ys-rs)
// so that e^(x/T - m) = 2^(y - r) and the A, B sums are ln 2 times their natural-log values. Two
// exps (ex2.approx.ftz) per element pair; a p * d term counts only where p > 0, so masked (-inf)
// entries contribute exactly 0 and a -inf on the other side where p > 0 gives a -inf B sum.
//
// Work decomposition: a "group" of kRowThreads threads (a whole 256-thread block, or one warp)
// scores one row, or one of `split` contiguous slices of a row. Each thread streams 16-byte vectors
// of both models, kUnroll vectors per model in flight, keeps its own online-softmax state in
// registers, and the group combines the states (shuffles, then shared memory). A split row writes
// its partial state to scratch and score_finalize_kernel combines the slices.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace scrimp {
namespace cuda {
namespace kern {

constexpr int kMaxLeadDims = 8;
constexpr int kBlockThreads = 256;
constexpr int kUnroll = 4;  // 16-byte vectors per model in flight per thread

// Everything the kernel needs, passed by value.
struct Params {
  const char* student = nullptr;  // logits base pointers
  const char* teacher = nullptr;
  const int64_t* targets = nullptr;
  float* student_entropy = nullptr;
  float* teacher_entropy = nullptr;
  float* kl_forward = nullptr;
  float* kl_reverse = nullptr;
  float* student_logprob = nullptr;
  float* teacher_logprob = nullptr;
  float4* partials = nullptr;  // [rows, split, 2] when split > 1
  int64_t rows = 0;
  int64_t vocab = 0;
  int split = 1;
  float c = 1.4426950408889634f;  // log2(e) / temperature
  int ndim = 1;                   // leading dims after collapsing
  int64_t shape[kMaxLeadDims];
  int64_t s_stride[kMaxLeadDims];  // leading strides in elements
  int64_t t_stride[kMaxLeadDims];
  int64_t g_stride[kMaxLeadDims];
};

__device__ __forceinline__ int64_t row_offset(const Params& p, int64_t row, const int64_t* strides) {
  if (p.ndim == 1) return row * strides[0];
  int64_t off = 0;
  for (int d = p.ndim - 1; d >= 0; --d) {
    const int64_t n = p.shape[d];
    const int64_t q = row / n;
    off += (row - q * n) * strides[d];
    row = q;
  }
  return off;
}

// ---- element types (float, __nv_bfloat16, __half): raw bits in uint4 vectors ---------------------
template <typename T>
struct Traits;

template <>
struct Traits<float> {
  static constexpr int kVec = 4;
  static constexpr int kSize = 4;
  static constexpr uint32_t kNegInfWord = 0xff800000u;
  static __device__ __forceinline__ float get(const uint4& v, int j) {
    const uint32_t w = j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
    return __uint_as_float(w);
  }
  static __device__ __forceinline__ float bits_to_float(uint32_t b) { return __uint_as_float(b); }
  template <int NV>
  static __device__ __forceinline__ float vmax(const uint4 (&v)[NV]) {
    float m = fmaxf(fmaxf(__uint_as_float(v[0].x), __uint_as_float(v[0].y)),
                    fmaxf(__uint_as_float(v[0].z), __uint_as_float(v[0].w)));
#pragma unroll
    for (int i = 1; i < NV; ++i)
      m = fmaxf(m, fmaxf(fmaxf(__uint_as_float(v[i].x), __uint_as_float(v[i].y)),
                         fmaxf(__uint_as_float(v[i].z), __uint_as_float(v[i].w))));
    return m;
  }
};

__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

template <>
struct Traits<__nv_bfloat16> {
  static constexpr int kVec = 8;
  static constexpr int kSize = 2;
  static constexpr uint32_t kNegInfWord = 0xff80ff80u;
  static __device__ __forceinline__ float get(const uint4& v, int j) {
    const uint32_t w = word(v, j >> 1);
    return __uint_as_float((j & 1) ? (w & 0xffff0000u) : (w << 16));
  }
  static __device__ __forceinline__ float bits_to_float(uint32_t b) { return __uint_as_float(b << 16); }
  static __device__ __forceinline__ __nv_bfloat162 as2(uint32_t w) {
    __nv_bfloat162 r;
    *reinterpret_cast<uint32_t*>(&r) = w;
    return r;
  }
  template <int NV>
  static __device__ __forceinline__ float vmax(const uint4 (&v)[NV]) {
    // Packed max (NaN-dropping like fmaxf: NaN is carried by the exp sums, not by the max).
    __nv_bfloat162 m = __hmax2(__hmax2(as2(v[0].x), as2(v[0].y)), __hmax2(as2(v[0].z), as2(v[0].w)));
#pragma unroll
    for (int i = 1; i < NV; ++i)
      m = __hmax2(m, __hmax2(__hmax2(as2(v[i].x), as2(v[i].y)), __hmax2(as2(v[i].z), as2(v[i].w))));
    const uint32_t w = *reinterpret_cast<const uint32_t*>(&m);
    return fmaxf(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
};

template <>
struct Traits<__half> {
  static constexpr int kVec = 8;
  static constexpr int kSize = 2;
  static constexpr uint32_t kNegInfWord = 0xfc00fc00u;
  static __device__ __forceinline__ float get(const uint4& v, int j) {
    const uint32_t w = word(v, j >> 1);
    return __half2float(__ushort_as_half(static_cast<unsigned short>((j & 1) ? (w >> 16) : (w & 0xffffu))));
  }
  static __device__ __forceinline__ float bits_to_float(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  static __device__ __forceinline__ __half2 as2(uint32_t w) {
    __half2 r;
    *reinterpret_cast<uint32_t*>(&r) = w;
    return r;
  }
  template <int NV>
  static __device__ __forceinline__ float vmax(const uint4 (&v)[NV]) {
    __half2 m = __hmax2(__hmax2(as2(v[0].x), as2(v[0].y)), __hmax2(as2(v[0].z), as2(v[0].w)));
#pragma unroll
    for (int i = 1; i < NV; ++i)
      m = __hmax2(m, __hmax2(__hmax2(as2(v[i].x), as2(v[i].y)), __hmax2(as2(v[i].z), as2(v[i].w))));
    return fmaxf(__low2float(m), __high2float(m));
  }
};

// ---- memory --------------------------------------------------------------------------------------
// Streaming 16-byte load: read once, so skip L1; ask L2 for 256-byte sectors.
__device__ __forceinline__ uint4 load16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

template <typename T>
__device__ __forceinline__ uint32_t load_elem_bits(const char* row, int64_t i) {
  if constexpr (Traits<T>::kSize == 4) {
    return __ldg(reinterpret_cast<const unsigned int*>(row) + i);
  } else {
    return __ldg(reinterpret_cast<const unsigned short*>(row) + i);
  }
}

// Puts element bits into slot j of a -inf-filled vector.
template <typename T>
__device__ __forceinline__ void set_elem(uint4& v, int j, uint32_t bits) {
  if constexpr (Traits<T>::kSize == 4) {
    if (j == 0) v.x = bits; else if (j == 1) v.y = bits; else if (j == 2) v.z = bits; else v.w = bits;
  } else {
    uint32_t* w = j < 2 ? &v.x : j < 4 ? &v.y : j < 6 ? &v.z : &v.w;
    *w = (j & 1) ? ((*w & 0x0000ffffu) | (bits << 16)) : ((*w & 0xffff0000u) | (bits & 0xffffu));
  }
}

template <typename T>
__device__ __forceinline__ uint4 neg_inf_vec() {
  return make_uint4(Traits<T>::kNegInfWord, Traits<T>::kNegInfWord, Traits<T>::kNegInfWord,
                    Traits<T>::kNegInfWord);
}

// ---- online softmax state --------------------------------------------------------------------
__device__ __forceinline__ float ex2(float x) {  // 2^x; 0 for x < -126 and for -inf; NaN stays NaN
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

constexpr float kNegInf = -__builtin_huge_valf();

// ms, mt: running maxima of y (-inf until a finite y is seen); the sums are relative to the
// reference ref(m) = m when finite, else 0.
struct State {
  float ms, mt;
  float zs, as, bs, zt, at, bt;
};

__device__ __forceinline__ State empty_state() { return State{kNegInf, kNegInf, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}; }
__device__ __forceinline__ float ref_of(float m) { return m > kNegInf ? m : 0.f; }

// Moves the state to new maxima (new_s >= ms, new_t >= mt), as rebase() in the CPU kernel. When
// the old mass underflows (factor 0) it is dropped rather than turned into 0 * -inf = NaN; a NaN Z
// stays NaN either way (and every output that reads A or B also reads that Z).
__device__ __forceinline__ void rebase(State& st, float new_s, float new_t) {
  const bool seen_s = st.ms > kNegInf, seen_t = st.mt > kNegInf;
  const float ds = seen_s ? st.ms - new_s : 0.f;
  const float dt = seen_t ? st.mt - new_t : 0.f;
  const float cs = seen_s ? ex2(ds) : 1.f;
  const float ct = seen_t ? ex2(dt) : 1.f;
  if (st.zs != 0.f) {
    st.as = cs == 0.f ? 0.f : cs * fmaf(ds, st.zs, st.as);
    st.bs = cs == 0.f ? 0.f : cs * fmaf(dt, st.zs, st.bs);
    st.zs = cs * st.zs;
  }
  if (st.zt != 0.f) {
    st.at = ct == 0.f ? 0.f : ct * fmaf(dt, st.zt, st.at);
    st.bt = ct == 0.f ? 0.f : ct * fmaf(ds, st.zt, st.bt);
    st.zt = ct * st.zt;
  }
  st.ms = new_s;
  st.mt = new_t;
}

// a <- a combined with b.
template <bool kTeacher>
__device__ __forceinline__ void combine(State& a, State b) {
  const float ms = fmaxf(a.ms, b.ms);
  const float mt = kTeacher ? fmaxf(a.mt, b.mt) : kNegInf;
  rebase(a, ms, mt);
  rebase(b, ms, mt);
  a.zs += b.zs;
  a.as += b.as;
  if (kTeacher) {
    a.bs += b.bs;
    a.zt += b.zt;
    a.at += b.at;
    a.bt += b.bt;
  }
}

template <bool kTeacher>
__device__ __forceinline__ State shfl_xor(const State& s, int lane_mask) {
  State o;
  o.ms = __shfl_xor_sync(0xffffffffu, s.ms, lane_mask);
  o.zs = __shfl_xor_sync(0xffffffffu, s.zs, lane_mask);
  o.as = __shfl_xor_sync(0xffffffffu, s.as, lane_mask);
  if (kTeacher) {
    o.mt = __shfl_xor_sync(0xffffffffu, s.mt, lane_mask);
    o.bs = __shfl_xor_sync(0xffffffffu, s.bs, lane_mask);
    o.zt = __shfl_xor_sync(0xffffffffu, s.zt, lane_mask);
    o.at = __shfl_xor_sync(0xffffffffu, s.at, lane_mask);
    o.bt = __shfl_xor_sync(0xffffffffu, s.bt, lane_mask);
  } else {
    o.mt = kNegInf;
    o.bs = o.zt = o.at = o.bt = 0.f;
  }
  return o;
}

template <bool kTeacher>
__device__ __forceinline__ void warp_combine(State& st) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) combine<kTeacher>(st, shfl_xor<kTeacher>(st, m));
}

// Absorbs NV vectors of each model (raw bits; -inf fill for absent elements) into the state.
template <typename T, bool kTeacher, int NV>
__device__ __forceinline__ void absorb(State& st, const uint4 (&vs)[NV], const uint4 (&vt)[NV], float c) {
  using Tr = Traits<T>;
  // c > 0, so max(x) * c == max(x * c) exactly (rounding is monotone).
  const float mxs = Tr::template vmax<NV>(vs) * c;
  const float mxt = kTeacher ? Tr::template vmax<NV>(vt) * c : kNegInf;
  if (mxs > st.ms || (kTeacher && mxt > st.mt)) rebase(st, fmaxf(st.ms, mxs), fmaxf(st.mt, mxt));
  const float nrs = -ref_of(st.ms);
  const float nrt = -ref_of(st.mt);
#pragma unroll
  for (int v = 0; v < NV; ++v) {
#pragma unroll
    for (int j = 0; j < Tr::kVec; ++j) {
      const float xs = fmaf(Tr::get(vs[v], j), c, nrs);  // <= ~0; -inf when masked; NaN passes
      const float es = ex2(xs);
      st.zs += es;
      const bool ps = es > 0.f;
      st.as = ps ? fmaf(es, xs, st.as) : st.as;
      if (kTeacher) {
        const float xt = fmaf(Tr::get(vt[v], j), c, nrt);
        const float et = ex2(xt);
        st.zt += et;
        const bool pt = et > 0.f;
        st.bs = ps ? fmaf(es, xt, st.bs) : st.bs;  // -inf where the teacher masks a student-probable token
        st.at = pt ? fmaf(et, xt, st.at) : st.at;
        st.bt = pt ? fmaf(et, xs, st.bt) : st.bt;
      }
    }
  }
}

// ---- per-row output ---------------------------------------------------------------------------
template <typename T, bool kTeacher>
__device__ void write_outputs(const Params& p, int64_t row, const State& st, const char* srow, const char* trow) {
  constexpr double kLn2 = 0.69314718055994530942;
  const double zs = st.zs;
  const double log_zs = log(zs);
  const double as = kLn2 * static_cast<double>(st.as);
  if (p.student_entropy) p.student_entropy[row] = static_cast<float>(log_zs - as / zs);
  double log_zt = 0.0;
  if (kTeacher) {
    const double zt = st.zt;
    log_zt = log(zt);
    const double at = kLn2 * static_cast<double>(st.at);
    const double bs = kLn2 * static_cast<double>(st.bs);
    const double bt = kLn2 * static_cast<double>(st.bt);
    if (p.teacher_entropy) p.teacher_entropy[row] = static_cast<float>(log_zt - at / zt);
    if (p.kl_reverse) p.kl_reverse[row] = static_cast<float>(as / zs - log_zs - bs / zs + log_zt);
    if (p.kl_forward) p.kl_forward[row] = static_cast<float>(at / zt - log_zt - bt / zt + log_zs);
  }
  if (p.targets && (p.student_logprob || p.teacher_logprob)) {
    const int64_t target = p.targets[row_offset(p, row, p.g_stride)];
    const bool ok = target >= 0 && target < p.vocab;
    const double nan = __longlong_as_double(0x7ff8000000000000ll);
    if (p.student_logprob) {
      double lp = nan;
      if (ok) {
        const double y = static_cast<double>(Traits<T>::bits_to_float(load_elem_bits<T>(srow, target))) * p.c;
        lp = kLn2 * (y - ref_of(st.ms)) - log_zs;
      }
      p.student_logprob[row] = static_cast<float>(lp);
    }
    if (kTeacher && p.teacher_logprob) {
      double lp = nan;
      if (ok) {
        const double y = static_cast<double>(Traits<T>::bits_to_float(load_elem_bits<T>(trow, target))) * p.c;
        lp = kLn2 * (y - ref_of(st.mt)) - log_zt;
      }
      p.teacher_logprob[row] = static_cast<float>(lp);
    }
  }
}

// ---- the main kernel -----------------------------------------------------------------------------
// Grid: x = ceil(rows / groups per block), y = split. kRowThreads = 256 (one row per block) or 32
// (one row per warp, for short rows).
template <typename T, bool kTeacher, int kRowThreads>
__global__ void __launch_bounds__(kBlockThreads, 4) score_rows_kernel(const Params p) {
  using Tr = Traits<T>;
  constexpr int kGroups = kBlockThreads / kRowThreads;
  constexpr int kWarpsPerGroup = kRowThreads / 32;
  constexpr int kVec = Tr::kVec;
  __shared__ State smem[kBlockThreads / 32];

  const int tid = threadIdx.x % kRowThreads;
  const int group = threadIdx.x / kRowThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGroups + group;
  const int split = blockIdx.y;
  // kRowThreads == 256: the whole block shares a row, so this exit is block-uniform; with 32 it is
  // warp-uniform and no block barrier follows.
  if (row >= p.rows) return;

  const int64_t V = p.vocab;
  const char* srow = p.student + row_offset(p, row, p.s_stride) * Tr::kSize;
  const char* trow = kTeacher ? p.teacher + row_offset(p, row, p.t_stride) * Tr::kSize : srow;
  const float c = p.c;

  State st = empty_state();
  uint4 vs[kUnroll], vt[kUnroll];

  const unsigned mis_s = static_cast<unsigned>(reinterpret_cast<uintptr_t>(srow) & 15u);
  const unsigned mis_t = static_cast<unsigned>(reinterpret_cast<uintptr_t>(trow) & 15u);
  if (mis_s == mis_t) {
    // Vector path: scalar head up to the 16-byte boundary, aligned vectors, scalar tail.
    int64_t head = static_cast<int64_t>(((16u - mis_s) & 15u) / Tr::kSize);  // < kVec
    if (head > V) head = V;
    const int64_t nvec = (V - head) / kVec;
    const int64_t tail = V - head - nvec * kVec;
    const uint4* sv = reinterpret_cast<const uint4*>(srow + head * Tr::kSize);
    const uint4* tv = reinterpret_cast<const uint4*>(trow + head * Tr::kSize);
    const int64_t chunk = (nvec + p.split - 1) / p.split;
    const int64_t begin = chunk * split;
    const int64_t end = begin + chunk < nvec ? begin + chunk : nvec;
    int64_t k = begin + tid;
    // Full tiles: kUnroll vectors per model, no bounds checks.
    for (; k + (kUnroll - 1) * kRowThreads < end; k += kUnroll * kRowThreads) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        vs[u] = load16(sv + k + u * kRowThreads);
        if (kTeacher) vt[u] = load16(tv + k + u * kRowThreads);
      }
      absorb<T, kTeacher, kUnroll>(st, vs, vt, c);
    }
    // The last partial tile.
    if (k < end) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t kk = k + u * kRowThreads;
        vs[u] = kk < end ? load16(sv + kk) : neg_inf_vec<T>();
        if (kTeacher) vt[u] = kk < end ? load16(tv + kk) : neg_inf_vec<T>();
      }
      absorb<T, kTeacher, kUnroll>(st, vs, vt, c);
    }
    // Head and tail elements (fewer than kVec each), by the first slice.
    if (split == 0 && (head > 0 || tail > 0)) {
      uint4 hs[1] = {neg_inf_vec<T>()}, ht[1] = {neg_inf_vec<T>()};
      if (tid < head) {
        set_elem<T>(hs[0], 0, load_elem_bits<T>(srow, tid));
        if (kTeacher) set_elem<T>(ht[0], 0, load_elem_bits<T>(trow, tid));
      }
      if (tid < tail) {
        const int64_t i = head + nvec * kVec + tid;
        set_elem<T>(hs[0], 1, load_elem_bits<T>(srow, i));
        if (kTeacher) set_elem<T>(ht[0], 1, load_elem_bits<T>(trow, i));
      }
      absorb<T, kTeacher, 1>(st, hs, ht, c);
    }
  } else {
    // Student and teacher rows differ in 16-byte alignment (rare: views with unrelated offsets):
    // element loads, still coalesced across the group, kVec elements per thread per tile.
    const int64_t chunk = (V + p.split - 1) / p.split;
    const int64_t begin = chunk * split;
    const int64_t end = begin + chunk < V ? begin + chunk : V;
    for (int64_t i0 = begin; i0 < end; i0 += kVec * kRowThreads) {
      uint4 es[1] = {neg_inf_vec<T>()}, et[1] = {neg_inf_vec<T>()};
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int64_t i = i0 + j * kRowThreads + tid;
        if (i < end) {
          set_elem<T>(es[0], j, load_elem_bits<T>(srow, i));
          if (kTeacher) set_elem<T>(et[0], j, load_elem_bits<T>(trow, i));
        }
      }
      absorb<T, kTeacher, 1>(st, es, et, c);
    }
  }

  // Combine the group's states: shuffles within each warp, then across the group's warps.
  warp_combine<kTeacher>(st);
  if (kWarpsPerGroup > 1) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) smem[warp] = st;
    __syncthreads();
    if (warp == group * kWarpsPerGroup) {
      st = lane < kWarpsPerGroup ? smem[warp + lane] : empty_state();
      warp_combine<kTeacher>(st);
    } else {
      return;
    }
  }
  if (tid != 0) return;
  if (p.split > 1) {
    float4* out = p.partials + (row * p.split + split) * 2;
    out[0] = make_float4(st.ms, st.mt, st.zs, st.as);
    out[1] = make_float4(st.bs, st.zt, st.at, st.bt);
  } else {
    write_outputs<T, kTeacher>(p, row, st, srow, trow);
  }
}

// Combines the `split` partial states of each row: one warp per row.
template <typename T, bool kTeacher>
__global__ void __launch_bounds__(kBlockThreads) score_finalize_kernel(const Params p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kBlockThreads / 32) + threadIdx.x / 32;
  if (row >= p.rows) return;
  State st = empty_state();
  for (int j = lane; j < p.split; j += 32) {
    const float4* in = p.partials + (row * p.split + j) * 2;
    const float4 a = in[0], b = in[1];
    combine<kTeacher>(st, State{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w});
  }
  warp_combine<kTeacher>(st);
  if (lane != 0) return;
  const char* srow = p.student + row_offset(p, row, p.s_stride) * Traits<T>::kSize;
  const char* trow = kTeacher ? p.teacher + row_offset(p, row, p.t_stride) * Traits<T>::kSize : srow;
  write_outputs<T, kTeacher>(p, row, st, srow, trow);
}

}  // namespace kern
}  // namespace cuda
}  // namespace scrimp
