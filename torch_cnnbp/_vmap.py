"""vmap rules for the cnnbp ops, so that ``torch.func.vmap`` and what is built on it (``jacrev``,
``hessian``-style ``jacrev(jacrev(...))``, per-sample gradients ``vmap(grad(...))``) run through this
project's kernels. The autograd.Functions in ops.py set ``generate_vmap_rule = True``, so their forward
and backward run under vmap and reach these rules.

Each rule receives the ops' arguments with one extra vmapped dimension of size B on some of the
tensors (its position in ``in_dims``, ``None`` for an unbatched tensor) and turns the B problems into
one call of the same op:

* only data batched (input, grad_output, indices): the vmapped dim joins the batch dim N, since the
  ops treat every sample of a batch independently: [B, N, ...] -> [B·N, ...];
* a batched weight (or bias), or a weight gradient that must stay per vmapped slice: the B
  convolutions become one grouped convolution with B·groups groups, the vmapped dim folded into the
  channel dims: input [B, N, C, H, W] -> [N, B·C, H, W], weight [B, K, C/groups, kH, kW] ->
  [B·K, C/groups, kH, kW], bias [B, K] -> [B·K]. Group b·groups + g then sees exactly slice b's
  channels of group g, so the results are slice b's results, laid out [N, B·K, ...].

An unbatched tensor that meets a batched one is expanded to B copies first.
"""
from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.cnnbp


def _front(t: Tensor, bdim, batch_size: int) -> Tensor:
    """t with its vmapped dim first; an unbatched t repeated batch_size times along a new first dim."""
    if bdim is None:
        return t.unsqueeze(0).expand(batch_size, *t.shape)
    return t.movedim(bdim, 0)


def _into_channels(t: Tensor, bdim, batch_size: int) -> Tensor:
    """[B, N, C, H, W] -> [N, B·C, H, W]."""
    return _front(t, bdim, batch_size).movedim(0, 1).flatten(1, 2)


@torch.library.register_vmap("cnnbp::conv2d")
def _conv2d_vmap(info, in_dims, input, weight, bias, stride, padding, dilation, groups):
    B = info.batch_size
    input_bdim, weight_bdim, bias_bdim = in_dims[:3]
    if weight_bdim is None and bias_bdim is None:
        output = _ops.conv2d(_front(input, input_bdim, B).flatten(0, 1), weight, bias, stride, padding,
                             dilation, groups)
        return output.unflatten(0, (B, -1)), 0
    output = _ops.conv2d(
        _into_channels(input, input_bdim, B),
        _front(weight, weight_bdim, B).flatten(0, 1),
        None if bias is None else _front(bias, bias_bdim, B).flatten(0, 1),
        stride, padding, dilation, groups * B,
    )
    return output.unflatten(1, (B, -1)), 1


@torch.library.register_vmap("cnnbp::conv2d_backward")
def _conv2d_backward_vmap(info, in_dims, grad_output, input, weight, stride, padding, dilation, groups,
                          output_mask):
    B = info.batch_size
    grad_output_bdim, input_bdim, weight_bdim = in_dims[:3]
    mask = [bool(m) for m in output_mask]
    if weight_bdim is None and not mask[1] and not mask[2]:
        # grad_input alone with one shared weight: every (slice, sample) pair is independent.
        grad_input, grad_weight, grad_bias = _ops.conv2d_backward(
            _front(grad_output, grad_output_bdim, B).flatten(0, 1),
            _front(input, input_bdim, B).flatten(0, 1),
            weight, stride, padding, dilation, groups, mask,
        )
        return (grad_input.unflatten(0, (B, -1)), grad_weight, grad_bias), (0, None, None)
    # Weight and bias gradients are per slice (they sum over N only): grouped form.
    grad_input, grad_weight, grad_bias = _ops.conv2d_backward(
        _into_channels(grad_output, grad_output_bdim, B),
        _into_channels(input, input_bdim, B),
        _front(weight, weight_bdim, B).flatten(0, 1),
        stride, padding, dilation, groups * B, mask,
    )
    return (
        grad_input.unflatten(1, (B, -1)) if mask[0] else grad_input,
        grad_weight.unflatten(0, (B, -1)) if mask[1] else grad_weight,
        grad_bias.unflatten(0, (B, -1)) if mask[2] else grad_bias,
    ), (1 if mask[0] else None, 0 if mask[1] else None, 0 if mask[2] else None)


@torch.library.register_vmap("cnnbp::max_pool2d")
def _max_pool2d_vmap(info, in_dims, input, kernel_size, stride, padding, dilation, ceil_mode):
    B = info.batch_size
    output, indices = _ops.max_pool2d(_front(input, in_dims[0], B).flatten(0, 1), kernel_size, stride,
                                      padding, dilation, ceil_mode)
    return (output.unflatten(0, (B, -1)), indices.unflatten(0, (B, -1))), (0, 0)


@torch.library.register_vmap("cnnbp::max_pool2d_backward")
def _max_pool2d_backward_vmap(info, in_dims, grad_output, indices, input_size, kernel_size=None, stride=None,
                              padding=None, dilation=None):
    # indices are positions inside each (sample, channel) plane, so folding B into N keeps them valid.
    B = info.batch_size
    grad_input = _ops.max_pool2d_backward(
        _front(grad_output, in_dims[0], B).flatten(0, 1),
        _front(indices, in_dims[1], B).flatten(0, 1),
        [B * input_size[0], *input_size[1:]],
        kernel_size, stride, padding, dilation,
    )
    return grad_input.unflatten(0, (B, -1)), 0
