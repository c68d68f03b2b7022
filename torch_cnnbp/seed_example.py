"""The worked example this project grew from: a 5×5 input o, a 2×2 kernel, a 4×4 output whose
gradient δ is given, and the gradients that backpropagation produces from them.

o and δ are the example's own numbers, and so is ∂E/∂w. The example does not list its whole kernel
(only w[0,0] = −0.13, with x[0,0] = 0.25); KERNEL below is our choice, consistent with both
(x[0,0] = 0.2491), and is what the input delta ∂E/∂o is computed with.
"""
import numpy as np

INPUT = np.array([
    [0.51, 0.90, 0.88, 0.84, 0.05],
    [0.40, 0.62, 0.22, 0.59, 0.10],
    [0.11, 0.20, 0.74, 0.33, 0.14],
    [0.47, 0.01, 0.85, 0.70, 0.09],
    [0.76, 0.19, 0.72, 0.17, 0.57],
])

DELTA = np.array([
    [0.0, 0.0, 0.0686, 0.0],
    [0.0, 0.0364, 0.0, 0.0],
    [0.0, 0.0467, 0.0, 0.0],
    [0.0, 0.0, 0.0, -0.0681],
])

# ∂E/∂w as the example states it: Σ_i Σ_j δ[i,j] · o[i+m, j+q].
GRAD_WEIGHT = np.array([
    [0.044606, 0.094061],
    [0.011262, 0.068288],
])

KERNEL = np.array([
    [-0.13, 0.15],
    [-0.51, 0.62],
])

# ∂E/∂o for KERNEL: δ padded by one on every side, correlated with the kernel rotated by 180°
# (the full convolution of δ with the kernel), written out to six decimals; the tests check
# it against the C++ backward op, the NumPy reference and PyTorch.
GRAD_INPUT = np.array([
    [0.0, 0.0, -0.008918, 0.01029, 0.0],
    [0.0, -0.004732, -0.029526, 0.042532, 0.0],
    [0.0, -0.024635, 0.029573, 0.0, 0.0],
    [0.0, -0.023817, 0.028954, 0.008853, -0.010215],
    [0.0, 0.0, 0.0, 0.034731, -0.042222],
])


def as_tensors(dtype=None):
    """(o, δ, w) as (1, 1, H, W) tensors."""
    import torch

    dtype = dtype or torch.float64
    t = lambda a: torch.tensor(a, dtype=dtype).reshape(1, 1, *a.shape)  # noqa: E731
    return t(INPUT), t(DELTA), t(KERNEL)
