// Shared declarations of the cnnbp kernels: the op entry points that ops.cpp registers,
// and the small index helpers that both convolution and pooling loops use.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace cnnbp {

// ---- conv2d.cpp -------------------------------------------------------------------------------
// padding is (top, bottom, left, right): symmetric padding repeats a value, padding='same' with an
// even effective kernel puts the extra row/column at the end, as PyTorch does.
at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// Returns (grad_input, grad_weight, grad_bias); an entry whose output_mask bit is false is not
// computed and comes back as an empty tensor of shape [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask);
// Diagnostic (tests): the batch plan conv2d makes for these sizes, see csrc/conv2d.cpp.
std::vector<int64_t> conv2d_plan(at::IntArrayRef input_size, at::IntArrayRef weight_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool backward);

// ---- max_pool2d.cpp ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(const at::Tensor& input,
                                                      at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride,
                                                      at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool ceil_mode);

at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                               at::IntArrayRef input_size, at::OptionalIntArrayRef kernel_size,
                               at::OptionalIntArrayRef stride, at::OptionalIntArrayRef padding,
                               at::OptionalIntArrayRef dilation);

// ---- helpers ----------------------------------------------------------------------------------

// For out positions o in [0, out_len) reading in[o * stride + offset], the sub-range [lo, hi) whose
// reads fall inside [0, in_len). Everything outside it reads zero padding.
struct Range {
  int64_t lo, hi;
};
inline Range valid_range(int64_t out_len, int64_t in_len, int64_t stride, int64_t offset) {
  int64_t lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  int64_t last = in_len - 1 - offset;  // largest o * stride allowed
  int64_t hi = last < 0 ? 0 : last / stride + 1;
  lo = std::min(lo, out_len);
  hi = std::max(lo, std::min(hi, out_len));
  return {lo, hi};
}

// dst[0, n) = src[0, n) for rows of any length, inline: whole 64-byte pieces, then the rest as two
// pieces of the largest power-of-two size that fits, overlapping (each byte written with its own
// value, nothing outside [0, n) read or written). Rows of a few values (depthwise planes of 7×7 or
// 14×14) would otherwise each be a call to memmove, which std::copy and plain loops compile to.
// src and dst must not overlap.
template <int kBytes>
inline void copy_piece(char* dst, const char* src) {
  char piece[kBytes];
  std::memcpy(piece, src, kBytes);
  std::memcpy(dst, piece, kBytes);
}
template <typename T>
inline void copy_values(T* __restrict__ dst_, const T* __restrict__ src_, int64_t n) {
  char* dst = reinterpret_cast<char*>(dst_);
  const char* src = reinterpret_cast<const char*>(src_);
  const int64_t bytes = n * int64_t(sizeof(T));
  if (bytes >= 64) {
    int64_t b = 0;
    for (; b + 64 <= bytes; b += 64) copy_piece<64>(dst + b, src + b);
    if (b < bytes) copy_piece<64>(dst + bytes - 64, src + bytes - 64);
  } else if (bytes >= 32) {
    copy_piece<32>(dst, src), copy_piece<32>(dst + bytes - 32, src + bytes - 32);
  } else if (bytes >= 16) {
    copy_piece<16>(dst, src), copy_piece<16>(dst + bytes - 16, src + bytes - 16);
  } else if (bytes >= 8) {
    copy_piece<8>(dst, src), copy_piece<8>(dst + bytes - 8, src + bytes - 8);
  } else if (bytes >= 4) {
    copy_piece<4>(dst, src), copy_piece<4>(dst + bytes - 4, src + bytes - 4);
  } else {
    for (int64_t b = 0; b < bytes; ++b) dst[b] = src[b];
  }
}

// dst[0, n) = 0, inline, in the same pieces as copy_values (short runs of zeros, a padded row's
// edge columns, would otherwise each be a call to memset).
template <int kBytes>
inline void zero_piece(char* dst) {
  char piece[kBytes] = {};
  std::memcpy(dst, piece, kBytes);
}
template <typename T>
inline void zero_values(T* dst_, int64_t n) {
  char* dst = reinterpret_cast<char*>(dst_);
  const int64_t bytes = n * int64_t(sizeof(T));
  if (bytes >= 64) {
    int64_t b = 0;
    for (; b + 64 <= bytes; b += 64) zero_piece<64>(dst + b);
    if (b < bytes) zero_piece<64>(dst + bytes - 64);
  } else if (bytes >= 32) {
    zero_piece<32>(dst), zero_piece<32>(dst + bytes - 32);
  } else if (bytes >= 16) {
    zero_piece<16>(dst), zero_piece<16>(dst + bytes - 16);
  } else if (bytes >= 8) {
    zero_piece<8>(dst), zero_piece<8>(dst + bytes - 8);
  } else if (bytes >= 4) {
    zero_piece<4>(dst), zero_piece<4>(dst + bytes - 4);
  } else {
    for (int64_t b = 0; b < bytes; ++b) dst[b] = 0;
  }
}

// Grain size for at::parallel_for over items of about `work` elementary steps each: ranges with
// less than ~32K steps in total run on the calling thread (waking threads costs more).
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, int64_t(32768) / std::max<int64_t>(1, work));
}

// Scratch memory of n values, not initialised (std::vector would zero it first: 3-4% of a batch-1
// 3×3 layer's forward went to zeroing column buffers that the unrolling then overwrote), starting on
// a cache line (packed GEMM panels: no vector load straddles two). From a stack per thread that keeps
// its memory between calls (ops.cpp): from malloc, the buffers that each thread freed stayed resident
// in its heap, and the backward's came on top of the forward's (128→128 3×3 at 28×28, batch 1, two
// threads: peak memory of a forward+backward 1.34× native's); unmapped after every call, their pages
// were faulted in anew by the next (the same layer took 1.37× as long).
void* scratch_alloc(size_t bytes);
void scratch_free(void* p, size_t bytes);

template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : bytes_(n > 0 ? size_t(n) * sizeof(T) : 0), values_(static_cast<T*>(bytes_ ? scratch_alloc(bytes_) : nullptr)) {}
  ~Scratch() { scratch_free(values_, bytes_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() { return values_; }

 private:
  size_t bytes_;
  T* values_;
};

// Half types are computed in float: the kernels see float or double only.
inline bool is_reduced_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}
inline at::ScalarType compute_type(at::ScalarType t) {
  return is_reduced_float(t) ? at::kFloat : t;
}

void check_floating_cpu(const at::Tensor& t, const char* op, const char* name);

// at::empty(sizes, options), with results over 32 MiB asked for as transparent huge pages (Linux,
// madvise): a fresh result that large is mostly page faults on first touch, 4 KiB at a time,
// unless the kernel backs it with 2 MiB pages. Only the whole 2 MiB pages inside the tensor's own
// memory are advised; nothing else changes (sizes, strides, allocator, freeing).
at::Tensor empty_result(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace cnnbp
