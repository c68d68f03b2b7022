"""The public functions: drop-in replacements for ``torch.nn.functional.conv2d`` and ``max_pool2d``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _args
from ._autocast import cast_for_autocast
from .ops import Conv2dFunction, MaxPool2dFunction


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> Tensor:
    """Same signature and results as ``torch.nn.functional.conv2d``, computed by this project's C++.

    input: (N, C, H, W) or unbatched (C, H, W); weight: (K, C / groups, kH, kW); bias: (K,) or None.
    stride, dilation: int or pair; padding: int, pair, 'valid' or 'same' (stride 1 only).
    """
    if input.dim() not in (3, 4):
        raise RuntimeError(
            f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {list(input.shape)}"
        )
    stride, padding, dilation = _args.conv2d_args(weight, stride, padding, dilation)
    groups = _args.integer("conv2d", "groups", groups)
    input, weight, bias = cast_for_autocast(input, weight, bias)  # before autograd, as native autocast
    if input.dim() == 3:
        return Conv2dFunction.apply(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups).squeeze(0)
    return Conv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups)


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """Same signature and results as ``torch.nn.functional.max_pool2d`` (indices included),
    computed by this project's C++. input: (N, C, H, W) or unbatched (C, H, W)."""
    kernel_size, stride, padding, dilation = _args.max_pool2d_args(kernel_size, stride, padding, dilation)
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"max_pool2d: ceil_mode must be a bool, but got {ceil_mode!r}")
    if input.dim() not in (3, 4):
        raise RuntimeError(
            "max_pool2d: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, "
            f"but got input of size: {list(input.shape)}"
        )
    unbatched = input.dim() == 3
    if unbatched and input.numel() == 0:
        raise RuntimeError(
            "max_pool2d: expected a 3-D (C, H, W) input with non-zero C, H and W, "
            f"but got input of size: {list(input.shape)}"
        )
    output, indices = MaxPool2dFunction.apply(
        input.unsqueeze(0) if unbatched else input, kernel_size, stride, padding, dilation, bool(ceil_mode)
    )
    if unbatched:
        output, indices = output.squeeze(0), indices.squeeze(0)
    return (output, indices) if return_indices else output
