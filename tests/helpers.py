"""The one comparison harness every test uses: run our op and PyTorch's on the same inputs,
forward and backward, and compare values and every gradient with a tolerance fitting the dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import torch_cnnbp

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# (rtol, atol) per dtype. Half types: native accumulates in float like we do, but the two sum in
# different orders and each rounds its result once to 8 (bf16) or 11 (fp16) bits.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}


def assert_close(actual, expected, dtype=None, scale=1.0, msg=""):
    """torch.testing.assert_close with the project's tolerance for `dtype`; `scale` widens atol for
    values that are sums of many terms (e.g. the weight gradient of a large batch)."""
    rtol, atol = TOLERANCE[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{msg}\n{m}")


def leaves(*tensors, dtype=None, requires_grad=True):
    """Independent leaf copies (same values, same strides) for each framework to differentiate."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        c = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype)
        c.copy_(t)
        out.append(c.requires_grad_(requires_grad and c.is_floating_point()))
    return out


HALF_TYPES = (torch.bfloat16, torch.float16)


def in_float64(fn, dtype):
    """fn computed in float64 on its floating inputs, its floating outputs rounded once to `dtype`:
    the correctly rounded result that a half-precision kernel accumulating in float approximates."""
    def wide(*ts):
        out = fn(*[t.double() if t is not None and t.is_floating_point() else t for t in ts])
        narrow = lambda o: o.to(dtype) if o.is_floating_point() else o  # noqa: E731
        return tuple(narrow(o) for o in out) if isinstance(out, tuple) else narrow(out)
    return wide


def compare_with_native(ours_fn, native_fn, inputs, dtype=None, grad_scale=1.0, msg="", on_fallback=None):
    """Runs both functions on separate leaf copies of `inputs`, backpropagates the same random
    upstream gradient through the first output, and compares the outputs (all of them, indices
    included) and the gradients of every floating input.

    In float16 and bfloat16, where ours is not within tolerance of native in the same dtype, it must
    instead be within tolerance of native computed in float64 and rounded once (in_float64). Native's
    half-precision kernels are themselves sometimes further than the tolerance from that result:
    its CPU float16 conv backward accumulates in float16, and on an AMD Zen 3 (AVX2, no AVX512-BF16)
    its bfloat16 conv grad_input was measured about twice as far from it as ours. Where native's error
    is close to the tolerance, ours (correctly rounded or within an ulp of it) can differ from native
    by slightly more than the tolerance; the float64 reference settles those too. on_fallback(text),
    if given, is called when the float64 reference is used (the fuzzer counts these)."""
    half = next((t.dtype for t in inputs if t is not None and t.dtype in HALF_TYPES), None)
    rng = torch.get_rng_state()  # the upstream gradient is drawn from it: the retry draws the same
    try:
        return _compare_once(ours_fn, native_fn, inputs, dtype, grad_scale, msg)
    except AssertionError:
        if half is None:
            raise
    if on_fallback is not None:
        on_fallback(f"compared with native in float64 after a mismatch with native {half}")
    torch.set_rng_state(rng)
    return _compare_once(ours_fn, in_float64(native_fn, half), inputs, dtype, grad_scale,
                         f"{msg} (vs native in float64, after a mismatch with native {half})")


def _compare_once(ours_fn, native_fn, inputs, dtype, grad_scale, msg):
    a = leaves(*inputs)
    b = leaves(*inputs)
    out_a, out_b = ours_fn(*a), native_fn(*b)
    tup_a = out_a if isinstance(out_a, tuple) else (out_a,)
    tup_b = out_b if isinstance(out_b, tuple) else (out_b,)
    assert len(tup_a) == len(tup_b)
    for x, y in zip(tup_a, tup_b):
        assert x.shape == y.shape, f"{msg}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        assert x.dtype == y.dtype, f"{msg}: dtype {x.dtype} != {y.dtype}"
        if x.is_floating_point():
            assert_close(x, y, dtype, msg=f"{msg}: output")
        else:
            assert torch.equal(x, y), f"{msg}: integer outputs differ"
    wants = [t for t in a if t is not None and t.requires_grad]
    if not wants:
        return tup_a
    g = torch.randn(tup_a[0].shape, dtype=torch.float64).to(tup_a[0].dtype)
    grads_a = torch.autograd.grad(tup_a[0], wants, g, allow_unused=True)
    grads_b = torch.autograd.grad(tup_b[0], [t for t in b if t is not None and t.requires_grad], g, allow_unused=True)
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        if gb is None:
            assert ga is None or not ga.any(), f"{msg}: gradient {i} should be zero"
            continue
        assert ga is not None, f"{msg}: gradient {i} missing"
        assert ga.shape == gb.shape and ga.dtype == gb.dtype, f"{msg}: gradient {i} shape/dtype"
        assert_close(ga, gb, dtype, scale=grad_scale, msg=f"{msg}: gradient {i}")
    return tup_a


def conv2d_pair(**kwargs):
    """(ours, native) conv2d closures over keyword arguments."""
    return (lambda x, w, b=None: torch_cnnbp.conv2d(x, w, b, **kwargs),
            lambda x, w, b=None: F.conv2d(x, w, b, **kwargs))


def max_pool2d_pair(**kwargs):
    """(ours, native) max_pool2d closures over keyword arguments."""
    return (lambda x: torch_cnnbp.max_pool2d(x, **kwargs), lambda x: F.max_pool2d(x, **kwargs))


def no_native_kernels_ran(fn, forbidden=("convolution", "mkldnn", "im2col", "col2im", "unfold", "pool")):
    """Runs fn under the profiler and returns the names of ATen ops whose names contain any of
    `forbidden` (lower-case). Empty means only this project's kernels did that work."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    return sorted(n for n in names if n.startswith("aten::") and any(f in n.lower() for f in forbidden))


def assert_close_within_native_error(actual, expected, exact, msg=""):
    """Compares ours (`actual`) with native (`expected`, same dtype) where a deep network's conditioning
    can magnify rounding far past the per-op tolerance (e.g. batch norm over a few values in train
    mode): the allowed difference is the dtype's tolerance, relative to the tensor's largest value,
    plus twice native's own error against `exact`, the float64 result. So ours must be as accurate
    as native, not bit-for-bit native."""
    rtol, atol = TOLERANCE[expected.dtype]
    exact = exact.to(torch.float64)
    native_error = (expected.to(torch.float64) - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=rtol,
                               atol=atol * scale + 2 * native_error, msg=lambda m: f"{msg}\n{m}")


class single_thread:
    """Context manager running its body with one intra-op thread. For finite-difference checks
    (gradcheck / gradgradcheck), which call the ops thousands of times on tiny tensors: with two
    threads on a loaded two-core machine each call's parallel region costs far more than its work."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
        return False
