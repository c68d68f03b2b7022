// Run-time choice of instruction set for the hot loops.
//
// A kernel body is written once, as plain loops in an always-inline lambda; run_with_isa()
// instantiates it three times: compiled for AVX-512, for AVX2+FMA, and for the baseline x86-64
// (or whatever architecture this is built on), and calls the best one the CPU supports. The
// environment variable CNNBP_SIMD=portable|avx2|avx512 caps the choice (read once, at load), so the
// portable path can be tested on any machine.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#define CNNBP_ALWAYS_INLINE inline __attribute__((always_inline))

namespace cnnbp {

enum class Isa { portable = 0, avx2 = 1, avx512 = 2 };

#if defined(__x86_64__) && defined(__GNUC__)
#define CNNBP_X86 1
#define CNNBP_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define CNNBP_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#endif

inline Isa detect_isa() {
  Isa best = Isa::portable;
#ifdef CNNBP_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::avx512;
#endif
  if (const char* cap = std::getenv("CNNBP_SIMD")) {
    Isa limit = best;
    if (!std::strcmp(cap, "portable")) limit = Isa::portable;
    else if (!std::strcmp(cap, "avx2")) limit = Isa::avx2;
    if (static_cast<int>(limit) < static_cast<int>(best)) best = limit;
  }
  return best;
}

inline Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "portable";
}

// What a kernel body compiled for one ISA may know of it: the widest vector its registers hold, and
// the widest GCC vector whose comparison results it may keep as values.
//
// compare_bytes: a comparison of two 64-byte GCC vectors yields, on AVX-512, a mask register, not
// a vector. The always-inline helpers the kernels call are compiled outside the AVX-512 target,
// where the result of `a > b` is typed as a vector of 32-bit booleans; once inlined into the
// AVX-512 wrapper, GCC 12 can compute that type only one lane at a time, and splits any use of it
// other than as the condition of selects (two comparisons combined, `take |= a != a`; matches
// counted, `count -= m`) into a scalar compare and insert per lane. The channels_last 3x3 stride-2
// pool forward ran 15x slower than at 256 bits that way. 32-byte comparisons (AVX-512VL) are
// vectors and stay whole. Loops that only select on one comparison (`take = v > best;
// best = take ? v : best; at = take ? t : at`) may use vector_bytes.
template <Isa I>
struct IsaTag {
  static constexpr Isa isa = I;
  static constexpr int vector_bytes = I == Isa::avx512 ? 64 : I == Isa::avx2 ? 32 : 16;
  static constexpr int compare_bytes = vector_bytes > 32 ? 32 : vector_bytes;
};

// f(IsaTag<I>{}) where f takes the tag (a generic lambda `[&](auto isa) …`), else f().
template <Isa I, typename F>
CNNBP_ALWAYS_INLINE void call_for_isa(const F& f) {
  if constexpr (std::is_invocable_v<const F&, IsaTag<I>>)
    f(IsaTag<I>{});
  else
    f();
}

#ifdef CNNBP_X86
template <typename F>
CNNBP_TARGET_AVX512 void run_avx512(const F& f) { call_for_isa<Isa::avx512>(f); }
template <typename F>
CNNBP_TARGET_AVX2 void run_avx2(const F& f) { call_for_isa<Isa::avx2>(f); }
#endif
template <typename F>
void run_portable(const F& f) { call_for_isa<Isa::portable>(f); }

// The widest ISA worth using for compare-and-blend loops (max_pool2d): 512 bits on Intel's AVX-512
// cores (a 3x3 stride-2 pool over 64 x 112^2: 0.84 ms against 1.07 at 256 bits), 256 bits elsewhere
// (on AMD Zen 5 the 256-bit loops measured faster).
inline Isa blend_isa() {
#ifdef CNNBP_X86
  static const Isa isa = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") ? Isa::avx512 : Isa::avx2;
  }();
  return isa;
#else
  return Isa::portable;
#endif
}

// The ISA for blend loops that combine comparisons (IsaTag::compare_bytes wide): at most AVX2.
// Their 256-bit code measured 15-40% slower compiled into the AVX-512 wrapper than into the AVX2 one
// on an Intel Xeon (a 3x3 stride-2 channels_last pool forward: 0.53 against 0.37-0.41 ms; NCHW 2x2:
// 1.23 against 0.86-0.94).
inline Isa compare_isa() { return blend_isa() == Isa::avx512 ? Isa::avx2 : blend_isa(); }

// f must be declared `[&]() CNNBP_LAMBDA_INLINE { ... }` (or `[&](auto isa) CNNBP_LAMBDA_INLINE`,
// to be told the ISA as an IsaTag) so that its body (and the always-inline helpers it calls) is
// compiled inside each target-specific wrapper.
#define CNNBP_LAMBDA_INLINE __attribute__((always_inline))

// The ISA a loop capped at `best` runs: the narrower of best and the CPU's (active_isa()).
inline Isa capped_isa(Isa best) {
  return static_cast<int>(active_isa()) < static_cast<int>(best) ? active_isa() : best;
}

// `best` caps the choice for a loop that measures faster at a narrower width.
template <typename F>
void run_with_isa(const F& f, Isa best = Isa::avx512) {
#ifdef CNNBP_X86
  const Isa isa = capped_isa(best);
  switch (isa) {
    case Isa::avx512: return run_avx512(f);
    case Isa::avx2: return run_avx2(f);
    default: break;
  }
#endif
  run_portable(f);
}

// ---- fixed-width vectors for register-blocked loops ----------------------------------------------
// Vec64<T, PB>: 64 bytes of T held as 64 / PB GCC vectors of PB bytes, PB the register width of the
// ISA the enclosing function is compiled for (IsaTag::vector_bytes): one 512-bit register, two
// 256-bit or four 128-bit ones. Loops that keep sums across runtime-bounded loops use these rather
// than arrays, which the compiler would keep on the stack. (A single 64-byte GCC vector is no
// substitute: without AVX-512 it has no machine mode, and GCC keeps it in memory, building each
// splat lane by lane: the depthwise loops ran 3-5x slower than native on an AVX2 CPU that way.)
// Lane l is the same element at every PB: which terms a lane sums, and in what order, does not
// depend on PB.
template <typename T, int PB>
struct Vec64 {
  typedef T piece __attribute__((vector_size(PB)));
  static constexpr int kPieces = 64 / PB, kPieceLanes = PB / int(sizeof(T)), kLanes = 64 / int(sizeof(T));
  piece v[kPieces];

  CNNBP_ALWAYS_INLINE Vec64& operator+=(const Vec64& o) {
    for (int i = 0; i < kPieces; ++i) v[i] += o.v[i];
    return *this;
  }
  CNNBP_ALWAYS_INLINE friend Vec64 operator+(Vec64 a, const Vec64& b) { return a += b; }
  CNNBP_ALWAYS_INLINE friend Vec64 operator*(const Vec64& a, const Vec64& b) {
    Vec64 r;
    for (int i = 0; i < kPieces; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  CNNBP_ALWAYS_INLINE T lane(int l) const { return v[l / kPieceLanes][l % kPieceLanes]; }
};
template <typename T>
constexpr int kLanes64 = 64 / sizeof(T);

template <int PB, typename T>
CNNBP_ALWAYS_INLINE Vec64<T, PB> load64(const T* p) {
  Vec64<T, PB> r;
  for (int i = 0; i < r.kPieces; ++i) std::memcpy(&r.v[i], p + i * r.kPieceLanes, PB);
  return r;
}

template <int PB, typename T>
CNNBP_ALWAYS_INLINE void store64(T* p, const Vec64<T, PB>& x) {
  for (int i = 0; i < x.kPieces; ++i) std::memcpy(p + i * x.kPieceLanes, &x.v[i], PB);
}

template <int PB, typename T>
CNNBP_ALWAYS_INLINE Vec64<T, PB> splat64(T x) {
  Vec64<T, PB> r;
  for (int i = 0; i < r.kPieces; ++i) r.v[i] = typename Vec64<T, PB>::piece{} + x;
  return r;
}

// Lanes at and above `skip` of 64 bytes of T, as bit masks (for keep_lanes): built once, outside
// the loops that apply them.
template <int PB, typename T>
struct LaneMask {
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I index __attribute__((vector_size(PB)));
  static constexpr int kPieces = 64 / PB, kPieceLanes = PB / int(sizeof(T));
  index keep[kPieces];
  explicit LaneMask(int skip) {
    for (int i = 0; i < kPieces; ++i)
      for (int l = 0; l < kPieceLanes; ++l) keep[i][l] = i * kPieceLanes + l < skip ? 0 : -1;
  }
};

// x with the lanes that m does not keep set to +0.
template <int PB, typename T>
CNNBP_ALWAYS_INLINE Vec64<T, PB> keep_lanes(const Vec64<T, PB>& x, const LaneMask<PB, T>& m) {
  Vec64<T, PB> r;
  for (int i = 0; i < x.kPieces; ++i) {
    typename LaneMask<PB, T>::index bits;
    std::memcpy(&bits, &x.v[i], PB);  // (a vector ?: here crashed GCC 12 on the portable path)
    bits &= m.keep[i];
    std::memcpy(&r.v[i], &bits, PB);
  }
  return r;
}

// p[0], p[step], p[2·step], …: reads nothing past the last of them.
template <int PB, typename T>
CNNBP_ALWAYS_INLINE Vec64<T, PB> load64_step(const T* p, int64_t step) {
  typedef Vec64<T, PB> V;
  constexpr int PL = V::kPieceLanes;
  if (step == 1) return load64<PB>(p);
  V r;
  if (step == 2) {  // piece i: the even lanes of p[2i·PL, +PL) and of p[2i·PL + PL − 1, +PL)
    typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
    typedef I index __attribute__((vector_size(PB)));
    index even;
    for (int l = 0; l < PL; ++l) even[l] = l < PL / 2 ? 2 * l : PL + 2 * (l - PL / 2) + 1;
    for (int i = 0; i < V::kPieces; ++i) {
      typename V::piece a, b;
      std::memcpy(&a, p + 2 * i * PL, PB);
      std::memcpy(&b, p + 2 * i * PL + PL - 1, PB);
      r.v[i] = __builtin_shuffle(a, b, even);
    }
    return r;
  }
  for (int l = 0; l < V::kLanes; ++l) r.v[l / PL][l % PL] = p[l * step];
  return r;
}

}  // namespace cnnbp
