"""Exceptions mid-way: a backward that raises part-way through (a tensor hook, a failing check
inside a parallel region, KeyboardInterrupt) leaves both ops usable and nothing global changed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torch_cnnbp
from helpers import compare_with_native, conv2d_pair, max_pool2d_pair


class Boom(Exception):
    pass


def global_state():
    """Everything process-wide that an op or its autograd wiring could leave changed."""
    return dict(
        threads=torch.get_num_threads(),
        grad=torch.is_grad_enabled(),
        inference=torch.is_inference_mode_enabled(),
        deterministic=torch.are_deterministic_algorithms_enabled(),
        dtype=torch.get_default_dtype(),
        autocast=torch.is_autocast_enabled("cpu"),
        anomaly=torch.is_anomaly_enabled(),
        ops=sorted(n for n in ("conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward")
                   if hasattr(torch.ops.cnnbp, n)),
    )


def check_ops_work(msg):
    """Both ops, forward and backward, against native; and a parallel-sized call, twice, bitwise
    identical (a broken thread pool would hang, raise or differ)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 4, 11, 13), torch.randn(5, 4, 3, 3), torch.randn(5)
    ours, native = conv2d_pair(padding=1, stride=(1, 2))
    compare_with_native(ours, native, [x, w, b], msg=f"{msg}: conv2d")
    ours, native = max_pool2d_pair(kernel_size=3, stride=2, padding=1, return_indices=True)
    compare_with_native(ours, native, [x], msg=f"{msg}: max_pool2d")
    big = torch.randn(16, 8, 32, 32)
    wb = torch.randn(8, 8, 3, 3)
    first = torch_cnnbp.max_pool2d(torch_cnnbp.conv2d(big, wb, padding=1), 2)
    assert torch.equal(first, torch_cnnbp.max_pool2d(torch_cnnbp.conv2d(big, wb, padding=1), 2)), msg


def network(x, w1, w2):
    y = torch_cnnbp.conv2d(x, w1, padding=1)
    z = torch_cnnbp.max_pool2d(y, 2)
    return torch_cnnbp.conv2d(z, w2, padding=1), y, z


@pytest.fixture
def state():
    before = global_state()
    yield before
    assert global_state() == before


@pytest.mark.parametrize("where", ["after pool backward", "after conv backward", "on the input"])
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_hook_raising_mid_backward(state, where, exc):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    w1 = torch.randn(4, 3, 3, 3, requires_grad=True)
    w2 = torch.randn(2, 4, 3, 3, requires_grad=True)
    out, y, z = network(x, w1, w2)

    def hook(grad):
        raise exc("interrupted")

    target = {"after pool backward": y, "after conv backward": z, "on the input": x}[where]
    handle = target.register_hook(hook)
    with pytest.raises(exc):
        out.sum().backward(retain_graph=True)
    handle.remove()
    # the same graph, retained, now runs to the end and gives native's gradients
    for t in (x, w1, w2):
        t.grad = None
    out.sum().backward()
    xn, w1n, w2n = (t.detach().clone().requires_grad_() for t in (x, w1, w2))
    F.conv2d(F.max_pool2d(F.conv2d(xn, w1n, padding=1), 2), w2n, padding=1).sum().backward()
    for a, e in ((x, xn), (w1, w1n), (w2, w2n)):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-4)
    check_ops_work(f"after {exc.__name__} {where}")


def test_failing_check_inside_parallel_backward(state):
    """max_pool2d_backward refuses an index outside the input plane: the check fires inside the
    parallel loop over planes, on worker threads. Repeated, with good calls in between."""
    torch.set_num_threads(max(2, torch.get_num_threads()))
    try:
        grad_output = torch.randn(64, 8, 4, 4)
        for i in range(20):
            indices = torch.randint(0, 64, (64, 8, 4, 4))
            indices[i % 64, i % 8, 1, 2] = 64 + i  # one bad index somewhere in the middle
            with pytest.raises(RuntimeError, match="outside the input plane"):
                torch.ops.cnnbp.max_pool2d_backward(grad_output, indices, [64, 8, 8, 8])
            with pytest.raises(RuntimeError, match="outside the input plane"):
                torch.ops.cnnbp.max_pool2d_backward(grad_output.contiguous(memory_format=torch.channels_last),
                                                    indices.contiguous(memory_format=torch.channels_last),
                                                    [64, 8, 8, 8])
            if i % 5 == 0:
                check_ops_work(f"after failed backward {i}")
    finally:
        torch.set_num_threads(state["threads"])
    check_ops_work("after failed backwards")


def test_bad_direct_op_calls_leave_ops_usable(state):
    """The raw ops rejecting bad arguments (checks before any work) in a loop."""
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    g = torch.randn(2, 4, 6, 6)
    for _ in range(50):
        with pytest.raises(RuntimeError):
            torch.ops.cnnbp.conv2d(x, w[:, :2], None, [1, 1], [0, 0, 0, 0], [1, 1], 1)
        with pytest.raises(RuntimeError):
            torch.ops.cnnbp.conv2d_backward(g[:, :, :5], x, w, [1, 1], [0, 0, 0, 0], [1, 1], 1,
                                            [True, True, True])
        with pytest.raises(RuntimeError):
            torch.ops.cnnbp.max_pool2d(x, [9, 9], [1, 1], [0, 0], [1, 1], False)
        with pytest.raises(RuntimeError):
            idx = torch.full((2, 3, 4, 4), 10**6, dtype=torch.int64)
            torch.ops.cnnbp.max_pool2d_backward(torch.randn(2, 3, 4, 4), idx, [2, 3, 8, 8])
    check_ops_work("after rejected raw calls")


def test_exception_in_forward_under_no_grad_and_autocast(state):
    """Errors raised inside context managers leave those contexts' global flags restored."""
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            torch_cnnbp.conv2d(x, w[:, :2])
    with pytest.raises(RuntimeError):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch_cnnbp.conv2d(x, w[:, :2])
    with pytest.raises(RuntimeError):
        with torch.inference_mode():
            torch_cnnbp.max_pool2d(x, 9)
    check_ops_work("after errors in contexts")


def test_exception_in_double_backward(state):
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = torch_cnnbp.max_pool2d(torch_cnnbp.conv2d(x, w, padding=1), 2)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    h = gx.register_hook(lambda g: (_ for _ in ()).throw(Boom("second order")))
    with pytest.raises(Boom):
        gx.sum().backward(retain_graph=True)
    h.remove()
    gx.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    check_ops_work("after exception in double backward")
