"""torch.func (vmap, grad, jacrev, per-sample gradients), torch.export and autocast through our ops.

Oracle: the same transform applied to PyTorch's own conv2d / max_pool2d; for the raw backward ops'
vmap rules, a Python loop over the vmapped dimension.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

import torch_cnnbp

from helpers import TOLERANCE, assert_close, no_native_kernels_ran

ops = torch.ops.cnnbp
D = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def close(actual, expected, dtype=D, msg=""):
    """assert_close over (nested) tuples of tensors."""
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            close(a, e, dtype, f"{msg}[{i}]")
    else:
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, msg
        assert_close(actual, expected, dtype, msg=msg)


# ---- vmap of the public functions, every batched/unbatched combination --------------------------

CONV_KWARGS = [
    dict(),
    dict(stride=2, padding=1, groups=2),
    dict(padding="same", dilation=(2, 1)),
]


@pytest.mark.parametrize("kwargs", CONV_KWARGS, ids=["plain", "stride_groups", "same_dilated"])
@pytest.mark.parametrize("bias_dim", [0, None, "no bias"])
@pytest.mark.parametrize("weight_dim", [0, 2, None])
@pytest.mark.parametrize("input_dim", [0, 3, None])
def test_vmap_conv2d(input_dim, weight_dim, bias_dim, kwargs):
    if input_dim is None and weight_dim is None and bias_dim in (None, "no bias"):
        pytest.skip("nothing is batched")
    B = 3

    def batched(shape, dim):  # B independent samples stacked along `dim`, or one unbatched tensor
        return torch.randn(*shape, dtype=D) if dim is None else torch.randn(*shape[:dim], B, *shape[dim:], dtype=D)

    x = batched((2, 4, 7, 6), input_dim)
    w = batched((6, 2 if kwargs.get("groups") else 4, 3, 3), weight_dim)
    b = None if bias_dim == "no bias" else batched((6,), bias_dim)
    bd = None if bias_dim == "no bias" else bias_dim
    dims = (input_dim, weight_dim, bd)
    ours = vmap(lambda x, w, b: torch_cnnbp.conv2d(x, w, b, **kwargs), in_dims=dims)(x, w, b)
    native = vmap(lambda x, w, b: F.conv2d(x, w, b, **kwargs), in_dims=dims)(x, w, b)
    close(ours, native)


@pytest.mark.parametrize("in_dim", [0, 2])
def test_vmap_max_pool2d(in_dim):
    x = torch.randn(2, 3, 4, 9, 8, dtype=D).movedim(0, in_dim)
    kwargs = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, return_indices=True)
    close(vmap(lambda x: torch_cnnbp.max_pool2d(x, **kwargs), in_dims=in_dim)(x),
          vmap(lambda x: F.max_pool2d(x, **kwargs), in_dims=in_dim)(x))


def test_nested_vmap_and_unbatched_samples():
    x, w = torch.randn(2, 3, 3, 6, 6, dtype=D), torch.randn(2, 4, 3, 3, 3, dtype=D)
    f_ours = vmap(vmap(lambda x, w: torch_cnnbp.max_pool2d(torch_cnnbp.conv2d(x, w, padding=1), 2), (0, None)),
                  (None, 0))
    f_native = vmap(vmap(lambda x, w: F.max_pool2d(F.conv2d(x, w, padding=1), 2), (0, None)), (None, 0))
    close(f_ours(x, w), f_native(x, w))  # vmapped over unbatched (C, H, W) samples, then over weights


def test_vmap_runs_only_our_kernels():
    x, w = torch.randn(3, 2, 2, 6, 6), torch.randn(3, 4, 2, 3, 3)

    def run():
        vmap(lambda x, w: torch_cnnbp.max_pool2d(torch_cnnbp.conv2d(x, w), 2))(x, w)

    assert no_native_kernels_ran(run) == []


# ---- vmap rules of the raw ops against a loop ---------------------------------------------------


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
@pytest.mark.parametrize("dims", [d for d in itertools.product([0, None], repeat=3) if d != (None, None, None)])
def test_vmap_conv2d_backward_op(dims, mask):
    B, conv = 3, ([2, 1], [1, 0, 2, 1], [1, 2], 2)
    shapes = ((2, 6, 3, 5), (2, 4, 7, 6), (6, 2, 3, 3))  # grad_output, input, weight
    args = [torch.randn(B, *s, dtype=D) if d == 0 else torch.randn(*s, dtype=D) for s, d in zip(shapes, dims)]
    got = vmap(lambda go, x, w: ops.conv2d_backward(go, x, w, *conv, list(mask)), in_dims=dims)(*args)
    for i in range(B):
        sample = [a[i] if d == 0 else a for a, d in zip(args, dims)]
        want = ops.conv2d_backward(*sample, *conv, list(mask))
        for j, m in enumerate(mask):
            if m:
                close(got[j][i], want[j], msg=f"result {j}")


@pytest.mark.parametrize("dims", [(0, 0), (0, None), (None, 0)])
def test_vmap_max_pool2d_backward_op(dims):
    B, x = 3, torch.randn(2, 3, 7, 7, dtype=D)
    _, indices = ops.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    indices = torch.stack([indices, indices.flip(-1), indices.flip(-2)])
    go = torch.randn(B, *indices.shape[1:], dtype=D)
    args = [go if dims[0] == 0 else go[0], indices if dims[1] == 0 else indices[0]]
    got = vmap(lambda g, i: ops.max_pool2d_backward(g, i, list(x.shape)), in_dims=dims)(*args)
    for i in range(B):
        sample = [a[i] if d == 0 else a for a, d in zip(args, dims)]
        close(got[i], ops.max_pool2d_backward(*sample, list(x.shape)))


@pytest.mark.parametrize("dims", [(0, 0), (None, 0)])
def test_vmap_max_pool2d_backward_op_with_window(dims):
    """The window (here a tiling one over channels_last samples: the gather) goes through vmap."""
    B, x = 3, torch.randn(2, 16, 6, 7, dtype=D).contiguous(memory_format=torch.channels_last)
    window = ([2, 2], [2, 2], [0, 0], [1, 1])
    indices = torch.stack([ops.max_pool2d(x + k, *window, False)[1] for k in range(B)])
    go = torch.randn(B, *indices.shape[1:], dtype=D)
    args = [go if dims[0] == 0 else go[0], indices]
    got = vmap(lambda g, i: ops.max_pool2d_backward(g, i, list(x.shape), *window), in_dims=dims)(*args)
    for i in range(B):
        sample = [a[i] if d == 0 else a for a, d in zip(args, dims)]
        close(got[i], ops.max_pool2d_backward(*sample, list(x.shape)))


# ---- grad, jacrev, per-sample gradients ---------------------------------------------------------


def tiny_net(conv, pool):
    """f(x, w1, b1, w2): conv -> tanh -> max-pool -> grouped strided conv -> sum of squares."""

    def f(x, w1, b1, w2):
        h = pool(torch.tanh(conv(x, w1, b1, padding=1)), 2)
        return conv(h, w2, None, stride=2, groups=2).pow(2).sum()

    return f


OURS, NATIVE = tiny_net(torch_cnnbp.conv2d, torch_cnnbp.max_pool2d), tiny_net(F.conv2d, F.max_pool2d)


def tiny_args():
    return (torch.randn(2, 2, 8, 8, dtype=D), torch.randn(4, 2, 3, 3, dtype=D), torch.randn(4, dtype=D),
            torch.randn(4, 2, 2, 2, dtype=D))


def test_grad():
    args = tiny_args()
    close(grad(OURS, argnums=(0, 1, 2, 3))(*args), grad(NATIVE, argnums=(0, 1, 2, 3))(*args))


def test_tensors_leaked_from_a_transform():
    """A tensor kept from inside torch.func.grad is a dead functorch wrapper once grad returns; native
    ops take it as its plain value. So do ours (their apply unwraps dead wrappers, as the stock
    torch.autograd.Function.apply does), forward and backward, with native's results."""
    leaked = []

    def f(t):
        leaked.append(t * 1)
        return t.sum()

    grad(f)(torch.randn(2, 3, 8, 8, dtype=D))
    x, w = leaked[0], torch.randn(4, 3, 3, 3, dtype=D, requires_grad=True)
    assert torch._C._functorch.is_functorch_wrapped_tensor(x)
    assert torch._C._functorch.unwrap_if_dead(x) is not x  # dead: this is what gets unwrapped
    close(torch_cnnbp.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))
    out = torch_cnnbp.conv2d(x, w, padding=1)
    close(out, F.conv2d(x, w, padding=1))
    (gw,) = torch.autograd.grad(out.sum(), w)
    close(gw, torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), w)[0])


def test_jacrev():
    x, w1, b1, _ = tiny_args()
    f_ours = lambda x, w: torch_cnnbp.max_pool2d(torch_cnnbp.conv2d(x, w, b1, padding=1).tanh(), 2)  # noqa: E731
    f_native = lambda x, w: F.max_pool2d(F.conv2d(x, w, b1, padding=1).tanh(), 2)  # noqa: E731
    close(jacrev(f_ours, argnums=(0, 1))(x, w1), jacrev(f_native, argnums=(0, 1))(x, w1))


def test_hessian_jacrev_of_jacrev():
    x, w1, b1, w2 = tiny_args()
    close(jacrev(jacrev(OURS, argnums=1), argnums=1)(x, w1, b1, w2),
          jacrev(jacrev(NATIVE, argnums=1), argnums=1)(x, w1, b1, w2))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.pool = nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 8, 3, groups=2, padding="same", padding_mode="reflect")
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_sample_gradients(dtype):
    native = SmallCNN().to(dtype)
    ours = torch_cnnbp.swap_modules(SmallCNN().to(dtype))
    ours.load_state_dict(native.state_dict())
    params = {k: v.detach() for k, v in native.named_parameters()}
    x, y = torch.randn(5, 1, 16, 16, dtype=dtype), torch.randint(0, 3, (5,))

    def per_sample_grads(model):
        def loss(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    got, want = per_sample_grads(ours), per_sample_grads(native)
    for name in params:
        assert got[name].shape == (5, *params[name].shape)
        assert_close(got[name], want[name], dtype, msg=name)
    # and they are the gradients of each sample taken one at a time
    for i in (0, 4):
        native.zero_grad()
        F.cross_entropy(native(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in native.named_parameters():
            assert_close(got[name][i], p.grad, dtype, msg=f"sample {i} {name}")


# ---- torch.export -------------------------------------------------------------------------------


def export_model():
    torch.manual_seed(0)
    return torch_cnnbp.swap_modules(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate", groups=2), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.Flatten(), nn.Linear(8 * 5 * 5, 5),
    )).eval()


def test_export_graph_contains_our_ops():
    model, x = export_model(), torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.conv2d.default) == 2 and targets.count(ops.max_pool2d.default) == 2
    assert not [t for t in targets if "convolution" in str(t) or "aten.max_pool" in str(t)]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


def test_exported_program_runs_with_grad_enabled():
    """As a user calls it: parameters that require grad, no torch.no_grad()."""
    model, x = export_model(), torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(program.module()(x).detach(), expected, rtol=0, atol=0)


def test_export_with_dynamic_batch():
    model, x = export_model(), torch.randn(2, 3, 16, 16)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    x5 = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x5), model(x5), rtol=0, atol=0)


# ---- autocast -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_conv_runs_in_lower_precision_and_trains(dtype):
    native = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3))
    ours = torch_cnnbp.swap_modules(copy.deepcopy(native))
    x = torch.randn(2, 3, 10, 10)
    results = []
    for model in (ours, native):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            h = model[0](xi)
            pooled = model[2](model[1](h))
            out = model[3](pooled)
        assert h.dtype == dtype and pooled.dtype == dtype and out.dtype == dtype
        out.float().pow(2).sum().backward()  # backward outside autocast, as recommended
        assert xi.grad.dtype == torch.float32 and model[0].weight.grad.dtype == torch.float32
        results.append([out.float(), xi.grad, *(p.grad for p in model.parameters())])
    rtol, atol = TOLERANCE[dtype]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


def test_autocast_max_pool_keeps_dtype_and_float64_is_not_cast():
    x32, x64 = torch.randn(1, 2, 6, 6), torch.randn(1, 2, 6, 6, dtype=D)
    w64 = torch.randn(3, 2, 3, 3, dtype=D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch_cnnbp.max_pool2d(x32, 2).dtype == F.max_pool2d(x32, 2).dtype == torch.float32
        assert torch_cnnbp.conv2d(x64, w64).dtype == F.conv2d(x64, w64).dtype == D
        # the op itself, as an exported or compiled graph calls it
        out = ops.conv2d(x32, w64.float(), None, [1, 1], [0, 0, 0, 0], [1, 1], 1)
        assert out.dtype == torch.bfloat16
    assert ops.conv2d(x32, w64.float(), None, [1, 1], [0, 0, 0, 0], [1, 1], 1).dtype == torch.float32


def test_exported_program_is_differentiable():
    """The cnnbp ops carry their own autograd registration, so the exported graph trains too."""
    model, x = export_model(), torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,))
    module = program.module()
    module(x).square().sum().backward()
    model(x).square().sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert grads and all(g is not None for g in grads.values())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)
