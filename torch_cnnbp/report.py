"""The verification report (`python -m torch_cnnbp`).

For each configuration of a built-in matrix it runs this project's op and PyTorch's on the same
float64 inputs, prints the largest difference of the output and of every gradient, runs gradcheck
and gradgradcheck, and finally walks through the seed's worked example and a small max-pool example.
Exits non-zero if anything fails.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import torch_cnnbp
from torch_cnnbp import seed_example

# (label, input shape, weight shape, with bias, kwargs)
CONV_CASES = [
    ("3x3", (2, 3, 7, 7), (4, 3, 3, 3), True, dict()),
    ("3x3 stride 2 pad 1", (2, 3, 8, 7), (4, 3, 3, 3), True, dict(stride=2, padding=1)),
    ("5x3 stride (2,1) pad (2,1)", (2, 2, 9, 6), (3, 2, 5, 3), False, dict(stride=(2, 1), padding=(2, 1))),
    ("3x3 dilation 2 'same'", (1, 2, 8, 8), (3, 2, 3, 3), True, dict(padding="same", dilation=2)),
    ("4x4 'same' (asymmetric)", (2, 2, 7, 6), (2, 2, 4, 4), True, dict(padding="same")),
    ("groups 2", (2, 4, 6, 6), (6, 2, 3, 3), True, dict(groups=2, padding=1)),
    ("depthwise", (2, 4, 6, 6), (4, 1, 3, 3), False, dict(groups=4, padding=1)),
    ("1x1", (2, 5, 4, 4), (3, 5, 1, 1), True, dict()),
    ("1x1 stride 2", (2, 5, 5, 5), (3, 5, 1, 1), False, dict(stride=2)),
    ("unbatched", (3, 6, 6), (2, 3, 3, 3), True, dict(padding="valid")),
    ("empty batch", (0, 3, 6, 6), (2, 3, 3, 3), True, dict()),
]

# (label, input shape, kwargs)
POOL_CASES = [
    ("2x2", (2, 3, 8, 8), dict(kernel_size=2)),
    ("3x3 stride 2 pad 1", (2, 3, 9, 9), dict(kernel_size=3, stride=2, padding=1)),
    ("3x3 stride 1 (overlap)", (2, 2, 6, 7), dict(kernel_size=3, stride=1)),
    ("(2,3) dilation 2", (1, 2, 9, 10), dict(kernel_size=(2, 3), dilation=2, stride=(1, 2))),
    ("2x2 ceil_mode", (2, 2, 5, 7), dict(kernel_size=2, ceil_mode=True)),
    ("3x3 s2 p1 ceil_mode", (1, 2, 6, 6), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("unbatched", (3, 6, 6), dict(kernel_size=2)),
    ("empty batch", (0, 3, 6, 6), dict(kernel_size=2)),
]

TOL = 1e-10


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _max_diffs(ours, native, inputs):
    """Largest |ours − native| for the output and each input's gradient, same inputs and δ."""
    a, b = [_leaf(t) for t in inputs], [_leaf(t) for t in inputs]
    ya, yb = ours(*a), native(*b)
    delta = torch.randn_like(yb)
    live = [i for i, t in enumerate(inputs) if t is not None]
    ga = torch.autograd.grad(ya, [a[i] for i in live], delta) if ya.numel() else [torch.zeros_like(a[i]) for i in live]
    gb = torch.autograd.grad(yb, [b[i] for i in live], delta) if yb.numel() else [torch.zeros_like(b[i]) for i in live]
    diffs = [(ya - yb).abs().max().item() if ya.numel() else 0.0]
    grads = [None] * len(inputs)
    for i, x, y in zip(live, ga, gb):
        grads[i] = (x - y).abs().max().item() if x.numel() else 0.0
    return diffs + grads


def _fmt(v):
    return "   -    " if v is None else f"{v:8.1e}"


def _checks(fn, inputs):
    args = tuple(_leaf(t) for t in inputs if t is not None)
    if args[0].numel() == 0:
        return "skip", "skip"
    ok1 = torch.autograd.gradcheck(fn, args, raise_exception=False)
    ok2 = torch.autograd.gradgradcheck(fn, args, raise_exception=False)
    return ("ok" if ok1 else "FAIL"), ("ok" if ok2 else "FAIL")


def conv_table(out):
    print("conv2d (float64): largest |ours - native| and finite-difference checks", file=out)
    print(f"  {'case':30s} {'output':>8s} {'d input':>8s} {'d weight':>8s} {'d bias':>8s}  gradcheck gradgradcheck", file=out)
    failures = 0
    for label, xs, ws, has_bias, kw in CONV_CASES:
        x = torch.randn(xs, dtype=torch.float64)
        w = torch.randn(ws, dtype=torch.float64)
        b = torch.randn(ws[0], dtype=torch.float64) if has_bias else None
        diffs = _max_diffs(lambda x, w, b: torch_cnnbp.conv2d(x, w, b, **kw),
                           lambda x, w, b: F.conv2d(x, w, b, **kw), (x, w, b))
        fn = (lambda x, w, b: torch_cnnbp.conv2d(x, w, b, **kw)) if has_bias else (lambda x, w: torch_cnnbp.conv2d(x, w, **kw))
        gc, ggc = _checks(fn, (x, w, b))
        bad = any(d is not None and d > TOL for d in diffs) or "FAIL" in (gc, ggc)
        failures += bad
        print(f"  {label:30s} " + " ".join(_fmt(d) for d in diffs) + f"  {gc:9s} {ggc:13s}{'  <-- FAIL' if bad else ''}", file=out)
    return failures, len(CONV_CASES)


def pool_table(out):
    print("\nmax_pool2d (float64): largest |ours - native|, indices equal, finite-difference checks", file=out)
    print(f"  {'case':30s} {'output':>8s} {'d input':>8s}  indices  gradcheck gradgradcheck", file=out)
    failures = 0
    for label, xs, kw in POOL_CASES:
        # distinct values: no ties, so the max is differentiable and gradcheck is meaningful
        n = int(np.prod(xs))
        x = (torch.randperm(n, dtype=torch.float64) / max(n, 1)).reshape(xs)
        diffs = _max_diffs(lambda x: torch_cnnbp.max_pool2d(x, **kw), lambda x: F.max_pool2d(x, **kw), (x,))
        same_idx = torch.equal(torch_cnnbp.max_pool2d(x, **kw, return_indices=True)[1],
                               F.max_pool2d(x, **kw, return_indices=True)[1])
        gc, ggc = _checks(lambda x: torch_cnnbp.max_pool2d(x, **kw), (x,))
        bad = any(d > TOL for d in diffs) or not same_idx or "FAIL" in (gc, ggc)
        failures += bad
        print(f"  {label:30s} " + " ".join(_fmt(d) for d in diffs)
              + f"  {'equal' if same_idx else 'DIFFER':7s}  {gc:9s} {ggc:13s}{'  <-- FAIL' if bad else ''}", file=out)
    return failures, len(POOL_CASES)


def _matrix(a, indent="    "):
    return "\n".join(indent + " ".join(f"{v:9.6f}" for v in row) for row in np.asarray(a))


def seed_walkthrough(out):
    o, delta, w = seed_example.as_tensors()
    x = torch_cnnbp.conv2d(o, w)
    gi, gw, gb = torch.ops.cnnbp.conv2d_backward(delta, o, w, [1, 1], [0, 0, 0, 0], [1, 1], 1, [True, True, True])
    print("\nThe seed's worked example: a 5x5 input o, a 2x2 kernel w, a 4x4 output x = o ⋆ w", file=out)
    print("  o (layer input):\n" + _matrix(o[0, 0]), file=out)
    print("  w (kernel; the example gives w[0,0] = -0.13 and x[0,0] = 0.25, the rest is our choice):\n" + _matrix(w[0, 0]), file=out)
    print("  x[i,j] = Σ_m Σ_q w[m,q] · o[i+m, j+q]   (forward, C++):\n" + _matrix(x[0, 0]), file=out)
    print("  δ = ∂E/∂x (given by the example):\n" + _matrix(delta[0, 0]), file=out)
    print("  ∂E/∂w[m,q] = Σ_i Σ_j δ[i,j] · o[i+m, j+q]   (C++ backward):\n" + _matrix(gw[0, 0]), file=out)
    ok_w = np.allclose(gw[0, 0].numpy(), seed_example.GRAD_WEIGHT, atol=1e-6)
    print(f"    the example's answer {seed_example.GRAD_WEIGHT.tolist()}: {'reproduced' if ok_w else 'NOT reproduced'}", file=out)
    print("  ∂E/∂o, the delta for the input layer: δ padded by 1 and correlated with w rotated by 180°\n"
          "  (every δ[i,j] sent back through the kernel to the four inputs that made x[i,j]):\n" + _matrix(gi[0, 0]), file=out)
    ok_i = np.allclose(gi[0, 0].numpy(), seed_example.GRAD_INPUT, atol=1e-6)
    ref = torch_cnnbp.reference.conv2d_grad_input_full_conv(delta.numpy(), w.numpy())
    ok_r = np.allclose(gi.numpy(), ref, atol=1e-12)
    print(f"    equals the stated values: {'yes' if ok_i else 'NO'}; equals the NumPy full convolution: {'yes' if ok_r else 'NO'}", file=out)
    print(f"  ∂E/∂b = Σ δ = {gb.item():.6f}", file=out)
    return int(not (ok_w and ok_i and ok_r))


def pool_walkthrough(out):
    o = torch.tensor([[1., 5., 2., 0.],
                      [3., 4., 6., 1.],
                      [7., 0., 2., 8.],
                      [1., 9., 3., 3.]], dtype=torch.float64).reshape(1, 1, 4, 4)
    delta = torch.tensor([[0.1, 0.2, 0.3],
                          [0.4, 0.5, 0.6],
                          [0.7, 0.8, 0.9]], dtype=torch.float64).reshape(1, 1, 3, 3)
    x, idx = torch.ops.cnnbp.max_pool2d(o, [2, 2], [1, 1], [0, 0], [1, 1], False)
    gi = torch.ops.cnnbp.max_pool2d_backward(delta, idx, list(o.shape))
    print("\nA max-pool example: 2x2 windows with stride 1 on a 4x4 input, so windows overlap", file=out)
    print("  o:\n" + _matrix(o[0, 0]), file=out)
    print("  x = window maxima:\n" + _matrix(x[0, 0]), file=out)
    print("  winners (flat index h*4 + w, and position):", file=out)
    for i in range(3):
        print("    " + "  ".join(f"{int(v):2d}=({int(v) // 4},{int(v) % 4})" for v in idx[0, 0, i]), file=out)
    print("  δ = ∂E/∂x:\n" + _matrix(delta[0, 0]), file=out)
    print("  ∂E/∂o: each δ goes to its window's winner only; an input that won several windows\n"
          "  receives the sum (e.g. 9 at (3,1) won two windows: 0.7 + 0.8):\n" + _matrix(gi[0, 0]), file=out)
    native = F.max_pool2d(o.requires_grad_(), 2, 1)
    (gn,) = torch.autograd.grad(native, o, delta)
    ok = torch.equal(gi, gn)
    print(f"    equals PyTorch's max_pool2d gradient: {'yes' if ok else 'NO'}", file=out)
    return int(not ok)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m torch_cnnbp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="random seed for the test inputs")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    # PyTorch warns that its own 'same' padding with an even kernel copies the input; not ours to report.
    warnings.filterwarnings("ignore", message="Using padding='same'")
    out = sys.stdout
    start = time.perf_counter()
    print(f"torch_cnnbp verification report (torch {torch.__version__}, {torch.get_num_threads()} threads)\n", file=out)
    f1, n1 = conv_table(out)
    f2, n2 = pool_table(out)
    f3 = seed_walkthrough(out)
    f4 = pool_walkthrough(out)
    failed = f1 + f2 + f3 + f4
    total = n1 + n2 + 2
    print(f"\n{total - failed} passed, {failed} failed "
          f"({n1} conv2d and {n2} max_pool2d configurations, 2 worked examples; tolerance {TOL:g}) "
          f"in {time.perf_counter() - start:.1f} s", file=out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
