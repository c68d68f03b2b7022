// conv2d: forward and backward side by side.
//
// Notation (the seed's): o is the layer input, w the kernel, b the bias, x the output
// (pre-activation) and δ = ∂E/∂x the gradient arriving from the layer above.
//
//   forward      x[n,k,i,j] = b[k] + Σ_c Σ_m Σ_q w[k,c,m,q] · o[n, c, i·sh + m·dh − pt, j·sw + q·dw − pl]
//   grad_weight  ∂E/∂w[k,c,m,q] = Σ_n Σ_i Σ_j δ[n,k,i,j] · o[n, c, i·sh + m·dh − pt, j·sw + q·dw − pl]
//   grad_input   ∂E/∂o[n,c,h,v] = Σ_k Σ_{(i,m): i·sh + m·dh − pt = h} Σ_{(j,q): …= v} δ[n,k,i,j] · w[k,c,m,q]
//   grad_bias    ∂E/∂b[k]       = Σ_n Σ_i Σ_j δ[n,k,i,j]
//
// (c runs over the input channels of k's group; o is zero outside the image.)
//
// All three are done as matrix products over an unrolled input. For one sample and one group,
// im2col lays out the receptive fields as a matrix `col` with one row per (c, m, q) and one column
// per output position (i, j): col[(c,m,q), (i,j)] = o[c, i·sh + m·dh − pt, j·sw + q·dw − pl]. Then
//
//   x     = W · col            (W is w viewed as [K_g, C_g·KH·KW])
//   ∂E/∂W = δ · colᵀ           (summed over the batch)
//   ∂col  = Wᵀ · δ,  then col2im adds every entry of ∂col back onto the input pixel it was read from:
//          this scatter is the "full convolution with the 180°-rotated kernel" of the stride-1 case,
//          and its generalisation to stride, padding and dilation.
//
// col is never built whole: a buffer of at most a few hundred KiB per thread holds the rows of a
// block of input channels for one slab of output positions (see "the batch loop").

#include "cnnbp.h"
#include "gemm.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <c10/util/irange.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace cnnbp {
namespace {

struct ConvShape {
  int64_t N, C, H, W;  // input
  int64_t K, KH, KW;   // weight [K, C / groups, KH, KW]
  int64_t OH, OW;      // output
  int64_t sh, sw, pt, pb, pl, pr, dh, dw, groups;

  int64_t Cg() const { return C / groups; }
  int64_t Kg() const { return K / groups; }
  int64_t col_rows() const { return Cg() * KH * KW; }
  int64_t in_plane() const { return H * W; }
  int64_t out_plane() const { return OH * OW; }
  // A 1x1 kernel with unit stride and no padding reads the input as it is: col is the input.
  bool col_is_input() const {
    return KH == 1 && KW == 1 && sh == 1 && sw == 1 && pt == 0 && pb == 0 && pl == 0 && pr == 0;
  }
};

// Every argument check of the op, in the order PyTorch makes them; the messages follow PyTorch's.
ConvShape check_conv2d(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_floating_cpu(input, "conv2d", "input");
  check_floating_cpu(weight, "conv2d", "weight");
  TORCH_CHECK(input.dim() == 4, "conv2d: expected a 4-D input (N, C, H, W), but got input of size: ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 4,
              "conv2d: expected a 4-D weight (out_channels, in_channels / groups, kH, kW), but got "
              "weight of size: ",
              weight.sizes());
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "conv2d: input type (",
              input.scalar_type(), ") and weight type (", weight.scalar_type(),
              ") should be the same");
  TORCH_CHECK(stride.size() == 2, "conv2d: expected stride to have 2 values, but got ", stride);
  TORCH_CHECK(padding.size() == 4,
              "conv2d: expected padding to have 4 values (top, bottom, left, right), but got ",
              padding);
  TORCH_CHECK(dilation.size() == 2, "conv2d: expected dilation to have 2 values, but got ",
              dilation);
  TORCH_CHECK(groups > 0, "non-positive groups is not supported (conv2d got groups=", groups, ")");
  for (auto s : stride) TORCH_CHECK(s > 0, "non-positive stride is not supported (conv2d got stride=", stride, ")");
  for (auto p : padding) TORCH_CHECK(p >= 0, "negative padding is not supported (conv2d got padding=", padding, ")");
  for (auto d : dilation) TORCH_CHECK(d > 0, "non-positive dilation is not supported (conv2d got dilation=", dilation, ")");

  ConvShape s;
  s.N = input.size(0), s.C = input.size(1), s.H = input.size(2), s.W = input.size(3);
  s.K = weight.size(0), s.KH = weight.size(2), s.KW = weight.size(3);
  s.sh = stride[0], s.sw = stride[1];
  s.pt = padding[0], s.pb = padding[1], s.pl = padding[2], s.pr = padding[3];
  s.dh = dilation[0], s.dw = dilation[1];
  s.groups = groups;

  TORCH_CHECK(s.KH > 0 && s.KW > 0, "conv2d: weight should have at least one element in each kernel dimension, but got weight of size ",
              weight.sizes());
  TORCH_CHECK(s.K >= groups, "Given groups=", groups, ", expected weight to be at least ", groups,
              " at dimension 0, but got weight of size ", weight.sizes(), " instead");
  TORCH_CHECK(s.K % groups == 0, "Given groups=", groups, ", expected weight to be divisible by ",
              groups, " at dimension 0, but got weight of size ", weight.sizes(), " instead");
  TORCH_CHECK(s.C == weight.size(1) * groups, "Given groups=", groups, ", weight of size ",
              weight.sizes(), ", expected input", input.sizes(), " to have ", weight.size(1) * groups,
              " channels, but got ", s.C, " channels instead");
  TORCH_CHECK(input.numel() > 0 || s.N == 0 || s.C == 0,
              "Only zero batch or zero channel inputs are supported, but got input shape: ",
              input.sizes());
  const int64_t eff_kh = s.dh * (s.KH - 1) + 1, eff_kw = s.dw * (s.KW - 1) + 1;
  const int64_t padded_h = s.H + s.pt + s.pb, padded_w = s.W + s.pl + s.pr;
  TORCH_CHECK(padded_h >= eff_kh && padded_w >= eff_kw,
              "Calculated padded input size per channel: (", padded_h, " x ", padded_w,
              "). Kernel size: (", eff_kh, " x ", eff_kw,
              "). Kernel size can't be greater than actual input size");
  if (bias.has_value() && bias->defined()) {
    check_floating_cpu(*bias, "conv2d", "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.K, "Given weight of size ", weight.sizes(),
                ", expected bias to be 1-dimensional with ", s.K,
                " elements, but got bias of size ", bias->sizes(), " instead");
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "conv2d: bias type (",
                bias->scalar_type(), ") should be the same as input type (", input.scalar_type(), ")");
  }
  s.OH = (padded_h - eff_kh) / s.sh + 1;
  s.OW = (padded_w - eff_kw) / s.sw + 1;
  return s;
}

// ---- im2col / col2im: the unrolling and its adjoint ----------------------------------------------

// Stride 1 with output rows as wide as the input's ("same" width): then position p = i·OW + j of a
// row (c, m, q) reads the plane at p + (m·dh − pt)·W + q·dw − pl, so the rows' runs join into one
// contiguous run, apart from the columns that fall in the padding.
inline bool rows_are_contiguous(const ConvShape& s) {
  return s.sh == 1 && s.sw == 1 && s.OW == s.W;
}

// For such a row whose valid output rows are ri and valid columns rj, over positions [p0, p1):
// [v0, v1) the positions in valid rows (rows first … last), and [b0, b1) the run from the first
// valid column of the first of them to the last valid column of the last (empty when rj is).
// Every position of the run reads (or, in col2im, writes) inside the plane.
struct ContiguousRun {
  int64_t v0, v1, first, last, b0, b1;
};
inline ContiguousRun contiguous_run(Range ri, Range rj, int64_t OW, int64_t p0, int64_t p1) {
  ContiguousRun r;
  r.v0 = std::min(p1, std::max(p0, ri.lo * OW));
  r.v1 = std::max(r.v0, std::min(p1, ri.hi * OW));
  r.first = r.v0 / OW;
  r.last = r.v1 > r.v0 ? (r.v1 - 1) / OW : r.first;
  r.b0 = r.b1 = r.v0;
  if (r.v1 > r.v0 && rj.lo < rj.hi) {
    r.b0 = std::max(r.v0, r.first * OW + rj.lo);
    r.b1 = std::max(r.b0, std::min(r.v1, r.last * OW + rj.hi));
  }
  return r;
}

// col[(c,m,q), p] = o[c, i·sh + m·dh − pt, j·sw + q·dw − pl] for output positions p = i·OW + j in
// [p0, p1), zero where that falls in padding, for the rows r = (c,m,q) in [r0, r1). `in` holds Cg
// planes of H×W; row r of `col` starts at col + (r − r0)·ld and holds positions p0 … p1 − 1.
template <typename T>
void im2col_rows(const T* in, T* col, int64_t ld, const ConvShape& s, int64_t p0, int64_t p1, int64_t r0,
                 int64_t r1) {
  const int64_t KHW = s.KH * s.KW, OW = s.OW;
  // The valid ranges of each kernel row m and column q, computed once (each takes divisions, and
  // small layers have many short rows: LeNet's 5x5 conv over 6 channels unrolls 150 rows of 100).
  c10::SmallVector<Range, 16> ranges_i(s.KH), ranges_j(s.KW);
  for (int64_t m = 0; m < s.KH; ++m) ranges_i[m] = valid_range(s.OH, s.H, s.sh, m * s.dh - s.pt);
  for (int64_t q = 0; q < s.KW; ++q) ranges_j[q] = valid_range(s.OW, s.W, s.sw, q * s.dw - s.pl);
  int64_t c = r0 / KHW, m = (r0 / s.KW) % s.KH, q = r0 % s.KW;  // (c, m, q) of row r, stepped below
  const bool contiguous = rows_are_contiguous(s);
  run_with_isa([&]() CNNBP_LAMBDA_INLINE {
  for (int64_t r = r0; r < r1; ++r, ++q) {
    if (q == s.KW) {
      q = 0;
      if (++m == s.KH) m = 0, ++c;
    }
    const T* plane = in + c * s.in_plane();
    T* row = col + (r - r0) * ld - p0;  // row[p] for p in [p0, p1)
    const Range ri = ranges_i[m];
    const Range rj = ranges_j[q];
    if (contiguous) {
      // row[p] = src[p] for every valid (i, j), src the plane shifted by (m·dh − pt, q·dw − pl):
      // one copy from the first valid column of the first valid row to the last valid column of
      // the last (all of it inside the plane), then zeros over the columns and rows not valid
      // (the copy read the neighbouring row's values there).
      const T* src = plane + (m * s.dh - s.pt) * s.W + (q * s.dw - s.pl);
      const ContiguousRun run = contiguous_run(ri, rj, OW, p0, p1);
      zero_values(row + p0, run.v0 - p0);
      zero_values(row + run.v1, p1 - run.v1);
      if (run.v0 == run.v1) continue;
      copy_values(row + run.b0, src + run.b0, run.b1 - run.b0);
      // The columns in the padding: the end of each valid row from rj.hi and the start of the next
      // up to rj.lo are one run; then the first row's start and the last row's end.
      const int64_t lo = rj.lo, hi = rj.hi, between = OW - hi + lo;
      if (between > 0)
        for (int64_t i = run.first; i < run.last; ++i) {
          const int64_t a = std::max(run.v0, i * OW + hi), e = std::min(run.v1, (i + 1) * OW + lo);
          if (a < e) zero_values(row + a, e - a);
        }
      const int64_t a = std::max(run.v0, run.first * OW), e = std::min(run.v1, run.first * OW + lo);
      if (a < e) zero_values(row + a, e - a);
      const int64_t a2 = std::max(run.v0, run.last * OW + hi), e2 = std::min(run.v1, (run.last + 1) * OW);
      if (a2 < e2) zero_values(row + a2, e2 - a2);
      continue;
    }
    for (int64_t i = p0 / OW; i * OW < p1; ++i) {
      const int64_t a = std::max(p0 - i * OW, int64_t(0)), b = std::min(p1 - i * OW, OW);  // j in [a, b)
      T* dst = row + i * OW;
      if (i < ri.lo || i >= ri.hi) {
        zero_values(dst + a, b - a);
        continue;
      }
      const T* src = plane + (i * s.sh + m * s.dh - s.pt) * s.W + (q * s.dw - s.pl);
      const int64_t lo = std::min(std::max(a, rj.lo), b), hi = std::max(std::min(b, rj.hi), lo);
      // inline pieces rather than std::fill / std::copy (or plain loops, which GCC turns into the
      // same memset / memmove calls): output rows are often short (LeNet: 10), where a library
      // call costs more than the copy
      zero_values(dst + a, lo - a);
      if (s.sw == 1) {
        copy_values(dst + lo, src + lo, hi - lo);
      } else {
        for (int64_t j = lo; j < hi; ++j) dst[j] = src[j * s.sw];
      }
      zero_values(dst + hi, b - hi);
    }
  }
  });
}

// Rows [r0, r1), split over threads when called outside a parallel region (each writes its own
// rows); row r0 at `col`.
template <typename T>
void im2col(const T* in, T* col, int64_t ld, const ConvShape& s, int64_t p0, int64_t p1, int64_t r0, int64_t r1) {
  at::parallel_for(r0, r1, grain_for(p1 - p0), [&](int64_t a, int64_t b) {
    im2col_rows(in, col + (a - r0) * ld, ld, s, p0, p1, a, b);
  });
}

// Unrolling in "frames", for stride 1 (any dilation) over small images, where the rows above are
// many short copies (LeNet's 5x5 conv over 6 channels: 150 rows of ten 10-wide pieces per sample).
// The sample's planes are first copied into zero-padded planes of Hp × Wp (plus one spare zero
// row); frame position p' = i·Wp + j, j in [0, Wp), then reads padded[c, p' + m·dh·Wp + q·dw], so
// each row (c, m, q) of the unrolled matrix is ONE contiguous copy of OH·Wp values. Columns with
// j ≥ OW are not outputs: the product computes them and they are dropped. Worth it when the
// dropped columns cost the product less than the short copies cost the unrolling (see
// use_frames).
struct Frame {
  int64_t Hp, Wp, P;  // padded plane (Hp + 1 rows are stored), frame positions OH·Wp
  int64_t plane() const { return (Hp + 1) * Wp; }
};
Frame frame_of(const ConvShape& s) {
  const int64_t Hp = s.H + s.pt + s.pb, Wp = s.W + s.pl + s.pr;
  return {Hp, Wp, s.OH * Wp};
}
// Where row r = (c, m, q) of a frame matrix (c counted from the first padded plane) reads frame
// position 0: padded[c, m·dh·Wp + q·dw]; position p' is that plus p'.
int64_t frame_row_offset(const ConvShape& s, const Frame& f, int64_t r) {
  const int64_t c = r / (s.KH * s.KW), m = (r / s.KW) % s.KH, q = r % s.KW;
  return c * f.plane() + m * s.dh * f.Wp + q * s.dw;
}
bool use_frames(const ConvShape& s) {
  return s.sh == 1 && s.sw == 1 && s.Kg() * (frame_of(s).Wp - s.OW) < 256;
}

// The rows of input channels [c0, c1) of one sample's (group's) frame matrix into col (the rows of
// c0 first, row r at col + r·ld); `padded` is scratch of (c1 − c0)·(Hp + 1)·Wp values.
template <typename T>
void im2col_frame(const T* in, T* col, int64_t ld, const ConvShape& s, T* padded, int64_t c0, int64_t c1) {
  const Frame f = frame_of(s);
  const int64_t plane = f.plane();
  run_with_isa([&]() CNNBP_LAMBDA_INLINE {
    for (int64_t c = c0; c < c1; ++c) {
      T* pc = padded + (c - c0) * plane;
      for (int64_t t = 0; t < s.pt * f.Wp; ++t) pc[t] = T(0);
      for (int64_t h = 0; h < s.H; ++h) {
        T* dst = pc + (s.pt + h) * f.Wp;
        const T* src = in + (c * s.H + h) * s.W;
        for (int64_t v = 0; v < s.pl; ++v) dst[v] = T(0);
        for (int64_t v = 0; v < s.W; ++v) dst[s.pl + v] = src[v];
        for (int64_t v = s.pl + s.W; v < f.Wp; ++v) dst[v] = T(0);
      }
      for (int64_t t = (s.pt + s.H) * f.Wp; t < plane; ++t) pc[t] = T(0);
    }
    for (int64_t r = 0; r < (c1 - c0) * s.KH * s.KW; ++r) {
      const T* src = padded + frame_row_offset(s, f, r);  // row r's channel counted from c0
      T* dst = col + r * ld;
      for (int64_t p = 0; p < f.P; ++p) dst[p] = src[p];
    }
  });
}

// The adjoint of im2col_frame, for channels [c0, c1) of one sample: each row (c, m, q) of the frame
// matrix ∂col (OH·Wp values, row r at col + r·ld, the rows of c0 first) is ONE contiguous add into
// a zero-padded plane, at the offset the row was read from; then the planes' insides are the
// gradient (grad_in holds the sample's Cg planes of H×W; planes c0 … c1 − 1 are written).
// `padded` is scratch of (c1 − c0)·(Hp + 1)·Wp values. The columns j ≥ OW of ∂col must hold zeros
// (they do when δ is zero there and the weight is finite): they land in the padding or on pixels
// that other columns reach too, and add nothing.
template <typename T>
void col2im_frame(const T* col, int64_t ld, T* grad_in, const ConvShape& s, T* padded, int64_t c0, int64_t c1) {
  const Frame f = frame_of(s);
  const int64_t plane = f.plane(), KHW = s.KH * s.KW;
  run_with_isa([&]() CNNBP_LAMBDA_INLINE {
    for (int64_t t = 0; t < (c1 - c0) * plane; ++t) padded[t] = T(0);
    for (int64_t r = 0; r < (c1 - c0) * KHW; ++r) {
      T* dst = padded + frame_row_offset(s, f, r);  // row r's channel counted from c0
      const T* src = col + r * ld;
      for (int64_t p = 0; p < f.P; ++p) dst[p] += src[p];
    }
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t h = 0; h < s.H; ++h) {
        const T* src = padded + (c - c0) * plane + (s.pt + h) * f.Wp + s.pl;
        T* dst = grad_in + (c * s.H + h) * s.W;
        for (int64_t v = 0; v < s.W; ++v) dst[v] = src[v];
      }
  });
}

// Whether all n values are finite (the frames of the backward multiply the dropped columns by 0).
template <typename T>
bool all_finite(const T* x, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::abs(x[i]) <= std::numeric_limits<T>::max();
  return ok;
}
// The same for the group's input channels of samples [0, b) from in_ng (b·Cg planes, C planes apart).
template <typename T>
bool all_finite(const T* in_ng, int64_t b, const ConvShape& s) {
  bool ok = true;
  for (int64_t j = 0; j < b; ++j) ok &= all_finite(in_ng + j * s.C * s.in_plane(), s.Cg() * s.in_plane());
  return ok;
}

// The adjoint of im2col: ∂o[c, h, v] += ∂col[(c,m,q), p] for every (m,q) and position p in [p0, p1)
// that read o[c,h,v], for the input channels c in [c0, c1) (whose rows start at `col`). A channel's
// rows write only into that channel's plane. `grad_in` must be zeroed by the caller. Where the
// rows are contiguous (rows_are_contiguous), ∂col's values at the columns that fall in the padding
// are set to zero (col is scratch), so that each row is one run of adds: those columns then add
// +0 to a neighbouring row's pixel, which changes no value (a sum that starts at +0 is never −0).
template <typename T>
void col2im_channels(T* col, int64_t ld, T* grad_in, const ConvShape& s, int64_t p0, int64_t p1, int64_t c0,
                     int64_t c1) {
  const int64_t OW = s.OW;
  c10::SmallVector<Range, 16> ranges_i(s.KH), ranges_j(s.KW);  // computed once, as in im2col_rows
  for (int64_t m = 0; m < s.KH; ++m) ranges_i[m] = valid_range(s.OH, s.H, s.sh, m * s.dh - s.pt);
  for (int64_t q = 0; q < s.KW; ++q) ranges_j[q] = valid_range(s.OW, s.W, s.sw, q * s.dw - s.pl);
  const bool contiguous = rows_are_contiguous(s);
  run_with_isa([&]() CNNBP_LAMBDA_INLINE {
  for (int64_t c = c0; c < c1; ++c) {
    T* plane = grad_in + c * s.in_plane();
    for (int64_t m = 0; m < s.KH; ++m) {
      const Range ri = ranges_i[m];
      for (int64_t q = 0; q < s.KW; ++q) {
        const Range rj = ranges_j[q];
        T* row = col + (((c - c0) * s.KH + m) * s.KW + q) * ld - p0;
        if (contiguous) {  // as in im2col_rows: from the first valid (i, j) to the last
          const ContiguousRun run = contiguous_run(ri, rj, OW, p0, p1);
          for (int64_t i = run.first; i < run.last; ++i)  // the padding's columns between row i and i + 1
            for (int64_t p = std::max(run.b0, i * OW + rj.hi), e = std::min(run.b1, (i + 1) * OW + rj.lo); p < e;
                 ++p)
              row[p] = T(0);
          T* dst = plane + (m * s.dh - s.pt) * s.W + (q * s.dw - s.pl);
          for (int64_t p = run.b0; p < run.b1; ++p) dst[p] += row[p];
          continue;
        }
        for (int64_t i = std::max(p0 / OW, ri.lo); i < ri.hi && i * OW < p1; ++i) {
          const int64_t lo = std::max({p0 - i * OW, int64_t(0), rj.lo}), hi = std::min({p1 - i * OW, OW, rj.hi});
          T* dst = plane + (i * s.sh + m * s.dh - s.pt) * s.W + (q * s.dw - s.pl);
          const T* src = row + i * OW;
          if (s.sw == 1) {
            for (int64_t j = lo; j < hi; ++j) dst[j] += src[j];
          } else {
            for (int64_t j = lo; j < hi; ++j) dst[j * s.sw] += src[j];
          }
        }
      }
    }
  }
  });
}

// Channels [c0, c1) (whose rows start at `col`), split over threads when called outside a
// parallel region: no two threads touch the same element.
template <typename T>
void col2im(T* col, int64_t ld, T* grad_in, const ConvShape& s, int64_t p0, int64_t p1, int64_t c0, int64_t c1) {
  const int64_t KHW = s.KH * s.KW;
  at::parallel_for(c0, c1, grain_for(KHW * (p1 - p0)), [&](int64_t a, int64_t b) {
    col2im_channels(col + (a - c0) * KHW * ld, ld, grad_in, s, p0, p1, a, b);
  });
}

// ---- the batch loop ---------------------------------------------------------------------------

// How a call is cut into products. The unrolled input of one sample can be large (128 channels at
// 28×28: 1152 rows × 784 columns), so it is never built whole; a column buffer holds the rows of
// `cblock` input channels (cblock·KH·KW rows) for one slab of output positions:
//   * a slab is `block` samples side by side (small images: each product then has at least ~512
//     columns), or, one sample at a time, a tile of `tile` of its output positions;
//   * the rows come in channel blocks, because every product splits along them:
//       x = Σ_blocks W[:, rows] · col[rows, :]           (accumulated block after block)
//       ∂E/∂W[:, rows] = δ · col[rows, :]ᵀ,   ∂col[rows, :] = W[:, rows]ᵀ · δ
//     and the col2im of a block's ∂col rows writes only that block's channels.
// Cutting rows rather than positions keeps the products wide: ∂E/∂W's inner dimension is the
// positions, and a product over a few dozen of them runs far below the BLAS's peak. The buffer
// stays within column_budget() elements per thread, small next to the layer's own tensors, so peak
// memory is close to that of a convolution without any unrolling.
//
// Threads, decided per call:
//   chunks > 1  the batch is cut into one chunk of samples per thread. Each thread owns its
//               buffers and, in the backward, its own partial ∂E/∂W; the partials are added in
//               chunk order. Chunk t covers the same samples for a given thread count, so the
//               result is deterministic. Used when there are at least as many samples as threads,
//               and in the backward only when a partial ∂E/∂W per thread is small next to the data.
//   chunks == 1 slab after slab, shared among the threads: the forward gives each thread a share
//               of a sample's positions (columns of x = W · col are independent), the backward a
//               share of the channel blocks (rows of ∂E/∂W and of ∂col, and the planes their col2im
//               writes). Small calls run on one thread, with only the products multi-threaded.
// The backward of a 1×1 layer (stride 1, no padding) over one sample at a time has no column buffer:
// its two products are made whole, by the GEMM's own threads where the batch is not chunked.
struct Plan {
  int64_t chunks, block, tile, cblock;
  bool shared;  // chunks == 1 and the slabs are shared among threads
};

// A column buffer holds at most this many elements per thread: 2^16 (256 KiB in float32), more
// for layers with much data (up to 2^18 where an eighth of the inputs and outputs, `data`
// elements, is that large), so that the buffers stay small next to the tensors the call has anyway.
int64_t column_budget(int64_t data) {
  return std::clamp<int64_t>(data / 8, int64_t(1) << 16, int64_t(1) << 18);
}

int64_t blocks_of(int64_t channels, int64_t per_block) {
  return (channels + per_block - 1) / per_block;
}

// Thread t's share of P positions split over `threads`: whole 32-column panels, as equal as they go.
Range thread_share(int64_t P, int64_t threads, int64_t t) {
  const int64_t panels = (P + 31) / 32;
  return {std::min(P, t * panels / threads * 32), std::min(P, (t + 1) * panels / threads * 32)};
}
// The tile length that cuts `len` columns into tiles of whole 32-column panels of about equal size,
// none longer than `most` (a multiple of 32, or len itself).
int64_t even_tiles(int64_t len, int64_t most) {
  const int64_t tiles = (len + most - 1) / most;
  return std::min(len, ((len + tiles - 1) / tiles + 31) / 32 * 32);
}

Plan plan_batches(const ConvShape& s, bool backward) {
  const int64_t threads = at::get_num_threads();
  const int64_t P = std::max<int64_t>(1, s.out_plane()), KHW = s.KH * s.KW;
  const int64_t Cg = std::max<int64_t>(1, s.Cg()), rows = Cg * KHW;
  const int64_t work = s.N * s.K * P * rows;                     // multiply-adds
  const int64_t data = s.N * (s.C * s.in_plane() + s.K * P);   // input and output elements
  const int64_t budget = column_budget(data);
  bool chunk = threads > 1 && s.N >= threads && work >= (int64_t(1) << 20);
  // A partial ∂E/∂W per thread beyond the first is as large as the weight. Where that is more than
  // an eighth of the data (256→256 3×3 at 14×14 and batch 8: 590K weights, 803K inputs and outputs),
  // the threads share channel blocks instead.
  if (backward && chunk && s.Cg() >= threads &&
      (threads - 1) * s.K * rows * 8 > data)
    chunk = false;
  Plan p;
  p.chunks = chunk ? threads : 1;
  // Samples per block: enough for ~512 columns, fewer where all rows then fit the budget with at
  // least 256 columns (one channel block, no partial products to add up).
  const int64_t width = use_frames(s) ? frame_of(s).P : P;
  auto block_of = [&](int64_t most) {
    const int64_t wide = std::clamp<int64_t>((512 + P - 1) / P, 1, std::max<int64_t>(1, most));
    const int64_t fit = budget / (rows * width);
    return fit * P >= 256 ? std::min(wide, fit) : wide;
  };
  p.block = block_of((s.N + p.chunks - 1) / p.chunks);
  // One sample at a time: tiles of whole 32-column panels, such that at least min(rows, 256) rows
  // fit the budget with them, and of about equal size (no short last tile).
  p.tile = std::min(P, std::max<int64_t>(256, budget / std::min<int64_t>(rows, 256) / 32 * 32));
  p.tile = even_tiles(P, p.tile);
  // The channel block follows from the slab that the call would use on one thread, so that it does
  // not change with the thread count: x sums its channel blocks in order, and the same blocks give
  // the same bits at any thread count.
  const int64_t block1 = block_of(s.N);
  const int64_t slab = block1 > 1 ? block1 * width : p.tile;
  const int64_t fit = std::clamp<int64_t>(budget / (KHW * slab), 1, Cg);
  p.cblock = (Cg + blocks_of(Cg, fit) - 1) / blocks_of(Cg, fit);  // blocks of even size
  // A 1×1 layer (stride 1, no padding) reads its input in place, no buffer to bound: each forward
  // product takes all of a sample's positions, or one thread's share of them.
  if (s.col_is_input()) p.tile = P;
  // Shared slabs, where there are threads to share them and enough work for each: the forward
  // shares the positions of one sample (at least 256 per thread), the backward the channel blocks
  // (at least one channel per thread). The backward's results do not depend on its channel block,
  // so there it is cut to a multiple of the thread count of blocks, which keeps the threads evenly
  // loaded.
  const int64_t slab_work = s.Kg() * rows * p.block * P;
  p.shared = p.chunks == 1 && threads > 1 && !at::in_parallel_region() && slab_work >= (int64_t(1) << 20) &&
             (backward ? s.Cg() >= threads : p.block == 1 && P >= 256 * threads);
  if (backward && p.shared) {
    const int64_t nblk = std::min(Cg, (blocks_of(Cg, p.cblock) + threads - 1) / threads * threads);
    p.cblock = (Cg + nblk - 1) / nblk;
  }
  return p;
}

// Whether a call packs the weight once for all its products (PackedA) rather than the own GEMM
// packing it for each: where more than one slab multiplies each channel block of it, and the packed
// copy is at most half the size of the call's inputs and outputs (packed always, it put the peak
// memory of 256→256 3×3 at 14×14, batch 8, at 1.29× native's).
bool pack_weight_once(const ConvShape& s, const Plan& p) {
  const int64_t slabs = p.block > 1 ? blocks_of(s.N, p.block) : s.N * blocks_of(s.out_plane(), p.tile);
  const int64_t data = s.N * (s.C * s.in_plane() + s.K * s.out_plane());
  return slabs > 1 && s.K * s.col_rows() * 2 <= data;
}

template <typename Fn>
void for_each_chunk(int64_t N, int64_t chunks, const Fn& fn) {
  if (chunks == 1) {
    fn(0, 0, N);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(t, t * N / chunks, (t + 1) * N / chunks);
  });
}

// δ of samples [n, n + b), group g, as one Kg × b·P matrix: δ itself for one sample, else packed.
template <typename T>
const T* gather_delta(const T* grad_output, const ConvShape& s, int64_t n, int64_t b, int64_t g, T* pack,
                      int64_t& ld) {
  const int64_t P = s.out_plane();
  const T* d = grad_output + (n * s.K + g * s.Kg()) * P;
  if (b == 1) {
    ld = P;
    return d;
  }
  ld = b * P;
  for (int64_t k = 0; k < s.Kg(); ++k)
    for (int64_t j = 0; j < b; ++j) std::copy(d + (j * s.K + k) * P, d + (j * s.K + k + 1) * P, pack + k * ld + j * P);
  return pack;
}

// δ of samples [n, n + b), group g, in frames: Kg × b·OH·Wp, output row i of sample j at column
// j·OH·Wp + i·Wp, zeros in the columns j ≥ OW of each row.
template <typename T>
const T* gather_delta_frames(const T* grad_output, const ConvShape& s, int64_t n, int64_t b, int64_t g, T* pack,
                             int64_t& ld) {
  const Frame f = frame_of(s);
  const int64_t P = s.out_plane();
  ld = b * f.P;
  for (int64_t k = 0; k < s.Kg(); ++k)
    for (int64_t j = 0; j < b; ++j) {
      const T* src = grad_output + ((n + j) * s.K + g * s.Kg() + k) * P;
      T* dst = pack + k * ld + j * f.P;
      for (int64_t i = 0; i < s.OH; ++i) {
        copy_values(dst + i * f.Wp, src + i * s.OW, s.OW);
        std::fill(dst + i * f.Wp + s.OW, dst + (i + 1) * f.Wp, T(0));
      }
    }
  return pack;
}

// δᵀ: the Kg × ldd matrix dg (all its ldd columns) turned around into out, ldd × Kg, in tiles of
// 16 × 16 so that both sides are read and written a cache line at a time.
template <typename T>
const T* transposed_delta(const T* dg, int64_t ldd, int64_t Kg, T* out) {
  constexpr int64_t kTile = 16;
  for (int64_t p0 = 0; p0 < ldd; p0 += kTile)
    for (int64_t k0 = 0; k0 < Kg; k0 += kTile) {
      const int64_t p1 = std::min(ldd, p0 + kTile), k1 = std::min(Kg, k0 + kTile);
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t k = k0; k < k1; ++k) out[p * Kg + k] = dg[k * ldd + p];
    }
  return out;
}

// ---- depthwise: one input channel per group ---------------------------------------------------
// With C / groups = 1 each product above would be a sliver (Kg × KH·KW × P); direct loops along
// the output rows are faster. The same three equations, per plane.
//
// The forward and δ_in are row sums:
//   out[j] = init + Σ over source rows r, then taps q, of wr[q] · src_r[j·step + off_q],
// with a tap left out where it reads outside its row. (A padded zero adds w · 0 = ±0, nothing,
// unless w is inf or NaN: then the term is NaN, as native's float64 computes it. Such outputs are
// set to NaN after the row sums; ∂E/∂W does the same for a non-finite δ over the padding.)
// Columns where every tap is inside (the interior) run in vectors of 64 bytes, up to kDwVectors of
// them at once (dw_vectors), whose sums stay in registers across all the taps, so that each output
// is stored once and the vectors' sums are independent chains (one vector alone waits on its
// adds: 4 cycles each). The last vector of a row overlaps the one before it rather than running
// short (it recomputes those columns to the same values). The few edge columns keep their sums in
// registers; interiors narrower than a vector add tap by tap along the whole row. Each output's
// terms are added in an order fixed by the shape alone.

// Vectors per block: four (eight chains of 256-bit adds, four of 512-bit), two with 128-bit
// registers (whose 16 would not hold four vectors' sums).
template <int PB>
constexpr int kDwVectors = PB >= 32 ? 4 : 2;

struct DwRow {
  int64_t len;      // outputs in the row
  int64_t step;     // source columns per output (the stride; 1 for δ_in)
  int64_t taps;     // taps per source row
  const int64_t* off;  // off[q]: source column of output 0, tap q (may be outside the row)
  const Range* valid;  // valid[q]: the outputs whose tap q is inside the source row
  Range interior;      // the outputs whose taps are all inside
  const int64_t* wq;   // wq[q]: tap q's column in a weight row
  // Rows with edge columns (see dw_row) may read zero-padded copies of the source rows
  // (pad_rows): `lead` zeros, the row, zeros up to `width` values, so that every output, and two
  // 64-byte vectors of outputs from column 0 of a shorter row, read inside the copy.
  int64_t lead, width;
  bool has_edges() const { return interior.lo > 0 || interior.hi < len; }  // outputs some tap misses
};

template <typename T>
CNNBP_ALWAYS_INLINE void dw_row_tap_by_tap(T* out, T init, const T* const* src, const T* const* wr, int64_t nrows,
                                           const DwRow& r) {
  for (int64_t j = 0; j < r.len; ++j) out[j] = init;
  for (int64_t t = 0; t < nrows; ++t) {
    for (int64_t q = 0; q < r.taps; ++q) {
      const T wv = wr[t][r.wq[q]];
      const T* sq = src[t] + r.off[q];
      const int64_t lo = r.valid[q].lo, hi = r.valid[q].hi;
      if (r.step == 1) {
        for (int64_t j = lo; j < hi; ++j) out[j] += wv * sq[j];
      } else {
        for (int64_t j = lo; j < hi; ++j) out[j] += wv * sq[j * r.step];
      }
    }
  }
}

// NV vectors of L = kLanes64<T> outputs, vector v at column j[v]: init + every tap of every source
// row, in dw_row_tap_by_tap's order. STEP: the source columns per output when 1 (unit loads), else
// 0 (r.step at run time).
template <int NV, int STEP, int PB, typename T>
CNNBP_ALWAYS_INLINE void dw_vectors_of(T* out, T init, const T* const* src, const T* const* wr, int64_t nrows,
                                       const DwRow& r, const int64_t* j) {
  const int64_t step = STEP == 1 ? 1 : r.step;
  Vec64<T, PB> a[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) a[v] = splat64<PB>(init);
  for (int64_t t = 0; t < nrows; ++t) {
    for (int64_t q = 0; q < r.taps; ++q) {
      const Vec64<T, PB> wv = splat64<PB>(wr[t][r.wq[q]]);
      const T* sq = src[t] + r.off[q];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        a[v] += wv * (STEP == 1 ? load64<PB>(sq + j[v]) : load64_step<PB>(sq + j[v] * step, step));
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) store64(out + j[v], a[v]);
}

// dw_vectors_of for nv (1 … kDwVectors<PB>) vectors.
template <int PB, typename T>
CNNBP_ALWAYS_INLINE void dw_vectors(T* out, T init, const T* const* src, const T* const* wr, int64_t nrows,
                                    const DwRow& r, const int64_t* j, int nv) {
  auto run = [&](auto nvc) CNNBP_LAMBDA_INLINE {
    constexpr int NV = decltype(nvc)::value;
    if (r.step == 1)
      dw_vectors_of<NV, 1, PB>(out, init, src, wr, nrows, r, j);
    else
      dw_vectors_of<NV, 0, PB>(out, init, src, wr, nrows, r, j);
  };
  static_assert(kDwVectors<PB> == 2 || kDwVectors<PB> == 4, "dw_vectors: 2 or 4 vectors per block");
  switch (nv) {
    case 1: run(std::integral_constant<int, 1>()); break;
    case 2: run(std::integral_constant<int, 2>()); break;
    case 3: if constexpr (kDwVectors<PB> == 4) run(std::integral_constant<int, 3>()); break;
    default: if constexpr (kDwVectors<PB> == 4) run(std::integral_constant<int, 4>()); break;
  }
}

// Whether ∂E/∂W's planes are narrow: no 64-byte block of columns fits the interior, but a row fits
// one or two.
template <typename T>
bool narrow_rows(const DwRow& r) {
  return r.interior.hi - r.interior.lo < kLanes64<T> && r.len <= 2 * kLanes64<T>;
}

// Whether dw_row should read rows r from zero-padded copies: where no vector fits the interior, or
// the edge columns' terms (summed one column at a time) are as many as the row's vectors. (Measured
// on one core, 3×3 depthwise forward, float32: 56-wide rows, 4 edge terms against 4 vectors, 15%
// faster padded; 112-wide, 4 against 7, 3-10% slower; stride 2 at 112 wide, 2 against 4, 35%
// slower; δ_in of a 5×5 layer with 28-wide outputs, float64, 20 edge terms against 4, 2.3x faster.
// Measured again later, with the rows copied inline, the copies paid at stride 1 at 112 wide too,
// and in δ_in at every width tried: the forward at stride 1 and δ_in now pad wherever a row has
// edge columns, and this rule is the forward's at other strides.)
template <typename T>
bool padding_pays(const DwRow& r) {
  constexpr int64_t L = kLanes64<T>;
  const int64_t inside = r.interior.hi - r.interior.lo;
  if (r.len < L || inside < L) return true;
  int64_t edge_terms = 0;
  for (int64_t q = 0; q < r.taps; ++q) edge_terms += r.valid[q].hi - r.valid[q].lo - inside;
  return edge_terms >= (r.len + L - 1) / L;
}

// rows × len values, `ld` apart, into copies `width` apart, each with `lead` zeros before it and
// zeros after it. The zeros are already there: `out` is a zero-initialised buffer that only
// pad_rows writes, always with the same geometry, so only the rows' values are copied.
template <typename T>
void pad_rows(const T* src, int64_t rows, int64_t len, int64_t ld, int64_t lead, int64_t width, T* out) {
  for (int64_t i = 0; i < rows; ++i) copy_values(out + i * width + lead, src + i * ld, len);
}

// `padded`: the source rows are zero-padded copies (pad_rows with r.lead, r.width). Then every
// column reads inside them, and the whole row runs in vectors (a row shorter than one: a vector of
// L into a buffer). The padding's terms w · 0 are exactly 0 for a finite weight (callers copy only
// then).
template <int PB, typename T>
CNNBP_ALWAYS_INLINE void dw_row(T* out, T init, const T* const* src, const T* const* wr, int64_t nrows,
                                const DwRow& r, bool padded) {
  constexpr int L = kLanes64<T>, NV = kDwVectors<PB>;
  if (padded && r.len < L) {
    T block[L];
    const int64_t j[NV] = {};
    dw_vectors<PB>(block, init, src, wr, nrows, r, j, 1);
    copy_values(out, block, r.len);
    return;
  }
  const int64_t lo = padded ? 0 : r.interior.lo, hi = padded ? r.len : r.interior.hi;
  if (hi - lo < L) {
    dw_row_tap_by_tap(out, init, src, wr, nrows, r);
    return;
  }
  // The edge columns (a few): their taps inside the row are an interval [q0, q1) (the column a
  // tap reads is linear in q); four running sums in registers, one per source row mod 4, added up
  // in a fixed order after init.
  auto column = [&](int64_t j) CNNBP_LAMBDA_INLINE {
    int64_t q0 = r.taps, q1 = 0;
    for (int64_t q = 0; q < r.taps; ++q) {
      if (j >= r.valid[q].lo && j < r.valid[q].hi) q0 = std::min(q0, q), q1 = q + 1;
    }
    T acc[4] = {};
    for (int64_t t = 0; t < nrows; ++t) {
      const T* row = src[t] + j * r.step;
      for (int64_t q = q0; q < q1; ++q) acc[t & 3] += wr[t][r.wq[q]] * row[r.off[q]];
    }
    out[j] = init + ((acc[0] + acc[1]) + (acc[2] + acc[3]));
  };
  for (int64_t j = 0; j < lo; ++j) column(j);
  for (int64_t j = hi; j < r.len; ++j) column(j);
  // The interior's (or, padded, the row's) vectors start at lo, lo + L, …, the last at hi − L; NV
  // of them at a time.
  const int64_t vectors = (hi - lo + L - 1) / L;
  for (int64_t v0 = 0; v0 < vectors; v0 += NV) {
    int64_t j[NV];
    const int nv = static_cast<int>(std::min<int64_t>(NV, vectors - v0));
    for (int v = 0; v < nv; ++v) j[v] = std::min(lo + (v0 + v) * L, hi - L);
    dw_vectors<PB>(out, init, src, wr, nrows, r, j, nv);
  }
}

// The column geometry of a depthwise row: tap u (weight column wq[u] = q0 + u·q_step) of output
// j reads source column j·step + first + u·tap_step.
struct DwColumns {
  std::vector<int64_t> off, wq;
  std::vector<Range> valid;
  DwRow row;
  DwColumns(int64_t len, int64_t src_len, int64_t step, int64_t taps, int64_t first, int64_t tap_step,
            int64_t q0 = 0, int64_t q_step = 1)
      : off(taps), wq(taps), valid(taps) {
    Range in{0, len};
    for (int64_t u = 0; u < taps; ++u) {
      off[u] = first + u * tap_step;
      wq[u] = q0 + u * q_step;
      valid[u] = valid_range(len, src_len, step, off[u]);
      in.lo = std::max(in.lo, valid[u].lo);
      in.hi = std::min(in.hi, valid[u].hi);
    }
    in.hi = std::max(in.lo, in.hi);
    constexpr int64_t kNarrowLanes = 2 * kLanes64<float>;  // two blocks of the most lanes (float)
    int64_t lo = 0, reach = src_len;
    for (int64_t u = 0; u < taps; ++u) {
      lo = std::min(lo, off[u]);
      reach = std::max(reach, off[u] + (std::max(len, kNarrowLanes) - 1) * step + 1);
    }
    row = DwRow{len, step, taps, off.data(), valid.data(), in, wq.data(), -lo, reach - lo};
  }
};

// ---- depthwise planes narrower than a vector: frames -----------------------------------------
// Output rows shorter than one 64-byte vector (MobileNet's 7×7 planes; 14×14 ones at stride 2)
// would each be one vector whose KH·KW terms form one chain of dependent adds. Instead the plane's
// source goes into a zero-initialised frame of rows `ld` values apart (its values only, at the same
// places for every plane, so the zeros around them stay), ld being the padded columns the outputs
// read, and output (i, j) is computed at frame position p = i·ld + j: tap (m, q) reads frame element
// p·s + m·dh·ld + q·dw (row and column stride both s), linear in p. The plane then runs as one row
// of `positions` outputs in vectors, up to kDwVectors at a time (positions with j ≥ OW are computed
// too and dropped). The forward at equal strides reads the input this way; δ_in, at any stride,
// reads δ spread out by the stride with the window turned around (see depthwise_grad_input). Used
// with finite weights only (the zeros' terms w · 0 must be 0), as the padded rows.
struct DwFrame {
  int64_t ld, rows;    // the frame's row length and rows
  int64_t top, left;   // where source row 0, column 0 goes
  int64_t spread_h, spread_w;  // source rows and columns this far apart in the frame (zeros between)
  int64_t OH, OW, positions, size;  // the outputs; frame positions computed (whole vectors); values
  int64_t fit_cols, fit_rows;  // the most source columns and rows that land inside the frame
  DwColumns cols;      // the taps: column q·dw, weight column wq[q], step s (for dw_vectors)
  DwFrame(int64_t OH_, int64_t OW_, int64_t KH, int64_t KW, int64_t step, int64_t dh, int64_t dw, int64_t top_,
          int64_t left_, int64_t spread_h_, int64_t spread_w_, int64_t lanes, bool flipped)
      : ld((OW_ - 1) * step + (KW - 1) * dw + 1), rows((OH_ - 1) * step + (KH - 1) * dh + 1),
        top(top_), left(left_), spread_h(spread_h_), spread_w(spread_w_), OH(OH_), OW(OW_),
        positions(((OH_ - 1) * ld + OW_ + lanes - 1) / lanes * lanes),
        size(std::max(rows * ld, (positions - 1) * step + (KH - 1) * dh * ld + (KW - 1) * dw + 1)),
        fit_cols((ld - left + spread_w - 1) / spread_w), fit_rows((rows - top + spread_h - 1) / spread_h),
        cols(positions, size, step, KW, 0, dw, flipped ? KW - 1 : 0, flipped ? -1 : 1) {}
  // Source plane (H × W values) into the frame at `frame`: value (h, v) at frame row
  // top + h·spread_h, column left + v·spread_w (those inside the frame).
  template <typename T>
  CNNBP_ALWAYS_INLINE void fill(const T* plane, int64_t H, int64_t W, T* frame) const {
    const int64_t n = std::min(W, fit_cols), h1 = std::min(H, fit_rows);
    for (int64_t h = 0; h < h1 && n > 0; ++h) {
      T* dst = frame + (top + h * spread_h) * ld + left;
      if (spread_w == 1) {
        copy_values(dst, plane + h * W, n);
      } else {
        for (int64_t v = 0; v < n; ++v) dst[v * spread_w] = plane[h * W + v];
      }
    }
  }
  // The frame's outputs, from nrows source rows src[t] (a frame row each) with weight rows wr[t],
  // into `out` (OH × OW); `buf`: `positions` values.
  template <int PB, typename T>
  CNNBP_ALWAYS_INLINE void run(T* out, T init, const T* const* src, const T* const* wr, int64_t nrows, T* buf) const {
    constexpr int L = kLanes64<T>, NV = kDwVectors<PB>;
    const int64_t vectors = positions / L;
    for (int64_t v0 = 0; v0 < vectors; v0 += NV) {
      int64_t j[NV];
      const int nv = static_cast<int>(std::min<int64_t>(NV, vectors - v0));
      for (int v = 0; v < nv; ++v) j[v] = (v0 + v) * L;
      dw_vectors<PB>(buf, init, src, wr, nrows, cols.row, j, nv);
    }
    for (int64_t i = 0; i < OH; ++i) copy_values(out + i * OW, buf + i * ld, OW);
  }
};

// ---- depthwise planes narrower than a vector, at a stride: phase frames -----------------------
// As in DwFrame, output (i, j) is position p = i·ld + j of a frame, but the input plane, zero-padded,
// is split by stride phase into sh·sw frames of the same row length: phase (a, b) holds element
// (r·sh + a, c·sw + b) of the padded plane at r·ld + c. Tap (m, q), with m·dh = a + sh·R and
// q·dw = b + sw·Q, reads padded element (i·sh + m·dh, j·sw + q·dw) for output (i, j): element
// p + R·ld + Q of phase (a, b), a unit step in p at any strides, and ld = OW + Q for the last tap's
// Q, where DwFrame's rows hold every padded column the outputs read, (OW − 1)·s + (KW − 1)·dw + 1.
// The forward at a stride (where the frames need finite weights, as DwFrame) and ∂E/∂W (below)
// run on these. A frame holds vectors·L positions first (∂E/∂W's δ; unused by the forward), then
// the phases.
template <typename T>
struct DwPhaseFrames {
  static constexpr int L = kLanes64<T>;
  int64_t ld, rows, vectors, size;  // row length, rows, vectors of positions, values per phase frame
  int64_t phases, per_sample;       // sh·sw; values per frame (δ's positions, then the phases)
  int64_t chunk;                    // ∂E/∂W: samples whose frames are filled at a time
  std::vector<int64_t> tap_at;      // tap t = m·KW + q: its phase + R·ld + Q, from the frame's start
  explicit DwPhaseFrames(const ConvShape& s)
      : ld(s.OW + (s.KW - 1) * s.dw / s.sw), rows(s.OH + (s.KH - 1) * s.dh / s.sh),
        vectors(((s.OH - 1) * ld + s.OW + L - 1) / L),
        size(std::max(rows * ld + L, vectors * L + ((s.KH - 1) * s.dh / s.sh) * ld + (s.KW - 1) * s.dw / s.sw)),
        phases(s.sh * s.sw), per_sample(vectors * L + phases * size),
        chunk(std::clamp<int64_t>(int64_t(32768 / sizeof(T)) / per_sample, 1, std::max<int64_t>(s.N, 1))),
        tap_at(s.KH * s.KW) {
    for (int64_t m = 0; m < s.KH; ++m)
      for (int64_t q = 0; q < s.KW; ++q) {
        const int64_t a = m * s.dh % s.sh, R = m * s.dh / s.sh, b = q * s.dw % s.sw, Q = q * s.dw / s.sw;
        tap_at[m * s.KW + q] = vectors * L + (a * s.sw + b) * size + R * ld + Q;
      }
  }
  // Where ∂E/∂W's frames pay: rows narrower than a vector (which the rows' path takes one vector
  // each), and fewer vectors of positions than rows, or as many at a column stride.
  static bool pay(const ConvShape& s) {
    if (s.OW >= L || s.OH <= 0 || s.OW <= 0) return false;
    const DwPhaseFrames f(s);
    return f.vectors < s.OH || (f.vectors == s.OH && s.sw > 1);
  }
  // Sample n's δ of channel k into the frame's positions (zero where nothing is written: the same
  // places for every sample).
  CNNBP_ALWAYS_INLINE void fill_delta(const T* dk, const ConvShape& s, T* frame) const {
    for (int64_t i = 0; i < s.OH; ++i) copy_values(frame + i * ld, dk + i * s.OW, s.OW);
  }
  // Its input plane into the phases (the same). At a column stride the plane goes first into
  // `padded` (padded_size() values; zeros but where the image's rows go, rows padded_ld() apart),
  // whose rows' phases are then picked out by strided vector loads (load64_step) into every row of
  // the phase frames, a vector at a time (each store runs on past the row, into the next one, which
  // is written after it, or past the frame's last row).
  int64_t padded_ld(const ConvShape& s) const { return (ld + L + 1) * s.sw; }
  int64_t padded_size(const ConvShape& s) const { return s.sw == 1 ? 0 : rows * s.sh * padded_ld(s); }
  template <int PB>
  CNNBP_ALWAYS_INLINE void fill_input(const T* plane, const ConvShape& s, T* frame, T* padded) const {
    T* x = frame + vectors * L;
    if (s.sw == 1) {
      for (int64_t h = 0, a = s.pt % s.sh, r = s.pt / s.sh; h < s.H && r < rows; ++h) {
        if (ld > s.pl) copy_values(x + a * size + r * ld + s.pl, plane + h * s.W, std::min(s.W, ld - s.pl));
        if (++a == s.sh) a = 0, ++r;
      }
      return;
    }
    // (the geometry in locals: the stores below, through memcpy, could otherwise alias it)
    const int64_t pld = padded_ld(s), sh = s.sh, sw = s.sw, prows = rows * sh, len = ld, phase = size;
    for (int64_t h = 0; h < s.H && h + s.pt < prows; ++h)
      copy_values(padded + (h + s.pt) * pld + s.pl, plane + h * s.W, std::min(s.W, len * sw - s.pl));
    auto phases_of = [&](auto step) CNNBP_LAMBDA_INLINE {  // step: sw, a constant where it is 2
      for (int64_t hp = 0, a = 0, r = 0; hp < prows; ++hp) {
        for (int64_t b = 0; b < int64_t(step); ++b) {  // padded column c·sw + b at column c of phase b
          T* dst = x + (a * int64_t(step) + b) * phase + r * len;
          const T* row = padded + hp * pld + b;
          for (int64_t c0 = 0; c0 < len; c0 += L)
            store64(dst + c0, load64_step<PB>(row + c0 * int64_t(step), int64_t(step)));
        }
        if (++a == sh) a = 0, ++r;
      }
    };
    if (sw == 2)
      phases_of(std::integral_constant<int64_t, 2>());
    else
      phases_of(sw);
  }
};

// The forward of narrow planes at a stride, on DwPhaseFrames: output position p of channel k is
// b[k] + Σ_t w[k, t] · X[tap_at[t] + p], the taps t = m·KW + q in (m, q) order, as rows of one tap
// each for dw_vectors (every position reads inside the frame); then the positions that are outputs
// are copied out. With finite weights only: the padding's terms w · 0 must be 0. (Forward alone,
// float32, two threads, against DwFrame's strided reads, or the rows' path at unequal strides: 3×3
// at stride 2 over 512 channels of 14×14, batch 8, 0.95-0.97x the time; 144 of 28×28, batch 2,
// 0.84x; 5×5 at stride 2 0.76x; 3×3 at stride (2, 1) 0.75x. The same values, bit for bit.)
template <typename T>
void depthwise_forward_phases(const T* in, const T* w, const T* b, T* out, const ConvShape& s) {
  constexpr int L = kLanes64<T>;
  const DwPhaseFrames<T> f(s);
  const int64_t Kg = s.Kg(), P = s.out_plane(), taps = s.KH * s.KW, len = f.vectors * L, zero = 0;
  const Range all{0, len};
  const DwRow row{len, 1, 1, &zero, &all, all, &zero, 0, len};
  at::parallel_for(0, s.N * s.C, grain_for(Kg * len * taps), [&](int64_t p0, int64_t p1) {
    std::vector<T> frame(f.per_sample), padded(f.padded_size(s)), buf(len);
    std::vector<const T*> src(taps), wr(taps);
    for (int64_t t = 0; t < taps; ++t) src[t] = frame.data() + f.tap_at[t];
    run_with_isa([&](auto isa) CNNBP_LAMBDA_INLINE {
      constexpr int PB = decltype(isa)::vector_bytes, NV = kDwVectors<PB>;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / s.C, c = p % s.C;
        f.template fill_input<PB>(in + p * s.in_plane(), s, frame.data(), padded.data());
        for (int64_t kk = 0; kk < Kg; ++kk) {
          const int64_t k = c * Kg + kk;
          for (int64_t t = 0; t < taps; ++t) wr[t] = w + k * taps + t;
          for (int64_t v0 = 0; v0 < f.vectors; v0 += NV) {
            int64_t j[NV] = {};
            const int nv = static_cast<int>(std::min<int64_t>(NV, f.vectors - v0));
            for (int v = 0; v < nv; ++v) j[v] = (v0 + v) * L;
            dw_vectors<PB>(buf.data(), b ? b[k] : T(0), src.data(), wr.data(), taps, row, j, nv);
          }
          T* o = out + (n * s.K + k) * P;
          for (int64_t i = 0; i < s.OH; ++i) copy_values(o + i * s.OW, buf.data() + i * f.ld, s.OW);
        }
      }
    });
  });
}

// x[n, k, i, :] = b[k] + Σ_m Σ_q w[k, m, q] · o[n, c, i·sh + m·dh − pt, · ], split over planes.
template <typename T>
void depthwise_forward(const T* in, const T* w, const T* b, T* out, const ConvShape& s) {
  const int64_t Kg = s.Kg(), P = s.out_plane();
  const bool finite_w = all_finite(w, s.K * s.KH * s.KW);
  if (finite_w && s.OW < kLanes64<T> && (s.sh > 1 || s.sw > 1))  // narrow planes at a stride: phase frames
    return depthwise_forward_phases(in, w, b, out, s);
  if (finite_w && s.OW < kLanes64<T> && s.sh == s.sw) {  // narrow planes: frames
    const DwFrame f(s.OH, s.OW, s.KH, s.KW, s.sw, s.dh, s.dw, s.pt, s.pl, 1, 1, kLanes64<T>, false);
    at::parallel_for(0, s.N * s.C, grain_for(Kg * f.positions * s.KH * s.KW), [&](int64_t p0, int64_t p1) {
      std::vector<T> frame(f.size), buf(f.positions);
      std::vector<const T*> src(s.KH), wr(s.KH);
      for (int64_t m = 0; m < s.KH; ++m) src[m] = frame.data() + m * s.dh * f.ld;
      run_with_isa([&](auto isa) CNNBP_LAMBDA_INLINE {
        constexpr int PB = decltype(isa)::vector_bytes;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n = p / s.C, c = p % s.C;
          f.fill(in + p * s.in_plane(), s.H, s.W, frame.data());
          for (int64_t kk = 0; kk < Kg; ++kk) {
            const int64_t k = c * Kg + kk;
            for (int64_t m = 0; m < s.KH; ++m) wr[m] = w + (k * s.KH + m) * s.KW;
            f.run<PB>(out + (n * s.K + k) * P, b ? b[k] : T(0), src.data(), wr.data(), s.KH, buf.data());
          }
        }
      });
    });
    return;
  }
  const DwColumns cols(s.OW, s.W, s.sw, s.KW, -s.pl, s.dw);
  // Rows with edge columns read a zero-padded copy of the plane (its terms w · 0 are 0 for a finite
  // weight): at stride 1 wherever there are edge columns, at other strides where padding_pays
  // (forward alone, float32, in-process A/B against padding_pays' choice: 3×3 over 32 channels of
  // 112×112 0.88x the time at two threads and one, 96 of 75×75 0.84x and 0.88x; at stride 2 over
  // 32 of 112×112 the copy made it 1.13x).
  const bool padded = finite_w && (padding_pays<T>(cols.row) || (s.sw == 1 && cols.row.has_edges()));
  const int64_t ld = padded ? cols.row.width : s.W;  // the source rows' distance
  at::parallel_for(0, s.N * s.C, grain_for(Kg * P * s.KH * s.KW), [&](int64_t p0, int64_t p1) {
    std::vector<const T*> src(s.KH), wr(s.KH);
    std::vector<T> copy(padded ? s.H * ld : 0);
    run_with_isa([&](auto isa) CNNBP_LAMBDA_INLINE {
      constexpr int PB = decltype(isa)::vector_bytes;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / s.C, c = p % s.C;
        const T* plane = in + p * s.in_plane();
        if (padded) {
          pad_rows(plane, s.H, s.W, s.W, cols.row.lead, ld, copy.data());
          plane = copy.data() + cols.row.lead;
        }
        for (int64_t kk = 0; kk < Kg; ++kk) {
          const int64_t k = c * Kg + kk;
          T* o = out + (n * s.K + k) * P;
          for (int64_t i = 0; i < s.OH; ++i) {
            int64_t rows = 0;  // the window rows inside the image
            for (int64_t m = 0; m < s.KH; ++m) {
              const int64_t h = i * s.sh + m * s.dh - s.pt;
              if (h < 0 || h >= s.H) continue;
              src[rows] = plane + h * ld;
              wr[rows++] = w + (k * s.KH + m) * s.KW;
            }
            dw_row<PB>(o + i * s.OW, b ? b[k] : T(0), src.data(), wr.data(), rows, cols.row, padded);
          }
          if (!finite_w) {
            for (int64_t m = 0; m < s.KH; ++m) {
              const Range ri = valid_range(s.OH, s.H, s.sh, m * s.dh - s.pt);
              for (int64_t q = 0; q < s.KW; ++q) {
                if (std::isfinite(w[(k * s.KH + m) * s.KW + q])) continue;
                const Range rj = cols.valid[q];
                for (int64_t i = 0; i < s.OH; ++i)
                  for (int64_t j = 0; j < s.OW; ++j)
                    if (i < ri.lo || i >= ri.hi || j < rj.lo || j >= rj.hi) o[i * s.OW + j] = NAN;
              }
            }
          }
        }
      }
    });
  });
}

// dst[2l] = a[l], dst[2l + 1] = b[l] for l < pairs: vectors of PB bytes from each, shuffled into two.
template <int PB, typename T>
CNNBP_ALWAYS_INLINE void interleave_pairs(T* __restrict__ dst, const T* a, const T* b, int64_t pairs) {
  typedef T piece __attribute__((vector_size(PB)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I index __attribute__((vector_size(PB)));
  constexpr int PL = PB / int(sizeof(T));
  index lo, hi;  // lane l of the first: a[l / 2] or b[l / 2] (odd l); of the second, from PL / 2 on
  for (int l = 0; l < PL; ++l) lo[l] = (l % 2 ? PL : 0) + l / 2, hi[l] = lo[l] + PL / 2;
  int64_t l = 0;
  for (; l + PL <= pairs; l += PL) {
    piece x, y;
    std::memcpy(&x, a + l, PB);
    std::memcpy(&y, b + l, PB);
    const piece u = __builtin_shuffle(x, y, lo), v = __builtin_shuffle(x, y, hi);
    std::memcpy(dst + 2 * l, &u, PB);
    std::memcpy(dst + 2 * l + PL, &v, PB);
  }
  for (; l < pairs; ++l) dst[2 * l] = a[l], dst[2 * l + 1] = b[l];
}

// δ_in[n, c, h, v] = Σ over the k of c, m, q of w[k, m, q] · δ[n, k, i, j] at the output (i, j)
// with i·sh + m·dh − pt = h and j·sw + q·dw − pl = v: a row sum per input row (a gather: each input
// written once, its terms added in (k, m, q) order). With a column stride, the input columns of one
// phase r (v = r, r + sw, …) share their taps: q·dw ≡ r + pl (mod sw), reading output columns
// l + (r + pl − q·dw) / sw for the phase's l-th column. Those taps are q0, q0 + sw/g, … (g = gcd(sw, dw)).
template <typename T>
void depthwise_grad_input(const T* d, const T* w, T* gin, const ConvShape& s) {
  const int64_t Kg = s.Kg(), P = s.out_plane();
  const bool finite_w = all_finite(w, s.K * s.KH * s.KW);
  // Narrow planes: frames of the Kg planes of δ, read as a stride-1 forward with the window turned
  // around. Output (h, v) takes w[m, q] · δ[i, j] where i·sh + m·dh − pt = h and j·sw + q·dw − pl = v:
  // δ[i, j] goes to frame row top + i·sh, column left + j·sw (zeros between, at a stride), with
  // top = (KH − 1)·dh − pt and left = (KW − 1)·dw − pl, and tap (m', q') of the frame window
  // carries weight (KH − 1 − m', KW − 1 − q').
  const int64_t top = (s.KH - 1) * s.dh - s.pt, left = (s.KW - 1) * s.dw - s.pl;
  if (finite_w && s.W < kLanes64<T> && top >= 0 && left >= 0) {
    const DwFrame f(s.H, s.W, s.KH, s.KW, 1, s.dh, s.dw, top, left, s.sh, s.sw, kLanes64<T>, true);
    at::parallel_for(0, s.N * s.C, grain_for(Kg * f.positions * s.KH * s.KW), [&](int64_t p0, int64_t p1) {
      std::vector<T> frames(Kg * f.size), buf(f.positions);
      std::vector<const T*> src(Kg * s.KH), wr(Kg * s.KH);
      run_with_isa([&](auto isa) CNNBP_LAMBDA_INLINE {
        constexpr int PB = decltype(isa)::vector_bytes;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n = p / s.C, c = p % s.C;
          for (int64_t kk = 0; kk < Kg; ++kk) {
            const int64_t k = c * Kg + kk;
            f.fill(d + (n * s.K + k) * P, s.OH, s.OW, frames.data() + kk * f.size);
            for (int64_t t = 0; t < s.KH; ++t) {
              src[kk * s.KH + t] = frames.data() + kk * f.size + t * s.dh * f.ld;
              wr[kk * s.KH + t] = w + (k * s.KH + s.KH - 1 - t) * s.KW;
            }
          }
          f.run<PB>(gin + p * s.in_plane(), T(0), src.data(), wr.data(), Kg * s.KH, buf.data());
        }
      });
    });
    return;
  }
  const int64_t g = std::gcd(s.sw, s.dw);
  std::vector<DwColumns> phases;
  for (int64_t r = 0; r < std::min(s.sw, s.W); ++r) {
    int64_t q0 = 0;
    while (q0 < s.KW && (r + s.pl - q0 * s.dw) % s.sw != 0) ++q0;
    const int64_t taps = q0 < s.KW ? (s.KW - 1 - q0) / (s.sw / g) + 1 : 0;
    const int64_t len = (s.W - r + s.sw - 1) / s.sw;
    phases.emplace_back(len, s.OW, 1, taps, q0 < s.KW ? (r + s.pl - q0 * s.dw) / s.sw : 0, -(s.dw / g), q0, s.sw / g);
  }
  // Rows with edge columns read zero-padded copies of the Kg planes of δ (their terms w · 0 are 0
  // for a finite weight), with room for every phase: the largest lead, and the largest reach past it.
  // Here the copies pay wherever there are edge columns, unlike the forward's rows (δ_in alone,
  // float32, two threads, in-process A/B against padding_pays' choice: 3×3 over 96 channels of
  // 75×75 0.77x the time, 32 of 112×112 0.88x, and at stride 2 over 144 of 56×56 0.87x, 32 of
  // 112×112 0.95x; the other layers tried it chose already).
  bool pays = false;
  int64_t lead = 0, reach = 0;
  for (const DwColumns& ph : phases) {
    pays |= padding_pays<T>(ph.row) || ph.row.has_edges();
    lead = std::max(lead, ph.row.lead);
    reach = std::max(reach, ph.row.width - ph.row.lead);
  }
  const bool padded = finite_w && pays;
  const int64_t ld = padded ? lead + reach : s.OW;  // the source rows' distance
  at::parallel_for(0, s.N * s.C, grain_for(Kg * P * s.KH * s.KW), [&](int64_t p0, int64_t p1) {
    std::vector<const T*> src(Kg * s.KH), wr(Kg * s.KH);
    std::vector<T> row(s.sw > 1 ? phases.size() * phases[0].row.len : 0);  // the phases' rows
    std::vector<T> copy(padded ? Kg * s.OH * ld : 0);
    run_with_isa([&](auto isa) CNNBP_LAMBDA_INLINE {
      constexpr int PB = decltype(isa)::vector_bytes;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / s.C, c = p % s.C;
        T* plane = gin + p * s.in_plane();
        // δ of the Kg channels k of c: δ[n, k, i, ·] at dk + (kk · OH + i) · ld
        const T* dk = d + (n * s.K + c * Kg) * P;
        if (padded) {
          pad_rows(dk, Kg * s.OH, s.OW, s.OW, lead, ld, copy.data());
          dk = copy.data() + lead;
        }
        for (int64_t h = 0; h < s.H; ++h) {
          int64_t rows = 0;  // the (k, m) whose output row reads input row h
          for (int64_t kk = 0; kk < Kg; ++kk) {
            const int64_t k = c * Kg + kk;
            for (int64_t m = 0; m < s.KH; ++m) {
              const int64_t at = h + s.pt - m * s.dh;
              if (at < 0 || at % s.sh != 0 || at / s.sh >= s.OH) continue;
              src[rows] = dk + (kk * s.OH + at / s.sh) * ld;
              wr[rows++] = w + (k * s.KH + m) * s.KW;
            }
          }
          if (s.sw == 1) {
            dw_row<PB>(plane + h * s.W, T(0), src.data(), wr.data(), rows, phases[0].row, padded);
            continue;
          }
          const int64_t len0 = phases[0].row.len;
          for (int64_t r = 0; r < int64_t(phases.size()); ++r)
            dw_row<PB>(row.data() + r * len0, T(0), src.data(), wr.data(), rows, phases[r].row, padded);
          T* dst = plane + h * s.W;
          if (s.sw == 2) {  // interleave the two phases (phase 1 is one shorter for an odd W)
            const T* r0 = row.data();
            const T* r1 = r0 + len0;
            const int64_t pairs = s.W / 2;
            interleave_pairs<PB>(dst, r0, r1, pairs);
            if (s.W % 2) dst[s.W - 1] = r0[pairs];
          } else {
            for (int64_t v = 0; v < s.W; ++v) dst[v] = row[(v % s.sw) * len0 + v / s.sw];
          }
        }
      }
    });
  });
}

// ∂E/∂W[k, m, q] = Σ_n Σ_i Σ_j δ[n, k, i, j] · o[n, c, i·sh + m·dh − pt, j·sw + q·dw − pl], split
// over output channels k: each thread owns k's weights and sums over the whole batch in a fixed
// order. Each output column j keeps its own running sum over (n, i), so that the loops vectorise
// along the row without reassociating a sum, and the column sums are added up once, in column
// order, at the end. The rows are taken in bands small enough that a band's rows of δ and o stay
// in the L1 cache while every tap (m, q) passes over them. Within a band the interior columns
// (every tap of the window row inside the image) run in blocks of 64 bytes whose sums for up to
// three taps stay in registers across the rows; the edge columns keep one sum per tap in a
// register each. Narrow rows (no block fits) accumulate tap by tap along the row. Every way, a
// column's sum is taken over (n, i) in order.

// Blocks of 64 bytes of columns at j0 (and, with BLK = 2, j1), taps [q0, q0 + QB) of window row m,
// rows [i0, i1) of sample n: acc[t · ld + j] += Σ_i δ[n, k, i, j] · o[…], in registers. The first
// `skip` columns of a single block are left as they are (a last block that overlaps the one before).
// STEP: s.sw when it is 1 (unit loads), else 0 (at run time).
template <int QB, int BLK, int STEP, int PB, typename T>
CNNBP_ALWAYS_INLINE void dw_weight_blocks_of(const T* plane, const T* dk, const ConvShape& s, int64_t m, int64_t i0,
                                          int64_t i1, int64_t q0, int64_t j0, int64_t j1, T* acc_out, int64_t ld,
                                          int64_t skip = 0) {
  Vec64<T, PB> acc[BLK][QB];
  auto load_cols = [&](const T* p) CNNBP_LAMBDA_INLINE {
    return STEP == 1 ? load64<PB>(p) : load64_step<PB>(p, s.sw);
  };
  const int64_t js[2] = {j0, j1};
  if (BLK == 1 && skip > 0) {
    const LaneMask<PB, T> fresh(static_cast<int>(skip));
#pragma GCC unroll 3
    for (int t = 0; t < QB; ++t) acc[0][t] = load64<PB>(acc_out + t * ld + j0);
    for (int64_t i = i0; i < i1; ++i) {
      const T* x = plane + (i * s.sh + m * s.dh - s.pt) * s.W + q0 * s.dw - s.pl + j0 * s.sw;
      const Vec64<T, PB> dv = load64<PB>(dk + i * s.OW + j0);
#pragma GCC unroll 3
      for (int t = 0; t < QB; ++t) acc[0][t] += keep_lanes(dv * load_cols(x + t * s.dw), fresh);
    }
    // (the skipped columns got + 0 above: their values are unchanged, the sign of a zero aside)
#pragma GCC unroll 3
    for (int t = 0; t < QB; ++t) store64(acc_out + t * ld + j0, acc[0][t]);
    return;
  }
#pragma GCC unroll 2
  for (int b = 0; b < BLK; ++b)
#pragma GCC unroll 3
    for (int t = 0; t < QB; ++t) acc[b][t] = load64<PB>(acc_out + t * ld + js[b]);
  for (int64_t i = i0; i < i1; ++i) {
    const T* x = plane + (i * s.sh + m * s.dh - s.pt) * s.W + q0 * s.dw - s.pl;
#pragma GCC unroll 2
    for (int b = 0; b < BLK; ++b) {
      const Vec64<T, PB> dv = load64<PB>(dk + i * s.OW + js[b]);
#pragma GCC unroll 3
      for (int t = 0; t < QB; ++t) acc[b][t] += dv * load_cols(x + js[b] * s.sw + t * s.dw);
    }
  }
#pragma GCC unroll 2
  for (int b = 0; b < BLK; ++b)
#pragma GCC unroll 3
    for (int t = 0; t < QB; ++t) store64(acc_out + t * ld + js[b], acc[b][t]);
}

// dw_weight_blocks_of, its loads for s.sw.
template <int QB, int BLK, int PB, typename T>
CNNBP_ALWAYS_INLINE void dw_weight_blocks(const T* plane, const T* dk, const ConvShape& s, int64_t m, int64_t i0,
                                          int64_t i1, int64_t q0, int64_t j0, int64_t j1, T* acc_out, int64_t ld,
                                          int64_t skip = 0) {
  if (s.sw == 1)
    dw_weight_blocks_of<QB, BLK, 1, PB>(plane, dk, s, m, i0, i1, q0, j0, j1, acc_out, ld, skip);
  else
    dw_weight_blocks_of<QB, BLK, 0, PB>(plane, dk, s, m, i0, i1, q0, j0, j1, acc_out, ld, skip);
}

// Column j, taps [q0, q0 + QB), the same rows: one sum per tap in a register. A tap that falls
// outside the row for this column reads a column inside it instead, and its sum is not kept.
template <int QB, typename T>
CNNBP_ALWAYS_INLINE void dw_weight_column(const T* plane, const T* dk, const ConvShape& s, int64_t m, int64_t i0,
                                          int64_t i1, int64_t q0, int64_t j, T* acc_out, int64_t ld) {
  int64_t col[QB];
  bool inside[QB];
  T acc[QB];
  for (int t = 0; t < QB; ++t) {
    const int64_t v = j * s.sw + (q0 + t) * s.dw - s.pl;
    inside[t] = v >= 0 && v < s.W;
    col[t] = std::min(std::max<int64_t>(v, 0), s.W - 1);
    acc[t] = acc_out[t * ld + j];
  }
  for (int64_t i = i0; i < i1; ++i) {
    const T* x = plane + (i * s.sh + m * s.dh - s.pt) * s.W;
    const T dv = dk[i * s.OW + j];
    for (int t = 0; t < QB; ++t) acc[t] += dv * x[col[t]];
  }
  for (int t = 0; t < QB; ++t)
    if (inside[t]) acc_out[t * ld + j] = acc[t];
}

// Whether δ[·, k] is finite outside the rows ri or the columns rj: where tap (m, q) with those
// valid ranges reads the zero padding. (Where it is not, the padding's term δ · 0 is NaN, and so
// is the tap's gradient.)
template <typename T>
CNNBP_ALWAYS_INLINE bool finite_over_padding(const T* d, const ConvShape& s, int64_t k, const Range& ri, const Range& rj) {
  bool ok = true;
  for (int64_t n = 0; n < s.N; ++n) {
    const T* dk = d + (n * s.K + k) * s.out_plane();
    for (int64_t i = 0; i < s.OH; ++i) {
      const T* row = dk + i * s.OW;
      const bool whole = i < ri.lo || i >= ri.hi;
      for (int64_t j = 0; j < (whole ? s.OW : rj.lo); ++j) ok &= std::abs(row[j]) <= std::numeric_limits<T>::max();
      for (int64_t j = whole ? s.OW : rj.hi; j < s.OW; ++j) ok &= std::abs(row[j]) <= std::numeric_limits<T>::max();
    }
  }
  return ok;
}

// Runs f.template operator()<QB>(q0) over the taps of a window row in groups of three, the last of
// one or two.
template <typename F>
CNNBP_ALWAYS_INLINE void for_tap_groups(int64_t taps, const F& f) {
  int64_t q = 0;
  for (; q + 3 <= taps; q += 3) f(std::integral_constant<int, 3>(), q);
  if (q + 2 == taps) f(std::integral_constant<int, 2>(), q);
  if (q + 1 == taps) f(std::integral_constant<int, 1>(), q);
}

// ---- ∂E/∂W of planes narrower than a vector: phase frames ------------------------------------
// On rows narrower than a vector the sums below keep one running sum per output column and tap,
// a vector per row of at most a few outputs (7 of 16 lanes on a 7×7 plane), each block's sums a
// chain of one add per row, and a column stride reads its inputs by shuffles. On DwPhaseFrames
// instead: a sample's δ goes into the frame's first vectors·L values, its rows ld apart (zeros at
// j ≥ OW), and ∂E/∂W[k, m, q] = Σ_p Σ_n D_n[p] · X_n[tap_at + p], computed in vectors of positions,
// three taps and up to four vectors at a time, one sum per position and tap in a register across
// the samples (in order). The positions that are outputs (i < OH, j < OW) are then summed, vector
// by vector with the others' lanes dropped (their terms are 0 · x, NaN for an infinite x), and the
// lanes of the result in double. A tap over the padding reads zeros there: its terms δ · 0 are 0,
// or NaN for a non-finite δ, as native computes them. The samples' frames are filled a chunk of
// about 32 KiB at a time. (∂E/∂W alone, float32, two threads, against the rows' path below: 3×3 over
// 7×7 planes, 1024 channels at batch 4, 0.72-0.81x its time, 256 at batch 16 0.58-0.65x; 512
// channels of 14×14 at stride 2, batch 8, 0.82x, where filling the phases value by value had taken
// 2.8x.)

// Taps t0 … t0 + QB − 1, vectors v0 … v0 + NV − 1 of the positions, the samples of one chunk
// (frames `frames`, per_sample apart): the sums in acc (tap t's at acc + t·vectors·L) plus theirs.
template <int QB, int NV, int PB, typename T>
CNNBP_ALWAYS_INLINE void dw_weight_frame_block(const T* frames, int64_t samples, const DwPhaseFrames<T>& f,
                                               int64_t t0, int64_t v0, T* acc) {
  constexpr int L = kLanes64<T>;
  Vec64<T, PB> sum[QB][NV];
  const int64_t stride = f.vectors * L;
#pragma GCC unroll 3
  for (int t = 0; t < QB; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) sum[t][v] = load64<PB>(acc + (t0 + t) * stride + (v0 + v) * L);
  for (int64_t n = 0; n < samples; ++n) {
    const T* fr = frames + n * f.per_sample;
    Vec64<T, PB> dv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) dv[v] = load64<PB>(fr + (v0 + v) * L);
#pragma GCC unroll 3
    for (int t = 0; t < QB; ++t) {
      const T* x = fr + f.tap_at[t0 + t] + v0 * L;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) sum[t][v] += dv[v] * load64<PB>(x + v * L);
    }
  }
#pragma GCC unroll 3
  for (int t = 0; t < QB; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store64(acc + (t0 + t) * stride + (v0 + v) * L, sum[t][v]);
}

// Vectors per block: four with 512-bit registers (twelve sums and four δ of 32), two with 256-bit,
// one with 128-bit (of 16 registers).
template <int PB>
constexpr int kDwWeightFrameVectors = PB >= 64 ? 4 : PB == 32 ? 2 : 1;

template <typename T>
void depthwise_grad_weight_frames(const T* in, const T* d, T* gw, const ConvShape& s) {
  constexpr int L = kLanes64<T>;
  const DwPhaseFrames<T> f(s);
  const int64_t Kg = s.Kg(), P = s.out_plane(), KHW = s.KH * s.KW, pos = f.vectors * L;
  at::parallel_for(0, s.K, grain_for(s.N * P * KHW), [&](int64_t k0, int64_t k1) {
    std::vector<T> frames(f.chunk * f.per_sample), acc(KHW * pos), padded(f.padded_size(s));
    run_with_isa([&](auto isa) CNNBP_LAMBDA_INLINE {
      constexpr int PB = decltype(isa)::vector_bytes, NV = kDwWeightFrameVectors<PB>;
      // the lanes of the positions that are outputs: all bits set, else 0 (LaneMask's)
      typedef typename LaneMask<PB, T>::I Bits;
      std::vector<Bits> outputs(pos);
      for (int64_t p = 0; p < pos; ++p) outputs[p] = p / f.ld < s.OH && p % f.ld < s.OW ? Bits(-1) : Bits(0);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t c = k / Kg;
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t n0 = 0; n0 < s.N; n0 += f.chunk) {
          const int64_t samples = std::min(f.chunk, s.N - n0);
          for (int64_t n = 0; n < samples; ++n) {
            T* frame = frames.data() + n * f.per_sample;
            f.fill_delta(d + ((n0 + n) * s.K + k) * P, s, frame);
            f.template fill_input<PB>(in + ((n0 + n) * s.C + c) * s.in_plane(), s, frame, padded.data());
          }
          for_tap_groups(KHW, [&](auto qb, int64_t t0) CNNBP_LAMBDA_INLINE {
            constexpr int QB = decltype(qb)::value;
            int64_t v0 = 0;
            for (; v0 + NV <= f.vectors; v0 += NV)
              dw_weight_frame_block<QB, NV, PB>(frames.data(), samples, f, t0, v0, acc.data());
            for (; v0 < f.vectors; ++v0)
              dw_weight_frame_block<QB, 1, PB>(frames.data(), samples, f, t0, v0, acc.data());
          });
        }
        for (int64_t t = 0; t < KHW; ++t) {
          Vec64<T, PB> sum = splat64<PB>(T(0));
          for (int64_t v = 0; v < f.vectors; ++v) {
            LaneMask<PB, T> keep(0);
            std::memcpy(keep.keep, outputs.data() + v * L, sizeof(keep.keep));
            sum += keep_lanes(load64<PB>(acc.data() + t * pos + v * L), keep);
          }
          double total = 0;
          for (int l = 0; l < L; ++l) total += sum.lane(l);
          gw[k * KHW + t] = static_cast<T>(total);
        }
      }
    });
  });
}

template <typename T>
void depthwise_grad_weight(const T* in, const T* d, T* gw, const ConvShape& s) {
  if (DwPhaseFrames<T>::pay(s)) return depthwise_grad_weight_frames(in, d, gw, s);
  constexpr int V = kLanes64<T>;
  const int64_t Kg = s.Kg(), P = s.out_plane();
  const DwColumns cols(s.OW, s.W, s.sw, s.KW, -s.pl, s.dw);
  const Range interior = cols.row.interior;
  const bool blocks = interior.hi - interior.lo >= V;
  // Narrow planes that the frames above do not take (no block fits the interior, but a row fits
  // one or two blocks: 14×14 layers, 7×7 ones in double): each sample's plane of δ is copied with
  // rows V lanes apart (zeros past OW), and its input plane into a zero-padded plane, so that every
  // tap of every output column reads inside the copy.
  // Then dw_weight_blocks runs on the copies: whole rows in registers, the padding's terms δ · 0
  // (0 for a finite δ; NaN otherwise, as below).
  const bool narrow = narrow_rows<T>(cols.row);
  const int64_t nb = (s.OW + V - 1) / V;
  ConvShape sp = s;  // the copies' geometry: no padding, δ rows nb·V apart, input rows Wq apart
  sp.pt = sp.pl = 0;
  sp.OW = nb * V;
  sp.H = (s.OH - 1) * s.sh + (s.KH - 1) * s.dh + 1;
  sp.W = std::max(s.W + s.pl, (s.KW - 1) * s.dw + (nb * V - 1) * s.sw + 1);
  const int64_t acc_ld = narrow ? sp.OW : s.OW;  // acc's row: one running sum per column
  // Block starts: every V columns of the interior. A last block that would run short starts V
  // before the interior's end instead, overlapping its neighbour, and skips the columns it shares.
  std::vector<int64_t> starts;
  int64_t tail_skip = 0;
  for (int64_t j0 = interior.lo; blocks && j0 < interior.hi; j0 += V) {
    if (j0 + V > interior.hi) {
      tail_skip = j0 - (interior.hi - V);
      j0 = interior.hi - V;
    }
    starts.push_back(j0);
  }
  // (a skipping block runs alone, after its neighbour has stored its sums)
  const size_t paired = tail_skip > 0 ? (starts.size() - 1) / 2 * 2 : starts.size() / 2 * 2;
  Range rows_inside{0, s.OH};  // the output rows whose window rows are all inside the image
  for (int64_t m = 0; m < s.KH; ++m) {
    const Range ri = valid_range(s.OH, s.H, s.sh, m * s.dh - s.pt);
    rows_inside = Range{std::max(rows_inside.lo, ri.lo), std::min(rows_inside.hi, ri.hi)};
  }
  rows_inside.hi = std::max(rows_inside.lo, rows_inside.hi);
  // Output rows per band: its rows of δ and the input rows they read, about 16 KiB.
  const int64_t band = std::max<int64_t>(1, 16384 / int64_t(sizeof(T) * (s.OW + s.sh * s.W)));
  const int64_t KHW = s.KH * s.KW;
  at::parallel_for(0, s.K, grain_for(s.N * P * KHW), [&](int64_t k0, int64_t k1) {
    std::vector<T> acc(KHW * acc_ld);  // acc[(m · KW + q) · acc_ld + j]: column j's sum for tap (m, q)
    std::vector<T> dpad(narrow ? s.OH * sp.OW : 0), xpad(narrow ? sp.H * sp.W : 0);
    run_with_isa([&](auto isa) CNNBP_LAMBDA_INLINE {
      constexpr int PB = decltype(isa)::vector_bytes;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t c = k / Kg;
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t n = 0; n < s.N; ++n) {
          const T* plane = in + (n * s.C + c) * s.in_plane();
          const T* dk = d + (n * s.K + k) * P;
          if (narrow) {  // the copies (see above), then every row and tap in registers
            // input rows h at xpad rows pt + h, the rows above and below them zeros (never written)
            const int64_t top = std::min(s.pt, sp.H), inside = std::min(s.H, sp.H - top);
            pad_rows(plane, inside, s.W, s.W, s.pl, sp.W, xpad.data() + top * sp.W);
            pad_rows(dk, s.OH, s.OW, s.OW, int64_t(0), sp.OW, dpad.data());
            for (int64_t m = 0; m < s.KH; ++m) {
              for_tap_groups(s.KW, [&](auto qb, int64_t q0) CNNBP_LAMBDA_INLINE {
                constexpr int QB = decltype(qb)::value;
                T* a = acc.data() + (m * s.KW + q0) * acc_ld;
                if (nb == 1)
                  dw_weight_blocks<QB, 1, PB>(xpad.data(), dpad.data(), sp, m, 0, s.OH, q0, 0, 0, a, acc_ld);
                else
                  dw_weight_blocks<QB, 2, PB>(xpad.data(), dpad.data(), sp, m, 0, s.OH, q0, 0, V, a, acc_ld);
              });
            }
            continue;
          }
          for (int64_t b0 = 0; b0 < s.OH; b0 += band) {
            const int64_t b1 = std::min(s.OH, b0 + band);
            for (int64_t m = 0; m < s.KH; ++m) {
              const Range ri = valid_range(s.OH, s.H, s.sh, m * s.dh - s.pt);
              const int64_t i0 = std::max(b0, ri.lo), i1 = std::min(b1, ri.hi);
              if (i0 >= i1) continue;
              T* am = acc.data() + m * s.KW * s.OW;
              if (blocks) {
                for_tap_groups(s.KW, [&](auto qb, int64_t q0) CNNBP_LAMBDA_INLINE {
                  constexpr int QB = decltype(qb)::value;
                  T* a = am + q0 * s.OW;
                  size_t u = 0;
                  for (; u < paired; u += 2)
                    dw_weight_blocks<QB, 2, PB>(plane, dk, s, m, i0, i1, q0, starts[u], starts[u + 1], a, s.OW);
                  for (; u < starts.size(); ++u)
                    dw_weight_blocks<QB, 1, PB>(plane, dk, s, m, i0, i1, q0, starts[u], 0, a, s.OW,
                                            u + 1 == starts.size() ? tail_skip : 0);
                  for (int64_t j = 0; j < interior.lo; ++j) dw_weight_column<QB>(plane, dk, s, m, i0, i1, q0, j, a, s.OW);
                  for (int64_t j = interior.hi; j < s.OW; ++j) dw_weight_column<QB>(plane, dk, s, m, i0, i1, q0, j, a, s.OW);
                });
              } else {
                for (int64_t q = 0; q < s.KW; ++q) {
                  const Range rj = cols.valid[q];
                  T* a = am + q * s.OW;
                  for (int64_t i = i0; i < i1; ++i) {
                    const T* src = plane + (i * s.sh + m * s.dh - s.pt) * s.W + (q * s.dw - s.pl);
                    const T* dr = dk + i * s.OW;
                    if (s.sw == 1) {
                      for (int64_t j = rj.lo; j < rj.hi; ++j) a[j] += dr[j] * src[j];
                    } else {
                      for (int64_t j = rj.lo; j < rj.hi; ++j) a[j] += dr[j] * src[j * s.sw];
                    }
                  }
                }
              }
            }
          }
        }
        // δ finite on the border that any tap reads over the padding: every tap's term there is 0.
        const bool border_finite = finite_over_padding(d, s, k, rows_inside, interior);
        for (int64_t m = 0; m < s.KH; ++m) {
          const Range ri = valid_range(s.OH, s.H, s.sh, m * s.dh - s.pt);
          for (int64_t q = 0; q < s.KW; ++q) {
            const Range rj = cols.valid[q];
            const T* a = acc.data() + (m * s.KW + q) * acc_ld;
            double sum = 0;
            for (int64_t j = rj.lo; j < rj.hi; ++j) sum += a[j];
            const bool finite = border_finite || finite_over_padding(d, s, k, ri, rj);
            gw[(k * s.KH + m) * s.KW + q] = finite ? static_cast<T>(sum) : T(NAN);
          }
        }
      }
    });
  });
}

// Inputs in compute precision (float for half types) and in the NCHW layout the loops index.
at::Tensor prepared(const at::Tensor& t) {
  return t.to(compute_type(t.scalar_type())).contiguous();
}

// Σ of one plane in a fixed order: 4 · kLanes64 running sums (lane l of sum u takes elements
// e ≡ u·L + l mod 4L), added up in a fixed tree, then the tail in order. Vectorised, and the
// same on every call and thread.
template <int PB, typename T>
CNNBP_ALWAYS_INLINE double plane_sum(const T* p, int64_t len) {
  constexpr int L = kLanes64<T>;
  Vec64<T, PB> a0 = splat64<PB>(T(0)), a1 = a0, a2 = a0, a3 = a0;
  int64_t e = 0;
  for (; e + 4 * L <= len; e += 4 * L) {
    a0 += load64<PB>(p + e);
    a1 += load64<PB>(p + e + L);
    a2 += load64<PB>(p + e + 2 * L);
    a3 += load64<PB>(p + e + 3 * L);
  }
  a0 = (a0 + a1) + (a2 + a3);
  double sum = 0;
  for (int l = 0; l < L; ++l) sum += a0.lane(l);
  for (; e < len; ++e) sum += p[e];
  return sum;
}

// ∂E/∂b[k] = Σ_n Σ_i Σ_j δ[n,k,i,j], split over k: each plane's sum, added in sample order.
template <typename T>
void bias_grad(const T* d, T* gb, const ConvShape& s) {
  const int64_t plane = s.out_plane();
  at::parallel_for(0, s.K, grain_for(s.N * plane), [&](int64_t k0, int64_t k1) {
    run_with_isa([&](auto isa) CNNBP_LAMBDA_INLINE {
      constexpr int PB = decltype(isa)::vector_bytes;
      for (int64_t k = k0; k < k1; ++k) {
        double acc = 0;
        for (int64_t n = 0; n < s.N; ++n) acc += plane_sum<PB>(d + (n * s.K + k) * plane, plane);
        gb[k] = static_cast<T>(acc);
      }
    });
  });
}

// out[g, k, r] = Σ_t in[t, g, r, k] for the chunks t in order (groups × rows × Kg each): the
// partials of ∂E/∂Wᵀ summed and turned around, in tiles of 16 × 16 so that both sides are read and
// written a cache line at a time. Split over (group, row tile): each writes its own outputs.
template <typename T>
void sum_transposed(const T* in, int64_t chunks, int64_t groups, int64_t rows, int64_t Kg, T* out) {
  constexpr int64_t kTile = 16;
  const int64_t tiles = (rows + kTile - 1) / kTile, per_chunk = groups * rows * Kg;
  at::parallel_for(0, groups * tiles, grain_for(kTile * Kg * chunks), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = i / tiles, r0 = (i % tiles) * kTile, r1 = std::min(rows, r0 + kTile);
      for (int64_t k0 = 0; k0 < Kg; k0 += kTile) {
        const int64_t k1 = std::min(Kg, k0 + kTile);
        for (int64_t k = k0; k < k1; ++k) {
          T* o = out + (g * Kg + k) * rows;
          for (int64_t r = r0; r < r1; ++r) {
            const T* src = in + (g * rows + r) * Kg + k;
            T sum = src[0];
            for (int64_t t = 1; t < chunks; ++t) sum += src[t * per_chunk];
            o[r] = sum;
          }
        }
      }
    }
  });
}

}  // namespace

// ---- forward ----------------------------------------------------------------------------------

at::Tensor conv2d_forward(const at::Tensor& input_, const at::Tensor& weight_,
                          const std::optional<at::Tensor>& bias_, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvShape s = check_conv2d(input_, weight_, bias_, stride, padding, dilation, groups);
  const at::Tensor input = prepared(input_), weight = prepared(weight_);
  const bool has_bias = bias_.has_value() && bias_->defined();
  const at::Tensor bias = has_bias ? prepared(*bias_) : at::Tensor();

  at::Tensor output = empty_result({s.N, s.K, s.OH, s.OW}, input.options());
  if (output.numel() == 0) return output.to(input_.scalar_type());
  if (s.col_rows() == 0) {  // no input channels: x = b
    if (has_bias)
      output.copy_(bias.view({1, s.K, 1, 1}).expand_as(output));
    else
      output.zero_();
    return output.to(input_.scalar_type());
  }

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnnbp::conv2d", [&] {
    using T = scalar_t;
    const T* in = input.const_data_ptr<T>();
    const T* w = weight.const_data_ptr<T>();
    const T* b = has_bias ? bias.const_data_ptr<T>() : nullptr;
    T* out = output.mutable_data_ptr<T>();
    if (s.Cg() == 1) {
      depthwise_forward(in, w, b, out, s);
      return;
    }
    const int64_t P = s.out_plane(), rows = s.col_rows(), Kg = s.Kg(), KHW = s.KH * s.KW;
    const Plan plan = plan_batches(s, false);
    const int64_t threads = at::get_num_threads();
    const bool split_positions = plan.shared;
    const bool frames = plan.block > 1 && use_frames(s);
    const int64_t width = frames ? frame_of(s).P : P;  // columns per sample in a block
    const bool direct = s.col_is_input();  // 1×1, stride 1, no padding: one sample's col is its input
    const int64_t block_rows = plan.cblock * KHW;
    // x[:, slab] (+)= W[:, r0 … r0 + nr) · col: W packed once for the call (pack_weight_once; the
    // own GEMM packing it for every product took a tenth of a 5×5 64→64 layer's forward at 27×27,
    // batch 4).
    std::vector<PackedA<T>> wpack(s.groups);
    if (pack_weight_once(s, plan))
      for (int64_t g = 0; g < s.groups; ++g) wpack[g].pack(false, Kg, rows, w + g * Kg * rows, rows);
    auto weight_product = [&](int64_t g, int64_t r0, int64_t nr, int64_t len, const T* B, int64_t ldb, bool acc, T* C,
                              int64_t ldc) {
      if (!wpack[g].empty())
        wpack[g].gemm(r0, nr, len, B, ldb, acc, C, ldc);
      else
        gemm<T>(false, false, Kg, len, nr, w + g * Kg * rows + r0, rows, B, ldb, acc, C, ldc);
    };
    for_each_chunk(s.N, plan.chunks, [&](int64_t, int64_t first, int64_t last) {
      Scratch<T> col(split_positions || (direct && plan.block == 1) ? 0
                         : block_rows * (plan.block > 1 ? plan.block * width : plan.tile));
      Scratch<T> tmp(plan.block > 1 ? Kg * plan.block * width : 0);
      Scratch<T> padded(frames ? plan.cblock * frame_of(s).plane() : 0);
      for (int64_t n = first; n < last; n += plan.block) {
        const int64_t nb = std::min(plan.block, last - n);
        for (int64_t g = 0; g < s.groups; ++g) {
          // x = W · col (+ b), channel block after channel block
          const T* in_ng = in + (n * s.C + g * s.Cg()) * s.in_plane();
          if (nb == 1) {
            T* o = out + (n * s.K + g * Kg) * P;
            auto positions = [&](int64_t p0, int64_t p1, T* buf) {
              const int64_t len = p1 - p0;
              if (b)
                for (int64_t k = 0; k < Kg; ++k) std::fill(o + k * P + p0, o + k * P + p1, b[g * Kg + k]);
              if (direct) {
                weight_product(g, 0, rows, len, in_ng + p0, s.in_plane(), b != nullptr, o + p0, P);
                return;
              }
              for (int64_t c0 = 0; c0 < s.Cg(); c0 += plan.cblock) {
                const int64_t r0 = c0 * KHW, r1 = std::min(s.Cg(), c0 + plan.cblock) * KHW;
                im2col(in_ng, buf, len, s, p0, p1, r0, r1);
                weight_product(g, r0, r1 - r0, len, buf, len, b != nullptr || c0 > 0, o + p0, P);
              }
            };
            if (split_positions) {
              // each thread an equal share of whole 32-column panels, cut into tiles of whole panels
              // of about equal size, at most plan.tile columns (tiles of plan.tile columns over all the
              // positions left one thread with 448 columns and the other with 336 at 28×28)
              at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
                for (int64_t t = t0; t < t1; ++t) {
                  const Range share = thread_share(P, threads, t);
                  if (share.lo == share.hi) continue;
                  const int64_t len = even_tiles(share.hi - share.lo, plan.tile);
                  Scratch<T> buf(direct ? 0 : block_rows * len);
                  for (int64_t p0 = share.lo; p0 < share.hi; p0 += len)
                    positions(p0, std::min(share.hi, p0 + len), buf.data());
                }
              });
            } else {
              for (int64_t p0 = 0; p0 < P; p0 += plan.tile) positions(p0, std::min(P, p0 + plan.tile), col.data());
            }
          } else {
            // samples side by side, in frames (im2col_frame: output rows Wp apart, columns j < OW
            // kept) or unrolled as they are (rows OW apart)
            const int64_t ld = nb * width, row_step = frames ? frame_of(s).Wp : s.OW;
            for (int64_t c0 = 0; c0 < s.Cg(); c0 += plan.cblock) {
              const int64_t c1 = std::min(s.Cg(), c0 + plan.cblock), r0 = c0 * KHW, r1 = c1 * KHW;
              for (int64_t j = 0; j < nb; ++j) {
                const T* in_j = in_ng + j * s.C * s.in_plane();
                if (frames)
                  im2col_frame(in_j, col.data() + j * width, ld, s, padded.data(), c0, c1);
                else
                  im2col(in_j, col.data() + j * width, ld, s, int64_t(0), P, r0, r1);
              }
              weight_product(g, r0, r1 - r0, ld, col.data(), ld, c0 > 0, tmp.data(), ld);
            }
            for (int64_t j = 0; j < nb; ++j)
              for (int64_t k = 0; k < Kg; ++k) {
                const T* src = tmp.data() + k * ld + j * width;
                T* dst = out + ((n + j) * s.K + g * Kg + k) * P;
                const T bk = b ? b[g * Kg + k] : T(0);
                for (int64_t i = 0; i < s.OH; ++i)
                  for (int64_t v = 0; v < s.OW; ++v) dst[i * s.OW + v] = src[i * row_step + v] + bk;
              }
          }
        }
      }
    });
  });
  return output.to(input_.scalar_type());
}

// ---- backward ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& weight_,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const ConvShape s = check_conv2d(input_, weight_, std::nullopt, stride, padding, dilation, groups);
  check_floating_cpu(grad_output_, "conv2d_backward", "grad_output");
  TORCH_CHECK(grad_output_.scalar_type() == input_.scalar_type(),
              "conv2d_backward: grad_output type (", grad_output_.scalar_type(),
              ") should be the same as input type (", input_.scalar_type(), ")");
  TORCH_CHECK(grad_output_.sizes() == at::IntArrayRef({s.N, s.K, s.OH, s.OW}),
              "conv2d_backward: expected grad_output of size ",
              at::IntArrayRef({s.N, s.K, s.OH, s.OW}), " but got ", grad_output_.sizes());

  const at::Tensor grad_output = prepared(grad_output_);
  const at::Tensor input = prepared(input_), weight = prepared(weight_);
  const auto type = input_.scalar_type();
  const bool want_in = output_mask[0], want_w = output_mask[1];
  const bool runs = (want_in || want_w) && s.N > 0 && s.out_plane() > 0 && s.K > 0 && s.C > 0;
  const Plan plan = plan_batches(s, true);
  // One sample at a time of a 1×1 layer (stride 1, no padding): every sample's col is its input,
  // and its two products are made whole (no column buffer).
  const bool whole_products = s.col_is_input() && plan.block == 1;
  // The depthwise loops, and the whole products, write every element of δ_in; the other products
  // add into it.
  const bool written = runs && (s.Cg() == 1 || whole_products);
  at::Tensor grad_input = !want_in ? at::Tensor() : empty_result({s.N, s.C, s.H, s.W}, input.options());
  if (want_in && !written) grad_input.zero_();
  // grad_weight: one partial sum per chunk of the batch, added in chunk order.
  // The products write each chunk's partial with their first sample (block), then add into it.
  // With 16 to 128 output channels per group they make each group's ∂E/∂W transposed, rows × Kg
  // (col · δᵀ rather than δ · colᵀ: ATen's BLAS ran that 10-50% faster at Kg 16-128 and as fast at
  // 256, one thread, 150-1152 rows over 800-3136 columns; a 32-group layer, Kg 4, took 1.6x the
  // time), turned around while the partials are summed (sum_transposed). Only with two chunks or
  // more: the sum then needs a result of its own, a weight's size, which with one chunk (a layer at
  // batch 1) would be new memory (128→128 3×3 at 28×28, batch 1: peak 1.27× native's, 1.07× without).
  at::Tensor partial = want_w ? at::empty({plan.chunks, s.K, s.col_rows()}, input.options()) : at::Tensor();
  const bool transposed = s.Cg() > 1 && s.Kg() >= 16 && s.Kg() <= 128 && plan.chunks > 1;
  if (want_w && !(runs && s.Cg() > 1)) partial.zero_();

  if (runs) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnnbp::conv2d_backward", [&] {
      using T = scalar_t;
      const T* in = input.const_data_ptr<T>();
      const T* w = weight.const_data_ptr<T>();
      const T* d = grad_output.const_data_ptr<T>();
      T* gin = want_in ? grad_input.mutable_data_ptr<T>() : nullptr;
      if (s.Cg() == 1) {
        if (want_in) depthwise_grad_input(d, w, gin, s);
        if (want_w) depthwise_grad_weight(in, d, partial.mutable_data_ptr<T>(), s);
        return;
      }
      const int64_t P = s.out_plane(), rows = s.col_rows(), Kg = s.Kg(), KHW = s.KH * s.KW;
      const bool share = plan.shared;  // each thread takes whole channel blocks
      const bool thin = want_w && thin_products() && Kg <= kThinMax;
      // Frames for blocks of samples (stride 1, small images), when the weight is finite.
      const bool frames = plan.block > 1 && use_frames(s) && all_finite(w, s.K * rows);
      const int64_t width = frames ? frame_of(s).P : P;  // columns per sample in a block
      const int64_t pad_size = frames ? plan.cblock * frame_of(s).plane() : 0;
      const int64_t cblock = plan.cblock;
      const int64_t nblk = blocks_of(s.Cg(), cblock), block_rows = cblock * KHW;
      // ∂E/∂W[:, r0 … r0 + nr) of a group (gw_g), += or = δ · colᵀ over len columns: made as
      // (col · δᵀ)ᵀ, rows × Kg, where partials are transposed (see `partial`).
      // With the own GEMM and Kg ≤ kThinMax, as col · δᵀ from δᵀ (dgt, turned once per block of
      // samples), both read in place (gemm_thin), stored turned where partials are not transposed.
      auto grad_w_product = [&](int64_t nr, int64_t len, const T* col, int64_t ldcol, const T* dg, int64_t ldd,
                                const T* dgt, bool add, T* gw_g, int64_t r0) {
        if (dgt)
          gemm_thin<T>(nr, Kg, len, col, ldcol, dgt, Kg, add, transposed ? gw_g + r0 * Kg : gw_g + r0,
                       transposed ? Kg : rows, !transposed);
        else if (transposed)
          gemm<T>(false, true, nr, Kg, len, col, ldcol, dg, ldd, add, gw_g + r0 * Kg, Kg);
        else
          gemm<T>(false, true, Kg, nr, len, dg, ldd, col, ldcol, add, gw_g + r0, rows);
      };
      // ∂col[rows] = W[:, rows]ᵀ · δ for channel block kb (rows r0 … r0 + nr), or for all rows of a
      // 1×1 layer's sample (kb = -1): each block's Wᵀ packed once for the call where the forward
      // packs W (pack_weight_once; whole_products: one block of all rows per group).
      const int64_t packed_blocks = whole_products ? 1 : nblk;
      std::vector<PackedA<T>> wtpack(want_in ? s.groups * packed_blocks : 0);
      if (want_in && pack_weight_once(s, plan))
        for (int64_t g = 0; g < s.groups; ++g)
          for (int64_t kb = 0; kb < packed_blocks; ++kb) {
            const int64_t c0 = kb * cblock, nr = whole_products ? rows : (std::min(s.Cg(), c0 + cblock) - c0) * KHW;
            wtpack[g * packed_blocks + kb].pack(true, nr, Kg, w + g * Kg * rows + c0 * KHW, rows);
          }
      auto delta_product = [&](int64_t g, int64_t kb, int64_t r0, int64_t nr, int64_t len, const T* dg, int64_t ldd,
                               T* C, int64_t ldc) {
        const bool packed = (kb >= 0 || whole_products) && !wtpack[g * packed_blocks + std::max<int64_t>(kb, 0)].empty();
        if (packed)
          wtpack[g * packed_blocks + std::max<int64_t>(kb, 0)].gemm(0, Kg, len, dg, ldd, false, C, ldc);
        else
          gemm<T>(true, false, nr, len, Kg, w + g * Kg * rows + r0, rows, dg, ldd, false, C, ldc);
      };
      for_each_chunk(s.N, plan.chunks, [&](int64_t t, int64_t first, int64_t last) {
        // One column buffer serves both products of a channel block in turn: its unrolled input
        // rows for ∂E/∂W, then Wᵀ · δ for δ_in.
        const int64_t span = plan.block > 1 ? plan.block * width : plan.tile;  // columns per product
        Scratch<T> col(share || whole_products ? 0 : block_rows * span);
        Scratch<T> pack(plan.block > 1 ? Kg * plan.block * width : 0);
        Scratch<T> pack_t(thin && !whole_products ? Kg * (plan.block > 1 ? plan.block * width : P) : 0);
        Scratch<T> padded(frames && !share ? pad_size : 0);
        T* gw = want_w ? partial.mutable_data_ptr<T>() + t * s.K * rows : nullptr;
        for (int64_t n = first; n < last; n += plan.block) {
          const int64_t nb = std::min(plan.block, last - n);
          for (int64_t g = 0; g < s.groups; ++g) {
            T* gw_g = want_w ? gw + g * Kg * rows : nullptr;
            const T* in_ng = in + (n * s.C + g * s.Cg()) * s.in_plane();
            T* gin_ng = want_in ? gin + (n * s.C + g * s.Cg()) * s.in_plane() : nullptr;
            // Frames (as in the forward) for a block of samples, where the dropped columns are sure to
            // add nothing: ∂col's are Wᵀ · 0 (a finite weight), ∂E/∂W's are 0 · input (finite).
            const bool framed = nb > 1 && frames && (!want_w || all_finite(in_ng, nb, s));
            int64_t ldd;
            const T* dg = framed ? gather_delta_frames(d, s, n, nb, g, pack.data(), ldd)
                                 : gather_delta(d, s, n, nb, g, pack.data(), ldd);
            const bool direct = s.col_is_input() && nb == 1;  // col is the input itself
            // (not for a direct 1×1 product: there one product takes the whole sample, and turning its δ
            // around cost more than packing does; MobileNet's 32→64 at 112×112, batch 1: 1.06 → 1.29×
            // native's time)
            const T* dgt = thin && !direct ? transposed_delta(dg, ldd, Kg, pack_t.data()) : nullptr;  // ld Kg
            // channel blocks [k0, k1), rows r0 … r1 − 1 each
            auto channel_blocks = [&](int64_t k0, int64_t k1, T* buf, T* pad) {
              for (int64_t kb = k0; kb < k1; ++kb) {
                const int64_t c0 = kb * cblock, c1 = std::min(s.Cg(), c0 + cblock), r0 = c0 * KHW, nr = (c1 - c0) * KHW;
                if (nb == 1) {  // one sample, its output positions in tiles [p0, p1)
                  for (int64_t p0 = 0; p0 < P; p0 += plan.tile) {
                    const int64_t p1 = std::min(P, p0 + plan.tile), len = p1 - p0;
                    if (want_w) {  // ∂E/∂W[:, rows]ᵀ += col[rows, :] · δᵀ
                      im2col(in_ng, buf, len, s, p0, p1, r0, r0 + nr);
                      grad_w_product(nr, len, buf, len, dg + p0, ldd, dgt ? dgt + p0 * Kg : nullptr,
                                     n > first || p0 > 0, gw_g, r0);
                    }
                    if (want_in) {  // ∂col[rows, :] = W[:, rows]ᵀ · δ, then col2im into channels c0 … c1 − 1
                      delta_product(g, kb, r0, nr, len, dg + p0, ldd, buf, len);
                      col2im(buf, len, gin_ng, s, p0, p1, c0, c1);
                    }
                  }
                } else {  // a block of samples side by side, in frames or unrolled as they are
                  const int64_t step = framed ? width : P, ld = nb * step;  // columns per sample, all
                  if (want_w) {
                    for (int64_t j = 0; j < nb; ++j) {
                      const T* in_j = in_ng + j * s.C * s.in_plane();
                      if (framed)
                        im2col_frame(in_j, buf + j * step, ld, s, pad, c0, c1);
                      else
                        im2col(in_j, buf + j * step, ld, s, int64_t(0), P, r0, r0 + nr);
                    }
                    grad_w_product(nr, ld, buf, ld, dg, ldd, dgt, n > first, gw_g, r0);
                  }
                  if (want_in) {
                    delta_product(g, kb, r0, nr, ld, dg, ldd, buf, ld);
                    for (int64_t j = 0; j < nb; ++j) {
                      T* gin_j = gin_ng + j * s.C * s.in_plane();
                      if (framed)
                        col2im_frame(buf + j * step, ld, gin_j, s, pad, c0, c1);
                      else
                        col2im(buf + j * step, ld, gin_j, s, int64_t(0), P, c0, c1);
                    }
                  }
                }
              }
            };
            if (direct) {
              // No buffer to bound: each product whole, as one call (threaded by the GEMM itself
              // when not in a chunk). Cut into channel blocks and tiles, the thin products of
              // 1×1 layers ran 5-40% slower (float64, 2 threads, at one sample).
              if (want_w) grad_w_product(rows, P, in_ng, s.in_plane(), dg, ldd, nullptr, n > first, gw_g, 0);
              if (want_in) delta_product(g, -1, 0, rows, P, dg, ldd, gin_ng, s.in_plane());
            } else if (share) {
              at::parallel_for(0, nblk, 1, [&](int64_t k0, int64_t k1) {
                Scratch<T> buf(block_rows * (nb == 1 ? plan.tile : nb * width));
                Scratch<T> pad(framed ? pad_size : 0);
                channel_blocks(k0, k1, buf.data(), pad.data());
              });
            } else {
              channel_blocks(0, nblk, col.data(), padded.data());
            }
          }
        }
      });
    });
  }

  at::Tensor grad_weight, grad_bias;
  if (want_w) {
    if (transposed) {
      grad_weight = at::empty(weight.sizes(), partial.options());
      AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "cnnbp::conv2d_backward_sum", [&] {
        sum_transposed(partial.const_data_ptr<scalar_t>(), plan.chunks, s.groups, s.col_rows(), s.Kg(),
                       grad_weight.mutable_data_ptr<scalar_t>());
      });
    } else {
      grad_weight = partial.select(0, 0);
      for (int64_t t = 1; t < partial.size(0); ++t) grad_weight.add_(partial.select(0, t));
    }
    grad_weight = grad_weight.view(weight.sizes()).to(type);
  }
  if (output_mask[2]) {
    grad_bias = at::empty({s.K}, grad_output.options());
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "cnnbp::conv2d_backward_bias", [&] {
      bias_grad(grad_output.const_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(), s);
    });
    grad_bias = grad_bias.to(type);
  }
  auto empty = [&] { return at::empty({0}, input_.options()); };
  return {want_in ? grad_input.to(type) : empty(), want_w ? grad_weight : empty(),
          output_mask[2] ? grad_bias : empty()};
}

// Diagnostic for the tests: the plan conv2d makes for these sizes at the current thread count, as
// [chunks, block, tile, cblock, shared].
std::vector<int64_t> conv2d_plan(at::IntArrayRef input_size, at::IntArrayRef weight_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool backward) {
  const at::Tensor one = at::zeros({1});  // expanded: the sizes without their storage
  const ConvShape s = check_conv2d(one.expand(input_size), one.expand(weight_size), std::nullopt, stride, padding,
                                   dilation, groups);
  const Plan p = plan_batches(s, backward);
  return {p.chunks, p.block, p.tile, p.cblock, p.shared};
}

}  // namespace cnnbp
