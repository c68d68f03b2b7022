"""Threads: concurrent calls from many Python threads, torch.set_num_threads, determinism.

What is asserted here is what README.md (Guarantees) states:
* many Python threads calling both ops at once, on different shapes, get the single-threaded answer;
* at every intra-op thread count 1..N results match native;
* for a fixed thread count, outputs and gradients are bitwise identical from run to run;
* across thread counts: max_pool2d is bitwise identical (outputs, indices, gradients); conv2d's
  weight gradient is NOT (the batch is split into one partial sum per thread), while its output,
  input gradient and bias gradient are, where its own GEMM runs; all stay within
  tolerance of native;
* torch.use_deterministic_algorithms(True) accepts both ops (and changes none of the above).
"""
from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.nn.functional as F

import torch_cnnbp
from helpers import HALF_TYPES, assert_close, in_float64, leaves

MAX_THREADS = max(4, os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def restore_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_cases(seed=0):
    """(name, ours_fn, native_fn, inputs) over varied shapes, layouts, options and dtypes."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    cases = []
    conv = [
        ((8, 3, 16, 33), (8, 3, 3, 3), dict(padding=1)),
        ((1, 16, 12, 12), (16, 16, 3, 3), dict(stride=2)),
        ((5, 4, 9, 17), (6, 4, 1, 1), {}),
        ((16, 8, 8, 8), (8, 4, 3, 3), dict(groups=2, padding="same")),
        ((3, 6, 11, 7), (6, 1, 2, 3), dict(groups=6, dilation=2, padding=(1, 2))),
        ((2, 2, 5, 40), (3, 2, 4, 4), dict(padding="same", dilation=(1, 2))),
    ]
    for i, (xs, ws, kw) in enumerate(conv):
        dtype = (torch.float32, torch.float64, torch.bfloat16)[i % 3]
        x = randn(*xs, dtype=dtype)
        if i % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        inputs = [x, randn(*ws, dtype=dtype), randn(ws[0], dtype=dtype)]
        cases.append((f"conv2d {xs} {ws} {kw} {dtype}",
                      lambda x, w, b, kw=kw: torch_cnnbp.conv2d(x, w, b, **kw),
                      lambda x, w, b, kw=kw: F.conv2d(x, w, b, **kw), inputs))
    pool = [
        ((8, 3, 16, 33), dict(kernel_size=3, stride=2, padding=1)),
        ((1, 4, 40, 41), dict(kernel_size=2)),
        ((4, 5, 13, 9), dict(kernel_size=(3, 2), stride=1, dilation=2, ceil_mode=True)),
        ((6, 16, 10, 10), dict(kernel_size=3, stride=2, ceil_mode=True)),
        # channels_last with fewer samples than threads: the backward splits each sample's pixels
        # into bands, one per thread (overlapping windows: pixels that win several windows)
        ((1, 16, 48, 45), dict(kernel_size=3, stride=2, padding=1)),
        ((2, 24, 31, 47), dict(kernel_size=3, stride=1, padding=1)),
    ]
    for i, (xs, kw) in enumerate(pool):
        dtype = (torch.float32, torch.float64, torch.bfloat16, torch.float16)[i % 4]
        x = randn(*xs, dtype=dtype)
        if i % 2 or i >= 4:
            x = x.contiguous(memory_format=torch.channels_last)
        cases.append((f"max_pool2d {xs} {kw} {dtype}",
                      lambda x, kw=kw: torch_cnnbp.max_pool2d(x, return_indices=True, **kw),
                      lambda x, kw=kw: F.max_pool2d(x, return_indices=True, **kw), [x]))
    return cases


def run_case(fn, inputs, seed=1):
    """Forward and backward (a fixed upstream gradient): [outputs..., gradients...], detached."""
    xs = leaves(*inputs)
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(outs[0], xs, g.to(outs[0].dtype))
    return [o.detach() for o in outs] + list(grads)


def native_references(native, inputs):
    """What ours must match: native's results, and in half precision also native computed in float64
    and rounded once, which counts where native in the same dtype is off (helpers.compare_with_native)."""
    refs = [run_case(native, inputs)]
    half = next((t.dtype for t in inputs if t.dtype in HALF_TYPES), None)
    if half is not None:
        refs.append(run_case(in_float64(native, half), inputs))
    return refs


def assert_results_close(got, references, msg):
    """got matches the first of `references` (native_references) or, failing that, the next."""
    for k, expected in enumerate(references):
        try:
            assert len(got) == len(expected)
            for i, (a, e) in enumerate(zip(got, expected)):
                if a.is_floating_point():
                    assert_close(a, e, msg=f"{msg}: result {i}")
                else:
                    assert torch.equal(a, e), f"{msg}: result {i} (indices) differ"
            return
        except AssertionError:
            if k == len(references) - 1:
                raise


def assert_bitwise(got, expected, msg):
    for i, (a, e) in enumerate(zip(got, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a, e), f"{msg}: result {i} not bitwise identical"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernels_really_run_on_that_many_threads(threads):
    # at::parallel_for is a header template: compiled without OpenMP it silently runs everything
    # on the calling thread. This counts the threads that ran a parallel_for inside the extension.
    torch.set_num_threads(threads)
    assert torch.ops.cnnbp._parallel_threads(64) == threads
    assert torch.ops.cnnbp._parallel_threads(1) == 1


def test_many_python_threads_at_once():
    cases = make_cases()
    expected = [native_references(native, inputs) for _, _, native, inputs in cases]
    n_threads, rounds = 8, 6
    barrier = threading.Barrier(n_threads)
    errors = []

    def worker(t):
        try:
            barrier.wait()
            for r in range(rounds):
                # every thread walks the cases from a different start: different shapes at once
                for k in range(len(cases)):
                    i = (t + r + k) % len(cases)
                    name, ours, _, inputs = cases[i]
                    assert_results_close(run_case(ours, inputs), expected[i], f"thread {t}: {name}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((t, e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, f"{len(errors)} thread(s) failed; first: {errors[0]!r}"


def test_threads_share_inputs_and_one_module():
    """Threads reading the same input and weight tensors (no copies) at once."""
    x = torch.randn(4, 3, 20, 21)
    w = torch.randn(5, 3, 3, 3)
    expected_conv = F.conv2d(x, w, padding=1)
    expected_pool = F.max_pool2d(expected_conv, 2, return_indices=True)
    errors = []

    def worker():
        try:
            for _ in range(20):
                y = torch_cnnbp.conv2d(x, w, padding=1)
                assert_close(y, expected_conv)
                out, idx = torch_cnnbp.max_pool2d(y, 2, return_indices=True)
                assert_close(out, expected_pool[0])
                assert torch.equal(idx, expected_pool[1])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, repr(errors[0])


@pytest.mark.parametrize("threads", range(1, MAX_THREADS + 1))
def test_every_thread_count_matches_native_and_is_deterministic(threads):
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for name, ours, native, inputs in make_cases():
        first = run_case(ours, inputs)
        assert_results_close(first, native_references(native, inputs), f"{threads} threads: {name}")
        for _ in range(2):
            assert_bitwise(run_case(ours, inputs), first, f"{threads} threads, repeated: {name}")


def results_by_thread_count(counts):
    cases = make_cases()
    out = {}
    for n in counts:
        torch.set_num_threads(n)
        out[n] = [run_case(ours, inputs) for _, ours, _, inputs in cases]
    return cases, out


def test_max_pool2d_is_bitwise_identical_across_thread_counts():
    counts = list(range(1, MAX_THREADS + 1))
    cases, res = results_by_thread_count(counts)
    for n in counts[1:]:
        for c, (name, *_rest) in enumerate(cases):
            if name.startswith("max_pool2d"):
                assert_bitwise(res[n][c], res[1][c], f"1 vs {n} threads: {name}")


def own_gemm_active() -> bool:
    """conv2d's products run on the project's own GEMM in this process (csrc/gemm.h: the default on
    AVX-512 CPUs not made by Intel, or CNNBP_GEMM=own); otherwise on ATen's BLAS."""
    return "gemm=own" in torch.ops.cnnbp._paths()


def test_conv2d_across_thread_counts():
    """What is true today, as README.md (Guarantees) states it:
    * the weight gradient may change in the last bits with the thread count: once the batch is
      split among threads (at least as many samples as threads, and enough work), each chunk sums
      its own partial and the partials are added in chunk order. Witness: a float64 batch of 8.
    * with the own GEMM, output, grad_input and grad_bias are bitwise identical across
      thread counts (each output element is computed by one thread, in a fixed order). With ATen's
      BLAS instead, that is not promised and only closeness is checked.
    Everything stays within tolerance of the 1-thread result (and of native: see above)."""
    g = torch.Generator().manual_seed(3)
    witness = []
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(8, 16, 32, 32, generator=g, dtype=torch.float64).to(dtype)
        w = torch.randn(16, 16, 3, 3, generator=g, dtype=torch.float64).to(dtype)
        b = torch.randn(16, generator=g, dtype=torch.float64).to(dtype)
        witness.append((f"conv2d batch 8, {dtype}", lambda x, w, b: torch_cnnbp.conv2d(x, w, b, padding=1), [x, w, b]))
    cases = witness + [(name, ours, inputs) for name, ours, _, inputs in make_cases() if name.startswith("conv2d")]
    counts = list(range(1, MAX_THREADS + 1))
    res = {}
    for n in counts:
        torch.set_num_threads(n)
        res[n] = [run_case(ours, inputs) for _, ours, inputs in cases]
    exact = own_gemm_active()
    for n in counts[1:]:
        for c, (name, _, _) in enumerate(cases):
            msg = f"1 vs {n} threads: {name}"
            assert_results_close(res[n][c], [res[1][c]], msg)
            if exact:
                out, gin, gw, gb = res[n][c]
                out1, gin1, gw1, gb1 = res[1][c]
                assert_bitwise([out, gin, gb], [out1, gin1, gb1], msg + " (output, grad_input, grad_bias)")
    assert not torch.equal(res[2][0][2], res[1][0][2]), (
        "conv2d's weight gradient over a batch of 8 is now bitwise identical at 1 and 2 threads: if "
        "that holds for all of conv2d, update README.md (Guarantees) (determinism across thread counts) "
        "and this test")


def test_use_deterministic_algorithms():
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cases = make_cases()
    baseline = [run_case(ours, inputs) for _, ours, _, inputs in cases]
    try:
        torch.use_deterministic_algorithms(True)
        for (name, ours, native, inputs), base in zip(cases, baseline):
            first = run_case(ours, inputs)
            assert_bitwise(first, base, f"deterministic mode: {name}")
            assert_bitwise(run_case(ours, inputs), first, f"deterministic mode, repeated: {name}")
        # double backward goes through the same ops (and max_pool2d's gather)
        x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
        y = torch_cnnbp.max_pool2d(torch_cnnbp.conv2d(x, w, padding=1), 2)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        gx.sum().backward()
        assert w.grad is not None and torch.isfinite(w.grad).all()
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)
    assert torch.are_deterministic_algorithms_enabled() == was_enabled
