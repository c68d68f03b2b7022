"""torch_cnnbp.max_pool2d and the cnnbp::max_pool2d / cnnbp::max_pool2d_backward ops.

Oracles: PyTorch's own max_pool2d (values, indices and gradients, through the shared harness),
finite differences, and the NumPy reference.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import torch_cnnbp
from torch_cnnbp import reference

from helpers import (
    DTYPES,
    assert_close,
    compare_with_native,
    leaves,
    max_pool2d_pair,
    no_native_kernels_ran,
    single_thread,
)

ops = torch.ops.cnnbp


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randn(*shape, dtype=torch.float64):
    """Normal values drawn in float64, then rounded once to `dtype` (both frameworks see the same)."""
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def distinct(*shape, dtype=torch.float64):
    """Values without ties (a permutation of 0..n-1, shifted to have both signs), for gradcheck."""
    n = math.prod(shape)
    return (torch.randperm(n, dtype=torch.float64) - n / 2).reshape(shape).to(dtype)


# ---- the comparison matrix --------------------------------------------------------------------

# (id, input shape, keyword arguments). kernel 1 / 2 / 3 / (2,3); stride None / 1 / 2 / (1,2);
# padding 0 / 1 / (1,0); dilation 1 / 2; ceil_mode with sizes where it adds a window, and where the
# added window would start in the right padding and so is dropped; batch 0 / 1 / N; unbatched.
CASES = [
    ("k1", (2, 3, 5, 6), dict(kernel_size=1)),
    ("k1_s2_ceil", (2, 2, 5, 6), dict(kernel_size=1, stride=2, ceil_mode=True)),
    ("k2", (2, 3, 6, 7), dict(kernel_size=2)),
    ("k2_ceil_odd", (2, 3, 7, 5), dict(kernel_size=2, ceil_mode=True)),
    # H = W = 5, k 2, s 2, p 1, ceil: the 4th window would start at 6 = H + p, so there are 3.
    ("k2_s2_p1_ceil_last_window_dropped", (2, 2, 5, 5), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
    ("k2_s2_p1_floor", (2, 2, 5, 5), dict(kernel_size=2, stride=2, padding=1)),
    ("k3_s3_p1_ceil_dropped_w", (1, 2, 4, 5), dict(kernel_size=3, stride=3, padding=1, ceil_mode=True)),
    ("k3_s1_overlap", (2, 2, 6, 5), dict(kernel_size=3, stride=1)),
    ("k3_s2_p1_ceil", (1, 3, 8, 9), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("k3_s1_p1_d2", (2, 2, 7, 7), dict(kernel_size=3, stride=1, padding=1, dilation=2)),
    ("k3_s12_p10_d2_ceil", (2, 2, 9, 8), dict(kernel_size=3, stride=(1, 2), padding=(1, 0), dilation=2, ceil_mode=True)),
    ("k23_s12_p10_d2", (2, 3, 6, 9), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1))),
    ("k23_default_stride_p1_ceil", (1, 2, 7, 8), dict(kernel_size=(2, 3), padding=1, ceil_mode=True)),
    ("k23_s2_d2_ceil", (2, 2, 8, 11), dict(kernel_size=(2, 3), stride=2, dilation=2, ceil_mode=True)),
    ("k2_s1_p1", (1, 2, 4, 6), dict(kernel_size=2, stride=1, padding=1)),
    ("k2_empty_stride", (2, 2, 6, 6), dict(kernel_size=2, stride=())),
    ("batch0", (0, 3, 6, 6), dict(kernel_size=2, padding=1)),
    ("batch0_ceil", (0, 2, 5, 7), dict(kernel_size=3, stride=2, ceil_mode=True)),
    ("batch1_k3_s2", (1, 4, 7, 7), dict(kernel_size=3, stride=2)),
    ("batch5_k2_s12", (5, 2, 6, 7), dict(kernel_size=2, stride=(1, 2), padding=(1, 0))),
    ("unbatched_k2", (3, 7, 5), dict(kernel_size=2)),
    ("unbatched_k3_s2_p1_d2_ceil", (2, 9, 8), dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)),
    ("kernel_is_image", (2, 2, 4, 3), dict(kernel_size=(4, 3))),
]

LAYOUTS = ("contiguous", "channels_last", "non_contiguous")


def in_layout(t, layout):
    """Same values as t in `layout`: channels_last (4-D only), or a transposed-strides view."""
    if layout == "contiguous":
        return t
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def case_id(case):
    return case[0]


def kw_id(kw):
    """A short test id for pooling keyword arguments: {'kernel_size': (2, 3), 'stride': 1} -> k2x3-s1."""
    short = dict(kernel_size="k", stride="s", padding="p", dilation="d", ceil_mode="ceil")
    parts = []
    for key, v in kw.items():
        if key == "ceil_mode":
            parts.append("ceil" if v else "floor")
        else:
            parts.append(short[key] + ("x".join(map(str, v)) if isinstance(v, tuple) else str(v)))
    return "-".join(parts)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("return_indices", (False, True), ids=("values", "indices"))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_native(case, return_indices, dtype, layout):
    """Output, indices (exactly) and the input gradient equal native max_pool2d's."""
    _, shape, kw = case
    x = in_layout(randn(*shape, dtype=dtype), layout)
    if layout == "non_contiguous" and x.numel() > 0:
        assert not x.is_contiguous()
    ours, native = max_pool2d_pair(**kw, return_indices=return_indices)
    out = compare_with_native(ours, native, (x,), dtype=dtype, msg=f"{case[0]} {dtype} {layout}")
    assert len(out) == (2 if return_indices else 1)
    assert out[0].dtype == dtype
    if return_indices:
        assert out[1].dtype == torch.int64


def test_matrix_covers_every_option():
    seen = {k: set() for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "batch")}
    for _, shape, kw in CASES:
        for key, default in (("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False)):
            v = kw.get(key, default)
            seen[key].add(tuple(v) if isinstance(v, tuple) else v)
        seen["batch"].add("unbatched" if len(shape) == 3 else min(shape[0], 2))
    assert {1, 2, 3, (2, 3)} <= seen["kernel_size"]
    assert {None, 1, 2, (1, 2)} <= seen["stride"]
    assert {0, 1, (1, 0)} <= seen["padding"]
    assert {1, 2} <= seen["dilation"]
    assert seen["ceil_mode"] == {False, True}
    assert seen["batch"] == {0, 1, 2, "unbatched"}


def test_ceil_mode_drops_window_starting_in_right_padding():
    """H = 5, k = 2, s = 2, p = 1: ceil arithmetic gives 4 windows, but the 4th would start at
    row 6 = H + p, entirely in the padding, so there are 3 (as native)."""
    x = randn(1, 1, 5, 5)
    out = torch_cnnbp.max_pool2d(x, 2, 2, 1, ceil_mode=True)
    assert out.shape == F.max_pool2d(x, 2, 2, 1, ceil_mode=True).shape == (1, 1, 3, 3)
    # ...whereas here ceil mode adds a window that starts inside the input.
    out = torch_cnnbp.max_pool2d(randn(1, 1, 5, 5), 2, 2, 0, ceil_mode=True)
    assert out.shape == (1, 1, 3, 3) and torch_cnnbp.max_pool2d(randn(1, 1, 5, 5), 2, 2, 0).shape == (1, 1, 2, 2)


# ---- ties, NaN, -inf, padding ------------------------------------------------------------------


def compare_values_indices_grad(x, kw, msg=""):
    """Values (NaN equal to NaN), indices exactly and the input gradient, ours against native."""
    xa, xb = leaves(x, x)
    out_a, idx_a = torch_cnnbp.max_pool2d(xa, **kw, return_indices=True)
    out_b, idx_b = F.max_pool2d(xb, **kw, return_indices=True)
    # A maximum is a selection, not arithmetic: values must be equal, NaN for NaN.
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{msg}\n{m}")
    assert torch.equal(idx_a, idx_b), f"{msg}: indices\n{idx_a}\n{idx_b}"
    g = randn(*out_a.shape, dtype=x.dtype)
    (ga,) = torch.autograd.grad(out_a, xa, g)
    (gb,) = torch.autograd.grad(out_b, xb, g)
    assert_close(ga, gb, msg=f"{msg}: gradient")
    return out_a, idx_a


TIE_KW = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), ceil_mode=True),
]


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", TIE_KW, ids=kw_id)
def test_ties(kw, dtype, layout):
    """Constant input and few distinct values: the same tie-break (first in scan order) as native."""
    constant = in_layout(torch.full((2, 2, 6, 7), 1.5, dtype=dtype), layout)
    _, idx = compare_values_indices_grad(constant, kw, "constant")
    assert idx.unique().numel() > 1
    repeated = in_layout(torch.randint(0, 3, (2, 3, 7, 6)).to(dtype), layout)
    compare_values_indices_grad(repeated, kw, "repeated values")


def _with_nans(positions, shape=(1, 2, 6, 6), dtype=torch.float32):
    x = randn(*shape, dtype=dtype)
    for p in positions:
        x[p] = float("nan")
    return x


NAN_CASES = [
    ("one_nan", [(0, 0, 1, 1)], dict(kernel_size=2)),
    ("one_nan_padded", [(0, 1, 0, 0)], dict(kernel_size=3, stride=2, padding=1)),
    ("several_nans_in_window", [(0, 0, 0, 0), (0, 0, 1, 1), (0, 0, 0, 1)], dict(kernel_size=2)),
    ("several_nans_overlapping", [(0, 0, 2, 2), (0, 0, 2, 3), (0, 1, 3, 4), (0, 1, 4, 1)], dict(kernel_size=3, stride=1)),
    ("nans_overlapping_dilated_ceil", [(0, 0, 1, 2), (0, 0, 3, 2), (0, 0, 5, 5)],
     dict(kernel_size=(2, 3), stride=(1, 2), padding=1, dilation=(2, 1), ceil_mode=True)),
    ("nan_plane", [(0, 1, slice(None), slice(None))], dict(kernel_size=2, stride=1)),
]


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NAN_CASES, ids=case_id)
def test_nan(case, dtype, layout):
    _, positions, kw = case
    x = in_layout(_with_nans(positions, dtype=dtype), layout)
    out, _ = compare_values_indices_grad(x, kw, case[0])
    assert out.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", TIE_KW, ids=kw_id)
def test_negative_infinity(kw, dtype):
    """-inf values, and windows that are all -inf (value -inf, index of their first tap, as native)."""
    x = randn(2, 2, 6, 7, dtype=dtype)
    x[0, 0, :3, :4] = -math.inf  # whole windows of -inf
    x[1, 1] = -math.inf  # a whole plane
    x[0, 1, ::2, ::3] = -math.inf  # scattered
    out, _ = compare_values_indices_grad(x, kw, "-inf")
    assert (out == -math.inf).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padding_never_selected(dtype):
    """All-negative input with padding: the padding's zeros never win, every index is in the image."""
    x = -randn(2, 3, 5, 6, dtype=dtype).abs() - 1
    for kw in (dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True),
               dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), dilation=(2, 3))):
        out, idx = compare_values_indices_grad(x, kw, str(kw))
        assert (out < 0).all()
        assert ((idx >= 0) & (idx < 5 * 6)).all()
        assert torch.equal(out, x.flatten(2).gather(2, idx.flatten(2)).view_as(out))


# ---- overlapping windows: gradients accumulate -------------------------------------------------


@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=3, stride=2),
                                dict(kernel_size=(3, 2), stride=1, dilation=(1, 2), ceil_mode=True)], ids=kw_id)
def test_overlapping_windows_accumulate(kw):
    x = randn(2, 2, 7, 8)
    x[:, :, 3, 3] = 10.0  # wins every window that contains it
    xa, xb = leaves(x, x)
    out, idx = torch_cnnbp.max_pool2d(xa, **kw, return_indices=True)
    assert (idx == 3 * 8 + 3).flatten(1).sum(1).min() > 1  # one input wins several windows
    g = randn(*out.shape)
    (ga,) = torch.autograd.grad(out, xa, g)
    (gb,) = torch.autograd.grad(F.max_pool2d(xb, **kw), xb, g)
    assert_close(ga, gb, msg="vs native")

    args = [torch_cnnbp._args.pair("", "", kw.get(k, d)) for k, d in (("kernel_size", 1), ("stride", kw["kernel_size"]),
                                                                      ("padding", 0), ("dilation", 1))]
    ref_out, ref_idx = reference.max_pool2d_forward(x.numpy(), *args, ceil_mode=kw.get("ceil_mode", False))
    assert torch.equal(idx, torch.from_numpy(ref_idx))
    assert_close(ga, torch.from_numpy(reference.max_pool2d_backward(g.numpy(), ref_idx, x.shape)), msg="vs reference")
    expected_at_peak = (g * (idx == 3 * 8 + 3)).sum((2, 3))
    assert_close(ga[:, :, 3, 3], expected_at_peak, msg="sum at the shared maximum")


# ---- indices feed max_unpool2d -----------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=(2, 3), stride=(2, 1), ceil_mode=True)], ids=kw_id)
def test_indices_feed_max_unpool2d(kw):
    x = randn(2, 3, 7, 6)
    out, idx = torch_cnnbp.max_pool2d(x, **kw, return_indices=True)
    out_n, idx_n = F.max_pool2d(x, **kw, return_indices=True)
    unpool_kw = dict(kernel_size=kw["kernel_size"], stride=kw.get("stride"), padding=kw.get("padding", 0),
                     output_size=x.shape[-2:])
    ours = F.max_unpool2d(out, idx, **unpool_kw)
    native = F.max_unpool2d(out_n, idx_n, **unpool_kw)
    assert ours.shape == x.shape
    assert torch.equal(ours, native)
    assert (ours != 0).any()


# ---- integer input -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.int32, torch.int64), ids=str)
@pytest.mark.parametrize("kw", TIE_KW + [dict(kernel_size=2, stride=1, padding=1)], ids=kw_id)
def test_integer_input(kw, dtype):
    x = torch.randint(-50, 50, (2, 3, 6, 7), dtype=dtype)
    x[0, 0, :2, :3] = torch.iinfo(dtype).min  # windows holding only the smallest value
    x[1, 2, 0, 0] = torch.iinfo(dtype).max
    out, idx = torch_cnnbp.max_pool2d(x, **kw, return_indices=True)
    out_n, idx_n = F.max_pool2d(x, **kw, return_indices=True)
    assert out.dtype == dtype
    assert torch.equal(out, out_n)
    assert torch.equal(idx, idx_n)


# ---- finite differences -----------------------------------------------------------------------

GRADCHECK_CASES = [
    ("k3_s1_p1_overlap", (1, 2, 5, 6), dict(kernel_size=3, stride=1, padding=1)),
    ("k2_s2_p1_ceil", (2, 1, 5, 5), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
    ("k23_s12_d2", (1, 2, 7, 6), dict(kernel_size=(2, 3), stride=(1, 2), dilation=2)),
    ("unbatched_k2", (2, 5, 4), dict(kernel_size=2, stride=1)),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=case_id)
def test_gradcheck_and_gradgradcheck(case):
    _, shape, kw = case
    x = distinct(*shape).requires_grad_()

    def fn(x):
        return torch_cnnbp.max_pool2d(x, **kw)

    with single_thread():
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


def test_second_derivative_matches_native():
    """Differentiating the input gradient again (create_graph=True) equals native."""
    def input_gradient(pool):
        def fn(x):
            y = pool(x)
            (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
            return gx
        return fn

    ours, native = max_pool2d_pair(kernel_size=3, stride=1, padding=1)
    compare_with_native(input_gradient(ours), input_gradient(native), (distinct(2, 2, 5, 6),))


# ---- the NumPy reference against the C++ ops -------------------------------------------------

# (id, input shape, kernel, stride, padding, dilation, ceil_mode)
REFERENCE_CASES = [
    ("k2", (2, 2, 4, 5), (2, 2), (2, 2), (0, 0), (1, 1), False),
    ("k3_s1_p1", (1, 2, 5, 5), (3, 3), (1, 1), (1, 1), (1, 1), False),
    ("k23_s12_p10_d21_ceil", (2, 1, 7, 8), (2, 3), (1, 2), (1, 0), (2, 1), True),
    ("k2_s2_p1_ceil", (1, 3, 5, 5), (2, 2), (2, 2), (1, 1), (1, 1), True),
]


@pytest.mark.parametrize("with_nan", (False, True), ids=("finite", "nan"))
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=case_id)
def test_ops_match_numpy_reference(case, with_nan):
    _, shape, kernel, stride, padding, dilation, ceil_mode = case
    x = randn(*shape)
    x[0, 0, 1, :2] = torch.tensor([3.0, 3.0])  # a tie
    if with_nan:
        x[0, 0, 2, 1] = float("nan")
        x[-1, -1, 0, 0] = float("nan")
    out, idx = ops.max_pool2d(x, list(kernel), list(stride), list(padding), list(dilation), ceil_mode)
    ref_out, ref_idx = reference.max_pool2d_forward(x.numpy(), kernel, stride, padding, dilation, ceil_mode)
    torch.testing.assert_close(out, torch.from_numpy(ref_out), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, torch.from_numpy(ref_idx))
    assert out.isnan().any() == with_nan

    delta = randn(*out.shape)
    grad = ops.max_pool2d_backward(delta, idx, list(x.shape))
    assert_close(grad, torch.from_numpy(reference.max_pool2d_backward(delta.numpy(), ref_idx, x.shape)))


# ---- opcheck -----------------------------------------------------------------------------------


def _max_pool2d_op_args():
    return {
        "f32_k2": (randn(2, 3, 6, 7, dtype=torch.float32), [2, 2], [2, 2], [0, 0], [1, 1], False),
        "f64_k3_s12_p1_d2_ceil": (randn(1, 2, 9, 8), [3, 3], [1, 2], [1, 1], [2, 2], True),
        "f32_requires_grad": (randn(2, 2, 5, 5, dtype=torch.float32).requires_grad_(), [3, 2], [2, 1], [1, 0], [1, 1], True),
        "bf16_batch0": (randn(0, 2, 5, 5, dtype=torch.bfloat16), [2, 2], [1, 1], [1, 1], [1, 1], False),
        "int64": (torch.randint(-9, 9, (1, 2, 5, 6)), [2, 3], [2, 2], [0, 1], [1, 1], True),
        "f32_channels_last": (randn(2, 3, 6, 5, dtype=torch.float32).contiguous(memory_format=torch.channels_last),
                              [2, 2], [1, 2], [1, 0], [1, 1], True),
        "f64_non_contiguous": (randn(2, 2, 5, 6).transpose(-1, -2), [3, 3], [2, 2], [1, 1], [1, 1], False),
    }


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
@pytest.mark.parametrize("name", list(_max_pool2d_op_args()))
def test_opcheck_max_pool2d(name):
    torch.library.opcheck(ops.max_pool2d.default, _max_pool2d_op_args()[name])


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16), ids=str)
def test_opcheck_max_pool2d_backward(dtype, layout):
    x = in_layout(randn(2, 3, 7, 6, dtype=dtype), layout)
    out, idx = ops.max_pool2d(x, [3, 3], [1, 2], [1, 1], [1, 1], True)
    torch.library.opcheck(ops.max_pool2d_backward.default, (randn(*out.shape, dtype=dtype), idx, list(x.shape)))
    torch.library.opcheck(ops.max_pool2d_backward.default,
                          (randn(*out.shape, dtype=dtype), idx, list(x.shape), [3, 3], [1, 2], [1, 1], [1, 1]))


@pytest.mark.parametrize("C", (3, 27))
def test_opcheck_max_pool2d_backward_tiling_window(C):
    """The same with a window that tiles the input (the channels_last gather)."""
    x = randn(2, C, 7, 6).contiguous(memory_format=torch.channels_last)
    out, idx = ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], True)
    torch.library.opcheck(ops.max_pool2d_backward.default,
                          (randn(*out.shape), idx, list(x.shape), [2, 2], [2, 2], [0, 0], [1, 1]))


# ---- torch.compile -----------------------------------------------------------------------------


def test_compile_fullgraph_matches_eager():
    def fn(x):
        out, idx = torch_cnnbp.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, return_indices=True)
        return (out * out).sum(), idx

    compiled = torch.compile(fn, fullgraph=True)
    x = randn(2, 3, 8, 7, dtype=torch.float32)
    xa, xb = leaves(x, x)
    (got, idx_got), (eager, idx_eager) = compiled(xa), fn(xb)
    assert_close(got, eager)
    assert torch.equal(idx_got, idx_eager)
    assert_close(torch.autograd.grad(got, xa)[0], torch.autograd.grad(eager, xb)[0])


# ---- the work is ours: no native pooling op runs ----------------------------------------------


@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1, ceil_mode=True)], ids=kw_id)
def test_no_native_pooling_ops(kw):
    (x,) = leaves(randn(2, 3, 6, 6, dtype=torch.float32))

    def forward_backward():
        y = torch_cnnbp.max_pool2d(x, **kw)
        (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        gx.sum().backward()

    assert no_native_kernels_ran(forward_backward, forbidden=("pool",)) == []
    assert x.grad is not None


def test_profiler_check_sees_native_pooling():
    """The check above is not vacuous: it reports native max_pool2d."""
    (x,) = leaves(randn(1, 2, 4, 4, dtype=torch.float32))
    assert no_native_kernels_ran(lambda: F.max_pool2d(x, 2).sum().backward(), forbidden=("pool",)) != []


# ---- bad input ---------------------------------------------------------------------------------

X = (2, 3, 6, 6)

# (id, input shape, keyword arguments, pattern our message must match)
BAD_INPUTS = [
    ("kernel_0", X, dict(kernel_size=0), r"kernel_size should be greater than zero"),
    ("kernel_negative", X, dict(kernel_size=(2, -1)), r"kernel_size should be greater than zero.*\[2, -1\]"),
    ("stride_0", X, dict(kernel_size=2, stride=0), r"stride should be greater than zero"),
    ("stride_negative", X, dict(kernel_size=2, stride=(-1, 1)), r"stride should be greater than zero.*\[-1, 1\]"),
    ("dilation_0", X, dict(kernel_size=2, dilation=0), r"dilation should be greater than zero"),
    ("dilation_negative", X, dict(kernel_size=2, dilation=(1, -2)), r"dilation should be greater than zero"),
    ("padding_negative", X, dict(kernel_size=2, padding=-1), r"pad must be non-negative"),
    ("padding_negative_w", X, dict(kernel_size=3, padding=(1, -1)), r"pad must be non-negative"),
    ("padding_over_half_kernel", X, dict(kernel_size=2, padding=2), r"pad should be at most half of kernel size"),
    ("padding_over_half_kernel_w", X, dict(kernel_size=3, padding=(0, 2)), r"pad should be at most half of kernel size"),
    ("padding_over_half_dilated_kernel", X, dict(kernel_size=2, padding=2, dilation=3), r"pad should be at most half"),
    ("padding_over_half_effective", X, dict(kernel_size=(1, 3), padding=(1, 1), dilation=(3, 1)), r"pad should be at most half"),
    ("output_too_small", (1, 1, 2, 2), dict(kernel_size=3), r"Output size is too small"),
    ("output_too_small_dilated", (1, 1, 4, 4), dict(kernel_size=3, dilation=2), r"Output size is too small"),
    ("output_too_small_w", (1, 1, 5, 2), dict(kernel_size=(2, 3)), r"Calculated output size: \(1x2x0\)"),
    ("input_2d", (6, 6), dict(kernel_size=2), r"3-D \(C, H, W\) or 4-D \(N, C, H, W\) input.*\[6, 6\]"),
    ("input_5d", (1, 1, 1, 6, 6), dict(kernel_size=2), r"3-D \(C, H, W\) or 4-D.*\[1, 1, 1, 6, 6\]"),
    ("zero_channels", (2, 0, 6, 6), dict(kernel_size=2), r"non-zero C, H and W.*\[2, 0, 6, 6\]"),
    ("zero_height", (2, 3, 0, 6), dict(kernel_size=2), r"non-zero C, H and W.*\[2, 3, 0, 6\]"),
    ("zero_width", (2, 3, 6, 0), dict(kernel_size=2), r"non-zero C, H and W.*\[2, 3, 6, 0\]"),
    ("zero_channels_unbatched", (0, 6, 6), dict(kernel_size=2), r"non-zero C, H and W"),
    ("zero_height_unbatched", (3, 0, 6), dict(kernel_size=2), r"non-zero C, H and W"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=case_id)
def test_bad_input_rejected(case):
    _, shape, kw, pattern = case
    x = torch.randn(*shape)
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        torch_cnnbp.max_pool2d(x, **kw)
    with pytest.raises((RuntimeError, ValueError)):
        F.max_pool2d(x, **kw)


@pytest.mark.parametrize("arg", ["kernel_size", "stride", "padding", "dilation"])
def test_three_element_tuple_rejected(arg):
    """A 3-element kernel_size/stride/padding/dilation is refused with a message naming the argument
    (the exception class is checked by the test below)."""
    kw = dict(kernel_size=2)
    kw[arg] = (1, 1, 1) if arg != "kernel_size" else (2, 2, 2)
    x = torch.randn(*X)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=rf"{arg}.*\({kw[arg][0]}, {kw[arg][0]}, {kw[arg][0]}\)"):
        torch_cnnbp.max_pool2d(x, **kw)
    with pytest.raises(RuntimeError):
        F.max_pool2d(x, **kw)


def test_three_element_kernel_size_raises_like_native():
    x = torch.randn(*X)
    with pytest.raises(RuntimeError):
        F.max_pool2d(x, (2, 2, 2))
    with pytest.raises((RuntimeError, ValueError), match=r"kernel_size"):
        torch_cnnbp.max_pool2d(x, (2, 2, 2))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_one_sample"])
@pytest.mark.parametrize("bad_index", [-1, 20, 10**12], ids=("negative", "one_past_plane", "huge"))
def test_backward_op_rejects_out_of_range_index(bad_index, layout):
    """An index outside the input plane is an error, never a write out of bounds: in each backward
    loop (planes; channels_last samples; channels_last bands of pixels, one sample on two threads).
    With a zero gradient there it is no error: empty windows point outside and are sent zeros."""
    shape, plane = ((2, 2, 4, 5), 20) if layout != "channels_last_one_sample" else ((1, 16, 48, 48), 48 * 48)
    bad_index = plane if bad_index == 20 else bad_index
    x = randn(*shape)
    if layout != "contiguous":
        x = x.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, idx = ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
        ops.max_pool2d_backward(torch.ones_like(out), idx, list(x.shape))  # the valid indices work
        idx = idx.clone()
        idx[0, 1, 0, 1] = bad_index
        grad = torch.ones_like(out)
        with pytest.raises(RuntimeError, match=rf"index {bad_index} is outside the input plane of {plane} elements"):
            ops.max_pool2d_backward(grad, idx, list(x.shape))
        grad[0, 1, 0, 1] = 0
        expected = F.max_pool2d(x, 2, return_indices=True)[1]
        got = ops.max_pool2d_backward(grad, idx, list(x.shape))
        reference = torch.zeros(x.shape, dtype=x.dtype).flatten(2).scatter_add_(2, expected.flatten(2), grad.flatten(2))
        assert torch.equal(got, reference.view(x.shape))
    finally:
        torch.set_num_threads(threads)


BAND_WINDOWS = [  # (C, H, W, kernel, stride, padding, dilation, ceil_mode): one sample, channels_last
    (64, 112, 112, (3, 3), (2, 2), (1, 1), (1, 1), False),  # ResNet's pool
    (32, 56, 56, (3, 3), (1, 1), (1, 1), (1, 1), False),
    (96, 55, 55, (3, 3), (2, 2), (0, 0), (1, 1), True),
    (24, 37, 41, (2, 3), (1, 2), (1, 1), (2, 1), False),  # dilated rows
    (40, 33, 30, (5, 5), (3, 3), (2, 2), (1, 1), True),
    (48, 29, 31, (1, 2), (2, 1), (0, 1), (1, 1), False),  # rows that no window reads
    (16, 60, 61, (4, 4), (4, 4), (2, 2), (1, 1), True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", BAND_WINDOWS, ids=[f"{c[0]}x{c[1]}x{c[2]}-k{c[3]}s{c[4]}p{c[5]}d{c[6]}" for c in BAND_WINDOWS])
def test_backward_bands_scan_the_rows_their_windows_reach(case, dtype):
    """channels_last, fewer samples than threads, the window given (as the autograd passes it): each
    thread scans only the output rows whose windows reach its band of input rows. Gradients bitwise
    native's (ties, and pixels that win several windows), and the same as the scan of every output
    (the backward called without the window)."""
    C, H, W, kernel, stride, padding, dilation, ceil_mode = case
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(H * W)).mul(2).round().to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        out, idx = ops.max_pool2d(x, list(kernel), list(stride), list(padding), list(dilation), ceil_mode)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(C)).to(dtype)
        g = g.contiguous(memory_format=torch.channels_last)
        got = ops.max_pool2d_backward(g, idx, list(x.shape), list(kernel), list(stride), list(padding), list(dilation))
        every = ops.max_pool2d_backward(g, idx, list(x.shape))
        expected = torch.ops.aten.max_pool2d_with_indices_backward(g, x, list(kernel), list(stride), list(padding),
                                                                   list(dilation), ceil_mode, idx)
        assert torch.equal(got, every)
        assert torch.equal(got, expected)
        assert got.is_contiguous(memory_format=torch.channels_last)
    finally:
        torch.set_num_threads(threads)


def test_backward_bands_take_indices_outside_their_windows():
    """Indices that are not taps of their windows (not made by the forward, but inside the plane) may
    land in the band of a thread that skipped their output row: the call then scans every output, and
    the gradient is still every δ added where its index names (a scatter_add); an index outside the
    plane is still an error. And a window whose padding leaves output rows that read no input row
    (possible when the backward op is called directly) takes the scan of every output."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = randn(1, 16, 48, 45, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        window = ([3, 3], [2, 2], [1, 1], [1, 1])
        out, idx = ops.max_pool2d(x, *window, False)
        g = torch.randn_like(out)

        def scatter(idx):
            flat = torch.zeros(1, 16, 48 * 45, dtype=torch.float64)
            return flat.scatter_add_(2, idx.flatten(2), g.double().flatten(2)).view(x.shape)

        for bad in [(0, 3, 0, 0, 47 * 45 + 44), (0, 5, 23, 22, 0), (0, 7, 0, 10, 24 * 45 + 3)]:
            stray = idx.clone()
            stray[bad[:4]] = bad[4]
            got = ops.max_pool2d_backward(g, stray, list(x.shape), *window)
            assert torch.equal(got, ops.max_pool2d_backward(g, stray, list(x.shape)))
            torch.testing.assert_close(got.double(), scatter(stray), rtol=1e-6, atol=1e-6)
            assert got.is_contiguous(memory_format=torch.channels_last)
        outside = idx.clone()
        outside[0, 2, 20, 11] = 48 * 45
        with pytest.raises(RuntimeError, match=r"index 2160 is outside the input plane of 2160 elements"):
            ops.max_pool2d_backward(g, outside, list(x.shape), *window)

        # kernel 2, stride 2, padding 5 (more than native's forward allows): output rows 0-1 and 27-28 read
        # only padding; their windows are empty, their indices point outside and their δ are zero
        size = [1, 16, 48, 48]
        xs = randn(*size, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        inner, inner_idx = ops.max_pool2d(xs, [2, 2], [2, 2], [1, 1], [1, 1], False)  # the 25x25 inside
        assert inner.shape[-2:] == (25, 25)
        grad = torch.zeros(1, 16, 29, 29)
        indices = torch.full((1, 16, 29, 29), -1, dtype=torch.long)
        grad[..., 2:27, 2:27] = torch.randn(1, 16, 25, 25)
        indices[..., 2:27, 2:27] = inner_idx
        grad, indices = (t.contiguous(memory_format=torch.channels_last) for t in (grad, indices))
        got = ops.max_pool2d_backward(grad, indices, size, [2, 2], [2, 2], [5, 5], [1, 1])
        expected = ops.max_pool2d_backward(grad[..., 2:27, 2:27], inner_idx, size, [2, 2], [2, 2], [1, 1], [1, 1])
        assert torch.equal(got, expected)
    finally:
        torch.set_num_threads(threads)


def test_backward_op_rejects_a_window_that_does_not_fit():
    """The window, where given, is checked: all four parts or none, positive sizes, and it must make
    grad_output's size from input_size (in floor or ceil mode)."""
    x = randn(2, 16, 9, 8).contiguous(memory_format=torch.channels_last)
    out, idx = ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], True)  # 5x4: ceil mode
    g, size = torch.ones_like(out), list(x.shape)
    ops.max_pool2d_backward(g, idx, size, [2, 2], [2, 2], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"give all of kernel_size, stride, padding and dilation"):
        ops.max_pool2d_backward(g, idx, size, [2, 2], [2, 2], None, [1, 1])
    with pytest.raises(RuntimeError, match=r"must be positive"):
        ops.max_pool2d_backward(g, idx, size, [2, 0], [2, 2], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"must have 2 values each"):
        ops.max_pool2d_backward(g, idx, size, [2, 2, 2], [2, 2], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"is not what kernel_size=\[3, 3\], stride=\[3, 3\]"):
        ops.max_pool2d_backward(g, idx, size, [3, 3], [3, 3], [0, 0], [1, 1])


def test_backward_op_rejects_mismatched_shapes():
    x = randn(2, 2, 4, 5)
    out, idx = ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match=r"do not match input_size"):
        ops.max_pool2d_backward(torch.ones_like(out), idx, [2, 3, 4, 5])
    with pytest.raises(RuntimeError, match=r"indices must be int64"):
        ops.max_pool2d_backward(torch.ones_like(out), idx.int(), list(x.shape))
