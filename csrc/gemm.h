// Row-major matrix products for the convolution: C[M×N] = op(A) · op(B) (+ C).
//
// Two backends, chosen once per process (gemm_backend()):
// - "own": the project's blocked GEMM (packed panels and a register-tiled micro-kernel for AVX-512
//   or AVX2+FMA, gemm.cpp). The default on AVX-512 CPUs not made by Intel, where MKL (behind ATen's
//   BLAS) takes a slow generic path: about 100 GFLOP/s per core against ~180 for this kernel on a
//   Zen 5 core.
// - "blas": ATen's BLAS (at::mm_out / at::addmm_out on views of the same buffers). The default on
//   Intel CPUs, where MKL's own kernels are faster than ours (about 175 against 100-145 GFLOP/s per
//   core on a Xeon with AVX-512), on AVX2 CPUs (on a Zen 3, MKL's AVX2 path beat the own AVX2
//   kernel by 5-10% on most of the benchmark's conv layers, and by more on thin products), and
//   without AVX2 or with CNNBP_SIMD=portable.
// CNNBP_GEMM=own|blas overrides the default (own needs AVX2 at least); it is read once, at first use.
#pragma once

#include <cstdint>
#include <vector>

namespace cnnbp {

// "own" or "blas": the backend this process uses.
const char* gemm_backend();

// op(A) is M×K: A[i·lda + k], or A[k·lda + i] when trans_a. op(B) is K×N likewise.
// accumulate: C += op(A)·op(B), else C = op(A)·op(B). Splits over column blocks of C with
// at::parallel_for when called outside a parallel region (each thread writes its own columns).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
          int64_t ldb, bool accumulate, T* C, int64_t ldc);

// op(A) packed once for several products that use it (the weight of a convolution, for every slab
// of a batch): pack() lays it out as the own backend's GEMM packs it for each product, panels of its
// tile's rows over all of K, and returns true; with the BLAS backend (or an empty A) it keeps nothing
// and returns false. gemm(k0, kc, …): C (+)= op(A)[:, k0 … k0 + kc) · B, B (kc × N, B[k·ldb + j])
// not transposed, threaded as gemm() is.
template <typename T>
struct PackedA {
  bool pack(bool trans_a, int64_t M, int64_t K, const T* A, int64_t lda);
  bool empty() const { return panels.empty(); }
  void gemm(int64_t k0, int64_t kc, int64_t N, const T* B, int64_t ldb, bool accumulate, T* C, int64_t ldc) const;

  std::vector<T> panels;
  int64_t M = 0, K = 0;
};

// Z = X · Y for ∂E/∂W (col · δᵀ) with both operands read in place: X is M×K (X[i·ldx + k]), Y is K×N
// (Y[k·ldy + j]) with N ≤ kThinMax. Into C as Z (C[i·ldc + j]), or turned (C[j·ldc + i]); accumulate
// adds to C. Only with the own backend (thin_products()); split over rows of Z like gemm().
constexpr int64_t kThinMax = 128;
bool thin_products();
template <typename T>
void gemm_thin(int64_t M, int64_t N, int64_t K, const T* X, int64_t ldx, const T* Y, int64_t ldy, bool accumulate,
               T* C, int64_t ldc, bool turned);

}  // namespace cnnbp
