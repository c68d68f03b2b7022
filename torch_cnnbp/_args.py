"""Argument normalisation for conv2d and max_pool2d, written once.

The public functions, the modules and the fake kernels all go through here, so `int` vs tuple,
``padding='same'`` and the output-size formulas have a single definition on the Python side.
"""
from __future__ import annotations

import numbers
from typing import Sequence, Tuple

import torch

Pair = Tuple[int, int]


def _is_int(v) -> bool:
    if type(v) is int:  # the common case, without the abstract-class checks below (per call they add up)
        return True
    return isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool)


def integer(op: str, name: str, value):
    """An int argument (PyTorch raises TypeError for anything else, bool included)."""
    if not _is_int(value):
        raise TypeError(f"{op}: {name} must be an int, but got {value!r}")
    return value


def pair(op: str, name: str, value, allow_empty: bool = False) -> Pair:
    """An int or a sequence of one or two ints, as a pair (PyTorch's `_pair` with its checks)."""
    if type(value) is int:
        return (value, value)
    if type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return (value[0], value[1])
    if _is_int(value):
        return (int(value) if isinstance(value, numbers.Integral) else value,) * 2
    if isinstance(value, torch.Size) or isinstance(value, Sequence) and not isinstance(value, str):
        items = list(value)
        if all(_is_int(v) for v in items):
            if len(items) == 1:
                return (items[0], items[0])
            if len(items) == 2:
                return (items[0], items[1])
            # the right type, the wrong length: PyTorch raises RuntimeError here
            raise RuntimeError(f"{op}: {name} must be an int or a tuple of two ints, but got {value!r}")
    raise TypeError(
        f"{op}: {name} must be an int or a tuple of two ints, but got {value!r}"
    )


# ---- conv2d -----------------------------------------------------------------------------------

Padding4 = Tuple[int, int, int, int]  # (top, bottom, left, right)


def conv2d_padding(padding, weight_shape: Sequence[int], stride: Pair, dilation: Pair) -> Padding4:
    """Explicit (top, bottom, left, right) padding from an int, a pair, 'valid' or 'same'.

    'same' pads the effective kernel extent d·(k−1) in total, half before and the rest after, so an
    even extent puts the extra row/column at the bottom/right, as PyTorch does.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            total = [d * (k - 1) for d, k in zip(dilation, weight_shape[2:])]
            return (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
        raise ValueError(f"Invalid padding string: {padding!r}, should be 'valid' or 'same'")
    ph, pw = pair("conv2d", "padding", padding)
    return (ph, ph, pw, pw)


def conv2d_args(weight: torch.Tensor, stride, padding, dilation) -> Tuple[Pair, Padding4, Pair]:
    """(stride, padding, dilation) as the cnnbp ops take them."""
    if weight.dim() != 4:
        raise RuntimeError(
            "conv2d: expected a 4-D weight (out_channels, in_channels / groups, kH, kW), "
            f"but got weight of size: {list(weight.shape)}"
        )
    stride = pair("conv2d", "stride", stride)
    dilation = pair("conv2d", "dilation", dilation)
    return stride, conv2d_padding(padding, weight.shape, stride, dilation), dilation


def conv2d_output_size(in_hw, kernel_hw, stride: Pair, padding: Padding4, dilation: Pair):
    """Output (H, W): floor((in + pad_begin + pad_end − d·(k−1) − 1) / s) + 1 per dimension."""
    pads = ((padding[0], padding[1]), (padding[2], padding[3]))
    return tuple(
        (i + p0 + p1 - d * (k - 1) - 1) // s + 1
        for i, k, s, (p0, p1), d in zip(in_hw, kernel_hw, stride, pads, dilation)
    )


# ---- max_pool2d -------------------------------------------------------------------------------


def max_pool2d_args(kernel_size, stride, padding, dilation) -> Tuple[Pair, Pair, Pair, Pair]:
    """(kernel_size, stride, padding, dilation) as pairs; stride None or () means kernel_size."""
    kernel_size = pair("max_pool2d", "kernel_size", kernel_size)
    if stride is None or (isinstance(stride, Sequence) and len(stride) == 0):
        stride = kernel_size
    else:
        stride = pair("max_pool2d", "stride", stride)
    return kernel_size, stride, pair("max_pool2d", "padding", padding), pair("max_pool2d", "dilation", dilation)


def pooled_size(in_len, k, pad, stride, dilation, ceil_mode: bool):
    """Output length of one pooled dimension, PyTorch's rule: floor or ceil division, and in ceil
    mode the last window must start inside the input or its left padding."""
    out = (in_len + 2 * pad - dilation * (k - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= in_len + pad:
        out -= 1
    return out


def max_pool2d_output_size(in_hw, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair, ceil_mode: bool):
    return tuple(
        pooled_size(in_hw[d], kernel[d], padding[d], stride[d], dilation[d], ceil_mode) for d in range(2)
    )


def empty_pool_windows(in_len, out_len, k, pad, stride, dilation):
    """Output positions of one pooled dimension whose window has no tap inside the input (possible
    only with dilation > 1: the taps can step over a short input). Such a window outputs −inf with
    an index that names no tap of it, and must send no gradient anywhere."""
    if dilation == 1:
        return []
    in_len, out_len = int(in_len), int(out_len)
    # A window that lies wholly inside the input has all its taps there: only the windows that reach
    # past an edge (i < first_inside, i > last_inside) are looked at, a few at each end.
    first_inside = -(-pad // stride)
    last_inside = (in_len - 1 + pad - dilation * (k - 1)) // stride
    low_end = min(out_len, first_inside)
    edges = list(range(low_end)) + list(range(max(low_end, last_inside + 1), out_len))
    return [i for i in edges if not any(0 <= i * stride - pad + m * dilation < in_len for m in range(k))]
