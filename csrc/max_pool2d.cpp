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

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <limits>
#include <type_traits>

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
  s.kh = kernel[0], s.kw = kernel[1], s.sh = stride[0], s.sw = stride[1];
  s.ph = padding[0], s.pw = padding[1], s.dh = dilation[0], s.dw = dilation[1];
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
inline bool is_nan(T v) {
  if constexpr (std::is_floating_point_v<T>) {
    return std::isnan(v);
  } else {
    return false;
  }
}

template <typename T>
void max_pool2d_plane(const T* in, T* out, int64_t* idx, const PoolShape& s) {
  using acc_t = at::opmath_type<T>;
  for (int64_t i = 0; i < s.OH; ++i) {
    int64_t h0, h1;
    window(i * s.sh - s.ph, s.kh, s.dh, s.H, h0, h1);
    for (int64_t j = 0; j < s.OW; ++j) {
      int64_t v0, v1;
      window(j * s.sw - s.pw, s.kw, s.dw, s.W, v0, v1);
      int64_t best = h0 * s.W + v0;
      acc_t best_val = std::numeric_limits<acc_t>::has_infinity
                           ? -std::numeric_limits<acc_t>::infinity()
                           : std::numeric_limits<acc_t>::lowest();
      for (int64_t h = h0; h < h1; h += s.dh) {
        for (int64_t v = v0; v < v1; v += s.dw) {
          const int64_t at = h * s.W + v;
          const acc_t val = static_cast<acc_t>(in[at]);
          if (val > best_val || is_nan(val)) {
            best_val = val;
            best = at;
          }
        }
      }
      out[i * s.OW + j] = static_cast<T>(best_val);
      idx[i * s.OW + j] = best;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(const at::Tensor& input_,
                                                      at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride,
                                                      at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool ceil_mode) {
  const PoolShape s = check_max_pool2d(input_, kernel_size, stride, padding, dilation, ceil_mode);
  const at::Tensor input = input_.contiguous();
  at::Tensor output = at::empty({input.size(0), input.size(1), s.OH, s.OW}, input.options());
  at::Tensor indices = at::empty(output.sizes(), input.options().dtype(at::kLong));
  // Integer inputs pool too (as in PyTorch); only floating types have a gradient.
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnbp::max_pool2d", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    int64_t* idx = indices.mutable_data_ptr<int64_t>();
    const int64_t in_plane = s.H * s.W, out_plane = s.OH * s.OW;
    at::parallel_for(0, s.planes, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        max_pool2d_plane(in + p * in_plane, out + p * out_plane, idx + p * out_plane, s);
      }
    });
  });
  return {output, indices};
}

// ∂E/∂o[p, indices[p, i, j]] += δ[p, i, j], split over planes p = (n, c): a plane's gradient is
// written by one thread only. An index outside the plane is an error, never a stray write.
at::Tensor max_pool2d_backward(const at::Tensor& grad_output_, const at::Tensor& indices_,
                               at::IntArrayRef input_size) {
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

  const at::Tensor grad_output = grad_output_.contiguous(), indices = indices_.contiguous();
  at::Tensor grad_input = at::zeros(input_size, grad_output.options());
  const int64_t planes = input_size[0] * input_size[1];
  const int64_t in_plane = input_size[2] * input_size[3];
  const int64_t out_plane = grad_output.size(2) * grad_output.size(3);
  if (planes == 0 || out_plane == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "cnnbp::max_pool2d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* d = grad_output.const_data_ptr<scalar_t>();
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    scalar_t* gin = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        scalar_t* g = gin + p * in_plane;
        for (int64_t ij = 0; ij < out_plane; ++ij) {
          const int64_t at = idx[p * out_plane + ij];
          TORCH_CHECK(at >= 0 && at < in_plane, "max_pool2d_backward: index ", at,
                      " is outside the input plane of ", in_plane, " elements");
          g[at] = static_cast<scalar_t>(static_cast<acc_t>(g[at]) +
                                        static_cast<acc_t>(d[p * out_plane + ij]));
        }
      }
    });
  });
  return grad_input;
}

}  // namespace cnnbp
