// Row-major matrix products for the convolution: C[M×N] = op(A) · op(B) (+ C).
//
// On CPUs with AVX-512 this is the project's own blocked GEMM (packed panels and a register-tiled
// micro-kernel, gemm.cpp); elsewhere, or with CNNBP_SIMD below avx512, it goes through ATen's BLAS
// (at::mm_out / at::addmm_out on views of the same buffers).
#pragma once

#include <cstdint>

namespace cnnbp {

// op(A) is M×K: A[i·lda + k], or A[k·lda + i] when trans_a. op(B) is K×N likewise.
// accumulate: C += op(A)·op(B), else C = op(A)·op(B). Splits over column blocks of C with
// at::parallel_for when called outside a parallel region (each thread writes its own columns).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
          int64_t ldb, bool accumulate, T* C, int64_t ldc);

}  // namespace cnnbp
