"""torch_cnnbp.conv2d and the cnnbp::conv2d / cnnbp::conv2d_backward ops.

Oracles: PyTorch's own conv2d and its autograd (through the shared harness in helpers.py), finite
differences (gradcheck / gradgradcheck), the NumPy reference, and the seed example's numbers.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import torch_cnnbp
from torch_cnnbp import reference, seed_example

from helpers import (
    DTYPES,
    assert_close,
    compare_with_native,
    conv2d_pair,
    leaves,
    no_native_kernels_ran,
    single_thread,
)

ops = torch.ops.cnnbp

# Native warns that 'same' with an even kernel may copy the input; that is native's business.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randn(*shape, dtype=torch.float64):
    """Normal values drawn in float64, then rounded once to `dtype` (both frameworks see the same)."""
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


# ---- the comparison matrix --------------------------------------------------------------------

# (id, input shape, weight shape, with bias, keyword arguments). Every option appears with several
# others: stride 1 / 2 / (2,3); padding 0 / 1 / (2,1) / 'same' (odd, even = asymmetric, dilated) /
# 'valid'; dilation 1 / 2 / (1,3); groups 1 / several / depthwise / depthwise with a channel
# multiplier; bias or not; batch 0 / 1 / N; unbatched; non-square kernels and images.
CASES = [
    ("plain", (2, 3, 7, 8), (4, 3, 3, 3), True, {}),
    ("stride2_pad1", (3, 3, 9, 8), (4, 3, 3, 3), True, dict(stride=2, padding=1)),
    ("stride23_pad21_nobias", (1, 2, 9, 11), (3, 2, 3, 2), False, dict(stride=(2, 3), padding=(2, 1))),
    ("dil2_pad2", (2, 3, 9, 8), (2, 3, 3, 3), True, dict(dilation=2, padding=2)),
    ("dil13_stride2_nobias", (3, 2, 8, 10), (4, 2, 2, 3), False, dict(dilation=(1, 3), stride=2)),
    ("groups2_pad1", (2, 4, 6, 7), (6, 2, 3, 3), True, dict(groups=2, padding=1)),
    ("groups3_stride23_dil13", (2, 6, 10, 9), (3, 2, 2, 3), True,
     dict(groups=3, stride=(2, 3), dilation=(1, 3), padding=(2, 1))),
    ("depthwise", (2, 4, 6, 6), (4, 1, 3, 3), True, dict(groups=4, padding=1)),
    ("depthwise_mult2_dil2_nobias", (2, 3, 9, 6), (6, 1, 3, 2), False, dict(groups=3, stride=2, dilation=2)),
    ("same_odd", (2, 3, 6, 7), (4, 3, 3, 3), True, dict(padding="same")),
    ("same_even_asym_nobias", (2, 3, 6, 7), (4, 3, 2, 4), False, dict(padding="same")),
    ("same_even_dil2", (1, 2, 7, 6), (3, 2, 2, 2), True, dict(padding="same", dilation=2)),
    ("same_dil23_asym", (2, 2, 7, 8), (3, 2, 3, 2), True, dict(padding="same", dilation=(2, 3))),
    ("same_groups2_even", (2, 4, 5, 6), (4, 2, 4, 3), True, dict(padding="same", groups=2)),
    ("same_depthwise_mult", (1, 2, 5, 5), (4, 1, 2, 2), False, dict(padding="same", groups=2, dilation=(1, 3))),
    ("valid_stride2", (2, 3, 5, 6), (2, 3, 3, 3), True, dict(padding="valid", stride=2)),
    ("valid_groups2_dil2", (1, 4, 8, 7), (2, 2, 3, 2), False, dict(padding="valid", groups=2, dilation=2)),
    ("batch0", (0, 3, 5, 5), (4, 3, 3, 3), True, dict(padding=1)),
    ("batch0_groups_stride", (0, 4, 6, 5), (2, 2, 2, 3), False, dict(groups=2, stride=(2, 3))),
    ("batch1_stride23", (1, 3, 8, 9), (2, 3, 3, 2), True, dict(stride=(2, 3))),
    ("batch5_groups2", (5, 2, 5, 6), (4, 1, 3, 3), True, dict(groups=2, padding=(2, 1))),
    ("unbatched", (3, 6, 5), (4, 3, 3, 2), True, dict(stride=(2, 3), padding=1)),
    ("unbatched_depthwise_same", (4, 6, 6), (4, 1, 2, 2), False, dict(groups=4, padding="same")),
    ("unbatched_dil2_nobias", (2, 7, 8), (3, 2, 2, 3), False, dict(dilation=2)),
    ("pointwise", (2, 4, 5, 5), (3, 4, 1, 1), True, {}),
    ("pointwise_groups_stride2", (2, 4, 5, 6), (4, 2, 1, 1), False, dict(groups=2, stride=2)),
    ("pointwise_pad1", (1, 3, 4, 4), (2, 3, 1, 1), True, dict(padding=1)),
    ("kernel_is_image", (2, 2, 4, 5), (3, 2, 4, 5), True, {}),
    ("kernel_fills_padded", (2, 2, 3, 2), (3, 2, 5, 4), True, dict(padding=1)),
    ("stride_beyond_kernel", (2, 2, 9, 10), (3, 2, 2, 2), True, dict(stride=(4, 3))),
]

LAYOUTS = ("contiguous", "channels_last", "non_contiguous")


def in_layout(t, layout):
    """Same values as t, laid out as `layout`. channels_last applies to 4-D tensors (an unbatched
    input stays as it is); non_contiguous gives 3-/4-D tensors transposed strides in their last two
    dims, or (for tensors with a size-1 dim there) a stride-2 slice, and the bias a stride-2 slice."""
    if t is None or layout == "contiguous":
        return t
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    if t.dim() >= 3 and min(t.shape[-2:]) > 1:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return torch.stack([t, t], -1).flatten(-2)[..., ::2]


def conv_inputs(case, dtype, layout="contiguous"):
    _, in_shape, w_shape, has_bias, _ = case
    x = in_layout(randn(*in_shape, dtype=dtype), layout)
    w = in_layout(randn(*w_shape, dtype=dtype), layout)
    b = in_layout(randn(w_shape[0], dtype=dtype), layout) if has_bias else None
    return x, w, b


def case_id(case):
    return case[0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_native(case, dtype, layout):
    """Forward and the gradients of input, weight and bias equal native conv2d's."""
    x, w, b = conv_inputs(case, dtype, layout)
    if layout == "channels_last":
        assert w.is_contiguous(memory_format=torch.channels_last)
        if x.dim() == 4:
            assert x.is_contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        assert not w.is_contiguous()
        assert x.numel() == 0 or not x.is_contiguous()  # an empty tensor always counts as contiguous
        assert b is None or not b.is_contiguous()
    ours, native = conv2d_pair(**case[4])
    inputs = (x, w) if b is None else (x, w, b)
    out = compare_with_native(ours, native, inputs, dtype=dtype, msg=f"{case[0]} {dtype} {layout}")[0]
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("which", [None, "output", "grad_input", "grad_weight"])
def test_half_precision_fallback_still_rejects_wrong_results(dtype, which):
    """The harness's float64 fallback (compare_with_native) accepts the correctly rounded result,
    not anything: one element of the output or of a gradient off by more than its tolerance fails
    against both references (which=None: the ops as they are pass)."""
    x, w = randn(2, 3, 7, 6, dtype=dtype), randn(4, 3, 3, 3, dtype=dtype)

    class Off(torch.autograd.Function):  # identity whose value or gradient is off in one element
        @staticmethod
        def forward(ctx, t):
            t = t.clone()
            if which == "output":
                t.view(-1)[3] += t.view(-1)[3].abs() + 1  # off by |t| + 1
            return t

        @staticmethod
        def backward(ctx, g):
            g = g.clone()
            if which != "output":
                g.view(-1)[3] += g.view(-1)[3].abs() + 1
            return g

    def ours(x, w):
        if which == "grad_input":
            x = Off.apply(x)
        if which == "grad_weight":
            w = Off.apply(w)
        out = torch_cnnbp.conv2d(x, w, padding=1)
        return Off.apply(out) if which == "output" else out

    native = conv2d_pair(padding=1)[1]
    if which is None:
        compare_with_native(ours, native, (x, w), msg="unchanged")
        return
    with pytest.raises(AssertionError, match="vs native in float64"):
        compare_with_native(ours, native, (x, w), msg=which)


def test_matrix_covers_every_option():
    """The matrix above really holds each option the suite claims to cover."""
    seen = {}
    for _, in_shape, w_shape, has_bias, kw in CASES:
        for key in ("stride", "padding", "dilation"):
            v = kw.get(key, 0 if key == "padding" else 1)
            seen.setdefault(key, set()).add(v if isinstance(v, (int, str)) else tuple(v))
        g = kw.get("groups", 1)
        c = in_shape[-3]
        seen.setdefault("groups", set()).add(
            "1" if g == 1 else "depthwise" if g == c == w_shape[0] else "depthwise_mult" if g == c else "several")
        seen.setdefault("bias", set()).add(has_bias)
        seen.setdefault("batch", set()).add("unbatched" if len(in_shape) == 3 else min(in_shape[0], 2))
        seen.setdefault("non_square", set()).add(w_shape[2] != w_shape[3] and in_shape[-2] != in_shape[-1])
    assert {1, 2, (2, 3)} <= seen["stride"]
    assert {0, 1, (2, 1), "same", "valid"} <= seen["padding"]
    assert {1, 2, (1, 3)} <= seen["dilation"]
    assert seen["groups"] == {"1", "several", "depthwise", "depthwise_mult"}
    assert seen["bias"] == {True, False}
    assert seen["batch"] == {0, 1, 2, "unbatched"}
    assert True in seen["non_square"]
    # 'same' with an even effective kernel extent (asymmetric padding), also with dilation.
    same_pads = [
        torch_cnnbp._args.conv2d_padding("same", w, (1, 1), torch_cnnbp._args.pair("", "", kw.get("dilation", 1)))
        for _, _, w, _, kw in CASES if kw.get("padding") == "same"
    ]
    assert any(p[0] != p[1] or p[2] != p[3] for p in same_pads)


def test_same_padding_is_asymmetric_like_native():
    """'same' with an even kernel extent pads one more at the bottom/right: equal to native on an
    input whose rows and columns all differ, and equal to an explicit (0, 1, 1, 2) padding."""
    x = randn(1, 1, 5, 6)
    w = randn(1, 1, 2, 4)
    ours = torch_cnnbp.conv2d(x, w, padding="same")
    assert ours.shape == x.shape
    assert_close(ours, F.conv2d(x, w, padding="same"))
    explicit = ops.conv2d(x, w, None, [1, 1], [0, 1, 1, 2], [1, 1], 1)
    assert_close(ours, explicit)
    # dilation (1, 3) with a 2-wide kernel: extent 3 along W, so 1 left and 2 right.
    ours = torch_cnnbp.conv2d(x, w[..., :2], padding="same", dilation=(1, 3))
    assert_close(ours, F.conv2d(x, w[..., :2], padding="same", dilation=(1, 3)))
    assert_close(ours, ops.conv2d(x, w[..., :2], None, [1, 1], [0, 1, 1, 2], [1, 3], 1))


def test_large_batch_weight_gradient_float32():
    """A batch large enough to be split over threads: the weight gradient (a sum over the batch)
    and the others equal native's. grad_scale widens atol for a sum of 8·6·6 terms."""
    x, w, b = randn(8, 3, 6, 6, dtype=torch.float32), randn(4, 3, 3, 3, dtype=torch.float32), randn(4, dtype=torch.float32)
    ours, native = conv2d_pair(padding=1)
    compare_with_native(ours, native, (x, w, b), grad_scale=4.0, msg="batch 8")


def test_deterministic():
    """Two runs give bitwise equal outputs and gradients (the batch split is fixed)."""
    x, w, b = randn(6, 4, 7, 7, dtype=torch.float32), randn(4, 2, 3, 3, dtype=torch.float32), randn(4, dtype=torch.float32)
    results = []
    for _ in range(2):
        xa, wa, ba = leaves(x, w, b)
        y = torch_cnnbp.conv2d(xa, wa, ba, padding=1, groups=2)
        grads = torch.autograd.grad(y, (xa, wa, ba), torch.ones_like(y))
        results.append((y, *grads))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


# ---- finite differences -----------------------------------------------------------------------

GRADCHECK_CASES = [
    ("stride21_pad1_bias", (2, 2, 5, 6), (3, 2, 3, 2), True, dict(stride=(2, 1), padding=1)),
    ("same_even_asym_nobias", (1, 2, 5, 6), (2, 2, 2, 4), False, dict(padding="same")),
    ("same_dil23_asym_bias", (2, 2, 5, 7), (2, 2, 2, 2), True, dict(padding="same", dilation=(2, 3))),
    ("groups2_stride2_dil2", (2, 4, 7, 7), (4, 2, 2, 3), True, dict(groups=2, stride=2, dilation=2, padding=(1, 2))),
    ("depthwise_mult_nobias", (1, 2, 5, 5), (4, 1, 3, 3), False, dict(groups=2, stride=(1, 2), padding=(0, 1))),
    ("unbatched_valid", (2, 5, 4), (3, 2, 2, 2), True, dict(padding="valid")),
    ("pointwise", (2, 3, 3, 4), (2, 3, 1, 1), True, {}),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=case_id)
def test_gradcheck_and_gradgradcheck(case):
    x, w, b = conv_inputs(case, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, w, b) if t is not None)
    kw = case[4]

    def fn(x, w, b=None):
        return torch_cnnbp.conv2d(x, w, b, **kw)

    with single_thread():
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_gradcheck_of_backward_function_with_partial_mask():
    """Double backward through Conv2dBackwardFunction when only some gradients were asked for."""
    x = randn(1, 2, 5, 5).requires_grad_()
    w = randn(3, 2, 3, 3).requires_grad_()
    go = randn(1, 3, 3, 3).requires_grad_()
    conv = ([1, 1], [0, 0, 0, 0], [1, 1], 1)
    for mask in ((True, False, False), (False, True, False), (False, True, True)):
        def fn(go, x, w, mask=mask):
            grads = torch_cnnbp.Conv2dBackwardFunction.apply(go, x, w, *conv, list(mask))
            return tuple(g for g, m in zip(grads, mask) if m)
        with single_thread():
            assert torch.autograd.gradcheck(fn, (go, x, w))


# ---- create_graph: second derivatives against native ------------------------------------------


def input_gradient(conv):
    """x, w, b -> ∂L/∂x with L = Σ tanh(conv(x, w, b)), kept differentiable (create_graph=True)."""
    def fn(x, w, b=None):
        y = conv(x, w, b)
        (gx,) = torch.autograd.grad(torch.tanh(y).sum(), x, create_graph=True)
        return gx
    return fn


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[10], CASES[12]], ids=case_id)
def test_second_derivatives_match_native(case, dtype):
    """The harness backpropagates a random gradient through ∂L/∂x: every second derivative equals native's."""
    x, w, b = conv_inputs(case, dtype)
    ours, native = conv2d_pair(**case[4])
    inputs = (x, w) if b is None else (x, w, b)
    compare_with_native(input_gradient(ours), input_gradient(native), inputs, dtype=dtype, msg=case[0])


@pytest.mark.parametrize("case", [CASES[0], CASES[7], CASES[13]], ids=case_id)
def test_gradient_penalty_matches_native(case):
    """A gradient penalty ‖∂L/∂x‖² differentiated w.r.t. the weights (and bias, input) equals native."""
    x, w, b = conv_inputs(case, torch.float64)
    results = []
    for conv in conv2d_pair(**case[4]):
        xa, wa, ba = leaves(x, w, b)
        penalty = input_gradient(conv)(xa, wa, ba).pow(2).sum()
        results.append((penalty, *torch.autograd.grad(penalty, (wa, ba, xa))))
    (p_ours, *g_ours), (p_native, *g_native) = results
    assert_close(p_ours, p_native, msg="penalty")
    assert g_native[0].abs().sum() > 0
    for name, a, e in zip(("weight", "bias", "input"), g_ours, g_native):
        assert_close(a, e, msg=f"penalty gradient w.r.t. {name}")


# ---- the NumPy reference against the C++ ops -------------------------------------------------

# (id, input shape, weight shape, stride, padding (top, bottom, left, right), dilation, groups)
REFERENCE_CASES = [
    ("plain", (2, 2, 5, 6), (3, 2, 3, 2), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    ("stride23_asym_pad", (1, 2, 7, 8), (2, 2, 3, 3), (2, 3), (1, 0, 2, 1), (1, 1), 1),
    ("dil21_groups2", (2, 4, 6, 5), (4, 2, 2, 3), (1, 1), (2, 2, 1, 1), (2, 1), 2),
    ("depthwise_mult_stride2_dil12", (1, 3, 6, 7), (6, 1, 3, 2), (2, 2), (1, 1, 1, 1), (1, 2), 3),
    ("same_like_even", (2, 1, 4, 5), (2, 1, 2, 2), (1, 1), (0, 1, 0, 1), (1, 1), 1),
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=case_id)
def test_ops_match_numpy_reference(case):
    _, in_shape, w_shape, stride, padding, dilation, groups = case
    x, w, b = randn(*in_shape), randn(*w_shape), randn(w_shape[0])
    conv = (list(stride), list(padding), list(dilation), groups)
    out = ops.conv2d(x, w, b, *conv)
    expected = reference.conv2d_forward(x.numpy(), w.numpy(), b.numpy(), stride, padding, dilation, groups)
    assert_close(out, torch.from_numpy(expected), msg="forward")
    # The same padding done by F.pad, then native: the (top, bottom, left, right) order is right.
    native = F.conv2d(F.pad(x, (padding[2], padding[3], padding[0], padding[1])), w, b,
                      stride=stride, dilation=dilation, groups=groups)
    assert_close(out, native, msg="forward vs F.pad + native")

    delta = randn(*out.shape)
    gi, gw, gb = ops.conv2d_backward(delta, x, w, *conv, [True, True, True])
    d = delta.numpy()
    assert_close(gi, torch.from_numpy(reference.conv2d_grad_input(d, w.numpy(), x.shape, stride, padding, dilation, groups)),
                 msg="grad_input")
    assert_close(gw, torch.from_numpy(reference.conv2d_grad_weight(x.numpy(), d, w.shape, stride, padding, dilation, groups)),
                 msg="grad_weight")
    assert_close(gb, torch.from_numpy(reference.conv2d_grad_bias(d)), msg="grad_bias")


def test_grad_input_is_full_convolution_with_rotated_kernel():
    """Stride 1, no padding: the input delta is the full convolution of δ with the 180°-rotated kernel."""
    x, w = randn(2, 3, 6, 5), randn(4, 3, 3, 2)
    out = ops.conv2d(x, w, None, [1, 1], [0, 0, 0, 0], [1, 1], 1)
    delta = randn(*out.shape)
    gi = ops.conv2d_backward(delta, x, w, [1, 1], [0, 0, 0, 0], [1, 1], 1, [True, False, False])[0]
    assert_close(gi, torch.from_numpy(reference.conv2d_grad_input_full_conv(delta.numpy(), w.numpy())))


# ---- the seed example --------------------------------------------------------------------------


def test_seed_example():
    """o and δ through cnnbp::conv2d_backward give the example's ∂E/∂w and, with KERNEL, its ∂E/∂o
    (both stated to six decimals); native autograd and the NumPy reference agree with the op."""
    o, delta, w = seed_example.as_tensors()
    grad_weight_seed = torch.from_numpy(seed_example.GRAD_WEIGHT).reshape(1, 1, 2, 2)
    grad_input_seed = torch.from_numpy(seed_example.GRAD_INPUT).reshape(1, 1, 5, 5)

    conv = ([1, 1], [0, 0, 0, 0], [1, 1], 1)
    gi, gw, gb = ops.conv2d_backward(delta, o, w, *conv, [True, True, True])
    torch.testing.assert_close(gw, grad_weight_seed, rtol=0, atol=1e-6)
    torch.testing.assert_close(gi, grad_input_seed, rtol=0, atol=1e-6)
    # The example's forward value x[0,0] = 0.2491 for this kernel.
    x = ops.conv2d(o, w, None, *conv)
    assert x.shape == (1, 1, 4, 4)
    torch.testing.assert_close(x[0, 0, 0, 0].item(), 0.2491, rtol=0, atol=1e-12)

    # Native autograd.
    o_n, w_n = leaves(o, w)
    y = F.conv2d(o_n, w_n)
    gi_n, gw_n = torch.autograd.grad(y, (o_n, w_n), delta)
    assert_close(gi, gi_n, msg="grad_input vs native")
    assert_close(gw, gw_n, msg="grad_weight vs native")
    assert_close(gb, delta.sum((0, 2, 3)), msg="grad_bias")
    # The NumPy reference, both ways of computing the input delta.
    d, kernel = delta.numpy(), w.numpy()
    assert_close(gw, torch.from_numpy(reference.conv2d_grad_weight(o.numpy(), d, kernel.shape)))
    assert_close(gi, torch.from_numpy(reference.conv2d_grad_input(d, kernel, o.shape)))
    assert_close(gi, torch.from_numpy(reference.conv2d_grad_input_full_conv(d, kernel)))
    # And the public function, through autograd.
    o_p, w_p = leaves(o, w)
    gi_p, gw_p = torch.autograd.grad(torch_cnnbp.conv2d(o_p, w_p), (o_p, w_p), delta)
    torch.testing.assert_close(gw_p, grad_weight_seed, rtol=0, atol=1e-6)
    torch.testing.assert_close(gi_p, grad_input_seed, rtol=0, atol=1e-6)


# ---- output_mask -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_output_mask(dtype):
    """Each of the 8 masks returns exactly the full backward's values for the requested gradients
    (which equal native's) and empty tensors for the others."""
    x, w = randn(2, 4, 6, 7, dtype=dtype), randn(6, 2, 3, 2, dtype=dtype)
    conv = ([2, 1], [1, 0, 1, 1], [1, 2], 2)
    out = ops.conv2d(x, w, None, *conv)
    delta = randn(*out.shape, dtype=dtype)
    full = ops.conv2d_backward(delta, x, w, *conv, [True, True, True])

    x_n, w_n = leaves(x, w)
    y = F.conv2d(F.pad(x_n, (1, 1, 1, 0)), w_n, None, stride=(2, 1), dilation=(1, 2), groups=2)
    native = torch.autograd.grad(y, (x_n, w_n), delta)
    assert_close(full[0], native[0], msg="grad_input")
    assert_close(full[1], native[1], msg="grad_weight")
    assert_close(full[2], delta.sum((0, 2, 3)), msg="grad_bias")

    for mask in itertools.product((False, True), repeat=3):
        got = ops.conv2d_backward(delta, x, w, *conv, list(mask))
        for requested, g, f in zip(mask, got, full):
            assert g.dtype == dtype
            if requested:
                assert torch.equal(g, f), f"mask {mask}"
            else:
                assert g.shape == (0,), f"mask {mask}: unrequested gradient of shape {tuple(g.shape)}"


def test_autograd_asks_only_for_needed_gradients():
    """Through the public function, inputs that don't require grad get none, and the rest are right."""
    x, w, b = randn(2, 3, 5, 5), randn(2, 3, 3, 3), randn(2)
    for flags in itertools.product((False, True), repeat=3):
        if not any(flags):
            continue
        ours = [t.clone().requires_grad_(f) for t, f in zip((x, w, b), flags)]
        native = [t.clone().requires_grad_(f) for t, f in zip((x, w, b), flags)]
        go = randn(2, 2, 5, 5)
        torch_cnnbp.conv2d(*ours, padding=1).backward(go)
        F.conv2d(*native, padding=1).backward(go)
        for f, a, e in zip(flags, ours, native):
            if f:
                assert_close(a.grad, e.grad)
            else:
                assert a.grad is None


# ---- opcheck -----------------------------------------------------------------------------------


def _conv2d_op_args():
    f32, f64 = torch.float32, torch.float64
    return {
        "f64_bias_groups_asym_pad": (randn(2, 4, 6, 5), randn(4, 2, 3, 2), randn(4), [2, 1], [1, 0, 2, 1], [1, 2], 2),
        "f32_no_bias": (randn(1, 3, 5, 5, dtype=f32), randn(2, 3, 3, 3, dtype=f32), None, [1, 1], [0, 0, 0, 0], [1, 1], 1),
        "f64_depthwise_dilated": (randn(2, 3, 7, 7), randn(3, 1, 2, 2), randn(3), [1, 2], [1, 1, 1, 1], [2, 2], 3),
        "f32_channels_last": (randn(2, 4, 6, 5, dtype=f32).contiguous(memory_format=torch.channels_last),
                              randn(4, 2, 3, 2, dtype=f32).contiguous(memory_format=torch.channels_last),
                              randn(4, dtype=f32), [1, 2], [1, 1, 0, 1], [1, 1], 2),
        "f64_non_contiguous": (randn(2, 3, 5, 6).transpose(-1, -2), randn(2, 3, 3, 3)[..., ::2], None,
                               [1, 1], [0, 0, 0, 0], [2, 1], 1),
        "f32_pointwise_batch0": (randn(0, 2, 4, 4, dtype=f32), randn(3, 2, 1, 1, dtype=f32), randn(3, dtype=f32),
                                 [1, 1], [0, 0, 0, 0], [1, 1], 1),
    }


@pytest.mark.parametrize("name", list(_conv2d_op_args()))
def test_opcheck_conv2d(name):
    torch.library.opcheck(ops.conv2d.default, _conv2d_op_args()[name])


@pytest.mark.parametrize("name", ["f64_bias_groups_asym_pad", "f32_no_bias"])
def test_opcheck_conv2d_requires_grad(name):
    args = list(_conv2d_op_args()[name])
    args[:3] = [t.requires_grad_() if t is not None else None for t in args[:3]]
    torch.library.opcheck(ops.conv2d.default, tuple(args))


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True], [False, False, False]],
                         ids=lambda m: "".join("1" if b else "0" for b in m))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_opcheck_conv2d_backward(dtype, mask):
    x, w = randn(2, 4, 6, 5, dtype=dtype), randn(4, 2, 3, 2, dtype=dtype)
    conv = ([2, 1], [1, 0, 2, 1], [1, 2], 2)
    go = randn(*ops.conv2d(x, w, None, *conv).shape, dtype=dtype)
    torch.library.opcheck(ops.conv2d_backward.default, (go, x, w, *conv, mask))


# ---- torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1, groups=2), dict(padding="same", dilation=(1, 2), groups=2)],
                         ids=["stride2_groups2", "same_dilated"])
def test_compile_fullgraph_matches_eager(kw):
    def loss(x, w, b):
        return torch.relu(torch_cnnbp.conv2d(x, w, b, **kw)).sum()

    compiled = torch.compile(loss, fullgraph=True)
    x, w, b = randn(2, 4, 7, 6, dtype=torch.float32), randn(6, 2, 3, 2, dtype=torch.float32), randn(6, dtype=torch.float32)
    eager_in, compiled_in = leaves(x, w, b), leaves(x, w, b)
    eager = loss(*eager_in)
    got = compiled(*compiled_in)
    assert_close(got, eager, msg="compiled forward")
    for a, e in zip(torch.autograd.grad(got, compiled_in), torch.autograd.grad(eager, eager_in)):
        assert_close(a, e, msg="compiled backward")


# ---- the work is ours: no native convolution kernel runs --------------------------------------


@pytest.mark.parametrize("case", [CASES[1], CASES[9], CASES[24], CASES[21]], ids=case_id)
def test_no_native_kernels(case):
    x, w, b = leaves(*conv_inputs(case, torch.float32))

    def forward_backward():
        y = torch_cnnbp.conv2d(x, w, b, **case[4])
        y.backward(torch.ones_like(y))

    def double_backward():
        penalty = input_gradient(lambda x, w, b: torch_cnnbp.conv2d(x, w, b, **case[4]))(x, w, b).pow(2).sum()
        penalty.backward()

    assert no_native_kernels_ran(forward_backward) == []
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert no_native_kernels_ran(double_backward) == []


def test_profiler_check_sees_native_convolution():
    """The check above is not vacuous: it does report native conv2d."""
    x, w = leaves(randn(1, 2, 5, 5, dtype=torch.float32), randn(3, 2, 3, 3, dtype=torch.float32))

    def native():
        F.conv2d(x, w).sum().backward()

    assert any("convolution" in n for n in no_native_kernels_ran(native))


# ---- bad input ---------------------------------------------------------------------------------


def _bad(x, w, b=None, **kw):
    return lambda: (x(), w(), None if b is None else b(), kw)


def _t(*shape, dtype=torch.float32):
    return lambda: torch.randn(*shape, dtype=dtype)


# (id, inputs builder, pattern our message must match)
BAD_INPUTS = [
    ("input_2d", _bad(_t(6, 6), _t(4, 1, 3, 3)), r"3D \(unbatched\) or 4D \(batched\) input.*\[6, 6\]"),
    ("input_5d", _bad(_t(1, 1, 1, 6, 6), _t(4, 1, 3, 3)), r"3D \(unbatched\) or 4D \(batched\) input.*\[1, 1, 1, 6, 6\]"),
    ("weight_3d", _bad(_t(2, 4, 6, 6), _t(6, 4, 3)), r"4-D weight.*\[6, 4, 3\]"),
    ("weight_5d", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3, 1)), r"4-D weight.*\[6, 4, 3, 3, 1\]"),
    ("channel_mismatch", _bad(_t(2, 4, 6, 6), _t(6, 3, 3, 3)), r"to have 3 channels, but got 4 channels"),
    ("groups_not_dividing_in", _bad(_t(2, 4, 6, 6), _t(6, 1, 3, 3), groups=3), r"groups=3.*to have 3 channels, but got 4"),
    ("groups_not_dividing_out", _bad(_t(2, 4, 6, 6), _t(5, 2, 3, 3), groups=2), r"groups=2.*divisible by 2 at dimension 0"),
    ("groups_more_than_out", _bad(_t(2, 4, 6, 6), _t(2, 1, 3, 3), groups=4), r"groups=4.*at least 4 at dimension 0"),
    ("groups_0", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), groups=0), r"non-positive groups"),
    ("groups_negative", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), groups=-2), r"non-positive groups"),
    ("stride_0", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), stride=0), r"non-positive stride"),
    ("stride_negative", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), stride=(1, -1)), r"non-positive stride"),
    ("padding_negative", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), padding=-1), r"negative padding"),
    ("padding_negative_w", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), padding=(0, -2)), r"negative padding"),
    ("dilation_0", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), dilation=0), r"non-positive dilation"),
    ("dilation_negative", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), dilation=(1, -1)), r"non-positive dilation"),
    ("kernel_larger_than_input", _bad(_t(2, 4, 6, 6), _t(6, 4, 7, 3)), r"Kernel size can't be greater than actual input size"),
    ("dilated_kernel_larger", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), dilation=3), r"Kernel size: \(7 x 7\).*can't be greater"),
    ("kernel_larger_than_padded", _bad(_t(2, 4, 4, 4), _t(6, 4, 3, 7), padding=1), r"padded input size.*\(6 x 6\).*can't be greater"),
    ("kernel_larger_unbatched", _bad(_t(4, 2, 6), _t(6, 4, 3, 3)), r"Kernel size can't be greater than actual input size"),
    ("bias_wrong_size", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), _t(5)), r"bias to be 1-dimensional with 6 elements.*\[5\]"),
    ("bias_2d", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), _t(6, 1)), r"bias to be 1-dimensional with 6 elements.*\[6, 1\]"),
    ("same_with_stride2", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), padding="same", stride=2), r"padding='same' is not supported for strided"),
    ("same_with_stride_12", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), padding="same", stride=(1, 2)), r"padding='same' is not supported for strided"),
    ("unknown_padding_string", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), padding="full"), r"[Ii]nvalid padding string.*full"),
    ("input_weight_dtypes", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3, dtype=torch.float64)), r"input type.*Float.*weight type.*Double"),
    ("input_bias_dtypes", _bad(_t(2, 4, 6, 6), _t(6, 4, 3, 3), _t(6, dtype=torch.float64)), r"bias type.*Double.*input type.*Float"),
    ("input_bias_dtypes_half", _bad(_t(2, 4, 6, 6, dtype=torch.float16), _t(6, 4, 3, 3, dtype=torch.float16), _t(6)),
     r"bias type.*Float.*input type.*Half"),
    ("zero_height_nonzero_batch", _bad(_t(2, 4, 0, 6), _t(6, 4, 1, 1)), r"zero batch or zero channel.*\[2, 4, 0, 6\]"),
    ("zero_width_nonzero_batch", _bad(_t(1, 4, 5, 0), _t(6, 4, 1, 1), padding=1), r"zero batch or zero channel.*\[1, 4, 5, 0\]"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=case_id)
def test_bad_input_rejected(case):
    _, build, pattern = case
    x, w, b, kw = build()
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        torch_cnnbp.conv2d(x, w, b, **kw)
    with pytest.raises((RuntimeError, ValueError)):
        F.conv2d(x, w, b, **kw)


@pytest.mark.parametrize("arg", ["stride", "dilation", "padding"])
def test_three_element_tuple_rejected(arg):
    """A 3-element stride/dilation/padding is refused, with a message naming the argument
    (the exception class is checked by the test below)."""
    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 4, 3, 3)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=rf"{arg}.*\(1, 1, 1\)"):
        torch_cnnbp.conv2d(x, w, **{arg: (1, 1, 1)})
    with pytest.raises(RuntimeError):
        F.conv2d(x, w, **{arg: (1, 1, 1)})


def test_three_element_stride_raises_like_native():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 4, 3, 3)
    with pytest.raises(RuntimeError):
        F.conv2d(x, w, stride=(1, 1, 1))
    with pytest.raises((RuntimeError, ValueError), match=r"stride"):
        torch_cnnbp.conv2d(x, w, stride=(1, 1, 1))


@pytest.mark.parametrize("dtype", (torch.int64, torch.int32), ids=str)
def test_integer_dtype_is_rejected_clearly(dtype):
    """Documented difference: native conv2d accepts integer tensors for the forward pass; ours
    only computes floating types and says so."""
    x, w = torch.randint(-3, 4, (1, 2, 5, 5), dtype=dtype), torch.randint(-3, 4, (3, 2, 3, 3), dtype=dtype)
    if dtype == torch.int64:  # native's integer conv (int64 on CPU) works and equals the float result
        native = F.conv2d(x, w)
        assert native.dtype == dtype
        assert torch.equal(native, F.conv2d(x.double(), w.double()).to(dtype))
    with pytest.raises(RuntimeError, match=r"must be float32, float64, float16 or bfloat16, but got (Long|Int)"):
        torch_cnnbp.conv2d(x, w)


def test_backward_op_rejects_wrong_grad_output():
    x, w = randn(2, 3, 5, 5), randn(4, 3, 3, 3)
    conv = ([1, 1], [0, 0, 0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"expected grad_output of size \[2, 4, 3, 3\]"):
        ops.conv2d_backward(randn(2, 4, 3, 4), x, w, *conv, [True, True, True])
    with pytest.raises(RuntimeError, match=r"grad_output type.*Float.*input type.*Double"):
        ops.conv2d_backward(randn(2, 4, 3, 3, dtype=torch.float32), x, w, *conv, [True, True, True])


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=(2, 1), dilation=(1, 2)), dict(padding="same")],
                         ids=["pad1", "strided_dilated", "same"])
def test_large_images_split_into_position_tiles(kw):
    """When one sample's unrolled input exceeds the per-thread column budget (column_budget in
    csrc/conv2d.cpp, 2^16 elements here), its output positions are processed in tiles: tiles start
    and end in the middle of output rows."""
    x = torch.randn(2, 64, 37, 41, dtype=torch.float64)   # 576 rows x up to 1517 positions
    w = torch.randn(5, 64, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    chunks, block, tile, cblock, shared = torch.ops.cnnbp._conv2d_plan([2, 64, 37, 41], [5, 64, 3, 3], [1, 1],
                                                                        [1, 1, 1, 1], [1, 1], 1, True)
    assert block == 1 and tile < 37 * 41 and tile % 41, (block, tile)
    compare_with_native(*conv2d_pair(**kw), (x, w, b), msg=str(kw))
    with single_thread():
        compare_with_native(*conv2d_pair(**kw), (x[:1], w, b), msg=f"{kw} one thread")
