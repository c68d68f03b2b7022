"""torch_cnnbp: 2-D convolution and max-pool, forward and backward, hand-written in C++.

    import torch_cnnbp
    y = torch_cnnbp.conv2d(x, w, b, stride=1, padding="same")     # as torch.nn.functional.conv2d
    z = torch_cnnbp.max_pool2d(y, 2)                               # as torch.nn.functional.max_pool2d
"""
import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C  # noqa: F401  (registers torch.ops.cnnbp.*)
except ImportError as e:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "torch_cnnbp's C++ extension (torch_cnnbp._C) is not built or does not match the installed "
        "torch. Build it from the repository root with:\n"
        "    pip install -r requirements.txt && pip install --no-build-isolation -e .\n"
        f"(original error: {e})"
    ) from e

from . import _autocast, _vmap  # noqa: E402,F401  (autocast and vmap rules for the ops)
from . import reference  # noqa: E402,F401
from .functional import conv2d, max_pool2d  # noqa: E402
from .modules import Conv2d, MaxPool2d, swap_modules, unswap_modules  # noqa: E402
from .ops import (  # noqa: E402
    Conv2dBackwardFunction,
    Conv2dFunction,
    MaxPool2dBackwardFunction,
    MaxPool2dFunction,
)

__all__ = [
    "conv2d",
    "max_pool2d",
    "Conv2d",
    "MaxPool2d",
    "swap_modules",
    "unswap_modules",
    "Conv2dFunction",
    "Conv2dBackwardFunction",
    "MaxPool2dFunction",
    "MaxPool2dBackwardFunction",
    "reference",
]
