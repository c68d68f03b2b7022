// The matrix products behind the convolution (see gemm.h).
//
// The blocked GEMM follows the usual structure: op(A) is packed into panels of MR rows (MR values
// per k), and op(B) is read as panels of NR columns (k-major, NR values per k): packed so when B
// is transposed, in place (a row of B per k) when it is not; a micro-kernel keeps an MR×NR tile of
// C in vector registers while it runs along k, with one broadcast of A and NR/L vector loads of B
// per k step. Blocks of KC along k keep the panels in cache.

#include "gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cnnbp.h"
#include "simd.h"

#ifdef CNNBP_X86
#include <immintrin.h>
#endif

namespace cnnbp {
namespace {

// ---- through ATen's BLAS ----------------------------------------------------------------------

template <typename T>
void gemm_aten(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
               int64_t ldb, bool accumulate, T* C, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor a = view(A, M, K, lda, trans_a), b = view(B, K, N, ldb, trans_b);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  if (accumulate) {
    at::addmm_out(c, c, a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

#ifdef CNNBP_X86
// ---- the blocked GEMM (AVX-512 and AVX2+FMA) ---------------------------------------------------

template <typename T, Isa I>
struct Tile;  // MR × NR register tile: NR = 2 vectors of L lanes, MR rows (2·MR accumulators)
template <>
struct Tile<float, Isa::avx512> {
  static constexpr int L = 16, NR = 32, MR = 12;  // 24 of 32 zmm registers
};
template <>
struct Tile<double, Isa::avx512> {
  static constexpr int L = 8, NR = 16, MR = 12;
};
template <>
struct Tile<float, Isa::avx2> {
  static constexpr int L = 8, NR = 16, MR = 6;  // 12 of 16 ymm registers
};
template <>
struct Tile<double, Isa::avx2> {
  static constexpr int L = 4, NR = 8, MR = 6;
};

constexpr int64_t KC = 256;  // k block
constexpr int64_t MC = 144;  // rows of A packed at once (a multiple of every MR)
constexpr int64_t NC = 1536; // columns of B packed at once (a multiple of every NR)

// Packs rows [i0, i0 + mc) × k [k0, k0 + kc) of op(A) as panels of MR rows: panel p holds, for each
// k, MR values (rows past M are zero).
template <typename T, Isa I>
void pack_a(bool trans, const T* A, int64_t lda, int64_t M, int64_t i0, int64_t mc, int64_t k0, int64_t kc, T* out) {
  constexpr int MR = Tile<T, I>::MR;
  for (int64_t ip = 0; ip < mc; ip += MR) {
    T* panel = out + ip * kc;
    const int64_t rows = std::max<int64_t>(0, std::min<int64_t>({MR, mc - ip, M - (i0 + ip)}));  // the rest: zeros
    if (trans) {  // op(A)'s rows i0 + ip … are contiguous in A for each k: a run of MR values per k
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = A + (k0 + k) * lda + i0 + ip;
        T* dst = panel + k * MR;
        if (rows == MR) {
          std::memcpy(dst, src, MR * sizeof(T));
        } else {
          for (int64_t r = 0; r < rows; ++r) dst[r] = src[r];
          for (int64_t r = rows; r < MR; ++r) dst[r] = T(0);
        }
      }
      continue;
    }
    // op(A) = A: each row read along k, the panel written across the rows. Whole panels four rows
    // (float) or two (double) at a time, a block of as many k transposed in SSE registers. (Packing's
    // share of a forward+backward, perf, float32, 2 threads: 512→512 3×3 at 7×7, batch 8, 14.6% with
    // both cases value by value, 8.6% with op(A) = Aᵀ by runs, 6.6% with this; 320→320 at 9×9, batch
    // 16, 10.6%, 7.2%, 4.0%; the calls' times 26.2 → 23.0 and 32.6 → 26.5 ms.)
    int64_t k_done = 0;
#ifdef CNNBP_X86
    if (rows == MR) {
      const T* a = A + (i0 + ip) * lda + k0;
      static_assert(MR % 2 == 0, "pack_a: the double blocks take rows in pairs");
      if constexpr (std::is_same_v<T, float>) {
        for (; k_done + 4 <= kc; k_done += 4) {
          int r = 0;
          for (; r + 4 <= MR; r += 4) {
            __m128 v0 = _mm_loadu_ps(a + r * lda + k_done), v1 = _mm_loadu_ps(a + (r + 1) * lda + k_done);
            __m128 v2 = _mm_loadu_ps(a + (r + 2) * lda + k_done), v3 = _mm_loadu_ps(a + (r + 3) * lda + k_done);
            _MM_TRANSPOSE4_PS(v0, v1, v2, v3);
            _mm_storeu_ps(panel + k_done * MR + r, v0);
            _mm_storeu_ps(panel + (k_done + 1) * MR + r, v1);
            _mm_storeu_ps(panel + (k_done + 2) * MR + r, v2);
            _mm_storeu_ps(panel + (k_done + 3) * MR + r, v3);
          }
          for (; r < MR; ++r)
            for (int64_t k = k_done; k < k_done + 4; ++k) panel[k * MR + r] = a[r * lda + k];
        }
      } else {
        for (; k_done + 2 <= kc; k_done += 2) {
          for (int r = 0; r < MR; r += 2) {
            const __m128d v0 = _mm_loadu_pd(a + r * lda + k_done), v1 = _mm_loadu_pd(a + (r + 1) * lda + k_done);
            _mm_storeu_pd(panel + k_done * MR + r, _mm_unpacklo_pd(v0, v1));
            _mm_storeu_pd(panel + (k_done + 1) * MR + r, _mm_unpackhi_pd(v0, v1));
          }
        }
      }
    }
#endif
    for (int r = 0; r < MR; ++r) {
      if (r >= rows) {
        for (int64_t k = k_done; k < kc; ++k) panel[k * MR + r] = T(0);
      } else {
        const T* src = A + (i0 + ip + r) * lda + k0;  // read along the row
        for (int64_t k = k_done; k < kc; ++k) panel[k * MR + r] = src[k];
      }
    }
  }
}

// Packs k [k0, k0 + kc) × columns [j0, j0 + nc) of op(B) as panels of NR columns (columns past N zero).
// B itself is read along its rows: row k's NR-column pieces go to every panel in turn. (Panel after
// panel, each read down 256 rows of B a row apart, which missed the cache on every row: packing
// then took longer than the products for a 64×576×3136 product.) Untransposed, only a last panel of
// fewer than NR columns is packed: gemm_blocked_columns reads whole panels of B in place.
template <typename T, Isa I>
void pack_b(bool trans, const T* B, int64_t ldb, int64_t N, int64_t j0, int64_t nc, int64_t k0, int64_t kc, T* out) {
  constexpr int NR = Tile<T, I>::NR;
  auto valid = [&](int64_t jp) { return std::max<int64_t>(0, std::min<int64_t>(NR, std::min(nc, N - j0) - jp)); };
  if (!trans) {
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = B + (k0 + k) * ldb + j0;
      for (int64_t jp = 0; jp < nc; jp += NR) {
        T* dst = out + jp * kc + k * NR;
        const int64_t n_valid = valid(jp);
        if (n_valid == NR) {
          std::memcpy(dst, src + jp, NR * sizeof(T));
        } else {
          std::copy(src + jp, src + jp + n_valid, dst);
          std::fill(dst + n_valid, dst + NR, T(0));
        }
      }
    }
    return;
  }
  for (int64_t jp = 0; jp < nc; jp += NR) {
    T* panel = out + jp * kc;
    const int64_t n_valid = valid(jp);
    for (int64_t j = 0; j < n_valid; ++j) {
      const T* src = B + (j0 + jp + j) * ldb + k0;  // read along the row of B
      for (int64_t k = 0; k < kc; ++k) panel[k * NR + j] = src[k];
    }
    for (int64_t k = 0; k < kc; ++k) std::fill(panel + k * NR + n_valid, panel + (k + 1) * NR, T(0));
  }
}

// The vector operations of each ISA. They are `inline` with their target, not always_inline: the
// micro-kernel body below is written once, without a target of its own, and GCC refuses to force
// a function with a wider target into it. It inlines them all the same once that body has been
// inlined into its target-specific wrapper (checked: no calls in the AVX2 or AVX-512 kernels).
template <typename T, Isa I>
struct V;
#define CNNBP_VECTOR_OPS(TYPE, ISA, TARGET, REG, P, S)                                                  \
  template <>                                                                                            \
  struct V<TYPE, ISA> {                                                                                  \
    using reg = REG;                                                                                     \
    static TARGET inline reg zero() { return P##_setzero_##S(); }                                        \
    static TARGET inline reg load(const TYPE* p) { return P##_loadu_##S(p); }                            \
    static TARGET inline reg set1(TYPE v) { return P##_set1_##S(v); }                                    \
    static TARGET inline reg fma(reg a, reg b, reg c) { return P##_fmadd_##S(a, b, c); }                 \
    static TARGET inline reg add(reg a, reg b) { return P##_add_##S(a, b); }                             \
    static TARGET inline void store(TYPE* p, reg v) { P##_storeu_##S(p, v); }                            \
  };
CNNBP_VECTOR_OPS(float, Isa::avx512, CNNBP_TARGET_AVX512, __m512, _mm512, ps)
CNNBP_VECTOR_OPS(double, Isa::avx512, CNNBP_TARGET_AVX512, __m512d, _mm512, pd)
CNNBP_VECTOR_OPS(float, Isa::avx2, CNNBP_TARGET_AVX2, __m256, _mm256, ps)
CNNBP_VECTOR_OPS(double, Isa::avx2, CNNBP_TARGET_AVX2, __m256d, _mm256, pd)
#undef CNNBP_VECTOR_OPS

// C[R × NV·L tile] (+)= A · B over kc steps, the tile in registers. A: packed (PACKED: the first R
// of a panel's MR values per k, as pack_a makes them) or rows read in place (A[r·lda + k]); B: NV vectors per k, ldb apart.
// A full tile is read and written in place; an edge tile (rows < R or cols < NV·L), or a turned
// one (C[j·ldc + r], the tile's transpose), goes through a local buffer.
template <typename T, Isa I, int R, int NV, bool PACKED>
CNNBP_ALWAYS_INLINE void kernel_body(int64_t kc, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                                     int64_t rows, int64_t cols, bool turned, bool accumulate) {
  using VT = V<T, I>;
  constexpr int L = Tile<T, I>::L;
  typename VT::reg acc[R][NV];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = VT::zero();
  for (int64_t k = 0; k < kc; ++k) {
    typename VT::reg b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = VT::load(B + k * ldb + v * L);
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
      const typename VT::reg a = VT::set1(PACKED ? A[k * Tile<T, I>::MR + r] : A[r * lda + k]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = VT::fma(a, b[v], acc[r][v]);
    }
  }
  if (!turned && rows == R && cols == NV * L) {
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        T* at = C + r * ldc + v * L;
        VT::store(at, accumulate ? VT::add(VT::load(at), acc[r][v]) : acc[r][v]);
      }
    return;
  }
  alignas(64) T tile[R * NV * L];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) VT::store(tile + (r * NV + v) * L, acc[r][v]);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) {
      T& c = turned ? C[j * ldc + r] : C[r * ldc + j];
      c = (accumulate ? c : T(0)) + tile[r * NV * L + j];
    }
}

template <typename T, int R, int NV, bool PACKED>
CNNBP_TARGET_AVX512 void kernel_avx512(int64_t kc, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                                       int64_t ldc, int64_t rows, int64_t cols, bool turned, bool accumulate) {
  kernel_body<T, Isa::avx512, R, NV, PACKED>(kc, A, lda, B, ldb, C, ldc, rows, cols, turned, accumulate);
}
template <typename T, int R, int NV, bool PACKED>
CNNBP_TARGET_AVX2 void kernel_avx2(int64_t kc, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                                   int64_t rows, int64_t cols, bool turned, bool accumulate) {
  kernel_body<T, Isa::avx2, R, NV, PACKED>(kc, A, lda, B, ldb, C, ldc, rows, cols, turned, accumulate);
}
// The ISA's kernel for tiles of R rows × NV vectors.
template <typename T, Isa I, int R, int NV, bool PACKED>
void tile_kernel(int64_t kc, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t rows,
                 int64_t cols, bool turned, bool accumulate) {
  if constexpr (I == Isa::avx512)
    kernel_avx512<T, R, NV, PACKED>(kc, A, lda, B, ldb, C, ldc, rows, cols, turned, accumulate);
  else
    kernel_avx2<T, R, NV, PACKED>(kc, A, lda, B, ldb, C, ldc, rows, cols, turned, accumulate);
}

// One thread's share: the columns [n0, n1) of C. op(B) = B (not transposed) is read in place, a
// row of NR values per k as a packed panel holds them, except a last panel of fewer than NR
// columns (packed, zero-padded): packing B cost a buffer of NC × KC values per thread (1.5 MiB in
// float), which put the peak memory of small 3×3 layers' forward+backward at 1.2-1.4× native's.
// `packed`, when not null, is op(A) packed whole (pack_whole: panels of MR rows over pk values of
// k, op(A)'s column 0 at k = 0 of each): read there, not packed again.
template <typename T, Isa I>
void gemm_blocked_columns(bool trans_a, bool trans_b, int64_t M, int64_t n0, int64_t n1, int64_t K, const T* A,
                          int64_t lda, const T* packed, int64_t pk, const T* B, int64_t ldb, bool accumulate, T* C,
                          int64_t ldc) {
  constexpr int MR = Tile<T, I>::MR, NR = Tile<T, I>::NR;
  const int64_t kc_max = std::min(KC, K);
  const bool in_place = !trans_b;
  const int64_t ncb = in_place ? n1 - n0 : NC;  // columns per block (one block when B is read in place)
  Scratch<T> apack(packed ? 0 : std::min(MC, (M + MR - 1) / MR * MR) * kc_max);
  Scratch<T> bpack((in_place ? NR : std::min(NC, (n1 - n0 + NR - 1) / NR * NR)) * kc_max);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    const bool acc = accumulate || k0 > 0;
    for (int64_t j0 = n0; j0 < n1; j0 += ncb) {
      const int64_t nc = std::min(ncb, n1 - j0);
      const int64_t whole = in_place ? nc / NR * NR : 0;  // columns read in place
      if (whole < nc)
        pack_b<T, I>(trans_b, B, ldb, n1, j0 + whole, (nc - whole + NR - 1) / NR * NR, k0, kc, bpack.data());
      for (int64_t i0 = 0; i0 < M; i0 += MC) {
        const int64_t mc = std::min(MC, M - i0);
        const int64_t mc_padded = (mc + MR - 1) / MR * MR;
        if (!packed) pack_a<T, I>(trans_a, A, lda, M, i0, mc_padded, k0, kc, apack.data());
        for (int64_t jp = 0; jp < nc; jp += NR) {
          const bool direct = jp < whole;
          const T* bp = direct ? B + k0 * ldb + j0 + jp : bpack.data() + (jp - whole) * kc;
          const int64_t ldbp = direct ? ldb : NR;
          for (int64_t ip = 0; ip < mc; ip += MR) {
            const T* ap = packed ? packed + (i0 + ip) * pk + k0 * MR : apack.data() + ip * kc;
            T* c = C + (i0 + ip) * ldc + j0 + jp;
            const int64_t rows = std::min<int64_t>(MR, mc - ip), cols = std::min<int64_t>(NR, nc - jp);
            // A last panel of a few rows by a kernel of fewer (M = 64: 5 panels of 12 rows, 1 of 4)
            if (rows <= MR / 3)
              tile_kernel<T, I, MR / 3, 2, true>(kc, ap, 0, bp, ldbp, c, ldc, rows, cols, false, acc);
            else if (rows <= 2 * MR / 3)
              tile_kernel<T, I, 2 * MR / 3, 2, true>(kc, ap, 0, bp, ldbp, c, ldc, rows, cols, false, acc);
            else
              tile_kernel<T, I, MR, 2, true>(kc, ap, 0, bp, ldbp, c, ldc, rows, cols, false, acc);
          }
        }
      }
    }
  }
}

// ---- X · Y with a thin Y, X read in place (∂E/∂W = δ · colᵀ as col · δᵀ) ------------------------
// ∂E/∂W's products use each value of the unrolled input (col) only Kg times. Packed into panels as
// the blocked path packs its operands (a transposition, value by value) col took about as long to
// pack as the products took (Kg = 32). Here neither operand is packed: X (col, M × K) is read where
// it is, a tile of rows broadcasting X[r][k] from its rows (kernel_body, not PACKED), and Y (δᵀ,
// K × N, N ≤ kThinMax) is read a row of vectors per k, as the panels of B are. Panels of two
// vectors of columns (tiles of MR rows), then one of one vector (2·MR rows); the columns past the
// last whole vector are copied, zero-padded, into a panel of one vector per k block. Z = X · Y over blocks of KT along k (each adds into the tile the one
// before stored) goes to C as Z, or turned (C[j·ldc + i]: δ · colᵀ, ∂E/∂W in the weight's layout).
constexpr int64_t KT = 512;  // k block: a tile's rows of X (12 × 512 floats, 24 KiB) stay in L1

// Rows [m0, m1) of Z, in groups of 2·MR rows: for each group, every column panel in turn, while the
// group's rows of X are in cache. A group of fewer rows is copied, zero-padded, into a buffer first,
// so that no kernel reads past X's last row.
template <typename T, Isa I>
void thin_rows(int64_t m0, int64_t m1, int64_t N, int64_t K, const T* X, int64_t ldx, const T* Y, int64_t ldy,
               bool accumulate, T* C, int64_t ldc, bool turned) {
  constexpr int MR = Tile<T, I>::MR, L = Tile<T, I>::L, G = 2 * MR;
  const int64_t kt_max = std::min(KT, K);
  const int64_t pairs = N / (2 * L), single = N % (2 * L) >= L, tail = N % L;  // panels of each width
  const int64_t tail_at = N - tail;
  Scratch<T> tail_panel(tail ? L * kt_max : 0);
  Scratch<T> edge(G * kt_max);
  for (int64_t k0 = 0; k0 < K; k0 += KT) {
    const int64_t kc = std::min(KT, K - k0);
    const bool acc = accumulate || k0 > 0;
    const T* y = Y + k0 * ldy;
    if (tail) {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t j = 0; j < L; ++j) tail_panel.data()[k * L + j] = j < tail ? y[k * ldy + tail_at + j] : T(0);
    }
    for (int64_t i = m0; i < m1; i += G) {
      const int64_t rows = std::min<int64_t>(G, m1 - i);
      const T* x = X + i * ldx + k0;
      int64_t ld = ldx;
      if (rows < G) {
        for (int64_t r = 0; r < G; ++r)
          for (int64_t k = 0; k < kc; ++k) edge.data()[r * kc + k] = r < rows ? x[r * ldx + k] : T(0);
        x = edge.data(), ld = kc;
      }
      auto out = [&](int64_t r, int64_t j) { return turned ? C + j * ldc + i + r : C + (i + r) * ldc + j; };
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t j = p * 2 * L;
        for (int64_t h = 0; h < G; h += MR)
          if (h < rows)
            tile_kernel<T, I, MR, 2, false>(kc, x + h * ld, ld, y + j, ldy, out(h, j), ldc,
                                           std::min<int64_t>(MR, rows - h), 2 * L, turned, acc);
      }
      if (single) {
        const int64_t j = pairs * 2 * L;
        tile_kernel<T, I, G, 1, false>(kc, x, ld, y + j, ldy, out(0, j), ldc, rows, L, turned, acc);
      }
      if (tail)
        tile_kernel<T, I, G, 1, false>(kc, x, ld, tail_panel.data(), L, out(0, tail_at), ldc, rows, tail, turned, acc);
    }
  }
}

template <typename T, Isa I>
void gemm_thin_blocked(int64_t M, int64_t N, int64_t K, const T* X, int64_t ldx, const T* Y, int64_t ldy,
                       bool accumulate, T* C, int64_t ldc, bool turned) {
  constexpr int G = 2 * Tile<T, I>::MR;
  const int64_t groups = (M + G - 1) / G;
  // Split over groups of rows of Z: each thread writes its own rows of C (columns, turned).
  at::parallel_for(0, groups, grain_for(G * N * K / 8), [&](int64_t t0, int64_t t1) {
    thin_rows<T, I>(t0 * G, std::min(M, t1 * G), N, K, X, ldx, Y, ldy, accumulate, C, ldc, turned);
  });
}

template <typename T, Isa I>
void gemm_blocked(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* packed,
                  int64_t pk, const T* B, int64_t ldb, bool accumulate, T* C, int64_t ldc) {
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    return;
  }
  constexpr int MR = Tile<T, I>::MR, NR = Tile<T, I>::NR;
  const int64_t panels = (N + NR - 1) / NR, row_panels = (M + MR - 1) / MR;
  // Columns split in whole panels; each thread packs its own operands and writes its own columns.
  // Where few panels leave the threads unevenly loaded and the rows split more evenly, the rows are
  // split instead, in whole panels of MR: each thread packs only its rows of A, and all read B in
  // place. (One sample's 196 positions are 7 panels, 4 + 3 on two threads, and each thread packed
  // all of A: a 256→256 3×3 forward at 14×14 ran at 115 GFLOP/s on two Zen 4 cores.)
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  auto largest_share = [&](int64_t parts, int64_t unit, int64_t len) {
    return std::min(len, (parts + threads - 1) / threads * unit);
  };
  if (threads > 1 && largest_share(row_panels, MR, M) * N < largest_share(panels, NR, N) * M) {
    at::parallel_for(0, row_panels, grain_for(N * K * MR / 8), [&](int64_t p0, int64_t p1) {
      const int64_t m0 = p0 * MR, m1 = std::min(M, p1 * MR);
      const T* a = A ? (trans_a ? A + m0 : A + m0 * lda) : nullptr;
      gemm_blocked_columns<T, I>(trans_a, trans_b, m1 - m0, 0, N, K, a, lda, packed ? packed + m0 * pk : nullptr, pk, B,
                                 ldb, accumulate, C + m0 * ldc, ldc);
    });
    return;
  }
  at::parallel_for(0, panels, grain_for(M * K * NR / 8), [&](int64_t p0, int64_t p1) {
    gemm_blocked_columns<T, I>(trans_a, trans_b, M, p0 * NR, std::min(N, p1 * NR), K, A, lda, packed, pk, B, ldb,
                               accumulate, C, ldc);
  });
}

// op(A) (M × K) as the panels of MR rows that pack_a makes, over all of K: panel p at out + p·MR·K.
template <typename T, Isa I>
void pack_whole(bool trans, int64_t M, int64_t K, const T* A, int64_t lda, T* out) {
  constexpr int MR = Tile<T, I>::MR;
  const int64_t panels = (M + MR - 1) / MR;
  at::parallel_for(0, panels, grain_for(MR * K * 8), [&](int64_t p0, int64_t p1) {
    pack_a<T, I>(trans, A, lda, M, p0 * MR, (p1 - p0) * MR, 0, K, out + p0 * MR * K);
  });
}
#endif

}  // namespace

namespace {
bool own_gemm_selected() {
  static const bool own = [] {
#ifdef CNNBP_X86
    if (active_isa() == Isa::portable) return false;
    if (const char* choice = std::getenv("CNNBP_GEMM")) {
      if (!std::strcmp(choice, "own")) return true;
      if (!std::strcmp(choice, "blas")) return false;
    }
    if (active_isa() != Isa::avx512) return false;  // AVX2: MKL measured faster (gemm.h)
    __builtin_cpu_init();
    return !__builtin_cpu_is("intel");
#else
    return false;
#endif
  }();
  return own;
}
}  // namespace

const char* gemm_backend() { return own_gemm_selected() ? "own" : "blas"; }

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
          int64_t ldb, bool accumulate, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
#ifdef CNNBP_X86
  if (own_gemm_selected()) {
    if (active_isa() == Isa::avx512)
      gemm_blocked<T, Isa::avx512>(trans_a, trans_b, M, N, K, A, lda, nullptr, 0, B, ldb, accumulate, C, ldc);
    else
      gemm_blocked<T, Isa::avx2>(trans_a, trans_b, M, N, K, A, lda, nullptr, 0, B, ldb, accumulate, C, ldc);
    return;
  }
#endif
  gemm_aten(trans_a, trans_b, M, N, K, A, lda, B, ldb, accumulate, C, ldc);
}

template <typename T>
bool PackedA<T>::pack(bool trans_a, int64_t rows, int64_t depth, const T* A, int64_t lda) {
  panels.clear();
  M = rows, K = depth;
#ifdef CNNBP_X86
  if (!own_gemm_selected() || M == 0 || K == 0) return false;
  const bool wide = active_isa() == Isa::avx512;
  const int64_t MR = wide ? Tile<T, Isa::avx512>::MR : Tile<T, Isa::avx2>::MR;
  panels.resize((M + MR - 1) / MR * MR * K);
  if (wide)
    pack_whole<T, Isa::avx512>(trans_a, M, K, A, lda, panels.data());
  else
    pack_whole<T, Isa::avx2>(trans_a, M, K, A, lda, panels.data());
  return true;
#else
  return false;
#endif
}

template <typename T>
void PackedA<T>::gemm(int64_t k0, int64_t kc, int64_t N, const T* B, int64_t ldb, bool accumulate, T* C,
                      int64_t ldc) const {
  TORCH_CHECK(!panels.empty() && k0 >= 0 && kc > 0 && k0 + kc <= K, "cnnbp: PackedA::gemm outside the packed operand");
  if (N == 0) return;
#ifdef CNNBP_X86
  if (active_isa() == Isa::avx512)
    gemm_blocked<T, Isa::avx512>(false, false, M, N, kc, nullptr, 0,
                                 panels.data() + k0 * Tile<T, Isa::avx512>::MR, K, B, ldb, accumulate, C, ldc);
  else
    gemm_blocked<T, Isa::avx2>(false, false, M, N, kc, nullptr, 0, panels.data() + k0 * Tile<T, Isa::avx2>::MR, K,
                               B, ldb, accumulate, C, ldc);
#endif
}

template struct PackedA<float>;
template struct PackedA<double>;

bool thin_products() {
#ifdef CNNBP_X86
  return own_gemm_selected();
#else
  return false;
#endif
}

template <typename T>
void gemm_thin(int64_t M, int64_t N, int64_t K, const T* X, int64_t ldx, const T* Y, int64_t ldy, bool accumulate,
               T* C, int64_t ldc, bool turned) {
  TORCH_CHECK(thin_products() && N <= kThinMax, "cnnbp: gemm_thin needs the own backend and N <= ", kThinMax);
  if (M == 0 || N == 0) return;
#ifdef CNNBP_X86
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) (turned ? C[j * ldc + i] : C[i * ldc + j]) = T(0);
    return;
  }
  if (active_isa() == Isa::avx512)
    gemm_thin_blocked<T, Isa::avx512>(M, N, K, X, ldx, Y, ldy, accumulate, C, ldc, turned);
  else
    gemm_thin_blocked<T, Isa::avx2>(M, N, K, X, ldx, Y, ldy, accumulate, C, ldc, turned);
#endif
}

template void gemm_thin<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, bool, float*,
                               int64_t, bool);
template void gemm_thin<double>(int64_t, int64_t, int64_t, const double*, int64_t, const double*, int64_t, bool,
                                double*, int64_t, bool);

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, bool,
                          float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t, const double*, int64_t,
                           bool, double*, int64_t);

}  // namespace cnnbp
