"""A plain NumPy reference: the equations of convolution and max-pool backpropagation as loops.

Nothing here is fast; everything is meant to be read next to the equations. It is the third oracle
in the tests (beside PyTorch's own autograd and finite differences), on small sizes.

Notation: o is a layer's input, w its kernel, b its bias, x its output (pre-activation),
δ = ∂E/∂x the gradient that arrives from the layer above. Arrays are (N, C, H, W); the kernel is
(K, C / groups, KH, KW). padding is (top, bottom, left, right); stride and dilation are pairs.
"""
from __future__ import annotations

import numpy as np


def _tap(n_out_pos, m, stride, dilation, pad_begin):
    """Input coordinate read by output position i at kernel tap m: i·s + m·d − p."""
    return n_out_pos * stride + m * dilation - pad_begin


def conv2d_output_shape(o_shape, w_shape, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    N, _, H, W = o_shape
    K, _, KH, KW = w_shape
    OH = (H + padding[0] + padding[1] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + padding[2] + padding[3] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return N, K, OH, OW


def conv2d_forward(o, w, b=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """x[n,k,i,j] = b[k] + Σ_c Σ_m Σ_q w[k,c,m,q] · o[n, c, i·sh + m·dh − pt, j·sw + q·dw − pl]

    (c runs over the input channels of k's group; o is zero outside the image)."""
    N, K, OH, OW = conv2d_output_shape(o.shape, w.shape, stride, padding, dilation)
    _, C, H, W = o.shape
    Cg, Kg = C // groups, K // groups
    _, _, KH, KW = w.shape
    x = np.zeros((N, K, OH, OW), dtype=np.result_type(o, w))
    for n in range(N):
        for k in range(K):
            c0 = (k // Kg) * Cg  # first input channel of k's group
            for i in range(OH):
                for j in range(OW):
                    acc = 0.0 if b is None else b[k]
                    for c in range(Cg):
                        for m in range(KH):
                            h = _tap(i, m, stride[0], dilation[0], padding[0])
                            if not 0 <= h < H:
                                continue
                            for q in range(KW):
                                v = _tap(j, q, stride[1], dilation[1], padding[2])
                                if 0 <= v < W:
                                    acc += w[k, c, m, q] * o[n, c0 + c, h, v]
                    x[n, k, i, j] = acc
    return x


def conv2d_grad_weight(o, delta, w_shape, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """∂E/∂w[k,c,m,q] = Σ_n Σ_i Σ_j δ[n,k,i,j] · o[n, c, i·sh + m·dh − pt, j·sw + q·dw − pl]

    The correlation of the layer input with δ, summed over the batch."""
    K, Cg, KH, KW = w_shape
    N, _, H, W = o.shape
    _, _, OH, OW = delta.shape
    Kg = K // groups
    gw = np.zeros(w_shape, dtype=np.result_type(o, delta))
    for k in range(K):
        c0 = (k // Kg) * Cg
        for c in range(Cg):
            for m in range(KH):
                for q in range(KW):
                    acc = 0.0
                    for n in range(N):
                        for i in range(OH):
                            h = _tap(i, m, stride[0], dilation[0], padding[0])
                            if not 0 <= h < H:
                                continue
                            for j in range(OW):
                                v = _tap(j, q, stride[1], dilation[1], padding[2])
                                if 0 <= v < W:
                                    acc += delta[n, k, i, j] * o[n, c0 + c, h, v]
                    gw[k, c, m, q] = acc
    return gw


def conv2d_grad_input(delta, w, o_shape, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """The delta of the input layer: ∂E/∂o[n,c,h,v] = Σ δ[n,k,i,j] · w[k,c',m,q] over every
    (k, i, j, m, q) whose tap read o[n,c,h,v], i.e. h = i·sh + m·dh − pt and v = j·sw + q·dw − pl.

    Written as the scatter it is: each δ[n,k,i,j] is sent back through the kernel to the inputs
    that produced x[n,k,i,j]. See conv2d_grad_input_full_conv for the stride-1 picture."""
    N, C, H, W = o_shape
    K, Cg, KH, KW = w.shape
    _, _, OH, OW = delta.shape
    Kg = K // groups
    go = np.zeros(o_shape, dtype=np.result_type(delta, w))
    for n in range(N):
        for k in range(K):
            c0 = (k // Kg) * Cg
            for i in range(OH):
                for j in range(OW):
                    for c in range(Cg):
                        for m in range(KH):
                            h = _tap(i, m, stride[0], dilation[0], padding[0])
                            if not 0 <= h < H:
                                continue
                            for q in range(KW):
                                v = _tap(j, q, stride[1], dilation[1], padding[2])
                                if 0 <= v < W:
                                    go[n, c0 + c, h, v] += delta[n, k, i, j] * w[k, c, m, q]
    return go


def conv2d_grad_input_full_conv(delta, w):
    """The same delta for stride 1, no padding, no dilation, one group, as a *full* convolution:
    pad δ by KH−1 / KW−1 on every side and correlate it with the kernel rotated by 180°,

        ∂E/∂o[n,c,h,v] = Σ_k Σ_m Σ_q δ_padded[n, k, h + m, v + q] · rot180(w)[k, c, m, q].
    """
    N, K, OH, OW = delta.shape
    _, C, KH, KW = w.shape
    padded = np.zeros((N, K, OH + 2 * (KH - 1), OW + 2 * (KW - 1)), dtype=delta.dtype)
    padded[:, :, KH - 1:KH - 1 + OH, KW - 1:KW - 1 + OW] = delta
    rot = w[:, :, ::-1, ::-1]
    H, W = OH + KH - 1, OW + KW - 1
    go = np.zeros((N, C, H, W), dtype=np.result_type(delta, w))
    for n in range(N):
        for c in range(C):
            for h in range(H):
                for v in range(W):
                    go[n, c, h, v] = np.sum(padded[n, :, h:h + KH, v:v + KW] * rot[:, c])
    return go


def conv2d_grad_bias(delta):
    """∂E/∂b[k] = Σ_n Σ_i Σ_j δ[n,k,i,j]"""
    N, K, OH, OW = delta.shape
    gb = np.zeros(K, dtype=delta.dtype)
    for k in range(K):
        for n in range(N):
            for i in range(OH):
                for j in range(OW):
                    gb[k] += delta[n, k, i, j]
    return gb


def max_pool2d_forward(o, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    """x[n,c,i,j] = the largest o[n,c,h,v] in window (i, j), and its flat index h·W + v.

    Windows are scanned row by row; a later value wins only if strictly larger (so ties keep the
    first), except that a NaN always wins (so NaN propagates). Padding never wins."""
    N, C, H, W = o.shape

    def out_len(n_in, k, p, s, d):
        n = (n_in + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (n - 1) * s >= n_in + p:
            n -= 1
        return n

    OH = out_len(H, kernel_size[0], padding[0], stride[0], dilation[0])
    OW = out_len(W, kernel_size[1], padding[1], stride[1], dilation[1])
    x = np.empty((N, C, OH, OW), dtype=o.dtype)
    idx = np.empty((N, C, OH, OW), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    best, best_at = -np.inf, None
                    for m in range(kernel_size[0]):
                        h = i * stride[0] + m * dilation[0] - padding[0]
                        for q in range(kernel_size[1]):
                            v = j * stride[1] + q * dilation[1] - padding[1]
                            if not (0 <= h < H and 0 <= v < W):
                                continue  # padding is never a candidate
                            if best_at is None:
                                best_at = h * W + v  # an all -inf window reports its first tap
                            val = o[n, c, h, v]
                            if val > best or np.isnan(val):
                                best, best_at = val, h * W + v
                    x[n, c, i, j] = best
                    idx[n, c, i, j] = best_at
    return x, idx


def max_pool2d_backward(delta, indices, o_shape):
    """∂E/∂o[n,c,h,v] = Σ δ[n,c,i,j] over the windows (i, j) whose maximum was o[n,c,h,v].

    Only the winner of a window receives its gradient; an input that wins several overlapping
    windows receives the sum."""
    N, C, H, W = o_shape
    go = np.zeros(o_shape, dtype=delta.dtype)
    flat = go.reshape(N, C, H * W)
    for n in range(N):
        for c in range(C):
            for i in range(delta.shape[2]):
                for j in range(delta.shape[3]):
                    flat[n, c, indices[n, c, i, j]] += delta[n, c, i, j]
    return go
