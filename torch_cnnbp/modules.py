"""Drop-in modules, and conversion of whole models between them and PyTorch's.

``Conv2d`` and ``MaxPool2d`` subclass ``torch.nn.Conv2d`` and ``torch.nn.MaxPool2d``: the constructor,
parameters, initialisation, ``extra_repr`` and state dict are PyTorch's own, and only the forward pass
runs through ``torch_cnnbp.conv2d`` / ``torch_cnnbp.max_pool2d``. Being subclasses, they are also
``isinstance`` of the native classes, so code that inspects a model for convolutions still finds them.
"""
from __future__ import annotations

from typing import Dict, Type

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .functional import conv2d, max_pool2d


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` computed by this project's C++ kernels; same arguments, same state dict.

    A padding_mode other than 'zeros' pads with ``F.pad`` first and then convolves with no padding,
    exactly as the native module does.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, self.bias)


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` computed by this project's C++ kernels; same arguments and outputs."""

    def forward(self, input: Tensor):
        return max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                          ceil_mode=self.ceil_mode, return_indices=self.return_indices)


# Exact native class -> ours. Exact types only: a user's subclass of nn.Conv2d may have its own
# forward, which a swap would silently drop.
_TO_OURS: Dict[Type[nn.Module], Type[nn.Module]] = {nn.Conv2d: Conv2d, nn.MaxPool2d: MaxPool2d}
_TO_NATIVE: Dict[Type[nn.Module], Type[nn.Module]] = {v: k for k, v in _TO_OURS.items()}


def _recast(module: nn.Module, cls: Type[nn.Module]) -> nn.Module:
    """A new module of class `cls` with `module`'s state: the same parameter and buffer tensors
    (shared, not copied, so an optimizer built on them keeps working), training flag, hooks and
    attributes. The native and our classes hold identical state, so nothing needs converting."""
    new = cls.__new__(cls)
    for name, value in vars(module).items():
        # Own copies of the state containers (_parameters, _buffers, _modules, ...), not of the tensors.
        # The hook dicts stay shared, so handles returned by register_*_hook before the swap still remove them.
        if isinstance(value, (dict, set)) and "hook" not in name:
            value = value.copy()
        new.__dict__[name] = value
    return new


def _convert(model: nn.Module, mapping: Dict[Type[nn.Module], Type[nn.Module]],
             done: Dict[int, nn.Module]) -> nn.Module:
    """`model` with its subtree converted; `done` maps id(module) to its result, so a module used
    in several places stays one module."""
    if id(model) in done:
        return done[id(model)]
    for name, child in list(model._modules.items()):
        if child is not None:
            converted = _convert(child, mapping, done)
            if converted is not child:
                model._modules[name] = converted  # where Sequential, ModuleList and ModuleDict keep them too
    cls = mapping.get(type(model))
    done[id(model)] = result = _recast(model, cls) if cls is not None else model
    return result


def swap_modules(model: nn.Module) -> nn.Module:
    """Replaces every ``torch.nn.Conv2d`` and ``torch.nn.MaxPool2d`` in `model` (at any depth, and
    `model` itself if it is one) by ``torch_cnnbp.Conv2d`` / ``torch_cnnbp.MaxPool2d`` and returns the
    model.

    The model is changed in place (like ``model.to(...)``); the new modules hold the very same
    parameter and buffer tensors, so device, dtype, ``requires_grad``, the training flag, registered
    hooks and any optimizer already built on ``model.parameters()`` carry over. Only modules whose type is exactly
    the native class are swapped; subclasses of it are left alone. If `model` itself is a Conv2d or
    MaxPool2d, use the returned module. ``unswap_modules`` goes back.
    """
    return _convert(model, _TO_OURS, {})


def unswap_modules(model: nn.Module) -> nn.Module:
    """The way back: replaces every ``torch_cnnbp.Conv2d`` / ``MaxPool2d`` in `model` by
    ``torch.nn.Conv2d`` / ``torch.nn.MaxPool2d`` with the same tensors, in place, and returns the model."""
    return _convert(model, _TO_NATIVE, {})
