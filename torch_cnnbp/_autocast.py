"""Autocast for the cnnbp ops, following PyTorch's CPU autocast lists: conv2d is a lower-precision op
(it runs in the autocast dtype, bfloat16 by default), max-pool is not listed and keeps its input dtype
(nothing to register). The cast rule is autocast's own: floating-point CPU tensors other than float64
are cast to ``torch.get_autocast_dtype("cpu")``.

Two places apply it:

* ``cast_for_autocast``, called by ``torch_cnnbp.conv2d`` before its autograd.Function, so that the
  cast is recorded by autograd as native autocast's is (autocast sits above autograd in PyTorch's
  dispatcher); the backward then runs in the autocast dtype and the gradients flow back through the
  cast to the float32 parameters, as native conv's do;
* an ``AutocastCPU`` kernel on ``cnnbp::conv2d`` itself, for direct calls of the op
  (``torch.ops.cnnbp.conv2d``, exported or compiled graphs).
"""
from __future__ import annotations

import torch

_DEVICE = "cpu"


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype is not torch.float64 \
            and value.device.type == _DEVICE:
        return value.to(dtype)
    return value


def cast_for_autocast(*tensors):
    """The tensors as autocast hands them to a lower-precision op (unchanged outside autocast)."""
    if not torch.is_autocast_enabled(_DEVICE):
        return tensors
    dtype = torch.get_autocast_dtype(_DEVICE)
    return tuple(_cast(t, dtype) for t in tensors)


def _conv2d_autocast(input, weight, bias, stride, padding, dilation, groups):
    input, weight, bias = cast_for_autocast(input, weight, bias)
    with torch.autocast(_DEVICE, enabled=False):
        return torch.ops.cnnbp.conv2d(input, weight, bias, stride, padding, dilation, groups)


_lib = torch.library.Library("cnnbp", "IMPL")
_lib.impl("conv2d", _conv2d_autocast, "AutocastCPU")
