"""python -m torch_cnnbp bench: our conv2d and max_pool2d against PyTorch's own, side by side.

    python -m torch_cnnbp bench                        # full suite, float32, forward+backward, torch's threads
    python -m torch_cnnbp bench --quick                # smoke run: batch / 8, few repetitions (< 1 min)
    python -m torch_cnnbp bench --threads 1,2 --dtype float64 --memory --json results.json
    python -m torch_cnnbp bench --filter resnet.3x3 --mode fwd
    python -m torch_cnnbp bench --list                 # the case names, for --filter
    python -m torch_cnnbp bench --suite extra          # other shapes of the same families

What is timed. Each case (a layer of a real network) runs ours and native in the same process on the
same input tensors, interleaved A B A B ...: warm-up rounds first, then as many rounds as fit a time
budget (within a minimum and maximum count). Each round times one call of each with
``time.perf_counter``, Python's garbage collector off. Reported: the median time, its spread
(interquartile range; min in the JSON), and ratio = median(ours) / median(native); the JSON also has
the median of the per-round ratios. The table line of a case is printed as soon as it is done. The
load average is printed too: above the number of usable CPUs, times include waiting for them.

* ``--mode fwdbwd`` (default): inputs, weights and bias are leaves with ``requires_grad``; one timed
  call is ``out = op(...); out.backward(grad)`` with a fixed upstream ``grad`` (same values for both,
  laid out like each op's own output). Every leaf's ``.grad`` is set to None before each call (not
  timed), so gradients are assigned, never accumulated. The output is freed after the clock stops.
* ``--mode fwd``: inputs without ``requires_grad``, under ``torch.no_grad()``: inference (native
  max_pool2d then uses its kernel that computes no indices).

Work counted. conv2d forward: 2·N·K·OH·OW·(C/groups)·kh·kw FLOPs (a multiply-add is 2; taps that
fall in the padding count as computed; bias not counted). forward+backward: forward + grad_input +
grad_weight, each the same count, so 3x: every case here asks for all three (grad_bias is not
counted). max_pool2d has no FLOPs worth counting; its rate is nominal memory traffic in GB/s: forward
reads the input and writes the output; forward+backward also writes int64 indices, then reads
grad_output and the indices and writes grad_input.

Before timing, each case's outputs and gradients are compared with native's (relative max error,
tolerance per dtype); a disagreement is flagged in the table and the JSON, the timing still runs.

``--memory``: peak memory of one forward+backward (forward in fwd mode), ours and native each in a
fresh process (forked from a server that has only imported torch and torch_cnnbp). First a warm-up
call at the case's batch on images of at most 16x16: thread pools, and the first-use buffers of
every thread the call runs on (a one-sample warm-up runs on one thread, and the other threads'
first-use buffers then counted in the measured call: 1.6x native's for LeNet's 6->16 layer, where
the steady state is 0.6-0.8x). Then, with the inputs allocated, the process's peak RSS is reset
(``echo 5 > /proc/self/clear_refs``) and the extra resident memory of one call at the case's shape
(the first, unless its images are that small) is VmHWM - VmRSS, read from /proc/self/status. It
counts every page the call touches (output, saved tensors, gradients, scratch buffers of any
library), not only tensors. Where clear_refs is unavailable, the growth of
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` during the call is used instead (a lower bound: the
process may have peaked higher before the call); the output says which.

Issue 4's targets (section 2) that apply to a run are printed under its summary, marked met or not;
they are stated for 2 threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}

# Relative max error (max |ours - native| / max |native|) above which a case is flagged.
AGREEMENT = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}

FAMILIES = ("conv2d", "max_pool2d NCHW", "max_pool2d channels_last")

# Issue 4, section 2: measured at 2 threads, forward+backward. (family, statistic, dtype or None, bound)
TARGETS = (
    ("conv2d", "geomean", "float32", 1.0),
    ("conv2d", "max", "float32", 1.5),
    ("conv2d", "geomean", "float64", 0.6),
    ("max_pool2d NCHW", "geomean", None, 0.2),
    ("max_pool2d channels_last", "geomean", None, 1.0),
    ("conv2d", "memory max", None, 1.1),
)


# ---- the suite --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One layer: conv2d (out_channels > 0) or max_pool2d on an (N, C, H, W) input."""

    tag: str
    batch: int
    channels: int
    height: int
    width: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    out_channels: int = 0  # 0: max_pool2d
    groups: int = 1
    bias: bool = False
    channels_last: bool = False

    @property
    def is_conv(self) -> bool:
        return self.out_channels > 0

    @property
    def family(self) -> str:
        if self.is_conv:
            return "conv2d"
        return "max_pool2d channels_last" if self.channels_last else "max_pool2d NCHW"

    @property
    def name(self) -> str:
        kh, kw = self.kernel
        parts = [self.tag]
        parts.append(f"{self.channels}->{self.out_channels}" if self.is_conv else f"{self.channels}ch")
        parts.append(f"{kh}x{kw}")
        for prefix, value, default in (("s", self.stride, 1), ("p", self.padding, 0), ("d", self.dilation, 1)):
            if value != (default, default):
                parts.append(f"{prefix}{value[0]}" if value[0] == value[1] else f"{prefix}{value[0]},{value[1]}")
        if self.groups > 1:
            parts.append(f"g{self.groups}")
        if self.bias:
            parts.append("+b")
        parts.append(f"@{self.height}x{self.width} n{self.batch}")
        if not self.is_conv:
            parts.append("channels_last" if self.channels_last else "NCHW")
        return " ".join(parts)

    @property
    def output_size(self) -> Tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip((self.height, self.width), self.kernel, self.stride, self.padding,
                                        self.dilation)
        )

    def flops(self, mode: str) -> int:
        """conv2d: 2·N·K·OH·OW·(C/groups)·kh·kw per forward, 3x that for forward+backward. Pool: 0."""
        if not self.is_conv:
            return 0
        oh, ow = self.output_size
        taps = (self.channels // self.groups) * self.kernel[0] * self.kernel[1]
        forward = 2 * self.batch * self.out_channels * oh * ow * taps
        return forward * (3 if mode == "fwdbwd" else 1)

    def traffic_bytes(self, mode: str, dtype: torch.dtype) -> int:
        """max_pool2d's nominal memory traffic (see the module docstring). conv2d: 0."""
        if self.is_conv:
            return 0
        item = torch.empty((), dtype=dtype).element_size()
        oh, ow = self.output_size
        inp = self.batch * self.channels * self.height * self.width * item
        out = self.batch * self.channels * oh * ow * item
        idx = self.batch * self.channels * oh * ow * 8
        return inp + out if mode == "fwd" else 2 * (inp + out + idx)

    def with_batch(self, batch: int) -> "Case":
        return dataclasses.replace(self, batch=batch)


def _conv(tag, n, c, k, hw, kernel, stride=1, padding=0, dilation=1, groups=1, bias=False) -> Case:
    return Case(tag, n, c, hw, hw, (kernel, kernel), (stride, stride), (padding, padding), (dilation, dilation),
                out_channels=k, groups=groups, bias=bias)


def _pools(tag, n, c, hw, kernel, stride, padding=0) -> List[Case]:
    base = Case(tag, n, c, hw, hw, (kernel, kernel), (stride, stride), (padding, padding))
    return [base, dataclasses.replace(base, channels_last=True)]


def suite() -> List[Case]:
    """Layers of LeNet-5, ResNet and MobileNet, plus a dilated 3x3. Batch 1 and a batch whose
    forward+backward takes tens of milliseconds."""
    cases = [
        _conv("lenet5.c1", 64, 1, 6, 32, 5, bias=True),
        _conv("lenet5.c3", 64, 6, 16, 14, 5, bias=True),
    ]
    for n in (1, 8):
        cases.append(_conv("resnet.stem", n, 3, 64, 224, 7, stride=2, padding=3))
    for n in (1, 8):
        for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7)):
            cases.append(_conv("resnet.3x3", n, c, c, hw, 3, padding=1))
    for n in (1, 8):
        cases.append(_conv("resnet.1x1", n, 256, 64, 56, 1))
        cases.append(_conv("resnet.1x1", n, 64, 256, 56, 1))
    for n in (1, 8):
        cases.append(_conv("mobilenet.dw", n, 32, 32, 112, 3, padding=1, groups=32))
        cases.append(_conv("mobilenet.pw", n, 32, 64, 112, 1))
        cases.append(_conv("mobilenet.dw", n, 128, 128, 56, 3, padding=1, groups=128))
        cases.append(_conv("mobilenet.pw", n, 128, 128, 56, 1))
    cases.append(_conv("mobilenet.dw", 8, 64, 64, 112, 3, stride=2, padding=1, groups=64))
    for n in (1, 8):
        cases.append(_conv("dilated.3x3", n, 128, 128, 28, 3, padding=2, dilation=2))
    for n in (1, 8):
        cases += _pools("resnet.maxpool", n, 64, 112, 3, 2, 1)
    cases += _pools("lenet5.s2", 64, 6, 28, 2, 2)
    cases += _pools("lenet5.s4", 64, 16, 10, 2, 2)
    return cases


def extra_suite() -> List[Case]:
    """Other layers of the same families, at sizes the main suite does not have (odd channel counts
    and image sizes, 5x5 and grouped convs, a larger dilation, MobileNet's last depthwise layers on
    7x7 planes, pools over odd planes): a check that the ratios do not hold only for the main
    suite's shapes."""
    cases = [
        _conv("other.5x5", 32, 1, 6, 28, 5, padding=2, bias=True),
        _conv("other.5x5", 16, 6, 16, 14, 5, bias=True),
        _conv("other.5x5", 4, 64, 64, 27, 5, padding=2),
        _conv("other.5x5", 16, 16, 32, 24, 5),
        _conv("other.stem", 4, 3, 32, 160, 7, stride=2, padding=3),
        _conv("other.stem", 2, 3, 32, 224, 3, stride=2, padding=1),
        _conv("other.3x3", 4, 96, 96, 35, 3, padding=1),
        _conv("other.3x3", 2, 192, 192, 17, 3, padding=1),
        _conv("other.3x3", 1, 48, 64, 71, 3, padding=1),
        _conv("other.3x3", 8, 128, 256, 28, 3, stride=2, padding=1),
        _conv("other.3x3", 16, 320, 320, 9, 3, padding=1),
        _conv("other.3x3", 16, 128, 128, 8, 3, padding=1),
        _conv("other.1x1", 4, 512, 128, 28, 1),
        _conv("other.1x1", 2, 96, 24, 57, 1, bias=True),
        _conv("other.1x1", 8, 256, 512, 28, 1, stride=2),
        _conv("other.dw", 4, 96, 96, 75, 3, padding=1, groups=96),
        _conv("other.dw", 2, 144, 144, 56, 3, stride=2, padding=1, groups=144),
        _conv("other.dw", 8, 240, 240, 14, 5, padding=2, groups=240),
        _conv("other.dw", 4, 1024, 1024, 7, 3, padding=1, groups=1024),
        _conv("other.dw", 8, 512, 512, 14, 3, stride=2, padding=1, groups=512),
        _conv("other.grouped", 4, 128, 128, 28, 3, padding=1, groups=4),
        _conv("other.dilated", 2, 64, 64, 45, 3, padding=3, dilation=3),
        _conv("other.dilated", 16, 256, 256, 14, 3, padding=2, dilation=2),
    ]
    cases += _pools("other.maxpool", 2, 96, 147, 3, 2)
    cases += _pools("other.maxpool", 4, 32, 150, 3, 2, 1)
    cases += _pools("other.maxpool", 8, 128, 56, 2, 2)
    cases += _pools("other.maxpool", 32, 20, 24, 2, 2)
    cases += _pools("other.maxpool", 4, 64, 28, 3, 1, 1)
    cases += _pools("other.maxpool", 4, 3, 255, 2, 2)
    return cases


SUITES = {"main": suite, "extra": extra_suite}


def select_cases(quick: bool, filters: Sequence[str], suite_name: str = "main") -> List[Case]:
    """The suite (`SUITES`), batch divided by 8 in quick mode (cases that then coincide run once),
    filtered by case-insensitive substrings of the name (any of them)."""
    cases, seen = [], set()
    for case in SUITES[suite_name]():
        if quick:
            case = case.with_batch(max(1, case.batch // 8))
        if case.name in seen:
            continue
        if filters and not any(f.lower() in case.name.lower() for f in filters):
            continue
        seen.add(case.name)
        cases.append(case)
    return cases


# ---- the two implementations ------------------------------------------------------------------


def op_pair(case: Case) -> Tuple[Callable, Callable]:
    """(ours, native), each taking the leaves of `make_inputs` and returning one tensor."""
    import torch_cnnbp as ours
    if case.is_conv:
        kw = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
        return (lambda x, w, b=None: ours.conv2d(x, w, b, **kw), lambda x, w, b=None: F.conv2d(x, w, b, **kw))
    kw = dict(kernel_size=case.kernel, stride=case.stride, padding=case.padding, dilation=case.dilation)
    return (lambda x: ours.max_pool2d(x, **kw), lambda x: F.max_pool2d(x, **kw))


def make_inputs(case: Case, dtype: torch.dtype, requires_grad: bool, seed: int = 0) -> List[torch.Tensor]:
    """[input] or [input, weight(, bias)], random, fixed seed; channels_last inputs for such cases."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, case.channels, case.height, case.width, generator=gen).to(dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tensors = [x]
    if case.is_conv:
        fan_in = (case.channels // case.groups) * case.kernel[0] * case.kernel[1]
        shape = (case.out_channels, case.channels // case.groups, *case.kernel)
        tensors.append((torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(dtype))
        if case.bias:
            tensors.append((0.1 * torch.randn(case.out_channels, generator=gen)).to(dtype))
    return [t.requires_grad_(requires_grad) for t in tensors]


class Call:
    """One timed call of one implementation on shared leaves: ``__call__`` returns seconds."""

    def __init__(self, fn: Callable, leaves: List[torch.Tensor], grad_values: Optional[torch.Tensor]):
        self.fn, self.leaves = fn, leaves
        self.grad_output = None
        if grad_values is not None:  # forward+backward: the upstream gradient in this op's output layout
            with torch.no_grad():
                out = fn(*leaves)
            self.grad_output = torch.empty_like(out).copy_(grad_values)

    def __call__(self) -> float:
        # The output is held until the clock has stopped: freeing it is not part of the op.
        if self.grad_output is None:
            with torch.no_grad():
                start = time.perf_counter()
                out = self.fn(*self.leaves)
                elapsed = time.perf_counter() - start
            del out
            return elapsed
        for t in self.leaves:
            t.grad = None
        start = time.perf_counter()
        out = self.fn(*self.leaves)
        out.backward(self.grad_output)
        elapsed = time.perf_counter() - start
        del out
        return elapsed

    def results(self) -> List[torch.Tensor]:
        """Output and (forward+backward) the gradient of every leaf, from one untimed call."""
        for t in self.leaves:
            t.grad = None
        if self.grad_output is None:
            with torch.no_grad():
                return [self.fn(*self.leaves)]
        out = self.fn(*self.leaves)
        out.backward(self.grad_output)
        grads = [t.grad for t in self.leaves]
        for t in self.leaves:
            t.grad = None
        return [out.detach()] + grads


def relative_error(ours: List[torch.Tensor], native: List[torch.Tensor]) -> float:
    """Largest max|a - b| / max|b| over the output and the gradients."""
    worst = 0.0
    for a, b in zip(ours, native):
        if a is None or b is None or a.shape != b.shape:
            return math.inf
        a, b = a.double(), b.double()
        scale = b.abs().max().item() or 1.0
        worst = max(worst, (a - b).abs().max().item() / scale)
    return worst


# ---- timing -----------------------------------------------------------------------------------


@dataclass
class Budget:
    warmup_rounds: int
    seconds: float  # per case, both implementations together
    min_rounds: int
    max_rounds: int


FULL = Budget(warmup_rounds=3, seconds=2.5, min_rounds=10, max_rounds=500)
QUICK = Budget(warmup_rounds=1, seconds=0.15, min_rounds=3, max_rounds=25)


def stats(seconds: Sequence[float]) -> dict:
    q1, median, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
    return {"median_ms": median * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "iqr_ms": (q3 - q1) * 1e3,
            "min_ms": min(seconds) * 1e3, "reps": len(seconds)}


def time_interleaved(a: Callable[[], float], b: Callable[[], float], budget: Budget):
    """Warm-up rounds, then rounds of a() and b() alternating (A B A B ...), as many as fit the
    budget (but at least min_rounds). Returns the two lists of seconds."""
    warmup_s = 0.0
    for _ in range(budget.warmup_rounds):  # at least one; fewer when rounds are slow
        warmup_s += a() + b()
        if warmup_s > budget.seconds / 3:
            break
    round_s = a() + b()
    rounds = int(min(budget.max_rounds, max(budget.min_rounds, budget.seconds / max(round_s, 1e-9))))
    times_a, times_b = [], []
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            times_a.append(a())
            times_b.append(b())
    finally:
        gc.enable()
    return times_a, times_b


def run_case(case: Case, dtype: torch.dtype, mode: str, budget: Budget) -> dict:
    ours_fn, native_fn = op_pair(case)
    leaves = make_inputs(case, dtype, requires_grad=(mode == "fwdbwd"))
    grad_values = None
    if mode == "fwdbwd":
        oh, ow = case.output_size
        k = case.out_channels if case.is_conv else case.channels
        gen = torch.Generator().manual_seed(1)
        grad_values = torch.randn(case.batch, k, oh, ow, generator=gen).to(dtype)
    ours, native = Call(ours_fn, leaves, grad_values), Call(native_fn, leaves, grad_values)
    error = relative_error(ours.results(), native.results())
    times_ours, times_native = time_interleaved(ours, native, budget)
    s_ours, s_native = stats(times_ours), stats(times_native)
    paired = [x / y for x, y in zip(times_ours, times_native)]
    p_q1, p_med, p_q3 = statistics.quantiles(paired, n=4, method="inclusive")
    result = {
        "name": case.name, "family": case.family, "case": dataclasses.asdict(case),
        "ours": s_ours, "native": s_native,
        "ratio": s_ours["median_ms"] / s_native["median_ms"],
        "ratio_paired": {"median": p_med, "q1": p_q1, "q3": p_q3},
        "relative_error": error, "agrees": error <= AGREEMENT[dtype],
    }
    flops, traffic = case.flops(mode), case.traffic_bytes(mode, dtype)
    if flops:
        result["flops"] = flops
        result["ours"]["gflops"] = flops / s_ours["median_ms"] / 1e6
        result["native"]["gflops"] = flops / s_native["median_ms"] / 1e6
    if traffic:
        result["bytes"] = traffic
        result["ours"]["gbytes_per_s"] = traffic / s_ours["median_ms"] / 1e6
        result["native"]["gbytes_per_s"] = traffic / s_native["median_ms"] / 1e6
    return result


# ---- memory: one fresh process per (case, implementation) -------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec: dict) -> dict:
    """In a fresh process: peak extra resident memory of one call of one implementation."""
    import resource

    torch.set_num_threads(spec["threads"])
    dtype, mode = DTYPES[spec["dtype"]], spec["mode"]
    case = Case(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["case"].items()})
    small = dataclasses.replace(case, height=min(case.height, 16), width=min(case.width, 16))
    need = [d * (k - 1) + 1 - 2 * p for k, p, d in zip(case.kernel, case.padding, case.dilation)]
    small = dataclasses.replace(small, height=max(small.height, need[0]), width=max(small.width, need[1]))
    fn = op_pair(case)[0 if spec["impl"] == "ours" else 1]

    # Warm-up at the case's batch on small images: thread pools, library initialisation on every
    # thread the call runs on, the output layout.
    warm = make_inputs(small, dtype, requires_grad=(mode == "fwdbwd"))
    out = fn(*warm)
    if mode == "fwdbwd":
        out.backward(torch.ones_like(out))
    channels_last_out = out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    del warm, out

    leaves = make_inputs(case, dtype, requires_grad=(mode == "fwdbwd"))
    grad_output = None
    if mode == "fwdbwd":
        oh, ow = case.output_size
        k = case.out_channels if case.is_conv else case.channels
        grad_output = torch.randn(case.batch, k, oh, ow).to(dtype)
        if channels_last_out:
            grad_output = grad_output.contiguous(memory_format=torch.channels_last)
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

    exact = _reset_peak_rss()
    before_kb = _status_kb("VmRSS")
    before_max_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if grad_output is None:
        with torch.no_grad():
            results = [fn(*leaves)]
    else:
        out = fn(*leaves)
        out.backward(grad_output)
        results = [out] + [t.grad for t in leaves]
    if exact:
        peak_kb, method = _status_kb("VmHWM"), "VmHWM after clear_refs"
    else:
        # Growth of the lifetime high-water mark: a lower bound of peak - before_kb.
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_max_kb + before_kb
        method = "ru_maxrss growth (lower bound)"
    tensors_bytes = sum(t.numel() * t.element_size() for t in results if t is not None)
    return {"peak_extra_bytes": max(0, peak_kb - before_kb) * 1024, "result_bytes": tensors_bytes,
            "method": method}


def _memory_child(spec: dict, conn) -> None:
    try:
        conn.send(("ok", memory_worker(spec)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        import traceback
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


_MEMORY_CONTEXT = None


def _memory_context():
    """Fresh processes without paying for `import torch` each time: a fork server that has imported
    torch and torch_cnnbp (and run nothing, so no thread pool exists yet) forks one child per
    measurement. Where there is no fork server, spawn (a new interpreter) does the same, slower."""
    global _MEMORY_CONTEXT
    if _MEMORY_CONTEXT is None:
        import multiprocessing
        if "forkserver" in multiprocessing.get_all_start_methods():
            _MEMORY_CONTEXT = multiprocessing.get_context("forkserver")
            _MEMORY_CONTEXT.set_forkserver_preload(["torch_cnnbp.bench"])
        else:
            _MEMORY_CONTEXT = multiprocessing.get_context("spawn")
    return _MEMORY_CONTEXT


def measure_memory(case: Case, dtype_name: str, mode: str, threads: int, timeout_s: float = 600) -> dict:
    """Runs `memory_worker` for ours and for native, each in a fresh process."""
    ctx = _memory_context()
    from torch_cnnbp import bench  # the child finds the target by its module name
    out = {}
    for impl in ("ours", "native"):
        spec = {"case": dataclasses.asdict(case), "dtype": dtype_name, "mode": mode, "threads": threads,
                "impl": impl}
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=bench._memory_child, args=(spec, sender), daemon=True)
        child.start()
        sender.close()
        try:
            status, payload = receiver.recv() if receiver.poll(timeout_s) else ("error", "timed out")
        except EOFError:
            status, payload = "error", "the process died without a result"
        finally:
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()
            receiver.close()
        if status != "ok":
            raise RuntimeError(f"memory measurement of {case.name} ({impl}) failed (exit code "
                               f"{child.exitcode}):\n{payload}")
        out[impl] = payload
    out["ratio"] = out["ours"]["peak_extra_bytes"] / max(out["native"]["peak_extra_bytes"], 1)
    out["method"] = out["ours"]["method"]
    return out


# ---- machine ----------------------------------------------------------------------------------


def machine_info() -> dict:
    info = {"cpu_model": platform.processor() or "unknown", "logical_cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
        info["simd"] = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f") if f in flags]
    except OSError:
        pass
    info["load_average_at_start"] = load_average()
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
            info["cgroup_cpu_limit"] = None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            info["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch_cnnbp  # loads the ops
        info["paths"] = torch.ops.cnnbp._paths()
        with open(torch_cnnbp._C.__file__, "rb") as f:
            info["extension_sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
    except (ImportError, OSError, AttributeError, RuntimeError):
        pass
    return info


# ---- output -----------------------------------------------------------------------------------


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(results: List[dict]) -> dict:
    families = {}
    for family in FAMILIES:
        rows = [r for r in results if r["family"] == family]
        if not rows:
            continue
        worst = max(rows, key=lambda r: r["ratio"])
        families[family] = {"cases": len(rows), "geomean_ratio": geomean([r["ratio"] for r in rows]),
                            "max_ratio": worst["ratio"], "max_ratio_case": worst["name"],
                            "min_ratio": min(r["ratio"] for r in rows)}
        with_memory = [r for r in rows if "memory" in r]
        if with_memory:
            worst_mem = max(with_memory, key=lambda r: r["memory"]["ratio"])
            families[family]["memory_max_ratio"] = worst_mem["memory"]["ratio"]
            families[family]["memory_max_ratio_case"] = worst_mem["name"]
    worst = max(results, key=lambda r: r["ratio"])
    return {"families": families, "max_ratio": worst["ratio"], "max_ratio_case": worst["name"],
            "load_average": load_average(),
            "disagreements": [r["name"] for r in results if not r["agrees"]]}


def check_targets(summary: dict, dtype_name: str, mode: str, threads: int) -> List[dict]:
    """Issue 4's targets that apply to this run (informational; they are stated for 2 threads, fwd+bwd)."""
    if mode != "fwdbwd":
        return []
    checks = []
    for family, statistic, dtype, bound in TARGETS:
        fam = summary["families"].get(family)
        if fam is None or (dtype is not None and dtype != dtype_name):
            continue
        key = {"geomean": "geomean_ratio", "max": "max_ratio", "memory max": "memory_max_ratio"}[statistic]
        if key not in fam:
            continue
        checks.append({"family": family, "statistic": statistic, "bound": bound, "value": fam[key],
                       "met": fam[key] <= bound, "threads": threads})
    return checks


def _rate(side: dict) -> str:
    if "gflops" in side:
        return f"{side['gflops']:7.1f}"
    if "gbytes_per_s" in side:
        return f"{side['gbytes_per_s']:6.1f}B"
    return "       "


NAME_WIDTH = 56


def header() -> str:
    return (f"{'#':>6}  {'case':<{NAME_WIDTH}} {'ours ms':>9} {'iqr%':>5} {'native ms':>10} {'iqr%':>5} "
            f"{'ours/nat':>8} {'ours':>7} {'native':>7}")


def format_row(i: int, n: int, r: dict) -> str:
    o, nat = r["ours"], r["native"]
    flag = "" if r["agrees"] else f"  DISAGREES (rel err {r['relative_error']:.1e})"
    return (f"{i:>2}/{n:<3}  {r['name']:<{NAME_WIDTH}} {o['median_ms']:9.3f} {100 * o['iqr_ms'] / o['median_ms']:5.1f} "
            f"{nat['median_ms']:10.3f} {100 * nat['iqr_ms'] / nat['median_ms']:5.1f} {r['ratio']:8.3f} "
            f"{_rate(o)} {_rate(nat)}{flag}")


def format_memory_row(i: int, n: int, r: dict) -> str:
    m = r["memory"]
    mb = lambda b: b / 2**20  # noqa: E731
    return (f"{i:>2}/{n:<3}  {r['name']:<{NAME_WIDTH}} {mb(m['ours']['peak_extra_bytes']):9.1f} "
            f"{mb(m['native']['peak_extra_bytes']):10.1f} {m['ratio']:8.3f} {mb(m['ours']['result_bytes']):10.1f}")


def load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages: above the usable CPU count, timings include contention."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def print_summary(summary: dict, targets: List[dict], threads: int) -> None:
    print(f"\nsummary, {threads} thread(s): ratio = ours/native median time, geometric mean per family"
          f" (load average now {summary['load_average']})")
    for family, fam in summary["families"].items():
        line = (f"  {family:<26} {fam['cases']:>3} cases  geomean {fam['geomean_ratio']:6.3f}  "
                f"min {fam['min_ratio']:6.3f}  max {fam['max_ratio']:6.3f} ({fam['max_ratio_case']})")
        if "memory_max_ratio" in fam:
            line += (f"\n  {'':<26} peak memory ours/native max {fam['memory_max_ratio']:.3f} "
                     f"({fam['memory_max_ratio_case']})")
        print(line)
    print(f"  max ratio overall: {summary['max_ratio']:.3f} ({summary['max_ratio_case']})")
    if summary["disagreements"]:
        print(f"  DISAGREE with native: {', '.join(summary['disagreements'])}")
    if targets:
        print("  issue 4 targets (stated for 2 threads):")
        for t in targets:
            print(f"    {t['family']:<26} {t['statistic']:<10} {t['value']:6.3f} <= {t['bound']:<4} "
                  f"{'met' if t['met'] else 'NOT met'}")
    sys.stdout.flush()


def print_scaling(runs: List[dict]) -> dict:
    """Per case and family: how time (ours and native) falls as threads grow, relative to the first count."""
    base = runs[0]
    counts = [run["threads"] for run in runs]
    by_name = [{r["name"]: r for r in run["cases"]} for run in runs]
    print(f"\nthread scaling: speed-up over {counts[0]} thread(s) (median time at {counts[0]} / median time at t)")
    print(f"  {'case':<{NAME_WIDTH}} " + " ".join(f"{'ours@' + str(t):>9} {'nat@' + str(t):>8}" for t in counts[1:]))
    scaling = {"threads": counts, "cases": {}, "families": {}}
    for r0 in base["cases"]:
        ups = []
        for run in by_name[1:]:
            r = run[r0["name"]]
            ups.append((r0["ours"]["median_ms"] / r["ours"]["median_ms"],
                        r0["native"]["median_ms"] / r["native"]["median_ms"]))
        scaling["cases"][r0["name"]] = [{"ours": o, "native": n} for o, n in ups]
        print(f"  {r0['name']:<{NAME_WIDTH}} " + " ".join(f"{o:9.2f} {n:8.2f}" for o, n in ups))
    for family in FAMILIES:
        names = [r["name"] for r in base["cases"] if r["family"] == family]
        if not names:
            continue
        fam = []
        for j in range(len(counts) - 1):
            fam.append({"ours": geomean([scaling["cases"][n][j]["ours"] for n in names]),
                        "native": geomean([scaling["cases"][n][j]["native"] for n in names])})
        scaling["families"][family] = fam
        print(f"  {'geomean ' + family:<{NAME_WIDTH}} " + " ".join(f"{f['ours']:9.2f} {f['native']:8.2f}" for f in fam))
    sys.stdout.flush()
    return scaling


# ---- main -------------------------------------------------------------------------------------


def parse_threads(text: str) -> List[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads expects N or a list like 1,2, got {text!r}")
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"--threads expects positive counts, got {text!r}")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torch_cnnbp bench",
        description="Time torch_cnnbp's conv2d and max_pool2d against PyTorch's on layers of real networks.",
        epilog="How it measures: see the docstring of torch_cnnbp/bench.py.")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--threads", type=parse_threads, default=None,
                   help="torch.set_num_threads count, or a list like 1,2 to run the suite at each "
                        f"(default: torch's, here {torch.get_num_threads()})")
    p.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwdbwd",
                   help="forward only (inference) or forward+backward (default)")
    p.add_argument("--quick", action="store_true", help="batch / 8 and few repetitions: a smoke run")
    p.add_argument("--suite", choices=list(SUITES), default="main",
                   help="main: the layers of LeNet-5, ResNet and MobileNet; extra: other shapes of the "
                        "same families (default: main)")
    p.add_argument("--filter", action="append", default=[], metavar="SUBSTRING",
                   help="only cases whose name contains SUBSTRING (case-insensitive; repeatable)")
    p.add_argument("--json", metavar="PATH", help="also write machine-readable results here")
    p.add_argument("--memory", action="store_true",
                   help="also measure peak memory of one call, ours vs native, a fresh process each")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cases = select_cases(args.quick, args.filter, args.suite)
    if args.list:
        for case in cases:
            print(f"{case.family:<26} {case.name}")
        return 0
    if not cases:
        print(f"no case matches {args.filter}", file=sys.stderr)
        return 2

    dtype = DTYPES[args.dtype]
    budget = QUICK if args.quick else FULL
    thread_counts = args.threads or [torch.get_num_threads()]
    machine = machine_info()
    print(f"torch_cnnbp bench: {machine['cpu_model']}, {machine.get('usable_cpus', machine['logical_cpus'])} "
          f"usable CPUs, torch {machine['torch']}, {machine['date']}, load average {load_average()}"
          + (f", commit {machine['git_commit']}" if "git_commit" in machine else "")
          + (f", paths {machine['paths']}" if "paths" in machine else ""))
    print(f"dtype {args.dtype}, mode {args.mode}, suite {args.suite}, {'quick' if args.quick else 'full'} "
          f"({budget.warmup_rounds} warm-up rounds, ~{budget.seconds:g} s per case, "
          f"{budget.min_rounds}-{budget.max_rounds} interleaved rounds), {len(cases)} cases, "
          f"threads {','.join(map(str, thread_counts))}")
    print("times: median of interleaved calls; iqr% = interquartile range / median; rate: GFLOP/s for conv "
          f"({'3x forward for fwd+bwd' if args.mode == 'fwdbwd' else 'forward'}), "
          "nominal GB/s (suffix B) for max_pool2d")
    sys.stdout.flush()

    runs = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"\n== {threads} thread(s) ==\n{header()}", flush=True)
        results = []
        for i, case in enumerate(cases, 1):
            results.append(run_case(case, dtype, args.mode, budget))
            print(format_row(i, len(cases), results[-1]), flush=True)
        if args.memory:
            print(f"\npeak memory of one {'forward+backward' if args.mode == 'fwdbwd' else 'forward'} "
                  f"(MiB above the RSS before the call; fresh process per case and implementation)")
            print(f"{'#':>6}  {'case':<{NAME_WIDTH}} {'ours MiB':>9} {'native MiB':>10} {'ours/nat':>8} "
                  f"{'results MiB':>10}", flush=True)
            for i, (case, r) in enumerate(zip(cases, results), 1):
                r["memory"] = measure_memory(case, args.dtype, args.mode, threads)
                print(format_memory_row(i, len(cases), r), flush=True)
            print(f"  method: {results[0]['memory']['method']}; 'results' = output + gradients returned, "
                  "the least any implementation must hold")
        summary = summarize(results)
        targets = check_targets(summary, args.dtype, args.mode, threads)
        print_summary(summary, targets, threads)
        runs.append({"threads": threads, "cases": results, "summary": summary, "targets": targets})

    scaling = print_scaling(runs) if len(runs) > 1 else None
    if args.json:
        doc = {"tool": "torch_cnnbp.bench", "format": 1, "machine": machine,
               "settings": {"dtype": args.dtype, "mode": args.mode, "quick": args.quick, "suite": args.suite,
                            "filter": args.filter,
                            "threads": thread_counts, "memory": args.memory,
                            "budget": dataclasses.asdict(budget)},
               "method": __doc__, "runs": runs}
        if scaling:
            doc["scaling"] = scaling
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0

