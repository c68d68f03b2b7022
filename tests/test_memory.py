"""Memory: no growth over thousands of steps, and tensors past 2^31 elements.

* test_no_growth_over_many_steps: thousands of small forward+backward steps of both ops (and of
  calls that are rejected, whose error paths are where buffers leak) leave the resident set where
  warm-up left it, within a small fixed slack.
* test_large_results_are_advised_as_huge_pages: results over 32 MiB (conv2d's output and
  input gradient, max_pool2d's output, indices and input gradient) lie in memory marked for
  transparent huge pages (VmFlags "hg" in /proc/self/smaps), smaller ones not, and none with
  CNNBP_HUGEPAGES=0.
* slow (run with `pytest -m slow tests/test_memory.py`; deselected otherwise): max_pool2d over tensors
  of more than 2^31 elements (one plane that large, and many planes adding up past it, in both
  layouts), and a conv2d whose unrolled-input (im2col) matrix has more than 2^31 elements, each
  checked at sampled positions, the last ones included, against a direct computation. They need
  up to ~12 GB of free memory (and skip, saying so, when there is less) and take a few minutes.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch

import torch_cnnbp
from helpers import assert_close

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ---- huge pages for large results ----------------------------------------------------------------

HUGE = 2 << 20


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def large_results():
    """(name, tensor) for each result kind that should be advised, all over 32 MiB."""
    x = torch.randn(5, 16, 256, 256, dtype=torch.float64)  # 40 MiB
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    y = torch.ops.cnnbp.conv2d(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    grad_input = torch.ops.cnnbp.conv2d_backward(torch.ones_like(y), x, w, [1, 1], [1, 1, 1, 1], [1, 1], 1,
                                                 [True, False, False])[0]
    big = x.float().repeat(2, 1, 1, 1)  # 40 MiB; 1x1 windows: results of 40 (values) and 80 MiB (indices)
    out, idx = torch.ops.cnnbp.max_pool2d(big, [1, 1], [1, 1], [0, 0], [1, 1], False)
    pool_grad = torch.ops.cnnbp.max_pool2d_backward(torch.ones_like(out), idx, list(big.shape))
    return [("conv2d output", y), ("conv2d grad_input", grad_input), ("max_pool2d output", out),
            ("max_pool2d indices", idx), ("max_pool2d grad_input", pool_grad)]


def first_whole_huge_page(t: torch.Tensor) -> int:
    address = (t.data_ptr() + HUGE - 1) // HUGE * HUGE
    assert address + HUGE <= t.data_ptr() + t.numel() * t.element_size()
    return address


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_large_results_are_advised_as_huge_pages():
    for name, t in large_results():
        assert "hg" in vm_flags(first_whole_huge_page(t)), name
    # 16 MiB: from the allocator's heap where it reuses memory; left as it is
    x = torch.randn(2, 16, 256, 256, dtype=torch.float64)
    y = torch.ops.cnnbp.conv2d(x, torch.randn(16, 16, 1, 1, dtype=torch.float64), None, [1, 1], [0] * 4, [1, 1], 1)
    assert "hg" not in vm_flags(first_whole_huge_page(y))


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_huge_page_advice_turns_off():
    code = ("import torch_cnnbp, test_memory as m\n"
            "print(sorted(n for n, t in m.large_results() if 'hg' in m.vm_flags(m.first_whole_huge_page(t))))")
    env = dict(os.environ, CNNBP_HUGEPAGES="0")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# ---- no growth ----------------------------------------------------------------------------------


def one_step(x, w, b):
    """A small training step through both ops, plus two rejected calls."""
    xa, wa, ba = (t.detach().requires_grad_() for t in (x, w, b))
    y = torch_cnnbp.conv2d(xa, wa, ba, padding=1)
    z, idx = torch_cnnbp.max_pool2d(y, 2, return_indices=True)
    z.square().sum().backward()
    for bad in (lambda: torch_cnnbp.conv2d(xa, wa[:, :2]), lambda: torch_cnnbp.max_pool2d(xa, 9)):
        try:
            bad()
        except RuntimeError:
            pass
    return float(wa.grad.sum())


def test_no_growth_over_many_steps():
    torch.manual_seed(0)
    # ~150 KB per tensor: a col buffer or gradient leaked per step would add hundreds of MB
    x = torch.randn(8, 8, 24, 25)
    w = torch.randn(16, 8, 3, 3)
    b = torch.randn(16)
    xcl = x.contiguous(memory_format=torch.channels_last)
    for _ in range(200):  # warm-up: allocator pools, thread pools, autograd caches
        one_step(x, w, b)
        one_step(xcl, w, b)
    gc.collect()
    before = rss_bytes()
    steps = 2000
    for i in range(steps):
        one_step(xcl if i % 2 else x, w, b)
    gc.collect()
    growth = rss_bytes() - before
    slack = 24 * 2**20
    assert growth < slack, f"RSS grew by {growth / 2**20:.1f} MiB over {steps} steps (allowed {slack / 2**20} MiB)"


# ---- past 2^31 elements (slow) ------------------------------------------------------------------


def random_bfloat16(shape, seed):
    """Positive finite bfloat16 values, drawn as raw bit patterns (no float32 temporary)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 0x7F80, shape, dtype=torch.int16, generator=g).view(torch.bfloat16)


def check_pool_samples(x, out, idx, k, samples):
    """out/idx at sampled (n, c, i, j) against the window's max and first argmax (scan order),
    for a pool with kernel k, stride k and no padding."""
    W = x.shape[-1]
    for n, c, i, j in samples:
        window = x[n, c, i * k:(i + 1) * k, j * k:(j + 1) * k].float().flatten()
        best = int(torch.argmax(window))  # the first maximum, as in scan order
        expected_index = (i * k + best // k) * W + j * k + best % k
        assert out[n, c, i, j].float() == window[best], (n, c, i, j)
        assert int(idx[n, c, i, j]) == expected_index, (n, c, i, j, int(idx[n, c, i, j]), expected_index)


def sample_positions(N, C, OH, OW, count=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    picks = [(N - 1, C - 1, OH - 1, OW - 1), (N - 1, C - 1, OH - 1, 0), (0, 0, 0, 0), (N - 1, C - 1, 0, OW - 1)]
    for _ in range(count):
        picks.append(tuple(int(torch.randint(0, d, (), generator=g)) for d in (N, C, OH, OW)))
    return picks


@pytest.mark.slow
@pytest.mark.parametrize("shape,layout", [
    ((1, 1, 46341, 46341), "contiguous"),   # one plane of 2^31 + 4633 elements: indices past int32
    ((3, 1, 26755, 26755), "contiguous"),   # planes below 2^31, offsets past it
    ((1, 3, 26755, 26755), "channels_last"),
], ids=["one-plane", "many-planes", "channels-last"])
def test_max_pool2d_past_2_31_elements(shape, layout):
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    assert numel > 2**31
    if mem_available_bytes() < 14 * 2**30:  # peak about 11.5 GB
        pytest.skip("needs about 14 GiB of free memory")
    k = 4
    x = random_bfloat16(shape, seed=1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out, idx = torch_cnnbp.max_pool2d(x, k, return_indices=True)
    N, C, OH, OW = out.shape
    assert (OH, OW) == (shape[2] // k, shape[3] // k)
    samples = sample_positions(N, C, OH, OW)
    with torch.no_grad():
        check_pool_samples(x.detach(), out.detach(), idx, k, samples)
    assert int(idx.max()) < shape[2] * shape[3]
    # backward: windows do not overlap, so each sampled winner gets exactly its output's gradient
    grad_out = torch.zeros_like(out)
    for n, c, i, j in samples:
        grad_out[n, c, i, j] = 1.0 + i % 7
    (grad_in,) = torch.autograd.grad(out, x, grad_out)
    del out
    for n, c, i, j in samples:
        h, v = divmod(int(idx[n, c, i, j]), shape[3])
        assert float(grad_in[n, c, h, v]) == 1.0 + i % 7
    # and nothing else anywhere (summed in chunks: a float64 copy of the whole would be 17 GB)
    in_memory_order = grad_in.detach().permute(0, 2, 3, 1) if layout == "channels_last" else grad_in.detach()
    total = sum(float(part.sum(dtype=torch.float64)) for part in in_memory_order.reshape(-1).split(2**26))
    assert total == sum(1.0 + i % 7 for _, _, i, _ in set(samples))
    del grad_in, x, idx
    gc.collect()


@pytest.mark.slow
def test_conv2d_unrolled_input_past_2_31_elements():
    """One sample, two input channels, a 5x5 kernel: the unrolled input of the whole sample (2·5·5
    = 50 rows by H·W columns) would hold more than 2^31 elements. Up to commit a2ff0c8 conv2d built
    exactly that buffer (8 GiB), its last rows reached only through 64-bit offsets; since then it
    unrolls tiles of output positions (at most 2^18 elements per thread), so this checks the tile
    offsets over planes of 43M positions, and the old overflow if the whole-sample buffer ever
    comes back. (Two channels, because a single-channel conv takes the direct depthwise loops.) The upstream gradient is zero except at sampled positions, so each
    gradient is a short sum that a direct float64 computation reproduces to float32 rounding.
    The two gradients are taken one at a time, to bound the peak memory."""
    if mem_available_bytes() < 14 * 2**30:  # peak about 10 GB
        pytest.skip("needs about 14 GiB of free memory")
    C, K, H, W, k, pad = 2, 2, 6554, 6554, 5, 2
    assert C * k * k * H * W > 2**31
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, C, H, W, generator=g).sub_(0.5).requires_grad_()
    w = torch.randn(K, C, k, k, generator=g).requires_grad_()
    out = torch_cnnbp.conv2d(x, w, padding=pad)
    assert out.shape == (1, K, H, W)
    samples = [(K - 1, H - 1, W - 1), (0, H - 1, 0), (1, H - 3, W - 3), (0, 0, 0), (1, H // 2, W // 2)]
    samples += [(int(torch.randint(0, K, (), generator=g)),) + tuple(int(v) for v in torch.randint(0, H, (2,), generator=g))
                for _ in range(30)]
    samples = sorted(set(samples))
    xp = torch.nn.functional.pad(x.detach(), (pad, pad, pad, pad))
    wd = w.detach().double()
    with torch.no_grad():
        for kk, i, j in samples:
            expected = (xp[0, :, i:i + k, j:j + k].double() * wd[kk]).sum()
            assert_close(out[0, kk, i, j].double(), expected, torch.float32, msg=f"output at {(kk, i, j)}")
    grad_out = torch.zeros_like(out)
    for n, (kk, i, j) in enumerate(samples):
        grad_out[0, kk, i, j] = 1.0 + n % 5
    (gw,) = torch.autograd.grad(out, w, grad_out, retain_graph=True)
    expected_gw = torch.zeros(K, C, k, k, dtype=torch.float64)
    for n, (kk, i, j) in enumerate(samples):
        expected_gw[kk] += (1.0 + n % 5) * xp[0, :, i:i + k, j:j + k].double()
    assert_close(gw.double(), expected_gw, torch.float32, msg="weight gradient")
    del xp
    gc.collect()
    (gx,) = torch.autograd.grad(out, x, grad_out)
    del out
    expected_gx = {}
    for n, (kk, i, j) in enumerate(samples):
        d = 1.0 + n % 5
        for c in range(C):
            for m in range(k):
                for q in range(k):
                    h, v = i + m - pad, j + q - pad
                    if 0 <= h < H and 0 <= v < W:
                        expected_gx[(c, h, v)] = expected_gx.get((c, h, v), 0.0) + d * float(wd[kk, c, m, q])
    for (c, h, v), e in expected_gx.items():
        got = float(gx[0, c, h, v])
        assert abs(got - e) <= 1e-4 * (1 + abs(e)), ((c, h, v), got, e)
    assert int((gx != 0).sum()) <= len(expected_gx), "gradient written where no sampled output reads"
