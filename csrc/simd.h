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

#ifdef CNNBP_X86
template <typename F>
CNNBP_TARGET_AVX512 void run_avx512(const F& f) { f(); }
template <typename F>
CNNBP_TARGET_AVX2 void run_avx2(const F& f) { f(); }
#endif
template <typename F>
void run_portable(const F& f) { f(); }

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

// f must be declared `[&]() CNNBP_LAMBDA_INLINE { ... }` so that its body (and the always-inline
// helpers it calls) is compiled inside each target-specific wrapper.
#define CNNBP_LAMBDA_INLINE __attribute__((always_inline))

// `best` caps the choice for a loop that measures faster at a narrower width.
template <typename F>
void run_with_isa(const F& f, Isa best = Isa::avx512) {
#ifdef CNNBP_X86
  const Isa isa = static_cast<int>(active_isa()) < static_cast<int>(best) ? active_isa() : best;
  switch (isa) {
    case Isa::avx512: return run_avx512(f);
    case Isa::avx2: return run_avx2(f);
    default: break;
  }
#endif
  run_portable(f);
}

// ---- fixed-width vectors for register-blocked loops ----------------------------------------------
// Vec64<T>: 64 bytes of T as a GCC vector: one 512-bit register, two 256-bit or four 128-bit ones,
// whichever the enclosing function is compiled for. Loops that keep sums across runtime-bounded
// loops use these rather than arrays, which the compiler would keep on the stack.
template <typename T>
struct Vec64Of;
template <>
struct Vec64Of<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t index __attribute__((vector_size(64)));
};
template <>
struct Vec64Of<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t index __attribute__((vector_size(64)));
};
template <typename T>
using Vec64 = typename Vec64Of<T>::type;
template <typename T>
constexpr int kLanes64 = 64 / sizeof(T);

template <typename T>
CNNBP_ALWAYS_INLINE Vec64<T> load64(const T* p) {
  Vec64<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
CNNBP_ALWAYS_INLINE void store64(T* p, const Vec64<T>& v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename T>
CNNBP_ALWAYS_INLINE Vec64<T> splat64(T x) {
  Vec64<T> v = {};
  return v + x;
}

// p[0], p[step], p[2·step], …: reads nothing past the last of them.
template <typename T>
CNNBP_ALWAYS_INLINE Vec64<T> load64_step(const T* p, int64_t step) {
  constexpr int L = kLanes64<T>;
  if (step == 1) return load64(p);
  if (step == 2) {  // the even lanes of p[0, L) and of p[L − 1, 2L − 1)
    typename Vec64Of<T>::index even;
    for (int l = 0; l < L; ++l) even[l] = l < L / 2 ? 2 * l : L + 2 * (l - L / 2) + 1;
    return __builtin_shuffle(load64(p), load64(p + L - 1), even);
  }
  Vec64<T> v;
  for (int l = 0; l < L; ++l) v[l] = p[l * step];
  return v;
}

}  // namespace cnnbp
