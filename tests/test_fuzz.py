"""Property tests: random configurations of conv2d and max_pool2d against PyTorch's own ops.

Valid configurations must agree with native in every output (indices exactly) and every gradient,
through the shared harness (helpers.compare_with_native). Invalid configurations must be rejected
exactly when native rejects them, with an exception of the corresponding kind: TypeError where
native raises TypeError, RuntimeError or ValueError where native raises one of those.

Profiles (tests/conftest.py): "ci" by default, CNNBP_HYPOTHESIS_PROFILE=long for thousands of
examples per property:
    CNNBP_HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_fuzz.py
A failure prints the drawn configuration, seed included, so it can be replayed.

Known product bugs are not drawn, or are checked only for rejection (see KNOWN BUGS below); each
has a strict-xfail reproducer at the end of this file. When one is fixed its reproducer XPASSes
and fails: delete the reproducer's marker and the matching exclusion here, so that the fuzzer
covers that case fully again. Bugs already fixed keep their reproducer as a plain regression test.
Where native itself is wrong or inconsistent, the reference is native on an equivalent input or
in float64 (compare_conv2d, compare_max_pool2d), and the reason is stated there.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

import torch_cnnbp
from helpers import DTYPES, assert_close, compare_with_native

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# ---- building blocks ------------------------------------------------------------------------------


def int_or_pair(draw, a, b):
    """(value as passed, normalised pair): an int, a 2-tuple, a 2-list, a 1-tuple or a numpy int."""
    form = draw(st.sampled_from(["int", "tuple", "list", "one", "numpy"]))
    if form in ("int", "one", "numpy"):
        v = draw(st.integers(a, b))
        return {"int": v, "one": (v,), "numpy": np.int64(v)}[form], (v, v)
    h, w = draw(st.integers(a, b)), draw(st.integers(a, b))
    return ((h, w) if form == "tuple" else [h, w]), (h, w)


def make_tensor(shape, layout, dtype, values="normal"):
    """A tensor of `shape` with the given memory layout; values from torch's (seeded) global RNG.

    layouts: contiguous, channels_last (4-D only), strided (every other element along the last dim,
    at an offset), transposed (last two dims stored swapped)."""
    shape = list(shape)
    if layout == "strided":
        alloc = shape[:-1] + [2 * shape[-1] + 1]
    elif layout == "transposed" and len(shape) >= 2:
        alloc = shape[:-2] + [shape[-1], shape[-2]]
    else:
        alloc = shape
    if dtype.is_floating_point:
        if values == "normal":
            t = torch.randn(alloc, dtype=torch.float64)
        else:  # few distinct values: ties in every window
            t = torch.randint(-2, 3, alloc).to(torch.float64)
    elif dtype == torch.uint8:
        t = torch.randint(0, 5 if values != "normal" else 256, alloc)
    else:
        t = torch.randint(-3, 4, alloc) if values != "normal" else torch.randint(-100, 100, alloc)
    t = t.to(dtype)
    if layout == "strided":
        t = t[..., 1::2]
    elif layout == "transposed" and len(shape) >= 2:
        t = t.transpose(-1, -2)
    elif layout == "channels_last" and len(shape) == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    assert list(t.shape) == shape
    return t


def error_kind(e: BaseException) -> str:
    """TypeError, or RuntimeError/ValueError (one kind: native raises either for bad values).
    Native's IndexError counts as the latter: native raises it only from an internal select() on a
    weight with an empty kernel and an empty batch, where ours raises RuntimeError."""
    if isinstance(e, TypeError):
        return "TypeError"
    if isinstance(e, (RuntimeError, ValueError, IndexError)):
        return "RuntimeError/ValueError"
    return type(e).__name__


def run(fn):
    """(result, None) or (None, exception)."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - every exception is a result to compare
        return None, e


def assert_same_rejection(ours_fn, native_err, msg):
    """Native raised native_err: ours must raise too, of the corresponding kind."""
    out, err = run(ours_fn)
    assert err is not None, f"{msg}: native raised {native_err!r} but ours returned {type(out)}"
    assert error_kind(err) == error_kind(native_err), (
        f"{msg}: native raised {native_err!r}, ours raised {err!r}")


# ---- conv2d: valid configurations ---------------------------------------------------------------


def compare_conv2d(ours_fn, native_fn, inputs, seed, msg, prep=lambda t: t):
    """compare_with_native for conv2d on the leaves `inputs`, the op seeing (prep(x), w, b), with the
    upstream gradient drawn from `seed`. In half precision the harness falls back to native in
    float64 rounded once where native in the same dtype disagrees (compare_with_native says why);
    the fuzzer counts those cases as events."""
    def ours(x, w, b=None):
        return ours_fn(prep(x), w, b)

    def native(x, w, b=None):
        return native_fn(prep(x), w, b)

    torch.manual_seed(seed)  # the harness draws the upstream gradient from torch's global RNG
    compare_with_native(ours, native, inputs, msg=msg,
                        on_fallback=lambda text: event(f"conv2d {inputs[0].dtype}: {text}"))


def native_conv2d_may_crash(case):
    """Native conv2d (torch 2.13 CPU) dies with SIGSEGV, e.g. on
        x = torch.randn(1, 14, 6, 1)
        w = torch.randn(14, 7, 2, 1).contiguous(memory_format=torch.channels_last)
        F.conv2d(x, w, torch.randn(14), stride=2, padding=3, dilation=3, groups=2)
    (also with a channels_last input and a contiguous weight; not with both contiguous, nor without
    the bias, nor with groups=1 or one channel per group). A superset of what was seen: groups > 1,
    more than one channel per group, a bias, and an output row or column that reads only padding.

    On CPUs with AVX512-BF16 (seen on a Sapphire Rapids class Xeon) native's bfloat16 backward also
    dies whenever an output row or column reads only padding, with any layout, bias or groups:
        x = torch.randn(1, 4, 1, 5, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(4, 4, 2, 3, dtype=torch.bfloat16, requires_grad=True)
        F.conv2d(x, w, dilation=3, padding=[2, 1]).sum().backward()
    (not with one channel per group, nor in float16 or float32)."""
    kw = case["kwargs"]
    groups = kw["groups"]
    bf16_region = case["dtype"] == torch.bfloat16 and case["C"] // groups > 1
    if not bf16_region and (groups == 1 or case["C"] // groups == 1 or not case["bias"]):
        return False
    pair = lambda v: tuple(v) * (2 // len(v)) if isinstance(v, (tuple, list)) else (int(v), int(v))  # noqa: E731
    s, d = pair(kw["stride"]), pair(kw["dilation"])
    k, size = (case["kh"], case["kw"]), (case["H"], case["W"])
    padding = kw.get("padding", 0)
    for dim in range(2):
        if padding == "same":
            begin, end = (d[dim] * (k[dim] - 1)) // 2, d[dim] * (k[dim] - 1) - (d[dim] * (k[dim] - 1)) // 2
        elif padding == "valid":
            begin = end = 0
        else:
            begin = end = pair(padding)[dim]
        out = (size[dim] + begin + end - d[dim] * (k[dim] - 1) - 1) // s[dim] + 1
        if empty_windows(size[dim], out, k[dim], s[dim], begin, d[dim]):
            return True
    return False


@st.composite
def conv2d_cases(draw):
    groups = draw(st.integers(1, 3))
    # channel counts past the GEMM's register tile (12 output channels) and packing panels too
    cg = draw(st.one_of(st.integers(1, 3), st.integers(4, 9)))
    kg = draw(st.one_of(st.integers(1, 3), st.integers(4, 26)))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation, (dh, dw) = int_or_pair(draw, 1, 3)
    padding_form = draw(st.sampled_from(["explicit", "explicit", "same", "valid", "default"]))
    kwargs = {"groups": groups, "dilation": dilation}
    if padding_form == "same":
        stride, (sh, sw) = draw(st.sampled_from([1, (1, 1), (1,), [1, 1]])), (1, 1)
        ph0, ph1 = (dh * (kh - 1)) // 2, dh * (kh - 1) - (dh * (kh - 1)) // 2  # uneven when even
        pw0, pw1 = (dw * (kw - 1)) // 2, dw * (kw - 1) - (dw * (kw - 1)) // 2
        kwargs["padding"] = "same"
    else:
        stride, (sh, sw) = int_or_pair(draw, 1, 3)
        if padding_form == "explicit":
            padding, (ph0, pw0) = int_or_pair(draw, 0, 3)
            ph1, pw1 = ph0, pw0
            kwargs["padding"] = padding
        else:
            ph0 = ph1 = pw0 = pw1 = 0
            if padding_form == "valid":
                kwargs["padding"] = "valid"
    kwargs["stride"] = stride
    # Smallest input that leaves at least one output position; widths reach 40 to cross every
    # SIMD tile remainder of the output row.
    h_min = max(1, dh * (kh - 1) + 1 - ph0 - ph1)
    w_min = max(1, dw * (kw - 1) + 1 - pw0 - pw1)
    H = draw(st.integers(h_min, h_min + 8))
    W = draw(st.integers(w_min, max(w_min, 40)))
    batch = draw(st.sampled_from([None, 0, 1, 1, 2, 3, 5]))
    dtype = draw(st.sampled_from(DTYPES))
    # Expanded (broadcast) inputs in float32/float64 only: in half precision the input's gradient is
    # a sum of per-copy gradients, each rounded to the dtype at its own (larger) magnitude, so the
    # sum's rounding error is not bounded by the dtype's tolerance at the sum's magnitude.
    # test_conv2d_expanded_half_precision checks the per-copy gradients in half precision.
    layouts = ["contiguous", "channels_last", "strided", "transposed"]
    if dtype in (torch.float32, torch.float64):
        layouts.append("expanded")
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=dtype,
        batch=batch,
        C=cg * groups, K=kg * groups, H=H, W=W, kh=kh, kw=kw,
        bias=draw(st.booleans()),
        input_layout=draw(st.sampled_from(layouts)),
        weight_layout=draw(st.sampled_from(["contiguous", "channels_last", "strided", "transposed"])),
        bias_layout=draw(st.sampled_from(["contiguous", "strided"])),
        kwargs=kwargs,
    )


@given(conv2d_cases())
def test_conv2d_matches_native(case):
    torch.manual_seed(case["seed"])
    dtype, batch, kwargs = case["dtype"], case["batch"], case["kwargs"]
    shape = (case["C"], case["H"], case["W"])
    expand_to = None
    if case["input_layout"] == "expanded":
        # A leaf with batch 1 (or an unbatched one with one channel row) broadcast inside the call.
        if batch is None:
            x = make_tensor((1,) + shape[1:], "contiguous", dtype)
            expand_to = shape
        else:
            x = make_tensor((1,) + shape, "contiguous", dtype)
            expand_to = (batch,) + shape
    else:
        full = shape if batch is None else (batch,) + shape
        x = make_tensor(full, case["input_layout"] if len(full) == 4 else "contiguous", dtype)
    w = make_tensor((case["K"], case["C"] // kwargs["groups"], case["kh"], case["kw"]),
                    case["weight_layout"], dtype)
    b = make_tensor((case["K"],), case["bias_layout"], dtype) if case["bias"] else None

    def prep(t):
        return t.expand(expand_to) if expand_to is not None else t

    def ours(x, w, b=None):
        return torch_cnnbp.conv2d(x, w, b, **kwargs)

    def native(x, w, b=None):
        return F.conv2d(x, w, b, **kwargs)

    if native_conv2d_may_crash(case):
        # Native crashes (SIGSEGV) on some convs whose output rows or columns read only padding
        # (see native_conv2d_may_crash). The reference there is native on contiguous copies, and in
        # float32 rounded once to bfloat16 for bfloat16 (native's bfloat16 kernels accumulate in
        # float32 too).
        event("conv2d: native's crash region, reference on contiguous copies")

        def native(x, w, b=None):  # noqa: F811
            wide = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
            cast = lambda t: None if t is None else t.contiguous().to(wide)  # noqa: E731
            return F.conv2d(cast(x), cast(w), cast(b), **kwargs).to(x.dtype)

    note(f"input {tuple(prep(x).shape)} strides {prep(x).stride()}, weight {tuple(w.shape)} {w.stride()}")
    inputs = [x, w] + ([b] if b is not None else [])
    compare_conv2d(ours, native, inputs, case["seed"], msg=f"conv2d {case}", prep=prep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,expanded,kw", [
    ((1, 9, 5, 40), (2, 9, 5, 40), dict(padding="same", dilation=2)),
    ((1, 4, 7, 13), (5, 4, 7, 13), dict(stride=2, padding=1)),
    ((1, 6, 31), (24, 6, 31), dict(groups=3, padding="same")),  # unbatched: channels broadcast
])
def test_conv2d_expanded_half_precision(dtype, shape, expanded, kw):
    """A broadcast (stride-0) input in half precision: output, the gradient of every copy (taken
    at the expanded tensor, before autograd sums the copies) and the weight gradient, against
    native computed in float64 and rounded once."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    C = expanded[-3]
    w = torch.randn(24, C // kw.get("groups", 1), 4, 4, generator=g, dtype=torch.float64).to(dtype)
    results = []
    for fn in (lambda x, w: torch_cnnbp.conv2d(x, w, **kw),
               lambda x, w: F.conv2d(x.double(), w.double(), **kw).to(dtype)):
        leaf, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        xe = leaf.expand(expanded)
        xe.retain_grad()
        out = fn(xe, wl)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(dtype))
        results.append((out.detach(), xe.grad, wl.grad))
    for name, a, e in zip(("output", "per-copy input gradient", "weight gradient"), *results):
        assert_close(a, e, msg=f"expanded {dtype} {kw}: {name}")


@pytest.mark.parametrize("seed", range(12))
def test_float16_conv2d_is_correctly_rounded(seed):
    """Ours in float16 is within the float16 tolerance of the float64 result rounded to float16,
    outputs and both gradients (native's CPU backward is not, for about 1 case in 10)."""
    torch.manual_seed(seed)
    C, K, kh, kw = (int(v) for v in torch.randint(1, 5, (4,)))
    N, H, W = int(torch.randint(1, 4, ())), kh + int(torch.randint(0, 6, ())), kw + int(torch.randint(0, 36, ()))
    x = torch.randn(N, C, H, W, dtype=torch.float64).half()
    w = torch.randn(K, C, kh, kw, dtype=torch.float64).half()
    compare_with_native(lambda x, w: torch_cnnbp.conv2d(x, w, padding="same"),
                        lambda x, w: F.conv2d(x.double(), w.double(), padding="same").half(), [x, w],
                        msg=f"float16 conv2d seed {seed}")


# ---- max_pool2d: valid configurations -----------------------------------------------------------


@st.composite
def max_pool2d_cases(draw):
    kernel, (kh, kw) = int_or_pair(draw, 1, 5)
    dilation, (dh, dw) = int_or_pair(draw, 1, 3)
    stride_form = draw(st.sampled_from(["given", "given", "none", "empty", "omitted"]))
    kwargs = {"kernel_size": kernel, "dilation": dilation}
    if stride_form == "given":
        kwargs["stride"], _ = int_or_pair(draw, 1, 5)
    elif stride_form == "none":
        kwargs["stride"] = None
    elif stride_form == "empty":
        kwargs["stride"] = draw(st.sampled_from([(), []]))
    # native: padding at most half the kernel size
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    if ph == pw and draw(st.booleans()):
        kwargs["padding"] = ph
    elif (ph, pw) != (0, 0) or draw(st.booleans()):
        kwargs["padding"] = (ph, pw)
    kwargs["ceil_mode"] = draw(st.booleans())
    kwargs["return_indices"] = draw(st.booleans())
    h_min = max(1, dh * (kh - 1) + 1 - 2 * ph)
    w_min = max(1, dw * (kw - 1) + 1 - 2 * pw)
    dtype = draw(st.sampled_from(DTYPES + DTYPES + INT_DTYPES))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=dtype,
        values=draw(st.sampled_from(["normal", "ties"])),
        batch=draw(st.sampled_from([None, 0, 1, 1, 2, 3])),
        # channels_last vectorises over channels (and blocks them by 64 in backward): reach past both
        C=draw(st.one_of(st.integers(1, 4), st.integers(5, 70))),
        H=draw(st.integers(h_min, h_min + 10)),
        W=draw(st.integers(w_min, max(w_min, 40))),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided", "transposed", "expanded"])),
        kwargs=kwargs,
    )


@given(max_pool2d_cases())
def test_max_pool2d_matches_native(case):
    torch.manual_seed(case["seed"])
    dtype, batch, kwargs = case["dtype"], case["batch"], case["kwargs"]
    shape = (case["C"], case["H"], case["W"])
    full = shape if batch is None else (batch,) + shape
    expand_to = None
    if case["layout"] == "expanded":  # every channel (and sample) reads the same plane
        x = make_tensor((1,) * (len(full) - 2) + full[-2:], "contiguous", dtype, case["values"])
        expand_to = full
    else:
        x = make_tensor(full, case["layout"] if len(full) == 4 else "contiguous", dtype, case["values"])

    def prep(t):
        return t.expand(expand_to) if expand_to is not None else t

    def ours(x):
        return torch_cnnbp.max_pool2d(prep(x), **kwargs)

    def native(x):
        return F.max_pool2d(prep(x), **kwargs)

    note(f"input {tuple(prep(x).shape)} strides {prep(x).stride()}")
    compare_max_pool2d(x, prep, kwargs, msg=f"max_pool2d {case}")


def pool_pairs(kwargs):
    """(kernel, stride, padding, dilation) as pairs, for a call native accepted."""
    def pair(v):
        v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        return tuple(int(e) for e in (v * 2 if len(v) == 1 else v))
    k = pair(kwargs["kernel_size"])
    stride = kwargs.get("stride")
    s = k if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else pair(stride)
    return k, s, pair(kwargs.get("padding", 0)), pair(kwargs.get("dilation", 1))


def empty_windows(in_len, out_len, k, s, p, d):
    """Output positions along one dimension whose window has no tap inside the input."""
    return [i for i in range(out_len) if not any(0 <= i * s - p + m * d < in_len for m in range(k))]


def compare_max_pool2d(x, prep, kwargs, msg):
    """compare_with_native for max_pool2d on the leaf x (the op sees prep(x)), except where a
    window lies wholly in the padding (dilation stepping over a short input). There the output is
    native's (the lowest value, and native's index, which points outside the window and often past
    the plane) and native's backward would write out of bounds, so the forward is compared with
    native and the backward with the definition: an empty window sends no gradient, every other
    window sends its gradient to its argmax (gather's adjoint, in the same dtype)."""
    if x.dtype in (torch.int8, torch.uint8):
        # native's int8/uint8 max_pool2d fails on channels_last inputs ("Expected input_depth *
        # input_height * input_width <= std::numeric_limits<integer_t>::max()"): its reference
        # is the same values, contiguous
        native_prep = lambda t: prep(t).contiguous()  # noqa: E731
    else:
        native_prep = prep
    full = prep(x)
    native_out, native_idx = F.max_pool2d(native_prep(x), **{**kwargs, "return_indices": True})
    k, s, p, d = pool_pairs(kwargs)
    rows = empty_windows(full.shape[-2], native_out.shape[-2], k[0], s[0], p[0], d[0])
    cols = empty_windows(full.shape[-1], native_out.shape[-1], k[1], s[1], p[1], d[1])
    if not rows and not cols:
        compare_with_native(lambda x: torch_cnnbp.max_pool2d(prep(x), **kwargs),
                            lambda x: F.max_pool2d(native_prep(x), **kwargs), [x], msg=msg)
        return
    event("max_pool2d: windows wholly in the padding")
    ours_out, ours_idx = torch_cnnbp.max_pool2d(full, **{**kwargs, "return_indices": True})
    assert ours_out.shape == native_out.shape and ours_out.dtype == native_out.dtype, msg
    if x.is_floating_point():
        assert_close(ours_out, native_out, msg=msg)
    else:
        assert torch.equal(ours_out, native_out), msg
    assert torch.equal(ours_idx, native_idx), f"{msg}: indices"
    if not x.is_floating_point():
        return
    g = torch.randn(ours_out.shape, dtype=torch.float64).to(x.dtype)
    keep = torch.ones(ours_out.shape[-2:], dtype=torch.bool)
    keep[rows, :] = False
    keep[:, cols] = False
    leaf = x.detach().clone().requires_grad_()
    out = torch_cnnbp.max_pool2d(prep(leaf), **kwargs)
    (grad,) = torch.autograd.grad(out[0] if isinstance(out, tuple) else out, leaf, g)
    ref_leaf = x.detach().clone().requires_grad_()
    idx = torch.where(keep, native_idx, torch.zeros_like(native_idx)).flatten(-2)
    gathered = prep(ref_leaf).flatten(-2).gather(-1, idx).view(ours_out.shape)
    (expected,) = torch.autograd.grad(gathered, ref_leaf, torch.where(keep, g, torch.zeros_like(g)))
    assert_close(grad, expected, msg=f"{msg}: gradient with empty windows")


# ---- invalid configurations ---------------------------------------------------------------------
#
# KNOWN BUGS, not drawn below (each has a strict-xfail reproducer at the end of this file):
#   a non-tensor input or bias: native TypeError, ours AttributeError / RuntimeError
#   an argument of the wrong type together with another problem (a wrong-length sequence, a bad
#   value, an input or weight of the wrong rank): native's argument parser raises TypeError before
#   any other check runs, ours raises whichever error its checks meet first (see
#   type_error_is_masked; for these the fuzzer requires only that ours rejects the call)
#   a 0-dim integer tensor as an int argument: native accepts it (via __index__), ours TypeError
# Deliberate differences, also not drawn: conv2d rejects integer and complex inputs (native
# computes them); native conv2d of a zero-channel input returns zero output channels, ours K;
# native conv2d skips its dilation and dtype checks when the input is empty (dilation=0, or input,
# weight and bias of different dtypes, are accepted then and rejected otherwise); ours rejects them
# always (checked below).

CONV2D_DEFAULTS = dict(stride=1, padding=0, dilation=1, groups=1)
MAX_POOL2D_DEFAULTS = dict(kernel_size=1, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False)
BAD_TYPES = [1.5, 2.0, None, True, False, (1, 2.0), (True, 1), "x"]


def loose_pair(draw, a, b, allow_types=True):
    """An argument that may be invalid: an int in [a, b], or a sequence of 0 to 3 of them; with
    allow_types, sometimes a float, None, a bool or a string (native: TypeError)."""
    forms = ["int", "int", "tuple", "tuple", "one", "list", "empty", "three"] + (["bad"] if allow_types else [])
    form = draw(st.sampled_from(forms))
    if form == "bad":
        return draw(st.sampled_from(BAD_TYPES))
    if form == "int":
        return draw(st.integers(a, b))
    n = {"tuple": 2, "list": 2, "one": 1, "empty": 0, "three": 3}[form]
    items = [draw(st.integers(a, b)) for _ in range(n)]
    return items if form == "list" else tuple(items)


def _pair(v):
    if isinstance(v, (tuple, list)) and len(v) in (1, 2):
        return tuple(v) * (2 // len(v))
    return (v, v)


def type_error_is_masked(native_err, ours_fn, native_fn, kwargs, defaults, padding_strings=False):
    """The known precedence bug: native raised TypeError, ours raised RuntimeError/ValueError, and
    with every wrongly-typed argument replaced by a valid default native still rejects the call with
    RuntimeError/ValueError, i.e. the call has a second, value-level problem that ours met first."""
    if error_kind(native_err) != "TypeError":
        return False
    _, ours_err = run(ours_fn)
    if ours_err is None or error_kind(ours_err) != "RuntimeError/ValueError":
        return False
    def wrong_type(key, v):
        if key == "ceil_mode":
            return not isinstance(v, bool)
        if key == "padding" and isinstance(v, str) and padding_strings:
            return False  # conv2d: a padding string is the right type; a bad one is a value error
        return key != "return_indices" and has_type_error_arg(v)

    repaired = {k: (defaults[k] if wrong_type(k, v) else v) for k, v in kwargs.items()}
    _, err = run(lambda: native_fn(**repaired))
    return err is not None and error_kind(err) == "RuntimeError/ValueError"


def has_type_error_arg(*args):
    def bad(v):
        if isinstance(v, (bool, float, str)) or v is None:
            return True
        return isinstance(v, (tuple, list)) and any(bad(e) for e in v)
    return any(bad(a) for a in args)


@st.composite
def conv2d_invalid_cases(draw):
    in_dim = draw(st.sampled_from([2, 3, 4, 4, 4, 5]))
    C = draw(st.integers(1, 4))
    in_shape = [draw(st.integers(0, 2)), C, draw(st.integers(0, 6)), draw(st.integers(0, 6))]
    in_shape = in_shape[4 - min(in_dim, 4):] if in_dim <= 4 else [1] + in_shape
    w_dim = draw(st.sampled_from([2, 3, 4, 4, 4, 5]))
    w_shape = [draw(st.integers(0, 4)), draw(st.integers(1, 4)), draw(st.integers(0, 4)), draw(st.integers(0, 4))]
    w_shape = w_shape[:w_dim] if w_dim <= 4 else w_shape + [1]
    dtype = draw(st.sampled_from(DTYPES))
    w_dtype = draw(st.sampled_from([dtype] * 4 + list(DTYPES)))
    bias = draw(st.sampled_from([None, "K", "K", "K+1", "Kx1", "scalar", "other dtype"]))
    allow_types = draw(st.booleans())
    padding = draw(st.one_of(st.sampled_from(["same", "valid", "full"]),
                             st.builds(lambda p: p, st.just(None)).flatmap(
                                 lambda _: st.just(loose_pair(draw, -1, 3, allow_types)))))
    groups = draw(st.one_of(st.integers(-1, 3), st.sampled_from([1.0, True, False, None]))
                  if allow_types else st.integers(-1, 3))
    kwargs = dict(stride=loose_pair(draw, -1, 3, allow_types), padding=padding,
                  dilation=loose_pair(draw, -1, 3, allow_types), groups=groups)
    return dict(seed=draw(st.integers(0, 2**31 - 1)), in_shape=in_shape, w_shape=w_shape, dtype=dtype,
                w_dtype=w_dtype, bias=bias, kwargs=kwargs)


@given(conv2d_invalid_cases())
def test_conv2d_rejects_exactly_what_native_rejects(case):
    torch.manual_seed(case["seed"])
    kwargs = case["kwargs"]
    x = torch.randn(case["in_shape"], dtype=torch.float64).to(case["dtype"])
    w = torch.randn(case["w_shape"], dtype=torch.float64).to(case["w_dtype"])
    K = case["w_shape"][0]
    b = {None: None, "K": torch.randn(K), "K+1": torch.randn(K + 1), "Kx1": torch.randn(K, 1),
         "scalar": torch.tensor(1.0), "other dtype": torch.randn(K, dtype=torch.float64)}[case["bias"]]
    if b is not None and case["bias"] != "other dtype":
        b = b.to(case["dtype"])
    native_out, native_err = run(lambda: F.conv2d(x, w, b, **kwargs))
    if native_err is not None:
        if type_error_is_masked(native_err, lambda: torch_cnnbp.conv2d(x, w, b, **kwargs),
                                lambda **kw: F.conv2d(x, w, b, **kw), kwargs, CONV2D_DEFAULTS, padding_strings=True):
            event("known bug: RuntimeError where native raises TypeError first (rejected all the same)")
            return
        assert_same_rejection(lambda: torch_cnnbp.conv2d(x, w, b, **kwargs), native_err, f"conv2d {case}")
        return
    assume(x.dim() < 3 or x.shape[-3] > 0)  # zero channels: native's output has 0 channels (see above)
    dtypes = {x.dtype, w.dtype} | ({b.dtype} if b is not None else set())
    if x.numel() == 0 and (0 in _pair(kwargs["dilation"]) or len(dtypes) > 1):
        # native skips its dilation and dtype checks for an empty input; ours makes them always
        event("conv2d: native skips a check on an empty input, ours rejects")
        assert_same_rejection(lambda: torch_cnnbp.conv2d(x, w, b, **kwargs),
                              RuntimeError("rejected by native for a non-empty input"), f"conv2d {case}")
        return
    inputs = [x, w] + ([b] if b is not None else [])
    compare_conv2d(lambda x, w, b=None: torch_cnnbp.conv2d(x, w, b, **kwargs),
                   lambda x, w, b=None: F.conv2d(x, w, b, **kwargs), inputs, case["seed"], msg=f"conv2d {case}")


@st.composite
def max_pool2d_invalid_cases(draw):
    in_dim = draw(st.sampled_from([2, 3, 3, 4, 4, 4, 5]))
    shape = [draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(st.integers(0, 7)), draw(st.integers(0, 7))]
    shape = shape[4 - min(in_dim, 4):] if in_dim <= 4 else [1] + shape
    allow_types = draw(st.booleans())
    kwargs = dict(kernel_size=loose_pair(draw, -1, 6, allow_types))
    stride = draw(st.sampled_from(["omit", "none", "empty", "given", "given"]))
    if stride == "none":
        kwargs["stride"] = None
    elif stride == "empty":
        kwargs["stride"] = draw(st.sampled_from([(), []]))
    elif stride == "given":
        kwargs["stride"] = loose_pair(draw, -1, 4, allow_types)
    if draw(st.booleans()):
        kwargs["padding"] = loose_pair(draw, -1, 4, allow_types)
    if draw(st.booleans()):
        kwargs["dilation"] = loose_pair(draw, -1, 3, allow_types)
    kwargs["ceil_mode"] = draw(st.sampled_from([False, True] + ([1, 0, None, "yes"] if allow_types else [])))
    kwargs["return_indices"] = draw(st.sampled_from([False, True, 0, 1, None]))
    dtype = draw(st.sampled_from(DTYPES + INT_DTYPES + (torch.bool, torch.complex64)))
    return dict(seed=draw(st.integers(0, 2**31 - 1)), shape=shape, dtype=dtype, kwargs=kwargs)


@given(max_pool2d_invalid_cases())
def test_max_pool2d_rejects_exactly_what_native_rejects(case):
    torch.manual_seed(case["seed"])
    kwargs = case["kwargs"]
    dtype = case["dtype"]
    x = torch.randn(case["shape"], dtype=torch.float64)
    x = (x * 10).to(dtype) if not dtype.is_complex else x.to(dtype)
    native_out, native_err = run(lambda: F.max_pool2d(x, **kwargs))
    if native_err is not None:
        if type_error_is_masked(native_err, lambda: torch_cnnbp.max_pool2d(x, **kwargs),
                                lambda **kw: F.max_pool2d(x, **kw), kwargs, MAX_POOL2D_DEFAULTS):
            event("known bug: RuntimeError where native raises TypeError first (rejected all the same)")
            return
        assert_same_rejection(lambda: torch_cnnbp.max_pool2d(x, **kwargs), native_err, f"max_pool2d {case}")
        return
    compare_max_pool2d(x, lambda t: t, kwargs, msg=f"max_pool2d {case}")


# ---- reproducers: fixed bugs (plain regression tests) and open ones (strict xfail) ---------------


def _xfail(reason):
    return pytest.mark.xfail(strict=True, reason=reason)


def _same_rejection(ours, native):
    native_out, native_err = run(native)
    assert native_err is not None
    assert_same_rejection(ours, native_err, "reproducer")


X = lambda: torch.randn(2, 3, 5, 5)  # noqa: E731
W = lambda: torch.randn(4, 3, 3, 3)  # noqa: E731


@pytest.mark.parametrize("arg", ["stride", "padding", "dilation"])
@pytest.mark.parametrize("value", [(1, 1, 1), []])
def test_fixed_conv2d_wrong_length_sequence_kind(arg, value):
    """Was: TypeError where native raises RuntimeError."""
    x, w = X(), W()
    _same_rejection(lambda: torch_cnnbp.conv2d(x, w, **{arg: value}), lambda: F.conv2d(x, w, **{arg: value}))


@pytest.mark.parametrize("arg", ["kernel_size", "stride", "padding", "dilation"])
def test_fixed_max_pool2d_wrong_length_sequence_kind(arg):
    """Was: TypeError where native raises RuntimeError."""
    x = X()
    kw = {"kernel_size": 2, arg: (1, 1, 1)}
    _same_rejection(lambda: torch_cnnbp.max_pool2d(x, **kw), lambda: F.max_pool2d(x, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("w_shape", [(4, 3, 0, 3), (4, 3, 3, 0)])
def test_fixed_conv2d_zero_size_kernel(dtype, w_shape):
    """Was: accepted, with an output of nonsense shape (native rejects)."""
    x, w = X().to(dtype), torch.randn(w_shape, dtype=dtype)
    _same_rejection(lambda: torch_cnnbp.conv2d(x, w), lambda: F.conv2d(x, w))


@pytest.mark.parametrize("groups", [1.0, True, False])
def test_fixed_conv2d_groups_type(groups):
    """Was: RuntimeError, or a result for True; native raises TypeError."""
    x, w = X(), W()
    _same_rejection(lambda: torch_cnnbp.conv2d(x, w, groups=groups), lambda: F.conv2d(x, w, groups=groups))


@pytest.mark.parametrize("ceil_mode", [1, None, "yes"])
def test_fixed_max_pool2d_ceil_mode_type(ceil_mode):
    """Was: accepted; native raises TypeError."""
    x = X()
    _same_rejection(lambda: torch_cnnbp.max_pool2d(x, 2, ceil_mode=ceil_mode),
                    lambda: F.max_pool2d(x, 2, ceil_mode=ceil_mode))


@_xfail("bug: a non-tensor input or bias raises AttributeError/RuntimeError; native raises TypeError")
@pytest.mark.parametrize("which", ["conv2d input", "conv2d bias", "max_pool2d input"])
def test_bug_non_tensor_argument(which):
    w = W()
    if which == "conv2d input":
        _same_rejection(lambda: torch_cnnbp.conv2d([1.0], w), lambda: F.conv2d([1.0], w))
    elif which == "conv2d bias":
        x = X()
        _same_rejection(lambda: torch_cnnbp.conv2d(x, w, [0.0] * 4), lambda: F.conv2d(x, w, [0.0] * 4))
    else:
        _same_rejection(lambda: torch_cnnbp.max_pool2d([1.0], 2), lambda: F.max_pool2d([1.0], 2))


@_xfail("bug: with a wrongly-typed argument and a second problem, ours raises the second problem's "
        "RuntimeError; native's argument parser raises TypeError first")
@pytest.mark.parametrize("which", ["conv2d input rank", "conv2d weight rank", "conv2d dilation=()",
                                   "max_pool2d kernel_size=()"])
def test_bug_type_error_precedes_value_error(which):
    x, w = X(), W()
    if which == "conv2d input rank":
        x = torch.randn(5, 5)
    elif which == "conv2d weight rank":
        w = torch.randn(4, 3, 3)
    if which.startswith("conv2d"):
        kw = dict(groups=1.0, dilation=()) if which == "conv2d dilation=()" else dict(stride=1.5)
        _same_rejection(lambda: torch_cnnbp.conv2d(x, w, **kw), lambda: F.conv2d(x, w, **kw))
    else:
        _same_rejection(lambda: torch_cnnbp.max_pool2d(x, (), ceil_mode=1), lambda: F.max_pool2d(x, (), ceil_mode=1))


@_xfail("bug: a 0-dim integer tensor as stride/kernel_size is rejected; native accepts it (__index__)")
@pytest.mark.parametrize("op", ["conv2d", "max_pool2d"])
def test_bug_zero_dim_tensor_argument(op):
    x = X()
    if op == "conv2d":
        w = W()
        expected = F.conv2d(x, w, stride=torch.tensor(2))
        torch.testing.assert_close(torch_cnnbp.conv2d(x, w, stride=torch.tensor(2)), expected)
    else:
        expected = F.max_pool2d(x, torch.tensor(2))
        torch.testing.assert_close(torch_cnnbp.max_pool2d(x, torch.tensor(2)), expected)
