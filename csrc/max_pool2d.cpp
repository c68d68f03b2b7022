// max_pool2d: forward and backward side by side.
//
//   forward   x[n,c,i,j] = max over the window { o[n, c, i·sh + m·dh − ph, j·sw + q·dw − pw] }
//             (positions in the padding never win), and indices[n,c,i,j] = h·W + v, the flat
//             position of the winner inside its input plane.
//   backward  ∂E/∂o[n,c,h,v] = Σ over the windows that (h,v) won of δ[n,c,i,j]
//
// Only the maximum contributes to the output, so only it receives gradient; where windows overlap
// (stride < kernel) one input can win several windows and its gradient is the sum of theirs.
// Ties go to the first maximum in window scan order (row by row); a NaN anywhere in the window wins
// (the last NaN, in scan order), so NaN propagates as in PyTorch.

#include "cnnbp.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef CNNBP_X86
#include <immintrin.h>
#endif

namespace cnnbp {
namespace {

struct PoolShape {
  int64_t planes, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// Output length of one dimension, as PyTorch computes it: floor or ceil, and in ceil mode the last
// window must start inside the input or its left padding.
int64_t pooled_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dilation,
                    bool ceil_mode) {
  const int64_t numer = in + 2 * pad - dilation * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (numer >= 0 ? numer / stride : -((-numer + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

// The window's fields of s (kernel, stride, padding, dilation: pairs, already checked).
inline void set_window(PoolShape& s, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation) {
  s.kh = kernel[0], s.kw = kernel[1], s.sh = stride[0], s.sw = stride[1];
  s.ph = padding[0], s.pw = padding[1], s.dh = dilation[0], s.dw = dilation[1];
}

PoolShape check_max_pool2d(const at::Tensor& input, at::IntArrayRef kernel, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(input.device().is_cpu() && input.layout() == at::kStrided,
              "max_pool2d: input must be a dense CPU tensor, but got ", input.device());
  TORCH_CHECK(input.scalar_type() != at::kBool && !at::isComplexType(input.scalar_type()),
              "max_pool2d: input must be a real floating-point or integer tensor, but got ",
              input.scalar_type());
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "max_pool2d: kernel_size, stride, padding and dilation must have 2 values each");
  TORCH_CHECK(kernel[0] > 0 && kernel[1] > 0,
              "max_pool2d: kernel_size should be greater than zero, but got ", kernel);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0,
              "max_pool2d: stride should be greater than zero, but got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0,
              "max_pool2d: dilation should be greater than zero, but got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0,
              "max_pool2d: pad must be non-negative, but got padding=", padding);
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(padding[d] <= ((kernel[d] - 1) * dilation[d] + 1) / 2 && padding[d] <= kernel[d] / 2,
                "max_pool2d: pad should be at most half of kernel size, but got padding=", padding,
                ", kernel_size=", kernel, " and dilation=", dilation);
  }
  TORCH_CHECK(input.dim() == 4 && input.size(1) > 0 && input.size(2) > 0 && input.size(3) > 0,
              "max_pool2d: expected a 4-D input (N, C, H, W) with non-zero C, H and W (N may be 0), "
              "but got input of size: ",
              input.sizes());
  PoolShape s;
  s.H = input.size(2), s.W = input.size(3);
  s.planes = input.size(0) * input.size(1);
  set_window(s, kernel, stride, padding, dilation);
  s.OH = pooled_size(s.H, s.kh, s.ph, s.sh, s.dh, ceil_mode);
  s.OW = pooled_size(s.W, s.kw, s.pw, s.sw, s.dw, ceil_mode);
  TORCH_CHECK(s.OH >= 1 && s.OW >= 1, "max_pool2d: given input size: (", input.size(1), "x", s.H,
              "x", s.W, "). Calculated output size: (", input.size(1), "x", s.OH, "x", s.OW,
              "). Output size is too small");
  return s;
}

// First in-image tap of a window that starts at `start` (possibly in the padding) and steps by
// `dilation`, and the end of the window clipped to the image.
inline void window(int64_t start, int64_t k, int64_t dilation, int64_t len, int64_t& first,
                   int64_t& end) {
  end = std::min(start + (k - 1) * dilation + 1, len);
  first = start;
  while (first < 0) first += dilation;
}

template <typename T>
CNNBP_ALWAYS_INLINE bool is_nan(T v) {
  if constexpr (std::is_floating_point_v<T>) {
    return v != v;
  } else {
    return false;
  }
}

template <typename T>
CNNBP_ALWAYS_INLINE auto lowest_value() {
  using acc_t = at::opmath_type<T>;
  return std::numeric_limits<acc_t>::has_infinity ? -std::numeric_limits<acc_t>::infinity()
                                                  : std::numeric_limits<acc_t>::lowest();
}

// The running maximum of one window gets a candidate: a strictly larger value or a NaN takes over
// (so ties keep the earlier tap and NaN propagates). Written branch-free so that the loops over
// output columns (NCHW) or channels (channels_last) vectorise.
template <typename A, typename I>
CNNBP_ALWAYS_INLINE void offer(A val, I at, A& best, I& best_at) {
  const bool take = (val > best) | is_nan(val);
  best = take ? val : best;
  best_at = take ? at : best_at;
}

// Copies one input row into its padded, phase-split buffer (see max_pool2d_plane_rows).
template <typename T, typename A>
CNNBP_ALWAYS_INLINE void fill_phases(const T* row, A* phases, int64_t phase_len, const PoolShape& s, A low) {
  if (s.sw == 1) {
    const int64_t body = std::min(s.W, phase_len - s.pw);
    for (int64_t t = 0; t < s.pw; ++t) phases[t] = low;
    for (int64_t v = 0; v < body; ++v) phases[s.pw + v] = static_cast<A>(row[v]);
    for (int64_t t = s.pw + body; t < phase_len; ++t) phases[t] = low;
    return;
  }
  for (int64_t r = 0; r < s.sw; ++r) {
    A* ph = phases + r * phase_len;
    // positions t of phase r that hold input v = t·sw + r − pw inside [0, W)
    const Range rt = valid_range(phase_len, s.W, s.sw, r - s.pw);
    for (int64_t t = 0; t < rt.lo; ++t) ph[t] = low;
    const T* src = row + (r - s.pw);
    if (s.sw == 2) {
      for (int64_t t = rt.lo; t < rt.hi; ++t) ph[t] = static_cast<A>(src[2 * t]);
    } else {
      for (int64_t t = rt.lo; t < rt.hi; ++t) ph[t] = static_cast<A>(src[t * s.sw]);
    }
    for (int64_t t = rt.hi; t < phase_len; ++t) ph[t] = low;
  }
}

// Offers taps q0 … q0 + KW − 1 of one window row to every output of the row. KW is a compile-time
// count so that the running maximum of an output stays in a register across the taps.
template <int KW, typename A>
CNNBP_ALWAYS_INLINE void offer_row_taps(const A* phases, int64_t phase_len, int32_t row_at, const PoolShape& s,
                                        A* best, int32_t* best_at, int64_t q0 = 0) {
  const A* src[KW];
  int32_t at0[KW];
  for (int q = 0; q < KW; ++q) {
    const int64_t u0 = (q0 + q) * s.dw;  // padded position read by output 0
    src[q] = phases + (u0 % s.sw) * phase_len + u0 / s.sw;
    at0[q] = row_at + static_cast<int32_t>(u0);
  }
  const int32_t sw = static_cast<int32_t>(s.sw);
  for (int64_t j = 0; j < s.OW; ++j) {
    A b = best[j];
    int32_t a = best_at[j];
    const int32_t step = static_cast<int32_t>(j) * sw;
    for (int q = 0; q < KW; ++q) offer(src[q][j], at0[q] + step, b, a);
    best[j] = b;
    best_at[j] = a;
  }
}

// NCHW: one plane, one output row at a time. Each input row of the window is first copied into a
// padded buffer split by stride phase (phase r holds padded positions r, r + sw, r + 2·sw, …) with
// −inf (the lowest value) in the padding, so that every tap reads a contiguous run of the buffer
// and padding can never win. Taps are then offered in window scan order (m, then q), each to the
// whole output row at once: the inner loops run along W without branches and vectorise.
// Indices are kept as int32 while a row is built (planes of up to 2^31 elements).
template <typename T>
CNNBP_ALWAYS_INLINE void max_pool2d_plane_rows(const T* in, T* out, int64_t* idx, const PoolShape& s,
                                               at::opmath_type<T>* phases, int64_t phase_len,
                                               at::opmath_type<T>* best, int32_t* best_at) {
  using acc_t = at::opmath_type<T>;
  const acc_t low = lowest_value<T>();
  for (int64_t i = 0; i < s.OH; ++i) {
    int64_t h0, h1;
    window(i * s.sh - s.ph, s.kh, s.dh, s.H, h0, h1);
    // Start from the first in-image tap with the lowest value, as PyTorch does: an all −inf
    // window reports its first tap.
    // Windows that start inside the image (j·sw ≥ pw) start at j·sw − pw: a loop that vectorises.
    const int64_t j_in = std::min(s.OW, (s.pw + s.sw - 1) / s.sw);
    for (int64_t j = 0; j < j_in; ++j) {
      int64_t v0, v1;
      window(j * s.sw - s.pw, s.kw, s.dw, s.W, v0, v1);
      best[j] = low;
      best_at[j] = static_cast<int32_t>(h0 * s.W + v0);
    }
    const int32_t row0 = static_cast<int32_t>(h0 * s.W - s.pw), sw32 = static_cast<int32_t>(s.sw);
    for (int64_t j = j_in; j < s.OW; ++j) {
      best[j] = low;
      best_at[j] = row0 + static_cast<int32_t>(j) * sw32;
    }
    for (int64_t h = h0; h < h1; h += s.dh) {
      const T* row = in + h * s.W;
      fill_phases(row, phases, phase_len, s, low);
      const int32_t row_at = static_cast<int32_t>(h * s.W - s.pw);
      switch (s.kw) {  // the taps of one window row, unrolled for the common kernel widths
        case 2: offer_row_taps<2>(phases, phase_len, row_at, s, best, best_at); break;
        case 3: offer_row_taps<3>(phases, phase_len, row_at, s, best, best_at); break;
        default:
          for (int64_t q = 0; q < s.kw; ++q) offer_row_taps<1>(phases, phase_len, row_at, s, best, best_at, q);
      }
    }
    T* __restrict__ out_row = out + i * s.OW;
    int64_t* __restrict__ idx_row = idx + i * s.OW;
    const int64_t OW = s.OW;  // (a local: a store through idx_row could otherwise alias s.OW)
    for (int64_t j = 0; j < OW; ++j) out_row[j] = static_cast<T>(best[j]);
    for (int64_t j = 0; j < OW; ++j) idx_row[j] = best_at[j];
  }
}

// ---- software prefetch of the next plane ----------------------------------------------------------
// The NCHW kernels work plane by plane: a plane's data are read (or zeroed) in a burst, then worked
// on in cache. The hardware prefetchers follow the stream of planes, but not far enough ahead to
// cover the burst, and over inputs larger than the caches about half of a 3×3 stride-2 forward's
// time was the copy of each plane waiting for memory. So while one plane is worked on, the next
// one's data are prefetched (into L2), a slice at each step of the work. Small planes follow each
// other without a pause long enough to matter, and there the prefetches only cost instructions
// (LeNet's 6 × 28² planes at batch 64, forward+backward: 1.10x the time), as they do where a call's
// data stay in the caches between calls; so they are issued for planes of kPrefetchPlaneBytes or
// more in calls that touch kPrefetchCallBytes or more. Values are unchanged: a prefetch is a hint.
constexpr int64_t kPrefetchPlaneBytes = int64_t(8) << 10, kPrefetchCallBytes = int64_t(2) << 20;
inline bool prefetch_pays(int64_t plane_bytes, int64_t call_bytes) {
  return plane_bytes >= kPrefetchPlaneBytes && call_bytes >= kPrefetchCallBytes;
}

struct PrefetchAhead {
  const char* p = nullptr;
  int64_t lines = 0, steps = 1;
  PrefetchAhead() = default;
  // `bytes` from `start`, spread over steps 0 … steps − 1
  PrefetchAhead(const void* start, int64_t bytes, int64_t steps)
      : p(static_cast<const char*>(start)), lines((bytes + 63) / 64), steps(std::max<int64_t>(steps, 1)) {}
  template <bool kWrite = false>
  CNNBP_ALWAYS_INLINE void step(int64_t k) const {
    if (lines == 0) return;  // (none asked for: no divisions either)
    for (int64_t l = k * lines / steps; l < (k + 1) * lines / steps; ++l) __builtin_prefetch(p + 64 * l, kWrite, 2);
  }
};

// The most common pool, 2×2 with stride 2 and every window inside the image (no padding, no
// dilation, no partial ceil_mode window): its kernels read the input directly, taps in scan order
// (top-left, top-right, bottom-left, bottom-right). The first tap is always in the image, so it
// starts the running maximum (the same result as offering it to −inf: only a −inf first tap keeps
// the lowest value, with its own index, either way).
inline bool is_2x2_stride_2(const PoolShape& s) {  // the window alone (floor or ceil mode)
  return s.kh == 2 && s.kw == 2 && s.sh == 2 && s.sw == 2 && s.ph == 0 && s.pw == 0 && s.dh == 1 && s.dw == 1;
}
inline bool is_plain_2x2_stride_2(const PoolShape& s) {  // and every window inside the image
  return is_2x2_stride_2(s) && 2 * s.OH <= s.H && 2 * s.OW <= s.W;
}

// ---- NCHW, floating types: the plane padded and phase-split once, windows in registers ----------
// The plane is copied once into a buffer of padded rows, each split by stride phase as in
// fill_phases, with the lowest value in the padding: ph rows above the image, and rows below it as
// far as the last window reaches. Tap (m, q) of output (i, j) is then element j + (q·dw) / sw of
// phase (q·dw) mod sw of padded row i·sh + m·dh, so for a block of L consecutive outputs of a row
// every tap is one contiguous run of L values. A block's running maxima, and the offsets of the
// taps that hold them, stay in registers across all kh·kw taps (offered in scan order); only the
// result is stored. Offsets count from the window's origin (i·sh − ph, j·sw − pw): tap (m, q) is
// m·dh·W + q·dw, the same for every lane, so taking a tap is a blend with a constant. Each window
// starts, as in max_pool2d_plane_rows, from the lowest value at its first in-image tap.
// A plane without NaN is compared with val > best alone (a later equal tap never takes over: the
// first maximum wins). A plane holding a NaN also lets every NaN tap take over (the last one wins).

// L lanes of A and of the integer of A's width, as pieces of at most PB bytes (one register each).
template <typename A_, int PB, int L>
struct PoolBlock {
  using A = A_;
  static constexpr int kBytes = L * int(sizeof(A));
  static constexpr int kPieceBytes = kBytes < PB ? kBytes : PB;
  static constexpr int kPieces = kBytes / kPieceBytes, kPieceLanes = kPieceBytes / int(sizeof(A));
  using I = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;
  typedef A value __attribute__((vector_size(kPieceBytes)));
  typedef I offset __attribute__((vector_size(kPieceBytes)));
};

// offer() for a register of lanes (GCC vectors), lane by lane; kNaN false for values known to hold
// no NaN (then val > best alone decides).
template <bool kNaN, typename V, typename M>
CNNBP_ALWAYS_INLINE void offer_lanes(V val, M at, V& best, M& best_at) {
  M take = val > best;
  if constexpr (kNaN) take |= val != val;
  best = take ? val : best;
  best_at = take ? at : best_at;
}

// The L values at src (the block's NP register pieces) offered to its running maxima, each lane at
// position `at`.
template <bool kNaN, typename B, typename A = typename B::A>
CNNBP_ALWAYS_INLINE void offer_run(const A* src, typename B::offset at, typename B::value (&best)[B::kPieces],
                                   typename B::offset (&best_at)[B::kPieces]) {
  for (int p = 0; p < B::kPieces; ++p) {
    typename B::value v;
    std::memcpy(&v, src + p * B::kPieceLanes, B::kPieceBytes);
    offer_lanes<kNaN>(v, at, best[p], best_at[p]);
  }
}

// A block's registers copied out to arrays of its lanes (for store_block).
template <typename B, int L = B::kPieces * B::kPieceLanes>
CNNBP_ALWAYS_INLINE void spill_block(const typename B::value (&best)[B::kPieces],
                                     const typename B::offset (&best_at)[B::kPieces], typename B::A (&vals)[L],
                                     typename B::I (&at)[L]) {
  for (int p = 0; p < B::kPieces; ++p) {
    std::memcpy(vals + p * B::kPieceLanes, &best[p], B::kPieceBytes);
    std::memcpy(at + p * B::kPieceLanes, &best_at[p], B::kPieceBytes);
  }
}

// A block's first n of L maxima and their positions into a row of outputs and indices. `room`:
// how many outputs from `out` on the caller writes later anyway (its own, in order): where all L
// lanes fit in it, all are stored (the extra lanes are overwritten later), which saves the short
// copies of a partial block (GCC makes them calls to memmove).
template <int L, typename T, typename A, typename I>
CNNBP_ALWAYS_INLINE void store_block(T* __restrict__ out, int64_t* __restrict__ idx, const A (&vals)[L],
                                     const I (&at)[L], int n, int64_t room) {
  if (n == L || room >= L) {
    for (int l = 0; l < L; ++l) out[l] = static_cast<T>(vals[l]);
    for (int l = 0; l < L; ++l) idx[l] = at[l];
  } else {
    for (int l = 0; l < n; ++l) out[l] = static_cast<T>(vals[l]);
    for (int l = 0; l < n; ++l) idx[l] = at[l];
  }
}

// What the blocks of every plane of one call share: the buffer's geometry and the offset tables.
template <typename A>
struct PlaneBlocks {
  using I = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;
  int64_t lanes;                  // L, outputs per block
  int64_t phase_len, row_len;     // row_len = sw · phase_len; phase_len a whole number of 64-byte vectors
  int64_t rows;                   // padded rows in the buffer
  std::vector<int64_t> tap_src;   // tap t = m·kw + q: its run's start, from the block's first row and output
  std::vector<I> tap_off;         // and its offset m·dh·W + q·dw
  std::vector<I> row_first;       // per output row: m0·dh·W, m0 its first in-image window row
  std::vector<I> col_first;       // per output column (padded to a whole block): q0·dw
  std::vector<I> col_at;          // per output column: j·sw

  PlaneBlocks(const PoolShape& s, int64_t L) : lanes(L) {
    const int64_t OW_blocks = (s.OW + L - 1) / L * L;
    constexpr int64_t kVector = 64 / int64_t(sizeof(A));
    phase_len = (OW_blocks + ((s.kw - 1) * s.dw) / s.sw + kVector - 1) / kVector * kVector;
    row_len = s.sw * phase_len;
    rows = (s.OH - 1) * s.sh + (s.kh - 1) * s.dh + 1;
    for (int64_t m = 0; m < s.kh; ++m) {
      for (int64_t q = 0; q < s.kw; ++q) {
        const int64_t u = q * s.dw;
        tap_src.push_back(m * s.dh * row_len + (u % s.sw) * phase_len + u / s.sw);
        tap_off.push_back(static_cast<I>(m * s.dh * s.W + u));
      }
    }
    auto first_tap = [](int64_t start, int64_t dilation) {  // steps from start to the first tap ≥ 0
      int64_t first = start;
      while (first < 0) first += dilation;
      return first - start;
    };
    for (int64_t i = 0; i < s.OH; ++i) row_first.push_back(static_cast<I>(first_tap(i * s.sh - s.ph, s.dh) * s.W));
    col_first.assign(OW_blocks, 0);
    col_at.assign(OW_blocks, 0);
    for (int64_t j = 0; j < s.OW; ++j) {
      col_first[j] = static_cast<I>(first_tap(j * s.sw - s.pw, s.dw));
      col_at[j] = static_cast<I>(j * s.sw);
    }
  }
  int64_t buffer_size() const { return rows * row_len; }
};

// The first n values of src to dst, vector by vector; returns whether they hold a NaN.
template <int PB, typename A>
CNNBP_ALWAYS_INLINE bool copy_and_check_nan(const A* __restrict__ src, A* __restrict__ dst, int64_t n) {
  using B = PoolBlock<A, PB, PB / int(sizeof(A))>;
  constexpr int V = B::kPieceLanes;
  typename B::offset nan{};
  int64_t v = 0;
  for (; v + V <= n; v += V) {
    typename B::value x;
    std::memcpy(&x, src + v, PB);
    std::memcpy(dst + v, &x, PB);
    nan |= x != x;
  }
  bool any = false;
  for (; v < n; ++v) {
    dst[v] = src[v];
    any |= src[v] != src[v];
  }
  for (int l = 0; l < V; ++l) any |= nan[l] != 0;
  return any;
}

// Copies plane `in` into the padded, phase-split buffer; returns whether it holds a NaN. `fresh`:
// the buffer's first plane. The padding (rows above and below the image, columns left and right
// of it) holds the lowest value; its geometry is the same for every plane, so it is written for
// the first plane only. Strides 1 and 2 of float and double copy vector by vector: stride 1
// straight into the padded row, stride 2 through `line` (row_len values, its padding the lowest
// value) whose even and odd elements are then split into the two phases by shuffles. Every phase
// is a whole number of vectors (PlaneBlocks). Other strides and the half types (converted) take
// fill_phases, padding included, value by value.
template <int PB, typename T, typename A>
CNNBP_ALWAYS_INLINE bool fill_plane(const T* in, A* buf, A* line, const PlaneBlocks<A>& b, const PoolShape& s,
                                    bool fresh) {
  const A low = lowest_value<T>();
  const int64_t r0 = s.ph, r1 = std::min(b.rows, s.ph + s.H);  // the buffer's rows in the image
  if constexpr (std::is_same_v<T, A>) {
    if (s.sw <= 2) {
      if (fresh) {
        std::fill(buf, buf + b.buffer_size(), low);
        std::fill(line, line + b.row_len, low);
      }
      const int64_t body = std::min(s.W, b.row_len - s.pw);  // the values of an input row the windows reach
      bool nan = false;
      if (s.sw == 1) {
        for (int64_t r = r0; r < r1; ++r)
          nan |= copy_and_check_nan<PB>(in + (r - s.ph) * s.W, buf + r * b.row_len + s.pw, body);
        return nan;
      }
      using B = PoolBlock<A, PB, PB / int(sizeof(A))>;
      constexpr int V = B::kPieceLanes;
      typename B::offset even, odd;
      for (int l = 0; l < V; ++l) even[l] = 2 * l, odd[l] = 2 * l + 1;
      for (int64_t r = r0; r < r1; ++r) {
        nan |= copy_and_check_nan<PB>(in + (r - s.ph) * s.W, line + s.pw, body);
        A* phase0 = buf + r * b.row_len;
        A* phase1 = phase0 + b.phase_len;
        for (int64_t t = 0; t < b.phase_len; t += V) {
          typename B::value x, y;
          std::memcpy(&x, line + 2 * t, PB);
          std::memcpy(&y, line + 2 * t + V, PB);
          const typename B::value even_values = __builtin_shuffle(x, y, even), odd_values = __builtin_shuffle(x, y, odd);
          std::memcpy(phase0 + t, &even_values, PB);
          std::memcpy(phase1 + t, &odd_values, PB);
        }
      }
      return nan;
    }
  }
  for (int64_t r = 0; r < b.rows; ++r) {
    A* dst = buf + r * b.row_len;
    if (r >= r0 && r < r1)
      fill_phases(in + (r - s.ph) * s.W, dst, b.phase_len, s, low);
    else
      std::fill(dst, dst + b.row_len, low);
  }
  int nan = 0;
  const int64_t n = b.buffer_size();
  for (int64_t e = 0; e < n; ++e) nan |= buf[e] != buf[e];
  return nan != 0;
}

// The outputs of one plane from its buffer, L at a time. KH, KW > 0: the window's size at compile
// time (its taps unrolled); 0: s.kh, s.kw. `after`: the outputs past the plane's that the caller
// writes later (see store_block). `next`: the next plane's input, a slice per output row.
template <int KH, int KW, bool kNaN, int L, int PB, typename T, typename A>
CNNBP_ALWAYS_INLINE void max_pool2d_plane_blocks(const A* buf, T* out, int64_t* idx, const PlaneBlocks<A>& b,
                                                 const PoolShape& s, int64_t after, const PrefetchAhead& next) {
  using B = PoolBlock<A, PB, L>;
  using I = typename B::I;
  using value = typename B::value;
  using offset = typename B::offset;
  constexpr int NP = B::kPieces, PL = B::kPieceLanes, PBytes = B::kPieceBytes;
  const int taps = KH > 0 ? KH * KW : static_cast<int>(s.kh * s.kw);
  const A low = lowest_value<T>();
  const int64_t* tap_src = b.tap_src.data();
  const I* tap_off = b.tap_off.data();
  for (int64_t i = 0; i < s.OH; ++i) {
    next.step(i);
    const A* rows = buf + i * s.sh * b.row_len;
    const I first_row = b.row_first[i];
    const I origin = static_cast<I>((i * s.sh - s.ph) * s.W - s.pw);
    for (int64_t j0 = 0; j0 < s.OW; j0 += L) {
      value best[NP];
      offset off[NP];
      for (int p = 0; p < NP; ++p) {
        best[p] = value{} + low;
        std::memcpy(&off[p], b.col_first.data() + j0 + p * PL, PBytes);
        off[p] += first_row;
      }
      for (int t = 0; t < taps; ++t) offer_run<kNaN, B>(rows + tap_src[t] + j0, offset{} + tap_off[t], best, off);
      for (int p = 0; p < NP; ++p) {
        offset col;
        std::memcpy(&col, b.col_at.data() + j0 + p * PL, PBytes);
        off[p] += col + origin;
      }
      A vals[L];
      I at[L];
      spill_block<B>(best, off, vals, at);
      store_block(out + i * s.OW + j0, idx + i * s.OW + j0, vals, at, static_cast<int>(std::min<int64_t>(L, s.OW - j0)),
                  (s.OH - i) * s.OW - j0 + after);
    }
  }
}

// One plane: the buffer, then the blocks, with the window unrolled for 2×2 and 3×3.
// PB: the register width; CB: the width for the NaN planes' combined comparisons
// (IsaTag::compare_bytes).
template <int L, int PB, int CB, typename T, typename A>
CNNBP_ALWAYS_INLINE void max_pool2d_plane_buffered(const T* in, T* out, int64_t* idx, A* buf, A* line,
                                                   const PlaneBlocks<A>& b, const PoolShape& s, int64_t after,
                                                   bool fresh, const PrefetchAhead& next) {
  if (fill_plane<PB>(in, buf, line, b, s, fresh))
    max_pool2d_plane_blocks<0, 0, true, L, CB>(buf, out, idx, b, s, after, next);
  else if (s.kh == 2 && s.kw == 2)
    max_pool2d_plane_blocks<2, 2, false, L, PB>(buf, out, idx, b, s, after, next);
  else if (s.kh == 3 && s.kw == 3)
    max_pool2d_plane_blocks<3, 3, false, L, PB>(buf, out, idx, b, s, after, next);
  else
    max_pool2d_plane_blocks<0, 0, false, L, PB>(buf, out, idx, b, s, after, next);
}

// One output (i, j) of a plane by the general scan: from the lowest value at the window's first
// in-image tap, every in-image tap offered in scan order.
template <typename T>
CNNBP_ALWAYS_INLINE void pool_window(const T* in, T* out, int64_t* idx, int64_t i, int64_t j, const PoolShape& s) {
  using acc_t = at::opmath_type<T>;
  int64_t h0, h1, v0, v1;
  window(i * s.sh - s.ph, s.kh, s.dh, s.H, h0, h1);
  window(j * s.sw - s.pw, s.kw, s.dw, s.W, v0, v1);
  int64_t best_at = h0 * s.W + v0;
  acc_t best = lowest_value<T>();
  for (int64_t h = h0; h < h1; h += s.dh)
    for (int64_t v = v0; v < v1; v += s.dw) offer(static_cast<acc_t>(in[h * s.W + v]), h * s.W + v, best, best_at);
  *out = static_cast<T>(best);
  *idx = best_at;
}

// NCHW, 2×2 stride 2, floating types: output row i reads input rows 2i and 2i + 1 directly, L
// outputs at a time. A block's 2L values of each row are split into even and odd columns (the left
// and right taps) by vector shuffles, and the four taps offered in scan order: the first starts the
// maximum (a whole window's first tap is in the image), and a NaN or a strictly
// larger value takes over. The last block of a row may read on past the row's end (into the next
// rows), but never past `in_end`, the end of the input: a block that would is first copied into a
// local buffer, and so is every block of a half type (converted). Its extra lanes are stored too
// where the outputs they land on are this call's later ones (rewritten after), not past row r1.
// Rows r0 … r1 − 1 of all the planes' output rows (row r: plane r / OH, row r % OH), so that small
// planes (LeNet's 5 rows of 5) cost no set-up each. In ceil mode the windows of the last row and
// column may hold one input row or column only: those take the general scan (pool_window), the
// OH_in × OW_in windows inside the image the blocks.
template <int L, int PB, typename T>
CNNBP_ALWAYS_INLINE void max_pool2d_rows_2x2_blocks(const T* in, const T* in_end, T* out, int64_t* idx,
                                                    const PoolShape& s, int64_t r0, int64_t r1) {
  const int64_t OH_in = s.H / 2, OW_in = s.W / 2;
  using A = at::opmath_type<T>;
  using B = PoolBlock<A, PB, L>;
  using I = typename B::I;
  using value = typename B::value;
  using offset = typename B::offset;
  constexpr int NP = B::kPieces, PL = B::kPieceLanes, PBytes = B::kPieceBytes;
  offset even, odd, lane2[NP];
  for (int l = 0; l < PL; ++l) even[l] = 2 * l, odd[l] = 2 * l + 1;
  for (int p = 0; p < NP; ++p)
    for (int l = 0; l < PL; ++l) lane2[p][l] = static_cast<I>(2 * (p * PL + l));
  const I W = static_cast<I>(s.W);
  const offset right = offset{} + 1, below = offset{} + W, below_right = offset{} + (W + 1);
  A copy[2][2 * L] = {};
  int64_t plane = r0 / s.OH, i = r0 % s.OH;
  for (int64_t r = r0; r < r1; ++r) {
    const T* r0p = in + plane * s.H * s.W + 2 * i * s.W;
    const T* r1p = r0p + s.W;
    const I origin = static_cast<I>(2 * i * s.W);
    const int64_t whole = i < OH_in ? std::min(s.OW, OW_in) : 0;  // outputs of this row with whole windows
    for (int64_t j0 = 0; j0 < whole; j0 += L) {
      const int n = static_cast<int>(std::min<int64_t>(L, whole - j0));
      const A* top = copy[0];
      const A* bottom = copy[1];
      bool direct = false;
      if constexpr (std::is_same_v<T, A>) {
        if (r1p + 2 * (j0 + L) <= in_end) {
          top = r0p + 2 * j0;
          bottom = r1p + 2 * j0;
          direct = true;
        }
      }
      if (!direct) {
        for (int e = 0; e < 2 * n; ++e) {
          copy[0][e] = static_cast<A>(r0p[2 * j0 + e]);
          copy[1][e] = static_cast<A>(r1p[2 * j0 + e]);
        }
      }
      A vals[L];
      I at[L];
      for (int p = 0; p < NP; ++p) {
        value a, b, c, d;
        std::memcpy(&a, top + 2 * p * PL, PBytes);
        std::memcpy(&b, top + 2 * p * PL + PL, PBytes);
        std::memcpy(&c, bottom + 2 * p * PL, PBytes);
        std::memcpy(&d, bottom + 2 * p * PL + PL, PBytes);
        value best = __builtin_shuffle(a, b, even);
        offset off = offset{};
        offer_lanes<true>(__builtin_shuffle(a, b, odd), right, best, off);
        offer_lanes<true>(__builtin_shuffle(c, d, even), below, best, off);
        offer_lanes<true>(__builtin_shuffle(c, d, odd), below_right, best, off);
        off += lane2[p] + (origin + static_cast<I>(2 * j0));
        std::memcpy(vals + p * PL, &best, PBytes);
        std::memcpy(at + p * PL, &off, PBytes);
      }
      store_block(out + r * s.OW + j0, idx + r * s.OW + j0, vals, at, n, (r1 - r) * s.OW - j0);
    }
    // (after the blocks, whose extra lanes may have run into these outputs)
    for (int64_t j = whole; j < s.OW; ++j)
      pool_window(in + plane * s.H * s.W, out + r * s.OW + j, idx + r * s.OW + j, i, j, s);
    if (++i == s.OH) i = 0, ++plane;
  }
}

#ifdef CNNBP_X86
// For 2×2 stride 2: the flat input position of output q's top-left tap, 2·(q / OW)·W + 2·(q % OW),
// for the OH·OW outputs of a plane, then zeros (position 0) up to a whole number of `lanes`.
std::vector<int32_t> top_left_taps(const PoolShape& s, int64_t lanes) {
  const int64_t Q = s.OH * s.OW;
  std::vector<int32_t> at((Q + lanes - 1) / lanes * lanes, 0);
  for (int64_t q = 0; q < Q; ++q) at[q] = static_cast<int32_t>(2 * (q / s.OW) * s.W + 2 * (q % s.OW));
  return at;
}

// offer() for gathered lanes: a strictly larger value or a NaN takes over, with its position.
CNNBP_TARGET_AVX512 inline void offer_gathered(__m512 v, __m512i at, __m512& best, __m512i& best_at) {
  const __mmask16 take = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  best = _mm512_mask_mov_ps(best, take, v);
  best_at = _mm512_mask_mov_epi32(best_at, take, at);
}
CNNBP_TARGET_AVX512 inline void offer_gathered(__m512d v, __m256i at, __m512d& best, __m256i& best_at) {
  const __mmask8 take = _mm512_cmp_pd_mask(v, best, _CMP_GT_OQ) | _mm512_cmp_pd_mask(v, v, _CMP_UNORD_Q);
  best = _mm512_mask_mov_pd(best, take, v);
  best_at = _mm256_mask_mov_epi32(best_at, take, at);
}
// NCHW, 2×2 stride 2 with every window inside the image, over planes whose output rows are
// narrower than two 64-byte vectors (LeNet's 5×5 and 14×14 outputs; on Intel's AVX-512 cores only,
// see max_pool2d_nchw_buffered): the row kernel above would
// fill a vector per output row, or two, with a few outputs in the last. Here a vector holds 16
// (float) or 8 (double) consecutive outputs of a plane, rows joined, and gathers their taps: with
// `at` from top_left_taps (made once per call), output q's taps are at at[q] + {0, 1, W, W + 1},
// offered in scan order as in max_pool2d_rows_2x2_blocks (the first starts the maximum; a strictly
// larger value or a NaN takes over). The last vector of a plane is masked, and its idle lanes read
// position 0 of the plane (at's padding). float gathers each window row's two taps at once, as one
// 64-bit pair, and splits the pairs by permutes.
template <typename T>
CNNBP_TARGET_AVX512 void max_pool2d_planes_2x2_gather(const T* in, T* out, int64_t* idx, const int32_t* at,
                                                      const PoolShape& s, int64_t p0, int64_t p1, bool ahead) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  constexpr int L = 64 / int(sizeof(T));
  const int64_t in_plane = s.H * s.W, Q = s.OH * s.OW;
  const __m512i one = _mm512_set1_epi32(1), below = _mm512_set1_epi32(static_cast<int32_t>(s.W)),
                below_right = _mm512_set1_epi32(static_cast<int32_t>(s.W + 1));
  for (int64_t p = p0; p < p1; ++p) {
    const T* base = in + p * in_plane;
    T* o = out + p * Q;
    int64_t* x = idx + p * Q;
    const PrefetchAhead next = ahead && p + 1 < p1 ? PrefetchAhead(base + in_plane, in_plane * int64_t(sizeof(T)), (Q + L - 1) / L)
                                                   : PrefetchAhead();
    for (int64_t q0 = 0; q0 < Q; q0 += L) {
      next.step(q0 / L);
      const int n = static_cast<int>(std::min<int64_t>(L, Q - q0));
      if constexpr (std::is_same_v<T, float>) {
        const __m512i a = _mm512_loadu_si512(at + q0);
        const __m256i lo = _mm512_castsi512_si256(a), hi = _mm512_extracti64x4_epi64(a, 1);
        const float* bottom = base + s.W;
        // pairs (left, right) of outputs 0-7 and 8-15, top and bottom rows of the windows
        const __m512 t_lo = _mm512_castpd_ps(_mm512_i32gather_pd(lo, reinterpret_cast<const double*>(base), 4));
        const __m512 t_hi = _mm512_castpd_ps(_mm512_i32gather_pd(hi, reinterpret_cast<const double*>(base), 4));
        const __m512 b_lo = _mm512_castpd_ps(_mm512_i32gather_pd(lo, reinterpret_cast<const double*>(bottom), 4));
        const __m512 b_hi = _mm512_castpd_ps(_mm512_i32gather_pd(hi, reinterpret_cast<const double*>(bottom), 4));
        const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i odd = _mm512_add_epi32(even, one);
        __m512 best = _mm512_permutex2var_ps(t_lo, even, t_hi);
        __m512i where = a;
        offer_gathered(_mm512_permutex2var_ps(t_lo, odd, t_hi), _mm512_add_epi32(a, one), best, where);
        offer_gathered(_mm512_permutex2var_ps(b_lo, even, b_hi), _mm512_add_epi32(a, below), best, where);
        offer_gathered(_mm512_permutex2var_ps(b_lo, odd, b_hi), _mm512_add_epi32(a, below_right), best, where);
        const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
        _mm512_mask_storeu_ps(o + q0, m, best);
        _mm512_mask_storeu_epi64(x + q0, static_cast<__mmask8>(m), _mm512_cvtepi32_epi64(_mm512_castsi512_si256(where)));
        _mm512_mask_storeu_epi64(x + q0 + 8, static_cast<__mmask8>(m >> 8),
                                 _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(where, 1)));
      } else {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + q0));
        __m512d best = _mm512_i32gather_pd(a, base, 8);
        __m256i where = a;
        offer_gathered(_mm512_i32gather_pd(a, base + 1, 8), _mm256_add_epi32(a, _mm512_castsi512_si256(one)), best, where);
        offer_gathered(_mm512_i32gather_pd(a, base + s.W, 8), _mm256_add_epi32(a, _mm512_castsi512_si256(below)), best,
                       where);
        offer_gathered(_mm512_i32gather_pd(a, base + s.W + 1, 8),
                       _mm256_add_epi32(a, _mm512_castsi512_si256(below_right)), best, where);
        const __mmask8 m = static_cast<__mmask8>((1u << n) - 1);
        _mm512_mask_storeu_pd(o + q0, m, best);
        _mm512_mask_storeu_epi64(x + q0, m, _mm512_cvtepi32_epi64(where));
      }
    }
  }
}

// NCHW float, 2×2 stride 2 over planes that the windows tile exactly (H = 2·OH, W = 2·OW) with
// output rows of at most 16 values (LeNet's 14×14 and 5×5 outputs). The planes' row pairs then
// follow each other in memory: row pair R of all the planes (plane R / OH, output row R % OH) is the
// 2W = 4·OW inputs from R·2W on, and its outputs the OW from R·OW on. A block of Rc = min(⌊16 / OW⌋,
// OH) consecutive output rows fills one vector of outputs and reads one run of Rc·4·OW ≤ 64 inputs:
// four vectors, loaded once (masked past the run). Each tap of the block's outputs is picked from
// those registers by permutes (from the first or the second pair of vectors, by the tap's place in
// the run), where max_pool2d_planes_2x2_gather loads every tap from memory; the taps are offered in
// scan order as there. The outputs' plane-local positions come from the rows' place in their plane,
// i0 + r for the block's r-th row (i0: its first row's), less OH where that passes the plane's end
// (Rc ≤ OH: at most once). Blocks b0 … b1 − 1 of the rows of all the planes.
struct RowBlocks2x2 {
  int64_t rows, OW;  // output rows of all planes; output columns of a plane
  int Rc;               // output rows per block
  int64_t blocks() const { return (rows + Rc - 1) / Rc; }
  int64_t rows_of(int64_t b) const { return std::min<int64_t>(Rc, rows - b * Rc); }  // block b's
};

inline bool tiles_2x2_rows(const PoolShape& s, int lanes) {  // the shapes RowBlocks2x2 takes
  return is_2x2_stride_2(s) && s.H == 2 * s.OH && s.W == 2 * s.OW && s.OW <= lanes;
}

inline RowBlocks2x2 row_blocks_2x2(const PoolShape& s, int lanes) {
  return {s.planes * s.OH, s.OW, static_cast<int>(std::min<int64_t>(lanes / s.OW, s.OH))};
}

// The block's outputs (lane l: row r = l / OW of the block, column j = l % OW): plane-local
// positions 2·W·i + 2·j of their top-left taps, for a block whose first row is row i0 of its plane.
CNNBP_TARGET_AVX512 inline __m512i block_top_left(__m512i row, __m512i col2, int64_t i0, const PoolShape& s) {
  const __m512i OH = _mm512_set1_epi32(static_cast<int32_t>(s.OH));
  __m512i i = _mm512_add_epi32(row, _mm512_set1_epi32(static_cast<int32_t>(i0)));
  i = _mm512_mask_sub_epi32(i, _mm512_cmpge_epi32_mask(i, OH), i, OH);
  return _mm512_add_epi32(_mm512_mullo_epi32(i, _mm512_set1_epi32(static_cast<int32_t>(2 * s.W))), col2);
}

// The inputs of a run of n values (n ≤ 64) as four vectors, zeros past n.
CNNBP_TARGET_AVX512 inline void load_run(const float* p, int64_t n, __m512 (&v)[4]) {
  for (int k = 0; k < 4; ++k) {
    const int64_t left = std::clamp<int64_t>(n - 16 * k, 0, 16);
    v[k] = _mm512_maskz_loadu_ps(static_cast<__mmask16>((uint32_t(1) << left) - 1), p + 16 * k);
  }
}

// Lane l of the result: element pos[l] of the run in v (`high`: the lanes whose pos is 32 or more).
CNNBP_TARGET_AVX512 inline __m512 pick_from_run(const __m512 (&v)[4], __m512i pos, __mmask16 high) {
  return _mm512_mask_blend_ps(high, _mm512_permutex2var_ps(v[0], pos, v[1]), _mm512_permutex2var_ps(v[2], pos, v[3]));
}

CNNBP_TARGET_AVX512 void max_pool2d_rows_2x2_permuted(const float* in, float* out, int64_t* idx,
                                                      const PoolShape& s, const RowBlocks2x2& rb, int64_t b0,
                                                      int64_t b1) {
  // lane l's row and column in the block, and its taps' places in the block's run of inputs
  alignas(64) int32_t row[16], col2[16], pos[4][16];
  const int32_t W = static_cast<int32_t>(s.W), taps[4] = {0, 1, W, W + 1};
  for (int l = 0; l < 16; ++l) {
    const bool used = l < rb.Rc * rb.OW;
    row[l] = used ? l / static_cast<int>(rb.OW) : 0;
    col2[l] = used ? 2 * (l % static_cast<int>(rb.OW)) : 0;
    for (int t = 0; t < 4; ++t) pos[t][l] = used ? row[l] * 2 * W + col2[l] + taps[t] : 0;
  }
  const __m512i row_v = _mm512_load_si512(row), col2_v = _mm512_load_si512(col2), above_31 = _mm512_set1_epi32(31);
  __m512i pos_v[4];
  __mmask16 high[4];  // taps in the second pair of vectors
  for (int t = 0; t < 4; ++t) {
    pos_v[t] = _mm512_load_si512(pos[t]);
    high[t] = _mm512_cmpgt_epi32_mask(pos_v[t], above_31);
  }
  int64_t i0 = b0 * rb.Rc % s.OH;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t R = b * rb.Rc, n = rb.rows_of(b) * rb.OW;
    __m512 v[4];
    load_run(in + R * 2 * s.W, 4 * n, v);
    const __m512i at = block_top_left(row_v, col2_v, i0, s);
    __m512 best = pick_from_run(v, pos_v[0], high[0]);
    __m512i where = at;
    for (int t = 1; t < 4; ++t)
      offer_gathered(pick_from_run(v, pos_v[t], high[t]), _mm512_add_epi32(at, _mm512_set1_epi32(taps[t])), best, where);
    const __mmask16 m = static_cast<__mmask16>((uint32_t(1) << n) - 1);
    _mm512_mask_storeu_ps(out + R * rb.OW, m, best);
    _mm512_mask_storeu_epi64(idx + R * rb.OW, static_cast<__mmask8>(m), _mm512_cvtepi32_epi64(_mm512_castsi512_si256(where)));
    _mm512_mask_storeu_epi64(idx + R * rb.OW + 8, static_cast<__mmask8>(m >> 8),
                             _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(where, 1)));
    if ((i0 += rb.Rc) >= s.OH) i0 -= s.OH;
  }
}

// Its backward, ∂E/∂o of the same blocks (δ, idx: the outputs' gradient and indices; gin: the
// input's gradient, all of it written here). The windows tile the planes, so every input element is
// a tap of exactly one window, and its gradient is that window's δ (+ 0: the scatter adds δ to +0,
// which turns a −0 into +0) if the window's index names it, else +0. A block's run of inputs is so
// written once, in four vectors, with no zeroing pass and no scatter. Element e of the run lies in
// row pair e / 2W of the block, at column c = e mod 2W mod W of row e mod 2W / W of the pair: the
// window of output lane (e / 2W)·OW + c / 2, its tap (e mod 2W / W)·W + c mod 2 counted from the
// window's top-left (block_top_left). Each output's index, less that top-left, is its tap: taken in
// int64 and narrowed with saturation, so that no index outside the plane can pass for a tap. Returns
// whether every output's tap is one of its window's four (0, 1, W, W + 1): where one is not (an
// index that this window did not make), the caller runs the scatter, which decides what it means.
CNNBP_TARGET_AVX512 bool max_pool2d_backward_rows_2x2_permuted(const float* d, const int64_t* idx, float* gin,
                                                               const PoolShape& s, const RowBlocks2x2& rb,
                                                               int64_t b0, int64_t b1) {
  alignas(64) int32_t row[16], col2[16], src[4][16], tap[4][16];
  const int32_t W = static_cast<int32_t>(s.W), OW = static_cast<int32_t>(rb.OW), run = 4 * rb.Rc * OW;
  for (int l = 0; l < 16; ++l) {
    const bool used = l < rb.Rc * OW;
    row[l] = used ? l / OW : 0;
    col2[l] = used ? 2 * (l % OW) : 0;
  }
  for (int e = 0; e < 64; ++e) {
    const int32_t pair = e / (2 * W), r = e % (2 * W) / W, c = e % (2 * W) % W;
    src[e / 16][e % 16] = e < run ? pair * OW + c / 2 : 0;
    tap[e / 16][e % 16] = e < run ? r * W + c % 2 : -1;
  }
  const __m512i row_v = _mm512_load_si512(row), col2_v = _mm512_load_si512(col2);
  __m512i src_v[4], tap_v[4];
  for (int k = 0; k < 4; ++k) src_v[k] = _mm512_load_si512(src[k]), tap_v[k] = _mm512_load_si512(tap[k]);
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi32(1), right = _mm512_set1_epi32(W),
                diagonal = _mm512_set1_epi32(W + 1);
  // (sizes in locals: the stores, through may-alias vector types, made GCC reload them every block)
  const PoolShape shape = s;
  const int64_t OW64 = rb.OW, OH = s.OH, rows = rb.rows, Rc = rb.Rc, row_pair = 2 * s.W;
  // The masks of a block's outputs and of its four vectors of inputs: all blocks but a short last one
  // have Rc rows.
  auto masks = [](int64_t n, __mmask16& outputs, __mmask16 (&stored)[4]) {
    outputs = static_cast<__mmask16>((uint32_t(1) << n) - 1);
    for (int k = 0; k < 4; ++k)
      stored[k] = static_cast<__mmask16>((uint32_t(1) << std::clamp<int64_t>(4 * n - 16 * k, 0, 16)) - 1);
  };
  __mmask16 m, stored[4];
  masks(Rc * OW64, m, stored);
  __mmask16 strays = 0;  // outputs whose index is no tap of their window
  int64_t i0 = b0 * Rc % OH;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t R = b * Rc;
    if (R + Rc > rows) masks((rows - R) * OW64, m, stored);
    const __m512i at = block_top_left(row_v, col2_v, i0, shape);
    const int64_t* const ip = idx + R * OW64;
    const __m512i lo = _mm512_sub_epi64(_mm512_maskz_loadu_epi64(static_cast<__mmask8>(m), ip),
                                        _mm512_cvtepi32_epi64(_mm512_castsi512_si256(at)));
    const __m512i hi = _mm512_sub_epi64(_mm512_maskz_loadu_epi64(static_cast<__mmask8>(m >> 8), ip + 8),
                                        _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(at, 1)));
    const __m512i taken = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtsepi64_epi32(lo)),
                                             _mm512_cvtsepi64_epi32(hi), 1);
    const __mmask16 known = _mm512_cmpeq_epi32_mask(taken, zero) | _mm512_cmpeq_epi32_mask(taken, one) |
                            _mm512_cmpeq_epi32_mask(taken, right) | _mm512_cmpeq_epi32_mask(taken, diagonal);
    strays |= static_cast<__mmask16>(m & ~known);
    const __m512 delta = _mm512_add_ps(_mm512_maskz_loadu_ps(m, d + R * OW64), _mm512_setzero_ps());
    float* const g = gin + R * row_pair;
    for (int k = 0; k < 4; ++k) {
      const __mmask16 hit = _mm512_cmpeq_epi32_mask(_mm512_permutexvar_epi32(src_v[k], taken), tap_v[k]);
      const __m512 v = _mm512_maskz_permutexvar_ps(hit, src_v[k], delta);
      // whole vectors unmasked (forward+backward, 2 threads, interleaved with native's: 0.91-0.98x
      // the time with every store masked)
      if (stored[k] == 0xFFFF)
        _mm512_storeu_ps(g + 16 * k, v);
      else
        _mm512_mask_storeu_ps(g + 16 * k, stored[k], v);
    }
    if ((i0 += Rc) >= OH) i0 -= OH;
  }
  return strays == 0;
}

// A vector of gradients into a row (the lanes of in_row; all of them, unmasked, where that is the
// whole vector) and one into the row W below it (where there is one).
CNNBP_TARGET_AVX512 inline void store_lanes(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
CNNBP_TARGET_AVX512 inline void store_lanes(double* p, __m512d v) { _mm512_storeu_pd(p, v); }
CNNBP_TARGET_AVX512 inline void store_lanes(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
CNNBP_TARGET_AVX512 inline void store_lanes(double* p, __mmask8 m, __m512d v) { _mm512_mask_storeu_pd(p, m, v); }
template <typename T, typename M, typename V>
CNNBP_TARGET_AVX512 inline void store_rows(T* g, int64_t W, M in_row, V top, V bottom, bool has_lower) {
  if (in_row == M(~M(0))) {
    store_lanes(g, top);
    if (has_lower) store_lanes(g + W, bottom);
    return;
  }
  store_lanes(g, in_row, top);
  if (has_lower) store_lanes(g + W, in_row, bottom);
}

// ∂E/∂o of 2×2 stride-2 windows over NCHW rows of any width (floor or ceil mode), by output rows,
// each writing its two input rows once (where the planes are not tiled exactly, or their rows are
// too wide for the blocks above). Input (h, w) lies in window (h / 2, w / 2) only, and its gradient
// is that window's δ (+ 0, as the scatter's +0 + δ) where the window's index names it, else +0;
// rows and columns that no window covers (floor mode, odd sizes) get +0. A vector holds L inputs of
// a row, from column w0 = L·v: the L / 2 outputs from column (L / 2)·v on give their indices less
// the position of input (2i, w0), each lane of the vector takes its output's (a permute), and lane
// l matches where that is l in the upper row, W + l in the lower. The vectors' work, per type:
// RowsGather2x2 below. Output rows [q0, q1) of all the planes' rows. Returns the matches: an index
// that is a tap of its window inside the image matches once, any other never.
template <typename T>
struct RowsGather2x2;

// float: 16 inputs a vector, the offsets narrowed to 32 bits with saturation (no index outside the
// plane passes for one inside it), matches counted per lane in 32 bits and added up every `flush`
// output rows (a lane counts at most 2 per vector, so under 2^30): summed on every row, they cost
// short rows a tenth of their time (64 × 6 × 27², backward op alone: 0.084 → 0.077 ms).
template <>
struct RowsGather2x2<float> {
  static constexpr int L = 16;
  __m512i pair_v, upper, lower, none, ones, count;
  int64_t flush;
  CNNBP_TARGET_AVX512 RowsGather2x2(int64_t W, int64_t vectors) {
    alignas(64) int32_t pair[16], lane[16];
    for (int l = 0; l < 16; ++l) pair[l] = l / 2, lane[l] = l;
    pair_v = _mm512_load_si512(pair), upper = _mm512_load_si512(lane), none = _mm512_set1_epi64(-1);
    lower = _mm512_add_epi32(upper, _mm512_set1_epi32(static_cast<int32_t>(W)));
    ones = _mm512_set1_epi32(1), count = _mm512_setzero_si512();
    flush = std::max<int64_t>(1, (int64_t(1) << 29) / vectors);
  }
  // The n inputs of row pair (g, g + W) from column w0 and the `outs` outputs that cover them
  // (indices iq, δ dq, from the first of them); `base`: the position of input (2i, w0).
  CNNBP_TARGET_AVX512 void block(float* g, int64_t W, int64_t w0, int64_t n, const int64_t* iq, const float* dq,
                                 int64_t outs, int64_t base, bool has_lower) {
    const __mmask16 in_row = static_cast<__mmask16>((uint32_t(1) << n) - 1);
    const __mmask8 out_mask = static_cast<__mmask8>((1u << outs) - 1);
    const __m512i offset64 = _mm512_sub_epi64(_mm512_mask_loadu_epi64(none, out_mask, iq), _mm512_set1_epi64(base));
    const __m512i offset = _mm512_permutexvar_epi32(pair_v, _mm512_castsi256_si512(_mm512_cvtsepi64_epi32(offset64)));
    const __m256 delta8 = _mm256_add_ps(_mm256_maskz_loadu_ps(out_mask, dq), _mm256_setzero_ps());
    const __m512 delta = _mm512_permutexvar_ps(pair_v, _mm512_castps256_ps512(delta8));
    const __mmask16 hit_upper = _mm512_mask_cmpeq_epi32_mask(in_row, offset, upper);
    const __mmask16 hit_lower = has_lower ? _mm512_mask_cmpeq_epi32_mask(in_row, offset, lower) : __mmask16(0);
    count = _mm512_mask_add_epi32(_mm512_mask_add_epi32(count, hit_upper, count, ones), hit_lower, count, ones);
    store_rows(g + w0, W, in_row, _mm512_maskz_mov_ps(hit_upper, delta), _mm512_maskz_mov_ps(hit_lower, delta), has_lower);
  }
  CNNBP_TARGET_AVX512 int64_t take() {  // the matches counted since the last take
    const int64_t sum = _mm512_reduce_add_epi32(count);
    count = _mm512_setzero_si512();
    return sum;
  }
};

// double: 8 inputs a vector, the offsets compared in 64 bits (no narrowing), counted in 64 bits.
template <>
struct RowsGather2x2<double> {
  static constexpr int L = 8;
  __m512i pair_v, upper, lower, ones, count;
  int64_t flush = std::numeric_limits<int64_t>::max();
  CNNBP_TARGET_AVX512 RowsGather2x2(int64_t W, int64_t) {
    alignas(64) int64_t pair[8], lane[8];
    for (int l = 0; l < 8; ++l) pair[l] = l / 2, lane[l] = l;
    pair_v = _mm512_load_si512(pair), upper = _mm512_load_si512(lane);
    lower = _mm512_add_epi64(upper, _mm512_set1_epi64(W));
    ones = _mm512_set1_epi64(1), count = _mm512_setzero_si512();
  }
  CNNBP_TARGET_AVX512 void block(double* g, int64_t W, int64_t w0, int64_t n, const int64_t* iq, const double* dq,
                                 int64_t outs, int64_t base, bool has_lower) {
    const __mmask8 in_row = static_cast<__mmask8>((1u << n) - 1), out_mask = static_cast<__mmask8>((1u << outs) - 1);
    const __m256i at4 = _mm256_mask_loadu_epi64(_mm256_set1_epi64x(-1), out_mask, iq);
    const __m512i offset =
        _mm512_permutexvar_epi64(pair_v, _mm512_castsi256_si512(_mm256_sub_epi64(at4, _mm256_set1_epi64x(base))));
    const __m256d delta4 = _mm256_add_pd(_mm256_maskz_loadu_pd(out_mask, dq), _mm256_setzero_pd());
    const __m512d delta = _mm512_permutexvar_pd(pair_v, _mm512_castpd256_pd512(delta4));
    const __mmask8 hit_upper = _mm512_mask_cmpeq_epi64_mask(in_row, offset, upper);
    const __mmask8 hit_lower = has_lower ? _mm512_mask_cmpeq_epi64_mask(in_row, offset, lower) : __mmask8(0);
    count = _mm512_mask_add_epi64(_mm512_mask_add_epi64(count, hit_upper, count, ones), hit_lower, count, ones);
    store_rows(g + w0, W, in_row, _mm512_maskz_mov_pd(hit_upper, delta), _mm512_maskz_mov_pd(hit_lower, delta), has_lower);
  }
  CNNBP_TARGET_AVX512 int64_t take() {
    const int64_t sum = _mm512_reduce_add_epi64(count);
    count = _mm512_setzero_si512();
    return sum;
  }
};

template <typename T>
CNNBP_TARGET_AVX512 int64_t max_pool2d_backward_2x2_rows_gather(const T* d, const int64_t* idx, T* gin,
                                                                const PoolShape& s, int64_t q0, int64_t q1) {
  constexpr int L = RowsGather2x2<T>::L;
  const int64_t H = s.H, W = s.W, OH = s.OH, OW = s.OW, vectors = (W + L - 1) / L;
  RowsGather2x2<T> gather(W, vectors);
  int64_t matched = 0;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t p = q / OH, i = q % OH, h = 2 * i;
    const bool has_lower = h + 1 < H;  // (ceil mode, odd H: the last window has one row)
    T* const g = gin + (p * H + h) * W;
    const int64_t* const iq = idx + q * OW;
    const T* const dq = d + q * OW;
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t w0 = L * v, o0 = L / 2 * v;
      gather.block(g, W, w0, std::min<int64_t>(L, W - w0), iq + o0, dq + o0, std::clamp<int64_t>(OW - o0, 0, L / 2),
                   h * W + w0, has_lower);
    }
    if ((q - q0) % gather.flush == gather.flush - 1 || q + 1 == q1) matched += gather.take();
    if (i == OH - 1)  // rows below the last window's (floor mode, odd H)
      for (int64_t r = h + 2; r < H; ++r) std::fill(gin + (p * H + r) * W, gin + (p * H + r + 1) * W, T(0));
  }
  return matched;
}
#endif

// NCHW backward of 2×2 stride-2 windows on AVX-512: float through max_pool2d_backward_rows_2x2_permuted
// where the windows tile the planes exactly with output rows of up to 16 (LeNet's pools), split over
// the blocks as the forward is; else through max_pool2d_backward_2x2_rows_gather, split over the
// output rows of all the planes; double through its rows gather where rows hold two vectors or
// more. Returns false where none applies, or where some index is no tap of its window (the scatter
// then writes all of gin again).
template <typename T>
bool max_pool2d_backward_nchw_rows_2x2(const T* d, const int64_t* idx, T* gin, const PoolShape& s) {
#ifdef CNNBP_X86
  if constexpr (std::is_same_v<T, float>) {
    if (!is_2x2_stride_2(s) || s.H * s.W >= (int64_t(1) << 31) || active_isa() != Isa::avx512) return false;
    if (tiles_2x2_rows(s, 16)) {
      const RowBlocks2x2 rb = row_blocks_2x2(s, 16);
      std::atomic<bool> strays{false};
      at::parallel_for(0, rb.blocks(), grain_for(4 * rb.Rc * rb.OW), [&](int64_t b0, int64_t b1) {
        if (!max_pool2d_backward_rows_2x2_permuted(d, idx, gin, s, rb, b0, b1))
          strays.store(true, std::memory_order_relaxed);
      });
      return !strays.load();
    }
    std::atomic<int64_t> matched{0};
    at::parallel_for(0, s.planes * s.OH, grain_for(4 * s.OW), [&](int64_t q0, int64_t q1) {
      matched += max_pool2d_backward_2x2_rows_gather(d, idx, gin, s, q0, q1);
    });
    return matched.load() == s.planes * s.OH * s.OW;
  }
  if constexpr (std::is_same_v<T, double>) {
    // rows of two vectors or more (backward op alone, two threads, in-process A/B against the
    // scatter: 8 × 128 × 56² 0.84x the time, 1 × 64 × 112² 0.66x, 4 × 3 × 255² (ceil mode) 0.64x,
    // 64 × 6 × 28² 0.88x, 64 × 6 × 27² 1.03x; LeNet's 16 × 10², a vector and a quarter per row, 1.26x)
    if (!is_2x2_stride_2(s) || s.W < 16 || active_isa() != Isa::avx512) return false;
    std::atomic<int64_t> matched{0};
    at::parallel_for(0, s.planes * s.OH, grain_for(4 * s.OW), [&](int64_t q0, int64_t q1) {
      matched += max_pool2d_backward_2x2_rows_gather(d, idx, gin, s, q0, q1);
    });
    return matched.load() == s.planes * s.OH * s.OW;
  }
#endif
  return false;
}

// NCHW forward of a floating type through max_pool2d_plane_buffered, split over planes (n, c).
// Returns false, having done nothing, where a plane's buffer would be too large (over 2^22 values).
template <typename T>
bool max_pool2d_nchw_buffered(const T* in, T* out, int64_t* idx, const PoolShape& s) {
  using A = at::opmath_type<T>;
  constexpr int kFull = 64 / int(sizeof(A));  // outputs per block: 64 bytes, or half that for short rows
  // 2×2 stride 2 (floor or ceil mode): the block kernel over rows of all planes
  const bool two_by_two = is_2x2_stride_2(s);
  // Half blocks for short rows: in the buffered kernel where OW ≤ kFull / 2, in the 2×2 one where
  // OW < kFull (LeNet's rows of 14 outputs: a block of 8 and one of 6).
  const int L = s.OW < (two_by_two ? kFull : kFull / 2 + 1) ? kFull / 2 : kFull;
  const PlaneBlocks<A> b(s, L);
  if (s.H * s.W >= (int64_t(1) << 31) || b.buffer_size() > (int64_t(1) << 22)) return false;
  const int64_t in_plane = s.H * s.W, out_plane = s.OH * s.OW;
  const T* in_end = in + s.planes * in_plane;
  // the plane-by-plane kernels (the 2×2 gather, the buffered blocks) prefetch each thread's next plane
  const bool ahead = prefetch_pays(in_plane * int64_t(sizeof(T)), s.planes * in_plane * int64_t(sizeof(T)));
#ifdef CNNBP_X86
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    // Planes tiled exactly, output rows of up to 16 (float): blocks of whole rows, taps permuted
    // from registers rather than gathered (ops alone, in-process A/B, batch 64: LeNet's 16 × 10²
    // 0.65-0.69× the gather's time, 6 × 28² 0.70-0.97×; 8 × 32 × 16² 0.75-0.80×).
    if constexpr (std::is_same_v<T, float>) {
      if (tiles_2x2_rows(s, 16) && active_isa() == Isa::avx512) {
        const RowBlocks2x2 rb = row_blocks_2x2(s, 16);
        at::parallel_for(0, rb.blocks(), grain_for(4 * rb.Rc * rb.OW), [&](int64_t b0, int64_t b1) {
          max_pool2d_rows_2x2_permuted(in, out, idx, s, rb, b0, b1);
        });
        return true;
      }
    }
    // Rows of up to two vectors of outputs, planes of up to 2^16 outputs (the table's size), on
    // Intel's AVX-512 cores (where blend_isa() is 512 bits wide), whose gathers are fast: on an
    // Intel Xeon a 64 × 56² input took 0.50 → 0.44 ms with it (2 threads), as fast as the row kernel
    // at 56 outputs. On AMD's (Zen 4, forward op alone, two threads, in-process A/B) the row kernel
    // below took 0.47-0.71x the gather's time in float32 (8 × 128 × 56², 4 × 64 × 62², 8 × 64 × 57²,
    // 16 × 16 × 33², 16 × 32 × 40², 64 × 6 × 27²) and 0.50-0.74x in float64 (LeNet's 64 × 6 × 28²
    // and 64 × 16 × 10², 32 × 20 × 24², 64 × 6 × 27², 1 × 64 × 30²).
    if (is_plain_2x2_stride_2(s) && s.OW < 2 * kFull && s.OH * s.OW <= (int64_t(1) << 16) &&
        active_isa() == Isa::avx512 && blend_isa() == Isa::avx512) {
      const std::vector<int32_t> at = top_left_taps(s, kFull);
      at::parallel_for(0, s.planes, grain_for(4 * s.OH * s.OW), [&](int64_t p0, int64_t p1) {
        max_pool2d_planes_2x2_gather(in, out, idx, at.data(), s, p0, p1, ahead);
      });
      return true;
    }
  }
#endif
  if (two_by_two) {  // split over the output rows of all planes
    at::parallel_for(0, s.planes * s.OH, grain_for(s.OW * 4), [&](int64_t r0, int64_t r1) {
      run_with_isa([&](auto isa) CNNBP_LAMBDA_INLINE {
        constexpr int PB = decltype(isa)::compare_bytes;  // NaN or larger: combined comparisons
        if (L == kFull)
          max_pool2d_rows_2x2_blocks<kFull, PB>(in, in_end, out, idx, s, r0, r1);
        else
          max_pool2d_rows_2x2_blocks<kFull / 2, PB>(in, in_end, out, idx, s, r0, r1);
      }, compare_isa());
    });
    return true;
  }
  at::parallel_for(0, s.planes, grain_for(out_plane * s.kh * s.kw + b.buffer_size()), [&](int64_t p0, int64_t p1) {
    std::vector<A> buf(b.buffer_size()), line(b.row_len);
    run_with_isa([&](auto isa) CNNBP_LAMBDA_INLINE {
      constexpr int PB = decltype(isa)::vector_bytes, CB = decltype(isa)::compare_bytes;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t after = (p1 - 1 - p) * out_plane;  // this thread's later planes
        const PrefetchAhead next = ahead && p + 1 < p1 ? PrefetchAhead(in + (p + 1) * in_plane, in_plane * int64_t(sizeof(T)), s.OH)
                                                       : PrefetchAhead();
        if (L == kFull)
          max_pool2d_plane_buffered<kFull, PB, CB>(in + p * in_plane, out + p * out_plane, idx + p * out_plane, buf.data(),
                                                   line.data(), b, s, after, p == p0, next);
        else
          max_pool2d_plane_buffered<kFull / 2, PB, CB>(in + p * in_plane, out + p * out_plane, idx + p * out_plane,
                                                       buf.data(), line.data(), b, s, after, p == p0, next);
      }
    }, blend_isa());
  });
  return true;
}

// The four taps of a 2×2 window, in scan order; `at` is the flat index of the top-left one.
template <typename A>
CNNBP_ALWAYS_INLINE void max_of_2x2(A t0, A t1, A t2, A t3, int32_t at, int32_t W, A& best, int32_t& best_at) {
  best = t0;
  best_at = at;
  offer(t1, at + 1, best, best_at);
  offer(t2, at + W, best, best_at);
  offer(t3, at + W + 1, best, best_at);
}

// channels_last, 2×2 stride 2 inside the image: the four taps of an output pixel are four runs of
// C values; each channel takes them in scan order (max_of_2x2).
template <typename T>
CNNBP_ALWAYS_INLINE void max_pool2d_pixel_2x2_cl(const T* in_n, T* out_px, int64_t* idx_px, int64_t i, int64_t j,
                                                 int64_t C, const PoolShape& s) {
  using acc_t = at::opmath_type<T>;
  const T* t0 = in_n + (2 * i * s.W + 2 * j) * C;
  const T* t1 = t0 + C;
  const T* t2 = t0 + s.W * C;
  const T* t3 = t2 + C;
  const int32_t at = static_cast<int32_t>(2 * i * s.W + 2 * j), W = static_cast<int32_t>(s.W);
  for (int64_t c = 0; c < C; ++c) {
    acc_t b;
    int32_t a;
    max_of_2x2(static_cast<acc_t>(t0[c]), static_cast<acc_t>(t1[c]), static_cast<acc_t>(t2[c]),
               static_cast<acc_t>(t3[c]), at, W, b, a);
    out_px[c] = static_cast<T>(b);
    idx_px[c] = a;
  }
}

// The maxima of n gathered 2×2 windows (taps t0 … t3 in scan order, top-left index at) into out
// and idx. Over whole arrays, so that it vectorises.
template <typename A, typename T, int B>
CNNBP_ALWAYS_INLINE void max_of_2x2_lanes(const A (&t0)[B], const A (&t1)[B], const A (&t2)[B], const A (&t3)[B],
                                          const int32_t (&at)[B], int n, int32_t W, T* out, int64_t* idx) {
  A best[B];
  int32_t best_at[B];
  for (int l = 0; l < n; ++l) max_of_2x2(t0[l], t1[l], t2[l], t3[l], at[l], W, best[l], best_at[l]);
  for (int l = 0; l < n; ++l) {
    out[l] = static_cast<T>(best[l]);
    idx[l] = best_at[l];
  }
}

// channels_last, 2×2 stride 2 inside the image, few channels (C < 16, LeNet's 6): per pixel the
// channel loop above would be too short to vectorise (it runs scalar, with a branch per tap). An
// output row instead is one run of OW·C values: lane e = j·C + c reads its top-left tap at input
// column 2j, channel c, offset u[e] = 2j·C + c in the row, and its index is 2i·W + col2[e] with
// col2[e] = 2j (tables made once per call, the same for every row). Gathered into arrays first, as
// above.
template <typename T>
CNNBP_ALWAYS_INLINE void max_pool2d_row_2x2_cl(const T* in_n, T* out_row, int64_t* idx_row, int64_t i, int64_t C,
                                               const int32_t* u, const int32_t* col2, const PoolShape& s) {
  using acc_t = at::opmath_type<T>;
  constexpr int B = 128;
  const T* r0 = in_n + 2 * i * s.W * C;
  const T* r1 = r0 + s.W * C;
  const int32_t at_row = static_cast<int32_t>(2 * i * s.W), W = static_cast<int32_t>(s.W);
  const int64_t lanes = s.OW * C;
  for (int64_t e0 = 0; e0 < lanes; e0 += B) {
    const int n = static_cast<int>(std::min<int64_t>(B, lanes - e0));
    acc_t t0[B], t1[B], t2[B], t3[B];
    int32_t at[B];
    for (int l = 0; l < n; ++l) {
      const int32_t v = u[e0 + l];
      t0[l] = static_cast<acc_t>(r0[v]);
      t1[l] = static_cast<acc_t>(r0[v + C]);
      t2[l] = static_cast<acc_t>(r1[v]);
      t3[l] = static_cast<acc_t>(r1[v + C]);
      at[l] = at_row + col2[e0 + l];
    }
    max_of_2x2_lanes(t0, t1, t2, t3, at, n, W, out_row + e0, idx_row + e0);
  }
}

// The same for planes too large for int32 indices: one window at a time, int64 throughout.
template <typename T>
void max_pool2d_plane_windows(const T* in, T* out, int64_t* idx, const PoolShape& s) {
  for (int64_t i = 0; i < s.OH; ++i)
    for (int64_t j = 0; j < s.OW; ++j) pool_window(in, out + i * s.OW + j, idx + i * s.OW + j, i, j, s);
}

// channels_last (N, H, W, C in memory): for one output pixel, every tap is offered to channels
// c0 … C − 1 at once: the inner loop runs along C, contiguous in memory.
template <typename T>
CNNBP_ALWAYS_INLINE void max_pool2d_pixel_cl(const T* in_n, T* out_px, int64_t* idx_px, int64_t i, int64_t j,
                                             int64_t c0, int64_t C, const PoolShape& s, at::opmath_type<T>* best,
                                             int32_t* best_at) {
  using acc_t = at::opmath_type<T>;
  int64_t h0, h1, v0, v1;
  window(i * s.sh - s.ph, s.kh, s.dh, s.H, h0, h1);
  window(j * s.sw - s.pw, s.kw, s.dw, s.W, v0, v1);
  const acc_t low = lowest_value<T>();
  const int32_t first = static_cast<int32_t>(h0 * s.W + v0);
  for (int64_t c = c0; c < C; ++c) {
    best[c] = low;
    best_at[c] = first;
  }
  for (int64_t h = h0; h < h1; h += s.dh) {
    for (int64_t v = v0; v < v1; v += s.dw) {
      const T* px = in_n + (h * s.W + v) * C;
      const int32_t at = static_cast<int32_t>(h * s.W + v);
      for (int64_t c = c0; c < C; ++c) offer(static_cast<acc_t>(px[c]), at, best[c], best_at[c]);
    }
  }
  for (int64_t c = c0; c < C; ++c) {
    out_px[c] = static_cast<T>(best[c]);
    idx_px[c] = best_at[c];
  }
}

// The same for float and double, L channels at a time from c_begin (the whole blocks of L): a
// block's maxima and the positions of their taps stay in registers across all the window's taps.
// Returns the channels done (c_begin plus the whole blocks), for a narrower block or
// max_pool2d_pixel_cl to finish.
template <int L, int PB, typename A>
CNNBP_ALWAYS_INLINE int64_t max_pool2d_pixel_cl_blocks(const A* in_n, A* out_px, int64_t* idx_px, int64_t i,
                                                       int64_t j, int64_t c_begin, int64_t C, const PoolShape& s) {
  using B = PoolBlock<A, PB, L>;
  using I = typename B::I;
  using value = typename B::value;
  using offset = typename B::offset;
  constexpr int NP = B::kPieces;
  int64_t h0, h1, v0, v1;
  window(i * s.sh - s.ph, s.kh, s.dh, s.H, h0, h1);
  window(j * s.sw - s.pw, s.kw, s.dw, s.W, v0, v1);
  const A low = lowest_value<A>();
  int64_t c0 = c_begin;
  for (; c0 + L <= C; c0 += L) {
    value best[NP];
    offset at[NP];
    for (int p = 0; p < NP; ++p) {
      best[p] = value{} + low;
      at[p] = offset{} + static_cast<I>(h0 * s.W + v0);
    }
    for (int64_t h = h0; h < h1; h += s.dh) {
      for (int64_t v = v0; v < v1; v += s.dw)
        offer_run<true, B>(in_n + (h * s.W + v) * C + c0, offset{} + static_cast<I>(h * s.W + v), best, at);
    }
    A vals[L];
    I where[L];
    spill_block<B>(best, at, vals, where);
    store_block(out_px + c0, idx_px + c0, vals, where, L, L);
  }
  return c0;
}


// The window given to the backward, checked as the forward checks it, and against the sizes: the
// output must be what this window makes of the input, in floor or in ceil mode.
PoolShape check_backward_window(const at::Tensor& grad_output, at::IntArrayRef input_size, at::IntArrayRef kernel,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "max_pool2d_backward: kernel_size, stride, padding and dilation must have 2 values each");
  TORCH_CHECK(kernel[0] > 0 && kernel[1] > 0 && stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 &&
                  dilation[1] > 0 && padding[0] >= 0 && padding[1] >= 0,
              "max_pool2d_backward: kernel_size, stride and dilation must be positive and padding non-negative, "
              "but got kernel_size=", kernel, ", stride=", stride, ", padding=", padding, ", dilation=", dilation);
  PoolShape s;
  s.H = input_size[2], s.W = input_size[3], s.planes = input_size[0] * input_size[1];
  set_window(s, kernel, stride, padding, dilation);
  s.OH = grad_output.size(2), s.OW = grad_output.size(3);
  auto made = [](int64_t out, int64_t in, int64_t k, int64_t pad, int64_t st, int64_t dil) {
    return out == pooled_size(in, k, pad, st, dil, false) || out == pooled_size(in, k, pad, st, dil, true);
  };
  TORCH_CHECK(made(s.OH, s.H, s.kh, s.ph, s.sh, s.dh) && made(s.OW, s.W, s.kw, s.pw, s.sw, s.dw),
              "max_pool2d_backward: grad_output of size ", grad_output.sizes(), " is not what kernel_size=", kernel,
              ", stride=", stride, ", padding=", padding, " and dilation=", dilation, " make of input_size ",
              input_size);
  return s;
}

// ---- channels_last backward of a tiling window: a gather ------------------------------------------
// When the windows tile the input (kernel = stride, no dilation: the 2x2 stride-2 pools of VGG and
// LeNet, in floor or ceil mode), every input position is a tap of at most one window, so its gradient
// is that window's δ if the window's index names it, else 0. Each gradient element is then written
// once, in vector loops along C: no zeroing pass and no scatter (ops alone, float32, 2 threads,
// 2x2 stride 2 over 64-128 channels: 0.52-0.60x native's time, against 1.0-1.2x for the scatter;
// the window comes from the forward, see max_pool2d_backward's schema). Output row i's windows cover input rows
// [i·sh − ph, (i + 1)·sh − ph); rows and columns past the last window belong to none and are zeroed.
// δ + 0 rather than δ: the scatter adds δ to +0, which turns a −0 into +0.
// The matches are counted: an output whose index is a tap of its window is matched exactly once,
// any other index never, so fewer matches than outputs (indices not made by this window) send the
// caller back to the scatter, which then decides what they mean.
inline bool is_tiling(const PoolShape& s) {
  return s.kh == s.sh && s.kw == s.sw && s.dh == 1 && s.dw == 1;
}

// Input rows [h0, h1) of the windows of output row i (and, for the last row, the rows past them).
inline void rows_of(const PoolShape& s, int64_t i, int64_t& h0, int64_t& h1, int64_t& covered_end) {
  h0 = std::max<int64_t>(0, i * s.sh - s.ph);
  covered_end = std::min(s.H, (i + 1) * s.sh - s.ph);
  h1 = i + 1 == s.OH ? s.H : covered_end;
}

// Vectors of PB bytes: values A, their lane masks (the integer of A's width), and int64 indices
// (sizeof(int64_t) / sizeof(A) index registers per value register).
template <typename A, int PB>
struct GatherVec {
  using value = typename PoolBlock<A, PB, PB / int(sizeof(A))>::value;  // one register
  using mask = typename PoolBlock<A, PB, PB / int(sizeof(A))>::offset;
  typedef int64_t index __attribute__((vector_size(PB)));
  static constexpr int kLanes = PB / int(sizeof(A)), kIndexLanes = PB / 8, kIndexRegs = int(8 / sizeof(A));

  // Lanes where at[l] == target[l] (the targets as int64 registers), as a mask of A's lanes.
  static CNNBP_ALWAYS_INLINE mask match(const int64_t* at, const index (&target)[kIndexRegs]) {
    index eq[kIndexRegs];
    for (int r = 0; r < kIndexRegs; ++r) {
      index v;
      std::memcpy(&v, at + r * kIndexLanes, PB);
      eq[r] = v == target[r];
    }
    mask m;
    if constexpr (kIndexRegs == 1) {
      std::memcpy(&m, &eq[0], PB);
    } else {  // every 32-bit half of an int64 lane of eq is that lane's mask: take the even halves
      mask lo, hi, even;
      std::memcpy(&lo, &eq[0], PB);
      std::memcpy(&hi, &eq[1], PB);
      for (int l = 0; l < kLanes; ++l) even[l] = 2 * l;
      m = __builtin_shuffle(lo, hi, even);
    }
    return m;
  }
  // v + 0 in the lanes where m is set, +0 elsewhere.
  static CNNBP_ALWAYS_INLINE value select(const A* v, mask m) {
    value x;
    std::memcpy(&x, v, PB);
    x += A(0);
    mask bits;
    std::memcpy(&bits, &x, PB);
    bits &= m;
    std::memcpy(&x, &bits, PB);
    return x;
  }
};

// channels_last: the input rows of output row i of sample n (d, idx: that row's δ and indices,
// OW·C each; gin: sample n's gradient). Returns the matches. C is at least one vector (PB bytes).
template <int PB, typename T>
CNNBP_ALWAYS_INLINE int64_t tiled_gather_rows_cl(const T* d, const int64_t* idx, T* gin, int64_t i, int64_t C,
                                                 const PoolShape& s) {
  using G = GatherVec<T, PB>;
  using M = typename G::mask;
  M count{};
  // The channels past the whole vectors: one vector ending at C, whose lanes before `tail` the
  // vectors counted already (`fresh`: the others).
  const int64_t tail = C / G::kLanes * G::kLanes, c0 = C - G::kLanes;
  M fresh;
  for (int l = 0; l < G::kLanes; ++l) fresh[l] = c0 + l >= tail ? -1 : 0;
  int64_t h0, h1, covered_end, matched = 0;
  rows_of(s, i, h0, h1, covered_end);
  const int64_t w_end = std::min(s.W, s.OW * s.sw - s.pw);  // columns from w_end on belong to no window
  for (int64_t h = h0; h < h1; ++h) {
    T* row = gin + h * s.W * C;
    if (h >= covered_end) {
      std::fill(row, row + s.W * C, T(0));
      continue;
    }
    // pixel w belongs to output column j = (w + pw) / sw: stepped along, no division per pixel
    int64_t j = s.pw / s.sw, phase = s.pw % s.sw;
    for (int64_t w = 0; w < w_end; ++w) {
      const int64_t o = j * C;
      if (++phase == s.sw) phase = 0, ++j;
      const int64_t* __restrict__ ip = idx + o;
      const T* __restrict__ dp = d + o;
      T* __restrict__ out = row + w * C;
      const int64_t at = h * s.W + w;
      typename G::index t[G::kIndexRegs];
      for (int r = 0; r < G::kIndexRegs; ++r) t[r] = typename G::index{} + at;
      for (int64_t c = 0; c < tail; c += G::kLanes) {
        const M m = G::match(ip + c, t);
        const typename G::value v = G::select(dp + c, m);
        std::memcpy(out + c, &v, PB);
        count -= m;
      }
      if (tail < C) {
        const M m = G::match(ip + c0, t);
        const typename G::value v = G::select(dp + c0, m);
        std::memcpy(out + c0, &v, PB);
        count -= m & fresh;
      }
    }
    std::fill(row + w_end * C, row + s.W * C, T(0));
  }
  for (int l = 0; l < int(sizeof(M) / sizeof(count[0])); ++l) matched += count[l];
  return matched;
}

// channels_last ∂E/∂o of a tiling window by the gather, into all of gin. Returns whether every output
// was matched (else gin is incomplete, and the scatter must run).
template <typename T>
bool max_pool2d_backward_tiled_cl(const T* d, const int64_t* idx, T* gin, int64_t N, int64_t C, const PoolShape& s) {
  if (C * int64_t(sizeof(T)) < 32) return false;  // under one vector of the widest compare_bytes
  std::atomic<int64_t> matched{0};
  const int64_t in_plane = s.H * s.W, out_plane = s.OH * s.OW;
  // split over (sample, output row): the input rows of an output row are written by one thread
  at::parallel_for(0, N * s.OH, grain_for(s.sh * s.W * C), [&](int64_t r0, int64_t r1) {
    int64_t found = 0;
    run_with_isa([&](auto isa) CNNBP_LAMBDA_INLINE {
      constexpr int PB = decltype(isa)::compare_bytes;  // the matches are counted
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / s.OH, i = r % s.OH;
        found += tiled_gather_rows_cl<PB>(d + r * s.OW * C, idx + r * s.OW * C, gin + n * in_plane * C, i, C, s);
      }
    }, compare_isa());
    matched += found;
  });
  return matched.load() == N * C * out_plane;
}

}  // namespace

// Memory layout of the result: channels_last when the input is laid out that way (and only that
// way); torch_cnnbp/ops.py's fake kernel applies the same rule.
bool use_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(const at::Tensor& input_,
                                                      at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride,
                                                      at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool ceil_mode) {
  const PoolShape s = check_max_pool2d(input_, kernel_size, stride, padding, dilation, ceil_mode);
  const bool cl = use_channels_last(input_);
  const auto format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor input = input_.contiguous(format);
  const int64_t N = input.size(0), C = input.size(1);
  at::Tensor output = empty_result({N, C, s.OH, s.OW}, input.options().memory_format(format));
  at::Tensor indices = empty_result({N, C, s.OH, s.OW}, input.options().dtype(at::kLong).memory_format(format));
  if (output.numel() == 0) return {output, indices};
  // Integer inputs pool too (as in PyTorch); only floating types have a gradient.
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnbp::max_pool2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    int64_t* idx = indices.mutable_data_ptr<int64_t>();
    const int64_t in_plane = s.H * s.W, out_plane = s.OH * s.OW;
    if (cl) {
      // Split over output pixels (n, i, j): each writes its own C outputs. Indices are built as
      // int32, so planes must stay under 2^31 elements here.
      TORCH_CHECK(in_plane < (int64_t(1) << 31), "max_pool2d: channels_last planes of 2^31 elements or more are not supported");
      const bool plain_2x2 = is_plain_2x2_stride_2(s);
      if (plain_2x2 && C < 16) {  // whole output rows (n, i), split over threads
        std::vector<int32_t> u(s.OW * C), col2(s.OW * C);
        for (int64_t e = 0; e < s.OW * C; ++e) {
          u[e] = static_cast<int32_t>(2 * (e / C) * C + e % C);
          col2[e] = static_cast<int32_t>(2 * (e / C));
        }
        at::parallel_for(0, N * s.OH, grain_for(s.OW * C * 4), [&](int64_t r0, int64_t r1) {
          run_with_isa([&]() CNNBP_LAMBDA_INLINE {
            for (int64_t r = r0; r < r1; ++r) {
              const int64_t n = r / s.OH, i = r % s.OH;
              max_pool2d_row_2x2_cl(in + n * in_plane * C, out + r * s.OW * C, idx + r * s.OW * C, i, C, u.data(),
                                    col2.data(), s);
            }
          }, blend_isa());
        });
        return;
      }
      // A 2x2 stride-2 pool in ceil mode has partial windows in its last row and column only: the
      // windows inside the image take the 2x2 kernel all the same.
      const bool any_2x2 = is_2x2_stride_2(s);
      const int64_t OH_in = any_2x2 ? s.H / 2 : 0, OW_in = any_2x2 ? s.W / 2 : 0;  // outputs with whole windows
      at::parallel_for(0, N * out_plane, grain_for(C * s.kh * s.kw), [&](int64_t p0, int64_t p1) {
        std::vector<acc_t> best(plain_2x2 ? 0 : C);
        std::vector<int32_t> best_at(plain_2x2 ? 0 : C);
        run_with_isa([&](auto isa) CNNBP_LAMBDA_INLINE {
          constexpr int PB = decltype(isa)::compare_bytes;  // NaN or larger: combined comparisons
          // (n, i, j) of pixel p, stepped along rather than divided out per pixel (with few
          // channels, LeNet's 6, the divisions cost more than the pooling)
          int64_t n = p0 / out_plane, i = (p0 % out_plane) / s.OW, j = p0 % s.OW;
          for (int64_t p = p0; p < p1; ++p) {
            if (i < OH_in && j < OW_in) {
              max_pool2d_pixel_2x2_cl(in + n * in_plane * C, out + p * C, idx + p * C, i, j, C, s);
            } else {
              int64_t done = 0;
              if constexpr (std::is_same_v<scalar_t, acc_t> && std::is_floating_point_v<acc_t>) {
                // float: 128-byte blocks first where 256-bit registers hold them (four independent
                // chains of compares per tap), then a 64-byte one. (For double,
                // whose offsets are int64 too, the wide block measured no faster.)
                constexpr int kWide = PB >= 32 && sizeof(acc_t) == 4 ? 128 : 64;
                done = max_pool2d_pixel_cl_blocks<kWide / int(sizeof(acc_t)), PB>(in + n * in_plane * C, out + p * C,
                                                                                  idx + p * C, i, j, 0, C, s);
                if constexpr (kWide != 64)
                  done = max_pool2d_pixel_cl_blocks<64 / int(sizeof(acc_t)), PB>(in + n * in_plane * C, out + p * C,
                                                                                 idx + p * C, i, j, done, C, s);
              }
              max_pool2d_pixel_cl(in + n * in_plane * C, out + p * C, idx + p * C, i, j, done, C, s, best.data(),
                                  best_at.data());
            }
            if (++j == s.OW) {
              j = 0;
              if (++i == s.OH) i = 0, ++n;
            }
          }
        }, compare_isa());
      });
      return;
    }
    // NCHW
    if constexpr (std::is_floating_point_v<acc_t>) {
      if (max_pool2d_nchw_buffered(in, out, idx, s)) return;
    }
    if (in_plane < (int64_t(1) << 31)) {
      // Integer types and planes too large for a buffer: one output row at a time, split over planes.
      // Each stride phase of a padded row holds the positions read by OW outputs and kw taps.
      const int64_t phase_len = s.OW + ((s.kw - 1) * s.dw) / s.sw + 1;
      at::parallel_for(0, s.planes, grain_for(out_plane * s.kh * s.kw), [&](int64_t p0, int64_t p1) {
        std::vector<acc_t> phases(s.sw * phase_len), best(s.OW);
        std::vector<int32_t> best_at(s.OW);
        run_with_isa([&]() CNNBP_LAMBDA_INLINE {
          for (int64_t p = p0; p < p1; ++p)
            max_pool2d_plane_rows(in + p * in_plane, out + p * out_plane, idx + p * out_plane, s, phases.data(),
                                  phase_len, best.data(), best_at.data());
        }, blend_isa());
      });
    } else {
      at::parallel_for(0, s.planes, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          max_pool2d_plane_windows(in + p * in_plane, out + p * out_plane, idx + p * out_plane, s);
      });
    }
  });
  return {output, indices};
}

// ∂E/∂o[p, indices[p, i, j]] += δ[p, i, j], split over planes p = (n, c): a plane's gradient is
// written by one thread only. An index outside the plane is an error, never a stray write.
at::Tensor max_pool2d_backward(const at::Tensor& grad_output_, const at::Tensor& indices_,
                               at::IntArrayRef input_size, at::OptionalIntArrayRef kernel_size,
                               at::OptionalIntArrayRef stride, at::OptionalIntArrayRef padding,
                               at::OptionalIntArrayRef dilation) {
  check_floating_cpu(grad_output_, "max_pool2d_backward", "grad_output");
  TORCH_CHECK(input_size.size() == 4, "max_pool2d_backward: input_size must have 4 values, got ",
              input_size);
  TORCH_CHECK(indices_.scalar_type() == at::kLong,
              "max_pool2d_backward: indices must be int64, got ", indices_.scalar_type());
  TORCH_CHECK(grad_output_.dim() == 4 && indices_.sizes() == grad_output_.sizes() &&
                  grad_output_.size(0) == input_size[0] && grad_output_.size(1) == input_size[1],
              "max_pool2d_backward: grad_output ", grad_output_.sizes(), " and indices ",
              indices_.sizes(), " do not match input_size ", input_size);
  for (auto d : input_size) TORCH_CHECK(d >= 0, "max_pool2d_backward: negative input_size ", input_size);

  // Same layout as the forward made: channels_last indices give a channels_last gradient.
  const bool cl = use_channels_last(indices_);
  const auto format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor grad_output = grad_output_.contiguous(format), indices = indices_.contiguous(format);
  // Zeroed below, by the thread that owns each part, just before it adds into it (one pass over memory).
  at::Tensor grad_input = empty_result(input_size, grad_output.options().memory_format(format));
  const int64_t N = input_size[0], C = input_size[1];
  const int64_t in_plane = input_size[2] * input_size[3];
  const int64_t out_plane = grad_output.size(2) * grad_output.size(3);
  if (N * C == 0 || out_plane == 0) return grad_input.zero_();
  const int given = kernel_size.has_value() + stride.has_value() + padding.has_value() + dilation.has_value();
  TORCH_CHECK(given == 0 || given == 4,
              "max_pool2d_backward: give all of kernel_size, stride, padding and dilation, or none of them");
  std::optional<PoolShape> window;
  if (given == 4) window = check_backward_window(grad_output, input_size, *kernel_size, *stride, *padding, *dilation);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "cnnbp::max_pool2d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* d = grad_output.const_data_ptr<scalar_t>();
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    scalar_t* gin = grad_input.mutable_data_ptr<scalar_t>();
    // An index inside the plane gets its add (adding a zero changes nothing: the gradient starts at
    // +0). One outside is an error unless its gradient is zero: empty windows (dilation stepping over
    // a short input) point outside and are sent zeros.
    auto inside = [plane = static_cast<uint64_t>(in_plane)](int64_t at) { return static_cast<uint64_t>(at) < plane; };
    auto check = [&](int64_t at, scalar_t grad) {
      TORCH_CHECK(inside(at) || grad == scalar_t(0), "max_pool2d_backward: index ", at,
                  " is outside the input plane of ", in_plane, " elements");
    };
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      // The gather for channels_last tiling windows, over 24 channels or more. Over fewer, its
      // channel loop is one or two vectors per pixel, and it reads each index once per tap where
      // the scatter reads it once: slower than the scatter (LeNet's 6: 7x as first written; 2x2
      // stride 2 at 28x28, batch 64, float32, 2 threads: 8 channels 135-139 against 107-109 us,
      // 12: 235-238 against 174-176; on a Xeon, ~100K elements per call: 16 channels 1.02-1.33x
      // the scatter's time over 10x10 to 56x56 planes, 20 channels 0.99-1.33x, 24 0.82-1.13x,
      // 32 0.71-1.05x, 48-64 0.65-0.88x); and on NCHW, along rows, it took 1.0-4.2x the
      // scatter's time (NCHW's scatter works in one plane at a time, in cache).
      if (cl && C >= 24 && window && is_tiling(*window) && max_pool2d_backward_tiled_cl(d, idx, gin, N, C, *window))
        return;
    }
    if (cl && N < at::get_num_threads() && in_plane >= 2 * at::get_num_threads() && N * in_plane * C >= 32768) {
      // Fewer samples than threads: each thread owns a band of input pixels of every sample, zeroes
      // it, and takes the adds that land in it, in output order (the order of a gradient's terms on
      // any split). Given the window, a thread scans only the output rows whose windows reach its
      // band's rows: an index inside its window's rows cannot land anywhere else. An index outside
      // them (not one the forward made) may land in the band of a thread that skipped its row: the
      // threads that scan the row see it, and then every thread scans every output instead.
      const int64_t threads = at::get_num_threads();
      const int64_t H = input_size[2], W = input_size[3], OH = grad_output.size(2), OW = grad_output.size(3);
      auto top = [&](int64_t i) { return i * window->sh - window->ph; };  // a window's first and last row
      auto bottom = [&](int64_t i) { return top(i) + (window->kh - 1) * window->dh; };
      bool rows_known = window.has_value();  // and every output row's window reaches the input
      for (int64_t i = 0; rows_known && i < OH; ++i) rows_known = top(i) < H && bottom(i) >= 0;
      auto bands = [&](bool by_rows) {
        std::atomic<bool> stray{false};
        at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
          // (local copies: read through the captures, the pointers were loaded again for every add)
          const scalar_t* const dp = d;
          const int64_t* const ip = idx;
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t lo = in_plane * t / threads, hi = in_plane * (t + 1) / threads;
            int64_t i0 = 0, i1 = OH;  // the output rows scanned
            if (by_rows) {
              const int64_t r0 = lo / W, r1 = (hi - 1) / W;
              while (i0 < OH && bottom(i0) < r0) ++i0;
              while (i1 > i0 && top(i1 - 1) > r1) --i1;
            }
            for (int64_t n = 0; n < N; ++n) {
              scalar_t* g = gin + n * in_plane * C;
              std::fill(g + lo * C, g + hi * C, scalar_t(0));
              for (int64_t i = i0; i < i1; ++i) {
                int64_t h0 = 0, h1 = 0;  // the window's rows in the image (by_rows only)
                if (by_rows) cnnbp::window(top(i), window->kh, window->dh, H, h0, h1);
                const int64_t rows_lo = h0 * W, rows_hi = h1 * W;  // and their pixels
                for (int64_t ij = i * OW; ij < (i + 1) * OW; ++ij) {
                  const int64_t off = (n * out_plane + ij) * C;
                  for (int64_t c = 0; c < C; ++c) {
                    const int64_t at = ip[off + c];
                    if (at >= lo && at < hi)
                      g[at * C + c] = static_cast<scalar_t>(static_cast<acc_t>(g[at * C + c]) + static_cast<acc_t>(dp[off + c]));
                    else if (at >= rows_lo && at < rows_hi)
                      continue;  // another band's, whose thread scans this row
                    else if (by_rows && inside(at))
                      stray.store(true, std::memory_order_relaxed);
                    else
                      check(at, dp[off + c]);
                  }
                }
              }
            }
          }
        });
        return !stray.load();
      };
      if (!rows_known || !bands(true)) bands(false);
    } else if (cl) {
      // Split over (sample, block of channels): a block's gradients are written by one thread.
      // Whole samples when there are enough of them, else blocks of 64 channels.
      const int64_t kBlock = N >= at::get_num_threads() ? C : 64;
      const int64_t blocks = (C + kBlock - 1) / kBlock;
      // (work per item: zeroing its part of the gradient, then its scatter)
      at::parallel_for(0, N * blocks, grain_for((in_plane + out_plane) * kBlock), [&](int64_t t0, int64_t t1) {
        const int64_t* const ip = idx;  // local copies, as in the NCHW scatter below
        const scalar_t* const dp = d;
        const int64_t Q = out_plane;
        const auto in_plane_at = inside;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = t / blocks, c0 = (t % blocks) * kBlock, c1 = std::min(C, c0 + kBlock);
          scalar_t* g = gin + n * in_plane * C;
          if (c1 - c0 == C) {
            std::fill(g, g + in_plane * C, scalar_t(0));
          } else {
            for (int64_t hw = 0; hw < in_plane; ++hw) std::fill(g + hw * C + c0, g + hw * C + c1, scalar_t(0));
          }
          for (int64_t ij = 0; ij < Q; ++ij) {
            const int64_t off = (n * Q + ij) * C;
            for (int64_t c = c0; c < c1; ++c) {
              const int64_t at = ip[off + c];
              if (in_plane_at(at))
                g[at * C + c] = static_cast<scalar_t>(static_cast<acc_t>(g[at * C + c]) + static_cast<acc_t>(dp[off + c]));
              else
                check(at, dp[off + c]);
            }
          }
        }
      });
    } else {
      if (window && max_pool2d_backward_nchw_rows_2x2(d, idx, gin, *window)) return;
      // Split over planes (n, c): a plane's gradient is written by one thread. Over large inputs
      // the next plane's indices and δ are prefetched, and its gradient (to be written), a slice
      // per step of kStep outputs.
      constexpr int64_t kStep = 64;
      const int64_t steps = (out_plane + kStep - 1) / kStep;
      const int64_t plane_bytes = in_plane * int64_t(sizeof(scalar_t)), out_bytes = out_plane * int64_t(sizeof(scalar_t));
      const int64_t index_bytes = out_plane * int64_t(sizeof(int64_t));
      const bool ahead = prefetch_pays(plane_bytes, N * C * (plane_bytes + out_bytes + index_bytes));
      at::parallel_for(0, N * C, grain_for(in_plane + out_plane), [&](int64_t p0, int64_t p1) {
        // Local copies of what the loop reads: read through the lambdas' captures, the pointers and
        // sizes were loaded again for every add, since the loop calls check (LeNet's 6 × 28² at
        // batch 64: 1.2-1.5x native's time).
        const int64_t* const ip = idx;
        const scalar_t* const dp = d;
        const int64_t Q = out_plane;
        const auto in_plane_at = inside;
        for (int64_t p = p0; p < p1; ++p) {
          scalar_t* const g = gin + p * in_plane;
          const int64_t* const pi = ip + p * Q;
          const scalar_t* const pd = dp + p * Q;
          std::fill(g, g + in_plane, scalar_t(0));
          PrefetchAhead next_idx, next_d, next_g;
          if (ahead && p + 1 < p1) {
            next_idx = PrefetchAhead(pi + Q, index_bytes, steps);
            next_d = PrefetchAhead(pd + Q, out_bytes, steps);
            next_g = PrefetchAhead(g + in_plane, plane_bytes, steps);
          }
          for (int64_t k = 0; k < steps; ++k) {
            next_idx.step(k);
            next_d.step(k);
            next_g.step<true>(k);
            const int64_t end = std::min(Q, (k + 1) * kStep);
            for (int64_t ij = k * kStep; ij < end; ++ij) {
              const int64_t at = pi[ij];
              if (in_plane_at(at))
                g[at] = static_cast<scalar_t>(static_cast<acc_t>(g[at]) + static_cast<acc_t>(pd[ij]));
              else
                check(at, pd[ij]);
            }
          }
        }
      });
    }
  });
  return grad_input;
}

}  // namespace cnnbp
