"""Fake kernels and autograd wiring for the cnnbp C++ ops.

The ops themselves (schemas in csrc/ops.cpp, kernels in csrc/conv2d.cpp and csrc/max_pool2d.cpp)
are reached as ``torch.ops.cnnbp.<name>``. Here they get

* fake kernels (shape logic only) so that ``torch.compile``, ``torch.export`` and
  ``torch.library.opcheck`` can run them on meta/fake tensors, and
* ``torch.autograd.Function`` classes whose backward passes are themselves differentiable
  through the same ops, so double backward (``gradgradcheck``, ``create_graph=True``) works.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _args

_ops = torch.ops.cnnbp


# ---- call overhead ----------------------------------------------------------------------------
# A small layer (LeNet's, or any layer at batch 1) takes a few microseconds in C++, so the Python
# around each call matters. Two costs are avoided in eager mode:
# * torch.autograd.Function.apply binds default arguments with inspect.signature on every call
#   (~45 µs). None of the forwards here has defaults, so _Function.apply goes straight to the C++
#   apply when no torch.func transform is active (transforms, and torch.compile, which traces
#   apply itself, take the stock path).
# * Calling an op that has autograd registered (below) enters a Python autograd kernel (~5 µs) even
#   when no gradient is needed. The forwards call the ops through _below_autograd, and where no
#   graph is recorded (grad disabled: torch.no_grad, or a backward without create_graph)
#   _Function.apply calls the forward directly, with no autograd node.


def _eager() -> bool:
    return not (torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling())


_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _unwrap_dead_wrappers(args):
    """torch._functorch.utils.unwrap_dead_wrappers (what the stock apply does), which builds a new
    tuple on every call; this one only when some tensor was unwrapped (1.8 µs against 1.0)."""
    for a in args:
        if isinstance(a, Tensor) and _unwrap_if_dead(a) is not a:
            return tuple([_unwrap_if_dead(a) if isinstance(a, Tensor) else a for a in args])
    return args


class _Function(torch.autograd.Function):
    @classmethod
    def apply(cls, *args):
        if _eager():
            args = _unwrap_dead_wrappers(args)
            if not torch.is_grad_enabled():
                return cls.forward(*args)
            return super(torch.autograd.Function, cls).apply(*args)
        return super().apply(*args)


def _below_autograd(op, *args):
    """op(*args) for an op called where no autograd graph is recorded."""
    if _eager():
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return op(*args)


# ---- fake kernels -----------------------------------------------------------------------------


@torch.library.register_fake("cnnbp::conv2d")
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups):
    torch._check(input.dim() == 4 and weight.dim() == 4, lambda: "conv2d: expected 4-D input and weight")
    torch._check(groups > 0 and input.shape[1] == weight.shape[1] * groups,
                 lambda: "conv2d: input channels must equal weight.shape[1] * groups")
    oh, ow = _args.conv2d_output_size(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    torch._check(oh > 0 and ow > 0, lambda: "conv2d: kernel size can't be greater than actual input size")
    return input.new_empty((input.shape[0], weight.shape[0], oh, ow))


@torch.library.register_fake("cnnbp::conv2d_backward")
def _conv2d_backward_fake(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    def maybe(flag, shape):
        return input.new_empty(shape if flag else (0,))

    return (
        maybe(output_mask[0], input.shape),
        maybe(output_mask[1], weight.shape),
        maybe(output_mask[2], (weight.shape[0],)),
    )


@torch.library.register_fake("cnnbp::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    torch._check(input.dim() == 4, lambda: "max_pool2d: expected a 4-D input")
    oh, ow = _args.max_pool2d_output_size(input.shape[2:], kernel_size, stride, padding, dilation, ceil_mode)
    torch._check(oh > 0 and ow > 0, lambda: "max_pool2d: output size is too small")
    shape = (input.shape[0], input.shape[1], oh, ow)
    fmt = _pool_memory_format(input)
    return (torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt),
            torch.empty(shape, dtype=torch.int64, device=input.device, memory_format=fmt))


@torch.library.register_fake("cnnbp::max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, indices, input_size, kernel_size=None, stride=None, padding=None,
                              dilation=None):
    return torch.empty(input_size, dtype=grad_output.dtype, device=grad_output.device,
                       memory_format=_pool_memory_format(indices))


def _pool_memory_format(t):
    """The layout max_pool2d gives its results (the same rule as csrc/max_pool2d.cpp): channels_last
    when the tensor is laid out that way and only that way."""
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


# ---- conv2d autograd --------------------------------------------------------------------------


class Conv2dFunction(_Function):
    """x = conv2d(o, w, b) with this project's forward and backward ops.

    Arguments are those of ``torch.ops.cnnbp.conv2d``: a 4-D input, stride and dilation as pairs,
    padding as (top, bottom, left, right). ``torch_cnnbp.conv2d`` normalises the rest.
    """

    generate_vmap_rule = True  # torch.func.vmap through forward and backward, by the ops' rules in _vmap.py

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups):
        return _below_autograd(_ops.conv2d.default, input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(input, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = (need[0], need[1], need[2] and ctx.has_bias)
        grads = conv2d_backward(grad_output, input, weight, *ctx.conv, mask)
        return (*grads, None, None, None, None)


class Conv2dBackwardFunction(_Function):
    """(δ_in, ∂E/∂w, ∂E/∂b) = conv2d_backward(δ, o, w), differentiable in δ, o and w.

    Its own backward, for upstream gradients (g_in, g_w, g_b) of the three results, is
        ∂/∂δ = conv2d(g_in, w, g_b) + conv2d(o, g_w)     (all three are linear in δ)
        ∂/∂o = grad_input(δ, weight=g_w)                 (∂E/∂w is bilinear in δ and o)
        ∂/∂w = grad_weight(δ, input=g_in)                (δ_in is bilinear in δ and w)
    which are again this project's ops, so any order of derivative works.
    """

    generate_vmap_rule = True  # torch.func.vmap through forward and backward, by the ops' rules in _vmap.py

    @staticmethod
    def forward(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
        return _below_autograd(_ops.conv2d_backward.default, grad_output, input, weight, stride, padding, dilation,
                               groups, output_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, weight, stride, padding, dilation, groups, output_mask = inputs
        ctx.save_for_backward(grad_output, input, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.output_mask = tuple(output_mask)

    @staticmethod
    def backward(ctx, g_input, g_weight, g_bias):
        grad_output, input, weight = ctx.saved_tensors
        conv = ctx.conv
        # Upstream gradients of results that were not computed are ignored.
        g_input, g_weight, g_bias = (g if m else None for g, m in zip((g_input, g_weight, g_bias), ctx.output_mask))
        need_go, need_in, need_w = ctx.needs_input_grad[:3]

        d_grad_output = d_input = d_weight = None
        if need_go:
            terms = []
            if g_input is not None:
                terms.append(Conv2dFunction.apply(g_input, weight, g_bias, *conv))
                g_bias = None
            if g_weight is not None:
                terms.append(Conv2dFunction.apply(input, g_weight, g_bias, *conv))
                g_bias = None
            if g_bias is not None:
                terms.append(g_bias.view(1, -1, 1, 1).expand_as(grad_output))
            if terms:
                d_grad_output = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        if need_in and g_weight is not None:
            d_input = conv2d_backward(grad_output, input, g_weight, *conv, (True, False, False))[0]
        if need_w and g_input is not None:
            d_weight = conv2d_backward(grad_output, g_input, weight, *conv, (False, True, False))[1]
        return d_grad_output, d_input, d_weight, None, None, None, None, None


def conv2d_backward(grad_output: Tensor, input: Tensor, weight: Tensor, stride, padding, dilation,
                    groups: int, output_mask: Sequence[bool]):
    """(grad_input, grad_weight, grad_bias) with None for entries not asked for in output_mask."""
    output_mask = [bool(m) for m in output_mask]
    if not any(output_mask):
        return None, None, None
    grads = Conv2dBackwardFunction.apply(grad_output, input, weight, stride, padding, dilation, groups, output_mask)
    return tuple(g if m else None for g, m in zip(grads, output_mask))


# ---- max_pool2d autograd ----------------------------------------------------------------------


class MaxPool2dFunction(_Function):
    """(x, indices) = max_pool2d(o) with this project's forward and backward ops.

    Arguments are those of ``torch.ops.cnnbp.max_pool2d`` (4-D input, pairs for the rest).
    """

    generate_vmap_rule = True  # torch.func.vmap through forward and backward, by the ops' rules in _vmap.py

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode):
        return _below_autograd(_ops.max_pool2d.default, input, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, kernel_size, stride, padding, dilation, ceil_mode = inputs
        ctx.input_shape = input.shape
        ctx.window = (kernel_size, stride, padding, dilation)
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zeros tensor for the indices' (unused) gradient

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        if grad_output is None:  # only the indices were used downstream
            return None, None, None, None, None, None
        (indices,) = ctx.saved_tensors
        kernel_size, stride, padding, dilation = ctx.window
        if dilation[0] == 1 and dilation[1] == 1:
            rows = cols = ()
        else:  # windows that hold no input position (dilation stepping over a short input) send no gradient
            rows, cols = (
                _args.empty_pool_windows(ctx.input_shape[2 + d], grad_output.shape[2 + d], kernel_size[d],
                                         padding[d], stride[d], dilation[d])
                for d in range(2)
            )
        if rows or cols:
            drop = torch.zeros(grad_output.shape[2:], dtype=torch.bool, device=grad_output.device)
            drop[rows, :] = True
            drop[:, cols] = True
            grad_output = grad_output.masked_fill(drop, 0)
        return (MaxPool2dBackwardFunction.apply(grad_output, indices, ctx.input_shape, *ctx.window),
                None, None, None, None, None)


class MaxPool2dBackwardFunction(_Function):
    """δ_in = scatter-add of δ through the argmax indices. It is linear in δ, and its adjoint is the
    gather of the upstream gradient at the same indices. The window (kernel_size, stride, padding,
    dilation) of the forward that made the indices lets the kernel work band by band."""

    generate_vmap_rule = True  # torch.func.vmap through forward and backward, by the ops' rules in _vmap.py

    @staticmethod
    def forward(grad_output, indices, input_shape, kernel_size, stride, padding, dilation):
        return _below_autograd(_ops.max_pool2d_backward.default, grad_output, indices, list(input_shape),
                               kernel_size, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, g_input):
        (indices,) = ctx.saved_tensors
        gathered = g_input.flatten(2).gather(2, indices.flatten(2)).view_as(indices)
        return gathered, None, None, None, None, None, None


# ---- autograd on the ops themselves -----------------------------------------------------------
# The same forward/backward pairs, registered on the ops, so that torch.ops.cnnbp.* called directly
# (by a traced or exported graph, or by a user) is differentiable too.

def _register_autograd(name, function):
    def backward(ctx, *grads):
        return function.backward(ctx, *grads)

    torch.library.register_autograd(f"cnnbp::{name}", backward, setup_context=function.setup_context)


_register_autograd("conv2d", Conv2dFunction)
_register_autograd("conv2d_backward", Conv2dBackwardFunction)
_register_autograd("max_pool2d", MaxPool2dFunction)
_register_autograd("max_pool2d_backward", MaxPool2dBackwardFunction)
