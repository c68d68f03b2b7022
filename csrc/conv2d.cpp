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
// col is built for one sample at a time (per thread), never for the whole batch.

#include "cnnbp.h"

#include <ATen/Parallel.h>
#include <c10/util/irange.h>

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

std::string sizes_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

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

// col[(c,m,q), (i,j)] = o[c, i·sh + m·dh − pt, j·sw + q·dw − pl], zero where that falls in padding.
// `in` holds Cg planes of H×W; `col` has col_rows() rows of OH·OW.
template <typename T>
void im2col(const T* in, T* col, const ConvShape& s) {
  const int64_t KHW = s.KH * s.KW, OW = s.OW;
  at::parallel_for(0, s.col_rows(), grain_for(s.out_plane()), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r / KHW, m = (r / s.KW) % s.KH, q = r % s.KW;
      const T* plane = in + c * s.in_plane();
      T* row = col + r * s.out_plane();
      const Range ri = valid_range(s.OH, s.H, s.sh, m * s.dh - s.pt);
      const Range rj = valid_range(s.OW, s.W, s.sw, q * s.dw - s.pl);
      std::fill(row, row + ri.lo * OW, T(0));
      for (int64_t i = ri.lo; i < ri.hi; ++i) {
        const T* src = plane + (i * s.sh + m * s.dh - s.pt) * s.W + (q * s.dw - s.pl);
        T* dst = row + i * OW;
        std::fill(dst, dst + rj.lo, T(0));
        if (s.sw == 1) {
          for (int64_t j = rj.lo; j < rj.hi; ++j) dst[j] = src[j];
        } else {
          for (int64_t j = rj.lo; j < rj.hi; ++j) dst[j] = src[j * s.sw];
        }
        std::fill(dst + rj.hi, dst + OW, T(0));
      }
      std::fill(row + ri.hi * OW, row + s.out_plane(), T(0));
    }
  });
}

// The adjoint of im2col: ∂o[c, h, v] += ∂col[(c,m,q), (i,j)] for every (m,q,i,j) that read o[c,h,v].
// Split over input channels: a channel's rows write only into that channel's plane, so no two
// threads touch the same element. `grad_in` must be zeroed by the caller.
template <typename T>
void col2im(const T* col, T* grad_in, const ConvShape& s) {
  const int64_t OW = s.OW;
  at::parallel_for(0, s.Cg(), grain_for(s.KH * s.KW * s.out_plane()), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* plane = grad_in + c * s.in_plane();
      for (int64_t m = 0; m < s.KH; ++m) {
        const Range ri = valid_range(s.OH, s.H, s.sh, m * s.dh - s.pt);
        for (int64_t q = 0; q < s.KW; ++q) {
          const Range rj = valid_range(s.OW, s.W, s.sw, q * s.dw - s.pl);
          const T* row = col + ((c * s.KH + m) * s.KW + q) * s.out_plane();
          for (int64_t i = ri.lo; i < ri.hi; ++i) {
            T* dst = plane + (i * s.sh + m * s.dh - s.pt) * s.W + (q * s.dw - s.pl);
            const T* src = row + i * OW;
            if (s.sw == 1) {
              for (int64_t j = rj.lo; j < rj.hi; ++j) dst[j] += src[j];
            } else {
              for (int64_t j = rj.lo; j < rj.hi; ++j) dst[j * s.sw] += src[j];
            }
          }
        }
      }
    }
  });
}

// ---- the batch loop ---------------------------------------------------------------------------

// Runs fn(first, last, col_buffer) over chunks of the batch. With at least as many samples as
// threads, each thread takes a contiguous chunk of samples and owns a column buffer; otherwise
// samples go one by one and the parallelism is inside im2col/col2im and the matrix products.
// Chunk t always covers the same samples for a given thread count, so per-chunk partial sums
// reduced in chunk order are deterministic.
int64_t batch_chunks(int64_t N) {
  const int64_t threads = at::get_num_threads();
  return (N >= threads && threads > 1) ? threads : 1;
}

template <typename Fn>
void for_each_chunk(int64_t N, int64_t chunks, Fn fn) {
  if (chunks == 1) {
    fn(0, 0, N);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(t, t * N / chunks, (t + 1) * N / chunks);
  });
}

// Views of one group's slice of a sample, as matrices.
at::Tensor weight_matrix(const at::Tensor& w, const ConvShape& s, int64_t g) {
  return w.narrow(0, g * s.Kg(), s.Kg()).view({s.Kg(), s.col_rows()});
}
at::Tensor out_matrix(const at::Tensor& x, const ConvShape& s, int64_t n, int64_t g) {
  return x.select(0, n).narrow(0, g * s.Kg(), s.Kg()).view({s.Kg(), s.out_plane()});
}
at::Tensor in_matrix(const at::Tensor& o, const ConvShape& s, int64_t n, int64_t g) {
  return o.select(0, n).narrow(0, g * s.Cg(), s.Cg()).view({s.Cg(), s.in_plane()});
}

// The unrolled input of sample n, group g: the input itself for pointwise convs, else `buffer`.
template <typename T>
at::Tensor unrolled_input(const at::Tensor& o, const ConvShape& s, int64_t n, int64_t g,
                          at::Tensor& buffer) {
  at::Tensor in = in_matrix(o, s, n, g);
  if (s.col_is_input()) return in;
  im2col<T>(in.const_data_ptr<T>(), buffer.mutable_data_ptr<T>(), s);
  return buffer;
}

at::Tensor col_buffer(const at::Tensor& like, const ConvShape& s) {
  if (s.col_is_input()) return at::Tensor();
  return at::empty({s.col_rows(), s.out_plane()}, like.options());
}

// Inputs in compute precision (float for half types) and in the NCHW layout the loops index.
at::Tensor prepared(const at::Tensor& t) {
  return t.to(compute_type(t.scalar_type())).contiguous();
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

  at::Tensor output = at::empty({s.N, s.K, s.OH, s.OW}, input.options());
  if (output.numel() == 0) return output.to(input_.scalar_type());

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnnbp::conv2d", [&] {
    const int64_t chunks = batch_chunks(s.N);
    for_each_chunk(s.N, chunks, [&](int64_t, int64_t first, int64_t last) {
      at::Tensor buffer = col_buffer(input, s);
      for (int64_t n = first; n < last; ++n) {
        for (int64_t g = 0; g < s.groups; ++g) {
          // x = W · col (+ b)
          at::Tensor col = unrolled_input<scalar_t>(input, s, n, g, buffer);
          at::Tensor out = out_matrix(output, s, n, g);
          if (has_bias) {
            at::addmm_out(out, bias.narrow(0, g * s.Kg(), s.Kg()).unsqueeze(1).expand_as(out),
                          weight_matrix(weight, s, g), col);
          } else {
            at::mm_out(out, weight_matrix(weight, s, g), col);
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
  at::Tensor grad_input, grad_weight, grad_bias;

  // δ_in = col2im(Wᵀ · δ), one sample at a time.
  if (output_mask[0]) {
    grad_input = at::zeros({s.N, s.C, s.H, s.W}, input.options());
    if (grad_input.numel() > 0 && s.K > 0 && s.out_plane() > 0) {
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnnbp::conv2d_backward_input", [&] {
        for_each_chunk(s.N, batch_chunks(s.N), [&](int64_t, int64_t first, int64_t last) {
          at::Tensor buffer = col_buffer(input, s);
          for (int64_t n = first; n < last; ++n) {
            for (int64_t g = 0; g < s.groups; ++g) {
              at::Tensor gin = in_matrix(grad_input, s, n, g);
              at::Tensor wt = weight_matrix(weight, s, g).t();
              if (s.col_is_input()) {
                at::mm_out(gin, wt, out_matrix(grad_output, s, n, g));
              } else {
                at::mm_out(buffer, wt, out_matrix(grad_output, s, n, g));
                col2im<scalar_t>(buffer.const_data_ptr<scalar_t>(), gin.mutable_data_ptr<scalar_t>(), s);
              }
            }
          }
        });
      });
    }
    grad_input = grad_input.to(type);
  } else {
    grad_input = at::empty({0}, input_.options());
  }

  // ∂E/∂W = Σ_n δ[n] · col[n]ᵀ: each chunk of the batch sums into its own partial, and the
  // partials are added in chunk order.
  if (output_mask[1]) {
    const int64_t chunks = batch_chunks(s.N);
    at::Tensor partial = at::zeros({chunks, s.K, s.col_rows()}, input.options());
    if (s.N > 0 && s.out_plane() > 0 && s.col_rows() > 0) {
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnnbp::conv2d_backward_weight", [&] {
        for_each_chunk(s.N, chunks, [&](int64_t t, int64_t first, int64_t last) {
          at::Tensor buffer = col_buffer(input, s);
          at::Tensor acc = partial.select(0, t);
          for (int64_t n = first; n < last; ++n) {
            for (int64_t g = 0; g < s.groups; ++g) {
              at::Tensor col = unrolled_input<scalar_t>(input, s, n, g, buffer);
              at::Tensor acc_g = acc.narrow(0, g * s.Kg(), s.Kg());
              at::addmm_out(acc_g, acc_g, out_matrix(grad_output, s, n, g), col.t());
            }
          }
        });
      });
    }
    grad_weight = partial.select(0, 0).clone();
    for (int64_t t = 1; t < chunks; ++t) grad_weight.add_(partial.select(0, t));
    grad_weight = grad_weight.view(weight.sizes()).to(type);
  } else {
    grad_weight = at::empty({0}, input_.options());
  }

  // ∂E/∂b[k] = Σ_n Σ_i Σ_j δ[n,k,i,j], split over k.
  if (output_mask[2]) {
    grad_bias = at::empty({s.K}, input.options());
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnnbp::conv2d_backward_bias", [&] {
      const scalar_t* d = grad_output.const_data_ptr<scalar_t>();
      scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
      const int64_t plane = s.out_plane();
      at::parallel_for(0, s.K, grain_for(s.N * plane), [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          double acc = 0;
          for (int64_t n = 0; n < s.N; ++n) {
            const scalar_t* p = d + (n * s.K + k) * plane;
            for (int64_t ij = 0; ij < plane; ++ij) acc += static_cast<double>(p[ij]);
          }
          gb[k] = static_cast<scalar_t>(acc);
        }
      });
    });
    grad_bias = grad_bias.to(type);
  } else {
    grad_bias = at::empty({0}, input_.options());
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cnnbp
