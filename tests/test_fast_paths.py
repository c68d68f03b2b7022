"""The fast paths of the kernels, each driven at its edges and compared with native (forward and
backward) through the shared harness, and with the NumPy reference on tiny float64 sizes.

* conv2d's own GEMM (csrc/gemm.cpp): register tile MR = 12 rows × NR = 32 (float) / 16
  (double) columns on AVX-512, MR = 6 × NR = 16 / 8 on AVX2 (the cases' remainders fall on both
  tiles' edges: 13 = 12 + 1 = 2·6 + 1, 33 = 32 + 1 = 2·16 + 1), k blocks of KC = 256, MC = 144 rows and NC = 1536 columns packed at once. The
  three products per sample block and group (csrc/conv2d.cpp) are
      forward      [Kg × rows] · [rows × cols]
      grad_input   [rows × Kg] · [Kg × cols]         (A transposed)
      grad_weight  [Kg × cols] · [cols × rows]       (B transposed)
  with Kg = K / groups, rows = the unrolled rows of a block of input channels (Cg·kh·kw when the
  channels fit one block) and cols = the columns of a slab (block·OH·OW, in frames block·OH·Wp, or a
  tile of one sample). GEMM_CASES puts each of these dimensions below one tile/block, on a multiple
  and one past it; `conv_plan` reads the plan from the extension (cnnbp::_conv2d_plan) so that
  test_gemm_matrix_covers_the_edges can say which products the cases make.
* the weight packed once per call where several slabs use it (PACKED_CASES), with the last panel
  of every height class (kernels of MR/3, 2·MR/3 and MR rows).
* the batch plan: sample blocks (block > 1 when OH·OW < 512) with remainders, per-thread chunks
  (N ≥ threads, work ≥ 2^20) with batches not divisible by the thread count, the pointwise direct
  path (col is the input itself) and pointwise convs that are not direct (stride 2, padding).
* the direct depthwise kernels (groups == C).
* max_pool2d: the NCHW phase-split rows (stride 1, 2, 3, (2,3); kernel widths 2 and 3 unrolled,
  1, 4, 5 generic; dilation; padding; ceil_mode; every output width 1..40), the channels_last
  kernel, backward with overlapping windows in both layouts.
* the run-time ISA choice: a compact subset rerun in fresh processes with CNNBP_SIMD=portable and
  CNNBP_SIMD=avx2 (read once at load), where the products go through ATen's BLAS.
* determinism: two runs with a fixed thread count are bitwise identical.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import torch_cnnbp
from torch_cnnbp import _args, reference

from helpers import (
    DTYPES,
    assert_close,
    assert_close_within_native_error,
    compare_with_native,
    conv2d_pair,
    leaves,
    max_pool2d_pair,
    no_native_kernels_ran,
)

# Native warns that 'same' with an even kernel may copy the input; that is native's business.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

# The GEMM's blocking (csrc/gemm.cpp).
MR, KC, MC, NC = 12, 256, 144, 1536
NR = {torch.float32: 32, torch.float64: 16}


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seeded; one intra-op thread unless a case asks for more (the cases that are about a split
    over threads say 2), and the caller's thread count put back afterwards. With two threads on a
    loaded two-core machine every parallel region of ours and of native costs far more than its
    work, and most cases here are small enough to run on the calling thread at any count."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(*shape, dtype=torch.float64):
    """Normal values drawn in float64, then rounded once to `dtype` (both frameworks see the same)."""
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def set_threads(n):
    """Sets the intra-op thread count (None leaves it as it is) and checks that it took."""
    if n is not None:
        torch.set_num_threads(n)
        assert torch.get_num_threads() == n


def own_gemm_active() -> bool:
    """conv2d's products run on the project's own GEMM in this process (csrc/gemm.h: the default on
    AVX-512 CPUs not made by Intel, or CNNBP_GEMM=own); otherwise on ATen's BLAS."""
    return "gemm=own" in torch.ops.cnnbp._paths()


# ---- conv2d's batch plan (plan_batches in csrc/conv2d.cpp), as the extension reports it ----------

def _split(total, size):
    """Pieces of `size` covering [0, total), the last one shorter."""
    return [min(size, total - a) for a in range(0, total, size)]


def conv_plan(x_shape, w_shape, threads, stride=1, padding=0, dilation=1, groups=1):
    """What conv2d.cpp does with these shapes at `threads` threads, from the plan the extension
    itself reports (cnnbp::_conv2d_plan: chunks, block, tile, cblock, shared; forward and backward),
    with what follows from it: the sample blocks of each chunk, whether col is the input itself, the
    channel blocks, and the (M, N, K) of each product."""
    N, C, H, W = x_shape
    K, Cg, KH, KW = w_shape
    w = torch.empty(w_shape, device="meta")
    (sh, sw), (pt, pb, pl, pr), (dh, dw) = _args.conv2d_args(w, stride, padding, dilation)
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    P, rows, Kg, KHW = OH * OW, Cg * KH * KW, K // groups, KH * KW
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = (list(x_shape), list(w_shape), [sh, sw], [pt, pb, pl, pr], [dh, dw], groups)
        fwd = torch.ops.cnnbp._conv2d_plan(*args, False)
        bwd = torch.ops.cnnbp._conv2d_plan(*args, True)
    finally:
        torch.set_num_threads(before)
    chunks, block, tile, cblock, shared = fwd
    b_chunks, b_block, b_tile, b_cblock, b_shared = bwd

    def blocks_of(n_chunks, blk):
        spans = [(t * N // n_chunks, (t + 1) * N // n_chunks) for t in range(n_chunks)]
        return [min(blk, last - n) for first, last in spans for n in range(first, last, blk)]

    blocks, b_blocks = blocks_of(chunks, block), blocks_of(b_chunks, b_block)
    pointwise = KH == KW == 1 and sh == sw == 1 and pt == pb == pl == pr == 0
    frames = block > 1 and sh == sw == 1 and Kg * (pl + pr + W - OW) < 256
    width = OH * (W + pl + pr) if frames else P
    products = set()
    if Cg > 1:  # depthwise convs (Cg == 1) use direct loops, no products
        for nb in set(blocks):
            if nb == 1 and pointwise:
                col_rows = [rows]
            else:
                col_rows = [r * KHW for r in _split(Cg, cblock)]
            if nb > 1:
                cols = [nb * width]
            elif shared:  # each thread whole 32-column panels, in tiles of about equal size
                panels, cols = -(-P // 32), []
                for t in range(threads):
                    lo, hi = (min(P, i * panels // threads * 32) for i in (t, t + 1))
                    if hi > lo:
                        tiles = -(-(hi - lo) // tile)
                        cols += _split(hi - lo, min(hi - lo, (-(-(hi - lo) // tiles) + 31) // 32 * 32))
            else:
                cols = _split(P, tile)
            products |= {("forward", Kg, c, r) for c in cols for r in col_rows}
        for nb in set(b_blocks):
            if nb == 1 and pointwise:  # the input itself: both products whole
                col_rows, cols = [rows], [P]
            else:
                col_rows = [r * KHW for r in _split(Cg, b_cblock)]
                cols = [nb * P] if nb > 1 else _split(P, b_tile)
            products |= {("grad_input", r, c, Kg) for c in cols for r in col_rows}
            products |= {("grad_weight", Kg, r, c) for c in cols for r in col_rows}
    return SimpleNamespace(P=P, rows=rows, Kg=Kg, chunks=chunks, block=block, blocks=blocks, tile=tile,
                           cblock=cblock, shared=shared, backward=SimpleNamespace(
                               chunks=b_chunks, block=b_block, blocks=b_blocks, tile=b_tile, cblock=b_cblock,
                               shared=b_shared),
                           direct=pointwise and block == 1, depthwise=Cg == 1, frames=frames, products=products,
                           split_positions=bool(shared), split_channels=bool(b_shared) and b_block == 1)


HALF_TYPES = (torch.bfloat16, torch.float16)


def compare_half_with_native_and_exact(ours_fn, native_fn, inputs, msg=""):
    """For float16 / bfloat16 convolutions. Native's half conv rounds partial sums on the way (its
    float16 grad_input of a 4x4-kernel conv measured 0.031 off the exact result where ours, which
    sums in float and rounds once, is 0.012 off), so a sum of a few hundred terms can put the two
    further apart than the per-op tolerance with native the less accurate one. So each output and
    gradient is checked twice: against the exact result (native in float64 on the same rounded
    inputs and upstream gradient) at the dtype's tolerance, which a single rounding meets; and
    against native with assert_close_within_native_error (as accurate as native)."""
    runs = []
    for fn, dtype in ((ours_fn, None), (native_fn, None), (native_fn, torch.float64)):
        ts = leaves(*inputs, dtype=dtype)
        out = fn(*ts)
        if not runs:
            g = randn(*out.shape, dtype=out.dtype)
        grads = torch.autograd.grad(out, [t for t in ts if t is not None], g.to(out.dtype))
        runs.append((out.detach(), *grads))
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    for what, ours, native, exact in zip(names, *runs):
        assert ours.shape == native.shape and ours.dtype == native.dtype, f"{msg}: {what} shape/dtype"
        assert_close(ours, exact.to(ours.dtype), msg=f"{msg}: {what} against float64")
        assert_close_within_native_error(ours, native, exact, msg=f"{msg}: {what} against native")
    return runs[0]


def run_conv_case(x_shape, w_shape, bias, kw, dtype, threads=None, msg=""):
    """Random inputs of these shapes, ours against native (forward and every gradient)."""
    set_threads(threads)
    x = randn(*x_shape, dtype=dtype)
    w = randn(*w_shape, dtype=dtype)
    b = randn(w_shape[0], dtype=dtype) if bias else None
    ours, native = conv2d_pair(**kw)
    if dtype in HALF_TYPES:
        return compare_half_with_native_and_exact(ours, native, (x, w, b), msg=f"{msg}, {dtype}")
    return compare_with_native(ours, native, (x, w, b), msg=msg)


# ---- the GEMM: tile, k-block, row-block and column-block edges --------------------------------

# (id, input shape, weight shape, bias, kwargs, threads). N = 1 unless said otherwise, so that the
# sample block is 1 and the products' columns are OH·OW exactly. Ids: Kg, rows, OH·OW. threads None
# runs at one thread (the fixture); 2 where the columns are enough to be split over two threads.
GEMM_CASES = [
    # Kg and the columns around the tile, rows around it too (grad_weight's columns)
    ("Kg11_rows31_cols31_1x1pad", (1, 31, 1, 29), (11, 31, 1, 1), True, dict(padding=(0, 1)), None),
    ("Kg12_rows32_cols32", (1, 2, 7, 11), (12, 2, 4, 4), False, {}, None),
    ("Kg13_rows33_cols33", (1, 11, 5, 11), (13, 11, 3, 1), True, {}, None),
    ("Kg25_rows65_cols65", (1, 13, 9, 13), (25, 13, 5, 1), False, {}, None),
    ("Kg12_rows15_cols15", (1, 5, 3, 15), (12, 5, 3, 1), True, {}, None),
    ("Kg12_rows16_cols16", (1, 4, 3, 9), (12, 4, 2, 2), False, {}, None),
    ("Kg24_rows17_cols17_1x1s2", (1, 17, 1, 33), (24, 17, 1, 1), True, dict(stride=2), None),
    ("Kg1_rows12_cols1", (1, 3, 2, 2), (1, 3, 2, 2), True, {}, None),
    # rows (grad_input's M) around MR
    ("Kg5_rows11_cols33_1x1", (1, 11, 3, 11), (5, 11, 1, 1), True, {}, None),
    ("Kg7_rows13_cols32_1x1s2", (1, 13, 7, 15), (7, 13, 1, 1), False, dict(stride=2), None),
    ("Kg3_rows25_cols65_1x1pad", (1, 25, 3, 13), (3, 25, 1, 1), True, dict(padding=1), None),
    # rows (k of the forward product, columns of grad_weight's) around KC = 256
    ("Kg13_rows255_cols33", (1, 85, 5, 11), (13, 85, 3, 1), True, {}, None),
    ("Kg12_rows256_cols32", (1, 16, 7, 11), (12, 16, 4, 4), False, {}, None),
    ("Kg11_rows257_cols55_1x1s2", (1, 257, 9, 21), (11, 257, 1, 1), True, dict(stride=2), None),
    ("Kg25_rows513_cols55", (1, 57, 7, 13), (25, 57, 3, 3), False, {}, None),
    ("groups2_Kg13_rows257_cols33_pad1", (1, 514, 3, 11), (26, 257, 1, 1), True, dict(groups=2, padding=(1, 0)), None),
    ("Kg144_rows144_cols32", (1, 16, 6, 10), (144, 16, 3, 3), True, {}, None),
    ("Kg145_rows27_cols33", (1, 3, 5, 13), (145, 3, 3, 3), False, {}, None),
    # rows past NC (grad_weight's columns) and several KC blocks (the forward's k)
    ("Kg13_rows1539_cols25_1thread", (1, 171, 7, 7), (13, 171, 3, 3), False, dict(), 1),
    ("Kg13_rows3105_cols21_1x1_2threads", (1, 3105, 3, 7), (13, 3105, 1, 1), True, dict(), 2),
    # Kg past MC = 144 (forward rows) and past KC (grad_input's k); rows past MC (grad_input's rows)
    ("Kg257_rows153_cols51", (1, 17, 5, 19), (257, 17, 3, 3), True, {}, None),
    ("Kg289_rows36_cols99", (1, 4, 5, 35), (289, 4, 3, 3), False, {}, None),
    ("Kg13_rows289_cols15_pad01", (1, 289, 3, 13), (13, 289, 1, 1), True, dict(padding=(0, 1)), None),
    ("Kg12_rows145_cols32_1x1pad1", (1, 145, 2, 6), (12, 145, 1, 1), False, dict(padding=1), None),
    # columns (OH·OW) around KC for grad_weight's k: 255, 256, 257, 513
    ("Kg12_rows27_cols255", (1, 3, 17, 19), (12, 3, 3, 3), True, {}, None),
    ("Kg12_rows27_cols256", (1, 3, 18, 18), (12, 3, 3, 3), False, {}, None),
    ("Kg12_rows27_cols257", (1, 3, 3, 259), (12, 3, 3, 3), True, {}, None),
    ("Kg13_rows27_cols513", (1, 3, 21, 29), (13, 3, 3, 3), False, {}, None),
    # columns past NC = 1536 in one thread's share: one thread, or 3100 columns over two (each
    # thread gets whole panels: 49 of 32 floats = 1568 or 97 of 16 doubles = 1552 for the first).
    ("Kg13_rows27_cols1537_1thread", (1, 3, 31, 55), (13, 3, 3, 3), True, {}, 1),
    ("Kg12_rows18_cols3100_2threads", (1, 2, 52, 64), (12, 2, 3, 3), False, {}, 2),
    ("Kg25_rows257_cols1537_1thread", (1, 257, 29, 53), (25, 257, 1, 1), True, dict(padding=0, stride=1), 1),
    # the same over two threads: 25 and 24 panels, the second ending in a 1-column edge tile
    ("Kg25_rows257_cols1537_2threads", (1, 257, 29, 53), (25, 257, 1, 1), False, dict(stride=1), 2),
]


def case_id(case):
    return case[0]


def test_gemm_matrix_covers_the_edges():
    """The GEMM cases make products whose every dimension sits below, on and one past the tile and
    block sizes (per the model of conv2d.cpp's plan; a model test, it checks the matrix itself)."""
    dims = {"fM": set(), "fN": set(), "fK": set(), "iM": set(), "iK": set(), "wN": set(), "wK": set()}
    for _, xs, ws, _, kw, threads in GEMM_CASES:
        plan = conv_plan(xs, ws, threads or 1, **kw)
        assert plan.blocks and set(plan.blocks) == {1} and not plan.depthwise, "one sample per product"
        for name, M, N, K in plan.products:
            key = {"forward": "f", "grad_input": "i", "grad_weight": "w"}[name]
            for d, v in zip("MNK", (M, N, K)):
                dims.setdefault(key + d, set()).add(v)
    def edges(size):
        return {size - 1, size, size + 1, 2 * size + 1}

    # rows of the tile (MR) and of the packed block (MC): forward's M = Kg, grad_input's M = rows
    assert edges(MR) <= dims["fM"] and {MC, MC + 1, 2 * MC + 1} <= dims["fM"]
    assert edges(MR) <= dims["iM"] and {MC, MC + 1, MC + 9, 2 * MC + 1} <= dims["iM"]
    # columns of the tile (NR, per dtype) and of the packed block (NC, also within one thread's share)
    for nr in NR.values():
        assert edges(nr) <= dims["fN"] and edges(nr) <= dims["wN"]
    assert {NC + 1, 2 * NC + 28} <= dims["fN"] and {NC + 3, 2 * NC + 33} <= dims["wN"]
    # k blocks (KC): forward's k = rows, grad_input's k = Kg, grad_weight's k = OH·OW
    assert edges(KC) <= dims["fK"] and {6 * KC + 3, 12 * KC + 33} <= dims["fK"]
    assert KC + 1 in dims["iK"]
    assert edges(KC) <= dims["wK"] and NC + 1 in dims["wK"]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("case", GEMM_CASES, ids=case_id)
def test_gemm_edges_match_native(case, dtype):
    name, xs, ws, bias, kw, threads = case
    run_conv_case(xs, ws, bias, kw, dtype, threads, msg=name)


GEMM_DTYPE_CASES = (
    "Kg13_rows33_cols33", "Kg25_rows65_cols65", "Kg12_rows256_cols32", "Kg11_rows257_cols55_1x1s2", "Kg12_rows27_cols257",
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", GEMM_DTYPE_CASES)
def test_gemm_edges_every_dtype(name, dtype):
    _, xs, ws, bias, kw, threads = next(c for c in GEMM_CASES if c[0] == name)
    run_conv_case(xs, ws, bias, kw, dtype, threads, msg=name)


# ∂E/∂W's thin products (csrc/gemm.cpp: gemm_thin, with the own GEMM and Kg ≤ 128): col · δᵀ with
# col read in place, δᵀ in panels of two vectors, then one, then a zero-padded tail, tiles of 12 or
# 24 rows of col with a short last group, blocks of 512 along k (the columns, OH·OW·block). Stored
# turned (∂E/∂W's own layout) where the batch is not chunked, else into the transposed partials.
# (id, input shape, weight shape, kwargs, threads, chunks the backward's plan makes). Kg and rows
# in the ids; float32 vectors hold 16, float64 8, so each Kg splits differently in each.
THIN_CASES = [
    ("Kg16_rows27_cols729", (1, 3, 29, 29), (16, 3, 3, 3), {}, 1, 1),
    ("Kg48_rows63_cols528_shared", (1, 7, 24, 26), (48, 7, 3, 3), {}, 2, 1),
    ("Kg40_rows45_cols483", (1, 5, 23, 25), (40, 5, 3, 3), {}, 2, 1),
    ("Kg5_rows99_cols570", (1, 11, 17, 40), (5, 11, 3, 3), {}, 1, 1),
    ("Kg128_rows36_cols525_shared", (1, 4, 27, 23), (128, 4, 3, 3), {}, 2, 1),
    ("Kg129_rows36_cols256_blocked", (1, 4, 18, 18), (129, 4, 3, 3), {}, 2, 1),
    ("Kg48_rows72_cols648_chunks", (4, 8, 20, 20), (48, 8, 3, 3), {}, 2, 2),
    ("Kg40_rows45_cols968_chunks", (4, 5, 24, 24), (40, 5, 3, 3), {}, 2, 2),
    ("Kg20_rows81_cols484_chunks", (5, 9, 24, 24), (20, 9, 3, 3), {}, 2, 2),
    ("Kg16_rows27_cols576_chunks", (6, 3, 26, 26), (16, 3, 3, 3), {}, 2, 2),
    ("groups2_Kg24_rows18_cols625_chunks", (4, 4, 25, 25), (48, 2, 3, 3), dict(groups=2), 2, 2),
]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("case", THIN_CASES, ids=lambda c: c[0])
def test_grad_weight_thin_products(case, dtype):
    name, xs, ws, kw, threads, chunks = case
    set_threads(threads)
    groups = kw.get("groups", 1)
    plan = torch.ops.cnnbp._conv2d_plan(list(xs), list(ws), [1, 1], [0, 0, 0, 0], [1, 1], groups, True)
    assert plan[0] == chunks, (name, plan)
    run_conv_case(xs, ws, False, kw, dtype, threads, msg=name)


# The weight packed once per call (csrc/gemm.h: PackedA, used with the own GEMM where more than one
# slab of the call multiplies each channel block of it and the copy is small next to the call's
# data: conv2d.cpp, pack_weight_once): W's rows for the forward, each channel
# block's Wᵀ for δ_in. Its last panel of M mod MR rows runs on a kernel of MR/3, 2·MR/3 or MR rows
# (MR = 12 on AVX-512, 6 on AVX2). (id, input shape, weight shape, kwargs, threads): Kg is the
# forward's M, the rows of a channel block δ_in's.
PACKED_CASES = [
    ("Kg4_rows8_N2", (2, 2, 24, 24), (4, 2, 2, 2), {}, 1),
    ("Kg5_rows20_N2", (2, 5, 24, 24), (5, 5, 2, 2), {}, 1),
    ("Kg8_rows45_N6_chunks", (6, 5, 24, 24), (8, 5, 3, 3), dict(padding=1), 2),
    ("Kg9_rows5_N2_1x1s2", (2, 5, 48, 48), (9, 5, 1, 1), dict(stride=2), 1),
    ("Kg24_rows27_N2", (2, 3, 26, 26), (24, 3, 3, 3), {}, 1),
    ("Kg20_rows288_tiles", (1, 32, 28, 28), (20, 32, 3, 3), dict(padding=1), 1),
    ("Kg20_rows288_tiles_shared", (1, 32, 28, 28), (20, 32, 3, 3), dict(padding=1), 2),
    ("Kg64_rows200_blocks5x5", (2, 24, 27, 27), (64, 24, 5, 5), dict(padding=2), 1),
    ("Kg13_rows54_N5_blocks", (5, 6, 16, 16), (13, 6, 3, 3), dict(padding=1), 2),
    ("groups2_Kg6_rows36_N8_blocks", (8, 8, 12, 12), (12, 4, 3, 3), dict(groups=2), 1),
    ("Kg7_rows11_N2_1x1_direct", (2, 11, 24, 24), (7, 11, 1, 1), {}, 1),
]


def packed_products(case):
    """The (forward, grad_input) products of a PACKED_CASES case whose weight operand is packed once."""
    _, xs, ws, kw, threads = case
    plan = conv_plan(xs, ws, threads, **kw)
    slabs = lambda p: -(-xs[0] // p.block) if p.block > 1 else xs[0] * -(-plan.P // p.tile)
    data = xs[0] * (math.prod(xs[1:]) + ws[0] * plan.P)  # conv2d.cpp: pack_weight_once
    assert slabs(plan) > 1 and slabs(plan.backward) > 1 and 2 * ws[0] * plan.rows <= data, case[0]
    return [(name, M) for name, M, _, _ in plan.products if name != "grad_weight"]


def test_packed_matrix_covers_every_last_panel():
    """Every kernel a last panel can take, for both products and both tile heights (a model test)."""
    for mr in (12, 6):
        for name in ("forward", "grad_input"):
            rests = {M % mr for case in PACKED_CASES for n, M in packed_products(case) if n == name}
            kernels = {0 if r == 0 else 1 if r <= mr // 3 else 2 if r <= 2 * mr // 3 else 3 for r in rests}
            assert kernels == {0, 1, 2, 3}, (mr, name, sorted(rests))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: c[0])
def test_products_with_the_weight_packed_once(case, dtype):
    name, xs, ws, kw, threads = case
    run_conv_case(xs, ws, True, kw, dtype, threads, msg=name)


@pytest.mark.skipif(not own_gemm_active(), reason="the own GEMM does not run here (CNNBP_GEMM / CPU)")
def test_own_gemm_is_what_runs_here():
    """On this machine the GEMM cases drive csrc/gemm.cpp, not ATen's BLAS: no aten::mm / addmm."""
    x, w = randn(1, 16, 7, 11, dtype=torch.float32), randn(12, 16, 4, 4, dtype=torch.float32)
    xa, wa = leaves(x, w)

    def run():
        y = torch_cnnbp.conv2d(xa, wa)
        torch.autograd.grad(y, (xa, wa), torch.ones_like(y))

    assert no_native_kernels_ran(run, forbidden=("mm", "bmm", "matmul")) == []


# ---- the batch plan: sample blocks, per-thread chunks, the pointwise direct path ----------------

# (id, input shape, weight shape, bias, kwargs). Run at 1 thread, and at 2 where that changes the
# plan (PLAN_RUNS).
PLAN_CASES = [
    # 7x7 outputs: block 11; N = 13 chunks at 2 threads (work ≥ 2^20), N = 5, 9 do not.
    ("out7x7_N5", (5, 16, 9, 9), (16, 16, 3, 3), True, {}),
    ("out7x7_N9", (9, 16, 9, 9), (16, 16, 3, 3), False, {}),
    ("out7x7_N13", (13, 16, 9, 9), (16, 16, 3, 3), True, {}),
    # 3x3 outputs: block 57, capped by the batch (or the chunk)
    ("out3x3_N5", (5, 32, 5, 5), (32, 32, 3, 3), False, {}),
    ("out3x3_N9_pad1_s2", (9, 32, 6, 6), (32, 32, 3, 3), True, dict(stride=2, padding=1)),
    ("out3x3_N13", (13, 32, 5, 5), (32, 32, 3, 3), True, {}),
    # 10x10 outputs: block 6, so 13 = 6 + 6 + 1 at one thread, 6 | 6 + 1 at two
    ("out10x10_N13_blocks_6_6_1", (13, 8, 12, 12), (16, 8, 3, 3), False, {}),
    ("out14x14_N5_blocks_3_2", (5, 8, 16, 16), (24, 8, 3, 3), True, {}),
    ("groups3_out7x7_N7", (7, 6, 9, 9), (9, 2, 3, 3), True, dict(groups=3)),
    ("groups2_out7x7_N13_pad1", (13, 16, 7, 7), (32, 8, 3, 3), False, dict(groups=2, padding=1)),
    # pointwise: direct (col is the input) when the block is 1: OH·OW ≥ 512, or one sample per chunk
    ("pointwise_direct_24x24_N3", (3, 32, 24, 24), (48, 32, 1, 1), True, {}),
    ("pointwise_direct_groups2_N3", (3, 32, 24, 24), (48, 16, 1, 1), False, dict(groups=2)),
    ("pointwise_16x16_N2", (2, 64, 16, 16), (64, 64, 1, 1), True, {}),
    ("pointwise_direct_N1", (1, 24, 5, 7), (13, 24, 1, 1), True, {}),
    ("pointwise_blocked_7x7_N5", (5, 32, 7, 7), (16, 32, 1, 1), False, {}),
    ("pointwise_stride2_N5", (5, 16, 15, 15), (24, 16, 1, 1), True, dict(stride=2)),
    ("pointwise_pad1_N3", (3, 16, 10, 10), (24, 16, 1, 1), False, dict(padding=1)),
    ("pointwise_stride2_pad1_N13", (13, 64, 13, 13), (64, 64, 1, 1), True, dict(stride=2, padding=1)),
    ("batch0", (0, 16, 9, 9), (16, 16, 3, 3), True, {}),
]


def test_plan_matrix_covers_every_path():
    """The plan cases reach each branch of plan_batches (per the model of it)."""
    plans = {(name, t): conv_plan(xs, ws, t, **kw) for name, xs, ws, _, kw in PLAN_CASES for t in (1, 2)}
    assert any(p.chunks == 2 and p.block > 1 for p in plans.values()), "chunks of sample blocks"
    assert any(p.chunks == 2 and len(set(p.blocks)) > 1 for p in plans.values()), "chunk with a remainder block"
    assert any(p.chunks == 1 and p.block > 1 and len(set(p.blocks)) > 1 for p in plans.values()), "remainder, 1 chunk"
    assert any(p.chunks == 2 and p.direct for p in plans.values()), "direct pointwise in chunks"
    assert any(p.chunks == 1 and p.direct for p in plans.values()), "direct pointwise, one chunk"
    assert plans[("pointwise_16x16_N2", 2)].direct and not plans[("pointwise_16x16_N2", 1)].direct
    assert not plans[("pointwise_blocked_7x7_N5", 1)].direct and plans[("pointwise_blocked_7x7_N5", 1)].block == 5
    assert not plans[("pointwise_stride2_N5", 2)].direct and not plans[("pointwise_pad1_N3", 2)].direct
    # chunked with a batch the thread count does not divide, and not chunked for lack of work
    batch = {name: xs[0] for name, xs, *_ in PLAN_CASES}
    assert any(p.chunks == 2 and batch[n] % 2 for (n, t), p in plans.items()), "chunks of unequal size"
    assert plans[("out7x7_N9", 2)].chunks == 1 and plans[("out7x7_N13", 2)].chunks == 2
    assert plans[("out10x10_N13_blocks_6_6_1", 1)].blocks == [6, 6, 1]
    assert plans[("out10x10_N13_blocks_6_6_1", 2)].blocks == [6, 6, 1]  # chunk [0, 6) and [6, 13)
    two = [c[0] for c, t in PLAN_RUNS if t == 2]
    assert len(two) >= 8 and "out7x7_N13" in two and "pointwise_16x16_N2" in two and "out7x7_N9" not in two


def test_pointwise_forward_products_are_not_tiled():
    """A direct 1×1 layer reads its input in place, so there is no column buffer to bound and its
    forward products are not cut into tiles: all of a sample's positions in one product, or, where
    one sample's positions are shared among the threads, one product per thread."""
    for xs, ws in (((1, 256, 56, 56), (64, 256, 1, 1)), ((8, 64, 56, 56), (256, 64, 1, 1)),
                   ((1, 32, 112, 112), (64, 32, 1, 1)), ((1, 24, 5, 7), (13, 24, 1, 1))):
        for threads in (1, 2, 3):
            plan = conv_plan(xs, ws, threads)
            assert plan.direct, (xs, threads)
            cols = sorted({c for what, _, c, _ in plan.products if what == "forward"})
            if plan.split_positions:
                share = (-(-plan.P // threads) + 31) // 32 * 32
                assert cols[-1] == share and -(-plan.P // share) == threads, (xs, threads, cols)
            else:
                assert cols == [plan.P], (xs, threads, cols)
    assert conv_plan((1, 256, 56, 56), (64, 256, 1, 1), 2).split_positions


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_pointwise_direct_grad_input_over_reused_memory(threads, dtype):
    """The direct pointwise backward writes δ_in whole (no zeroing first): over memory the allocator
    hands back holding NaN, every element of it is still native's, groups and batch chunks included."""
    set_threads(threads)
    for N, groups in ((1, 2), (3, 1), (2, 4)):
        x = randn(N, 32, 24, 24, dtype=dtype)
        w = randn(48, 32 // groups, 1, 1, dtype=dtype)
        g = randn(N, 48, 24, 24, dtype=dtype)
        assert conv_plan(tuple(x.shape), tuple(w.shape), threads, groups=groups).direct
        expected = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups,
                                                       [True, False, False])[0]
        for _ in range(3):
            junk = torch.full_like(x, float("nan"))
            del junk
            got = torch.ops.cnnbp.conv2d_backward(g, x, w, [1, 1], [0] * 4, [1, 1], groups, [True, False, False])[0]
            assert_close(got, expected, msg=f"N={N} groups={groups}")


# Stride 1 with output rows as wide as the input's (csrc/conv2d.cpp, rows_are_contiguous): each row
# (c, m, q) of the unrolling is one contiguous copy from the plane, its padding columns zeroed after,
# and col2im one run of adds with ∂col's padding columns zeroed first. (id, input, weight, kwargs)
CONTIGUOUS_CASES = [
    ("3x3_tiles_cut_rows", (1, 16, 40, 37), (24, 16, 3, 3), dict(padding=1)),
    ("5x5_channel_blocks_N3", (3, 40, 27, 27), (16, 40, 5, 5), dict(padding=2)),
    ("dilation_columns_all_padding", (1, 8, 9, 3), (8, 8, 3, 3), dict(padding=4, dilation=4)),
    ("even_kernel_same", (1, 12, 20, 23), (10, 12, 4, 4), dict(padding="same")),
    ("rows_all_padding", (1, 6, 5, 30), (6, 6, 5, 3), dict(padding=(4, 1))),
]


def test_contiguous_cases_reach_their_paths():
    """The cases are stride-1 convs with OW == W that take the unrolling (not frames, not 1×1), one
    of them with tiles that start inside an output row."""
    cut = False
    for name, xs, ws, kw in CONTIGUOUS_CASES:
        plan = conv_plan(xs, ws, 1, **kw)
        out = F.conv2d(torch.empty(xs, device="meta"), torch.empty(ws, device="meta"), **kw)
        assert out.shape[3] == xs[3] and not plan.direct and not plan.depthwise and plan.block == 1, name
        cut |= plan.tile < plan.P and plan.tile % out.shape[3] != 0
    assert cut


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("case", CONTIGUOUS_CASES, ids=lambda c: c[0])
def test_contiguous_rows(case, dtype, threads):
    name, xs, ws, kw = case
    run_conv_case(xs, ws, True, kw, dtype, threads, msg=name)


@pytest.mark.parametrize("case", CONTIGUOUS_CASES, ids=lambda c: c[0])
def test_contiguous_rows_padding_columns_add_nothing(case):
    """An infinite weight in the first kernel column makes ∂col infinite in its rows, at the columns
    that fall in the padding too; those must not reach the pixel their run would wrap onto (the
    last column of the row above), and a NaN in the input must not leak into a padding column."""
    name, xs, ws, kw = case
    x, w = randn(*xs, dtype=torch.float64), randn(*ws, dtype=torch.float64)
    w[0, 0, 0, 0] = math.inf
    x[0, 0, 1, -1] = math.nan
    stride, padding, dilation = _args.conv2d_args(w, 1, kw.get("padding", 0), kw.get("dilation", 1))
    g = randn(*F.conv2d(x, w, **kw).shape, dtype=torch.float64)
    native_pad = [padding[0], padding[2]] if padding[0] == padding[1] and padding[2] == padding[3] else None
    xp = x if native_pad else F.pad(x, (padding[2], padding[3], padding[0], padding[1]))
    expected = torch.ops.aten.convolution_backward(g, xp, w, None, [1, 1], native_pad or [0, 0], list(dilation),
                                                   False, [0, 0], 1, [True, True, False])
    got = torch.ops.cnnbp.conv2d_backward(g, x, w, [1, 1], list(padding), list(dilation), 1, [True, True, False])
    grad_input = expected[0]
    if not native_pad:
        grad_input = grad_input[:, :, padding[0]:padding[0] + xs[2], padding[2]:padding[2] + xs[3]]
    torch.testing.assert_close(got[0], grad_input, equal_nan=True, msg=f"{name}: grad_input")
    torch.testing.assert_close(got[1], expected[1], equal_nan=True, msg=f"{name}: grad_weight")
    out = torch.ops.cnnbp.conv2d(x, w, None, [1, 1], list(padding), list(dilation), 1)
    torch.testing.assert_close(out, F.conv2d(x, w, **kw), equal_nan=True, msg=f"{name}: output")


# One sample on several threads: each thread a share of the output positions (forward) or of the
# input channels (backward), with its own unrolling and products. (id, input, weight, bias, kwargs)
SPLIT_CASES = [
    ("3x3_pad1_40x37", (1, 16, 40, 37), (32, 16, 3, 3), True, dict(padding=1)),  # tiles not a multiple of 32
    ("5x5_tiled", (1, 32, 28, 30), (32, 32, 5, 5), False, dict(padding=2)),  # rows·P over the column budget
    ("pointwise_direct", (1, 64, 30, 33), (48, 64, 1, 1), True, {}),
    ("groups2_s2", (1, 32, 64, 50), (32, 16, 3, 3), True, dict(groups=2, stride=2, padding=1)),
    ("dilated_5_channels", (1, 5, 48, 45), (96, 5, 3, 3), False, dict(dilation=2, padding=2)),
    ("batch2_3threads", (2, 24, 36, 36), (32, 24, 3, 3), True, dict(padding="same")),
]


@pytest.mark.parametrize("threads", (2, 3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c[0])
def test_one_sample_split_over_threads(case, dtype, threads):
    name, xs, ws, bias, kw = case
    plan = conv_plan(xs, ws, threads, **kw)
    assert plan.split_positions and plan.split_channels or (name == "batch2_3threads" and threads == 2), plan
    run_conv_case(xs, ws, bias, kw, dtype, threads, msg=f"{name}, {threads} threads")


def gemm_splits_rows(M, N, threads, dtype):
    """gemm_blocked's choice (csrc/gemm.cpp) for a product outside a parallel region: rows in whole
    panels of MR where the largest thread's share of rows is less work than its share of columns."""
    def largest(parts, unit, length):
        return min(length, -(-parts // threads) * unit)
    nr = NR[dtype]
    return largest(-(-M // MR), MR, M) * N < largest(-(-N // nr), nr, N) * M


# Products with few columns split over threads by rows of A (M, N as gemm_blocked sees them):
# (id, input, weight, bias, kwargs, M, N of the product that splits by rows)
ROW_SPLIT_CASES = [
    # forward, x = W · col: 100 rows (the second thread's last panel has 4), 49 columns
    ("fwd_100x49", (1, 96, 7, 7), (100, 96, 3, 3), True, dict(padding=1), 100, 49),
    # 1×1 backward of one sample made whole: δ_in = Wᵀ · δ (A transposed), 200 rows, 36 columns
    ("din_1x1_transposed_200x36", (1, 200, 6, 6), (64, 200, 1, 1), False, {}, 200, 36),
]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("case", ROW_SPLIT_CASES, ids=lambda c: c[0])
def test_products_split_by_rows(case, dtype):
    """Each thread packs and multiplies its own rows of A: the results match native, and are the
    same bits as on one thread (the split changes which thread computes a row, not how)."""
    if not own_gemm_active():
        pytest.skip("the row split is the own GEMM's (gemm=blas here)")
    name, xs, ws, bias, kw, M, N = case
    assert gemm_splits_rows(M, N, 2, dtype), name
    run_conv_case(xs, ws, bias, kw, dtype, 2, msg=f"{name}, 2 threads")
    x, w = randn(*xs, dtype=dtype).requires_grad_(), randn(*ws, dtype=dtype).requires_grad_()
    b = randn(ws[0], dtype=dtype).requires_grad_() if bias else None
    results = []
    for threads in (1, 2):
        set_threads(threads)
        y = torch_cnnbp.conv2d(x, w, b, **kw)
        results.append((y, *torch.autograd.grad(y, (x, w), torch.ones_like(y))))
    for one, two in zip(*results):
        assert torch.equal(one, two), name


# Channel blocks (csrc/conv2d.cpp, "the batch loop"): a column buffer holds the rows of a block of
# input channels; the forward adds the blocks' products up, the backward's products and col2im
# split along them. Each case has more input channels than one block (an odd count, so the last
# block is shorter) and drives, at 2 threads, the path named in its id.
# (id, input, weight, bias, kwargs, what the plan at 2 threads must show)
CHANNEL_BLOCK_CASES = [
    ("tiles_41ch_bwd_shared", (1, 41, 17, 19), (24, 41, 3, 3), True, dict(padding=1),
     lambda p: p.block == 1 and p.tile < p.P and p.backward.shared),
    ("frames_blocks_97ch_fwd_chunks", (6, 97, 7, 7), (32, 97, 3, 3), False, dict(padding=1),
     lambda p: p.frames and p.chunks == 2 and p.block > 1),
    ("blocks_bwd_shared_97ch", (4, 97, 7, 7), (96, 97, 3, 3), True, dict(padding=1),
     lambda p: p.backward.chunks == 1 and p.backward.shared and p.backward.block == 4),
    ("fwd_chunks_bwd_shared_65ch", (4, 65, 16, 16), (64, 65, 3, 3), False, dict(padding=1),
     lambda p: p.chunks == 2 and p.backward.chunks == 1 and p.backward.shared),
    ("tiles_bwd_chunks_67ch", (3, 67, 24, 24), (16, 67, 3, 3), True, dict(padding=1),
     lambda p: p.backward.chunks == 2 and p.backward.block == 1 and p.backward.tile < p.P),
    ("groups2_frames_45ch", (5, 90, 9, 9), (40, 45, 3, 3), True, dict(padding=1, groups=2),
     lambda p: p.frames and p.backward.shared),
]


def test_channel_blocks_plan():
    """Each case has several channel blocks and takes its path; the forward's channel block (whose
    products it adds up in order) is the same at every thread count, so the forward's sums are too."""
    for name, xs, ws, _, kw, drives in CHANNEL_BLOCK_CASES:
        plans = {t: conv_plan(xs, ws, t, **kw) for t in (1, 2, 3)}
        cg = ws[1]
        assert all(p.cblock < cg and p.backward.cblock < cg for p in plans.values()), (name, plans)
        assert cg % plans[1].cblock, f"{name}: the last channel block should be shorter"
        assert len({p.cblock for p in plans.values()}) == 1, (name, "forward channel block changes with threads")
        assert drives(plans[2]), (name, plans[2])


@pytest.mark.parametrize("threads", (1, 2, 3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CHANNEL_BLOCK_CASES, ids=lambda c: c[0])
def test_channel_blocks_match_native(case, dtype, threads):
    name, xs, ws, bias, kw, _ = case
    run_conv_case(xs, ws, bias, kw, dtype, threads, msg=f"{name}, {threads} threads")


# Stride-1 convs over small images unroll in frames (im2col_frame in csrc/conv2d.cpp: padded planes,
# one copy per unrolled row, columns past OW computed and dropped) when the batch is blocked and
# Kg · (padded width − OW) < 256. (id, input, weight, bias, kwargs)
FRAME_CASES = [
    ("lenet_c3", (9, 6, 14, 14), (16, 6, 5, 5), True, {}),
    ("pad1", (7, 8, 9, 11), (24, 8, 3, 3), False, dict(padding=1)),
    ("same_even_kernel", (6, 5, 8, 13), (12, 5, 4, 2), True, dict(padding="same")),
    ("dilated_asym_pad", (5, 4, 10, 9), (8, 4, 3, 2), False, dict(dilation=(2, 3), padding=(2, 1))),
    ("groups3", (8, 6, 7, 12), (9, 2, 3, 3), True, dict(groups=3, padding=(0, 1))),
    ("one_column_out", (12, 3, 6, 5), (10, 3, 2, 5), False, {}),
]


def uses_frames(xs, ws, kw):
    """The model of use_frames: a blocked batch, stride 1, Kg · (padded width − OW) < 256."""
    plan = conv_plan(xs, ws, 1, **kw)
    N, C, H, W = xs
    K, _, _, KW = ws
    pad = kw.get("padding", 0)
    d = kw.get("dilation", 1)
    dw = d[1] if isinstance(d, tuple) else d
    if pad == "same":
        pl_pr = dw * (KW - 1)
    else:
        pl_pr = 2 * (pad[1] if isinstance(pad, tuple) else pad)
    OW = W + pl_pr - dw * (KW - 1)
    return plan.block > 1 and kw.get("stride", 1) == 1 and K // kw.get("groups", 1) * (W + pl_pr - OW) < 256


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FRAME_CASES, ids=lambda c: c[0])
def test_frame_unrolling_matches_native(case, dtype):
    """Forward and backward in frames (the backward's blocks too: ∂E/∂W from framed columns with δ
    zero in the dropped ones, δ_in by one contiguous add per row into padded planes)."""
    name, xs, ws, bias, kw = case
    assert uses_frames(xs, ws, kw), name
    assert conv_plan(xs, ws, 1, **kw).backward.block > 1, name  # the backward's blocks are framed too
    run_conv_case(xs, ws, bias, kw, dtype, 1, msg=name)
    if dtype == torch.float64:
        # Non-finite values: in the forward they stay in the dropped columns. The backward's frames
        # would multiply them by the zeros of the dropped columns, so a block with a non-finite
        # input (for ∂E/∂W) or a non-finite weight (for δ_in) takes the unframed path instead.
        ours, native = conv2d_pair(**kw)
        for where in ("input", "weight"):
            x, w = randn(*xs, dtype=dtype), randn(*ws, dtype=dtype)
            b = randn(ws[0], dtype=dtype) if bias else None
            if where == "input":
                x[..., -1] = math.inf
                x[0, 0, 0, 0] = math.nan
            else:
                w[0, 0, 0, -1] = math.inf
            g = randn(*native(x, w, b).shape, dtype=dtype)
            got, want = [], []
            for fn, out in ((ours, got), (native, want)):
                xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
                y = fn(xa, wa, b)
                out.append(y.detach())
                out.extend(torch.autograd.grad(y, (xa, wa), g))
            for what, a, e in zip(("output", "grad_input", "grad_weight"), got, want):
                torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"{name}, {where} non-finite, {what}: {m}")


def test_backward_frames_take_finite_blocks_only():
    """A batch whose second block of samples holds an inf: the first block's ∂E/∂W is framed, the
    second's not, and the sum over both is native's (the inf's row and column give inf / NaN exactly
    where native's do)."""
    xs, ws = (12, 6, 14, 14), (16, 6, 5, 5)
    plan = conv_plan(xs, ws, 1)
    assert 1 < plan.backward.block < 12, plan
    x, w = randn(*xs), randn(*ws)
    x[plan.backward.block + 1, 2, 5, 13] = math.inf
    ours, native = conv2d_pair()
    g = randn(12, 16, 10, 10)
    res = []
    for fn in (ours, native):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        res.append(torch.autograd.grad(fn(xa, wa, None), (xa, wa), g))
    for a, e in zip(*res):
        torch.testing.assert_close(a, e, equal_nan=True)


def plan_changes_with_two_threads(case):
    _, xs, ws, _, kw = case
    one, two = conv_plan(xs, ws, 1, **kw), conv_plan(xs, ws, 2, **kw)
    return (one.chunks, one.blocks, one.direct) != (two.chunks, two.blocks, two.direct)


PLAN_RUNS = [(c, 1) for c in PLAN_CASES] + [(c, 2) for c in PLAN_CASES if plan_changes_with_two_threads(c)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("case,threads", PLAN_RUNS, ids=lambda v: case_id(v) if isinstance(v, tuple) else f"{v}thr")
def test_batch_plan_matches_native(case, threads, dtype):
    name, xs, ws, bias, kw = case
    run_conv_case(xs, ws, bias, kw, dtype, threads, msg=f"{name}, {threads} threads")


@pytest.mark.parametrize("case,threads", [r for r in PLAN_RUNS if r[0][1][0] > 0],
                         ids=lambda v: case_id(v) if isinstance(v, tuple) else f"{v}thr")
def test_batch_plan_grad_weight_over_reused_memory(case, threads):
    """∂E/∂W's partial sums are not zeroed: the first products of each chunk write them. Over memory
    the allocator hands back holding NaN, ∂E/∂W (and δ_in) are still native's on every plan."""
    name, xs, ws, _, kw = case
    set_threads(threads)
    x, w = randn(*xs, dtype=torch.float64), randn(*ws, dtype=torch.float64)
    native = F.conv2d(x, w, **kw)
    g = randn(*native.shape, dtype=torch.float64)
    plan = conv_plan(xs, ws, threads, **kw)
    (sh, sw), padding, dilation = _args.conv2d_args(w, kw.get("stride", 1), kw.get("padding", 0), 1)
    expected = torch.ops.aten.convolution_backward(g, x, w, None, [sh, sw], [padding[0], padding[2]], list(dilation),
                                                   False, [0, 0], kw.get("groups", 1), [True, True, False])[:2]
    for _ in range(3):
        junk = torch.full((plan.backward.chunks * w.numel(),), float("nan"), dtype=torch.float64)
        del junk
        got = torch.ops.cnnbp.conv2d_backward(g, x, w, [sh, sw], list(padding), list(dilation), kw.get("groups", 1),
                                              [True, True, False])[:2]
        assert_close(got[1], expected[1], msg=f"{name}: grad_weight")
        assert_close(got[0], expected[0], msg=f"{name}: grad_input")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("name", ("out7x7_N13", "pointwise_16x16_N2", "out10x10_N13_blocks_6_6_1"))
def test_batch_plan_half_types(name, dtype):
    _, xs, ws, bias, kw = next(c for c in PLAN_CASES if c[0] == name)
    run_conv_case(xs, ws, bias, kw, dtype, 2, msg=name)


# ---- depthwise: the direct kernels --------------------------------------------------------------

# (id, channel multiplier, kernel, bias, kwargs); C = 3 = groups, widths 1, 3, ..., 37.
DEPTHWISE_CASES = [
    ("mult1_k3_s1_p1_bias", 1, (3, 3), True, dict(padding=1)),
    ("mult3_k3_s2_p1", 3, (3, 3), False, dict(stride=2, padding=1)),
    ("mult1_k3_s3_p1_bias", 1, (3, 3), True, dict(stride=3, padding=1)),
    ("mult3_k3_s12_d2_p2_bias", 3, (3, 3), True, dict(stride=(1, 2), dilation=2, padding=2)),
    ("mult1_k24_same_asym", 1, (2, 4), False, dict(padding="same")),
    ("mult3_k24_same_asym_bias", 3, (2, 4), True, dict(padding="same")),
    ("mult3_k32_same_d2", 3, (3, 2), False, dict(padding="same", dilation=2)),
    ("mult1_k5_s2_p4_d2", 1, (5, 5), True, dict(stride=2, padding=4, dilation=2)),
]

ODD_WIDTHS = tuple(range(1, 38, 2))


# The depthwise rows (forward, δ_in) run in 64-byte vectors of 16 float / 8 double outputs, up to four
# at a time (two on the portable path), the last vector overlapping its neighbour; ∂E/∂W runs in
# blocks of one vector, paired, the last block overlapping its neighbour; the edge columns and rows
# narrower than a vector take other loops. Widths 1 … 83 (and four float rows past two groups of
# four) put the interior below, on and past one vector, one group and several in both dtypes. δ_in
# with a column stride gathers each stride phase separately (interleaved at stride 2, and with
# dilation the taps of a phase step by sw / gcd(sw, dw)).
DEPTHWISE_WIDTHS = {torch.float64: tuple(range(1, 84, 2)), torch.float32: (*range(1, 84, 2), 127, 129, 145, 163)}


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=case_id)
def test_depthwise_every_odd_width(case, dtype):
    name, mult, (kh, kw_), bias, kw = case
    C = 3
    for W in DEPTHWISE_WIDTHS[dtype]:
        x_shape, w_shape = (2, C, 5, W), (C * mult, 1, kh, kw_)
        assert conv_plan(x_shape, w_shape, 2, groups=C, **kw).depthwise
        run_conv_case(x_shape, w_shape, bias, dict(groups=C, **kw), dtype, msg=f"{name}, W={W}")
    # batch 0
    run_conv_case((0, C, 5, 9), (C * mult, 1, kh, kw_), bias, dict(groups=C, **kw), dtype, msg=f"{name}, N=0")


# Rows too narrow for a 64-byte block of interior columns but at most two blocks long (16 / 32 floats,
# 8 / 16 doubles) run on zero-padded copies (dw_row, and ∂E/∂W's narrow planes): widths on
# both sides of one and two blocks, even ones included (the odd-width sweep above has none).
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_depthwise_narrow_rows(dtype):
    lanes = 64 // torch.empty((), dtype=dtype).element_size()
    widths = sorted({7, 14, lanes - 1, lanes, lanes + 1, 2 * lanes - 1, 2 * lanes, 2 * lanes + 1})
    for name, mult, k, bias, kw in (("k3_s1_p1", 1, 3, True, dict(padding=1)), ("mult2_k3_s2_p1", 2, 3, False,
                                    dict(stride=2, padding=1)), ("k5_s1_p2_d1x2", 1, 5, True,
                                    dict(padding=(2, 4), dilation=(1, 2)))):
        for W in widths:
            run_conv_case((2, 3, 6, W), (3 * mult, 1, k, k), bias, dict(groups=3, **kw), dtype, msg=f"{name}, W={W}")


# Planes whose rows are narrower than a vector (16 float / 8 double outputs) run as frames: the
# forward at stride 1 on frames of padded rows, at any other strides on frames of the input's
# stride phases (DwPhaseFrames, as ∂E/∂W below), δ_in at any stride (δ spread out by it, the
# window turned around), with the channel multiplier's planes summed in one pass; padding wider than
# (kernel − 1)·dilation keeps δ_in on the rows' path. Heights 1 … 9, widths around the vector.
DEPTHWISE_FRAME_CASES = [
    ("k3_s1_p1", 1, (3, 3), dict(padding=1)),
    ("mult2_k3_s2_p1", 2, (3, 3), dict(stride=2, padding=1)),
    ("k3_s21_p12", 1, (3, 3), dict(stride=(2, 1), padding=(1, 2))),
    ("mult3_k3_s3_p2_d2", 3, (3, 3), dict(stride=3, padding=2, dilation=2)),
    ("k25_s2_valid", 1, (2, 5), dict(stride=2)),
    ("k3_p3_wider_than_window", 1, (3, 3), dict(padding=3)),
    ("k5_s1_p2", 1, (5, 5), dict(padding=2)),
]


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("case", DEPTHWISE_FRAME_CASES, ids=lambda c: c[0])
def test_depthwise_narrow_planes_frames(case, dtype):
    name, mult, (kh, kw_), kw = case
    lanes = 64 // torch.empty((), dtype=dtype).element_size()
    for H in (1, 2, 5, 9):
        for W in (1, 2, 5, 7, lanes - 1, lanes, lanes + 3, 2 * lanes - 1):
            pad = kw.get("padding", 0)
            ph, pw = pad if isinstance(pad, tuple) else (pad, pad)
            dil = kw.get("dilation", 1)
            if H + 2 * ph < dil * (kh - 1) + 1 or W + 2 * pw < dil * (kw_ - 1) + 1:
                continue
            run_conv_case((2, 3, H, W), (3 * mult, 1, kh, kw_), True, dict(groups=3, **kw), dtype,
                          threads=2, msg=f"{name}, H={H}, W={W}")


# ∂E/∂W of planes narrower than a vector runs on frames where they pay (fewer vectors of frame
# positions than output rows, or as many at a column stride; conv2d.cpp: DwWeightFrames): the input
# plane split into stride phases, the samples' frames filled a chunk of about 32 KiB at a time.
# Batches of one sample, several, and several chunks (61: two to four chunks in every case here);
# strides 1, 2, (2, 1), (1, 2); dilation; a channel multiplier; asymmetric padding ("same" with an
# even kernel). In float64, whose vectors hold 8, the 7×7 and 5×5 planes at stride 1 take the rows'
# path instead (in the sweep too).
DEPTHWISE_WEIGHT_FRAME_CASES = [
    ("k3_p1_7x7", (7, 7), 1, (3, 3), dict(padding=1)),
    ("k3_s2_p1_14x14", (14, 14), 1, (3, 3), dict(stride=2, padding=1)),
    ("mult2_k3_s2_p1_7x7", (7, 7), 2, (3, 3), dict(stride=2, padding=1)),
    ("k3_d21_p21_9x5", (9, 5), 1, (3, 3), dict(padding=(2, 1), dilation=(2, 1))),
    ("k3_s21_p1_12x6", (12, 6), 1, (3, 3), dict(stride=(2, 1), padding=1)),
    ("mult3_k3_s12_p02_10x9", (10, 9), 3, (3, 3), dict(stride=(1, 2), padding=(0, 2))),
    ("k5_p2_5x5", (5, 5), 1, (5, 5), dict(padding=2)),
    ("k3_s2_p1_16x6", (16, 6), 1, (3, 3), dict(stride=2, padding=1)),
    ("k24_same_7x7", (7, 7), 1, (2, 4), dict(padding="same")),
]


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("N", (1, 3, 61))
@pytest.mark.parametrize("case", DEPTHWISE_WEIGHT_FRAME_CASES, ids=lambda c: c[0])
def test_depthwise_grad_weight_frames(case, N, dtype):
    name, (H, W), mult, (kh, kw_), kw = case
    run_conv_case((N, 3, H, W), (3 * mult, 1, kh, kw_), True, dict(groups=3, **kw), dtype, threads=2,
                  msg=f"{name}, N={N}")


# Column strides and dilations whose stride phases take different tap sets in δ_in: gcd(sw, dw) = 1
# (every phase one tap of three) and > 1 (phases with no tap at all: their inputs get no gradient).
@pytest.mark.parametrize("stride, dilation, padding", [(2, 1, 1), (3, 2, 2), (2, 2, 2), (4, 2, 0), ((1, 3), (2, 1), (2, 1))],
                         ids=str)
def test_depthwise_strided_gather_phases(stride, dilation, padding):
    pw, dw = (padding[1], dilation[1]) if isinstance(padding, tuple) else (padding, dilation)
    for W in (1, 2, 7, 8, 33, 34, 70, 71):
        if W + 2 * pw < 2 * dw + 1:  # no output column
            continue
        run_conv_case((2, 4, 9, W), (8, 1, 3, 3), True, dict(groups=4, stride=stride, dilation=dilation,
                                                             padding=padding), torch.float32,
                      msg=f"stride {stride}, dilation {dilation}, padding {padding}, W={W}")


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_depthwise_threaded_every_dtype(dtype, threads):
    """Planes large enough to be split over threads (and the weight gradient over channels)."""
    run_conv_case((3, 8, 24, 25), (24, 1, 3, 3), True, dict(groups=8, padding=1), dtype, threads, msg="depthwise mult 3")
    run_conv_case((3, 8, 23, 29), (8, 1, 3, 3), False, dict(groups=8, stride=2), dtype, threads, msg="depthwise stride 2")


# ---- max_pool2d: the phase-split rows (NCHW) and the channels_last kernel -------------------------

# kernel widths 2, 3 (unrolled) and 1, 4, 5 (generic); strides 1, 2, 3, (2, 3); dilation; padding; ceil.
POOL_CASES = [
    dict(kernel_size=2, stride=1),
    dict(kernel_size=2, stride=2),
    dict(kernel_size=2, stride=2, ceil_mode=True),  # even widths: the 2x2 path; odd: a partial last window
    dict(kernel_size=2, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=3, stride=3, ceil_mode=True),
    dict(kernel_size=3, stride=(2, 3), padding=1),
    dict(kernel_size=(2, 3), stride=(2, 3), dilation=2, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, dilation=2),
    dict(kernel_size=1, stride=1),
    dict(kernel_size=1, stride=2, ceil_mode=True),
    dict(kernel_size=4, stride=2, padding=2),
    dict(kernel_size=(3, 4), stride=(1, 3), padding=(1, 1), dilation=(1, 2), ceil_mode=True),
    dict(kernel_size=5, stride=3, padding=2, ceil_mode=True),
    dict(kernel_size=(4, 5), stride=(2, 1), dilation=(2, 1)),
]


def kw_id(kw):
    """A short test id for pooling keyword arguments: {'kernel_size': (2, 3), 'stride': 1} -> k2x3-s1."""
    short = dict(kernel_size="k", stride="s", padding="p", dilation="d", ceil_mode="ceil")
    parts = []
    for key, v in kw.items():
        if key == "ceil_mode":
            parts.append("ceil" if v else "floor")
        else:
            parts.append(short[key] + ("x".join(map(str, v)) if isinstance(v, tuple) else str(v)))
    return "-".join(parts)


def pooled_width(W, kw):
    """Output width, as reference.max_pool2d_forward computes it."""
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    k, s = pair(kw["kernel_size"])[1], pair(kw.get("stride", kw["kernel_size"]))[1]
    p, d = pair(kw.get("padding", 0))[1], pair(kw.get("dilation", 1))[1]
    n = (W + 2 * p - d * (k - 1) - 1 + (s - 1 if kw.get("ceil_mode") else 0)) // s + 1
    if kw.get("ceil_mode") and (n - 1) * s >= W + p:
        n -= 1
    return n


def pool_widths(kw, most=40):
    """For every output width 1 .. `most`: the narrowest input giving it and, in ceil mode for odd
    output widths, also the widest (whose last window hangs over the right edge)."""
    by_width = {}
    for W in range(1, 4 * most + 16):
        by_width.setdefault(pooled_width(W, kw), []).append(W)
    widths = []
    for ow in range(1, most + 1):
        ws = by_width.get(ow, [])
        widths += ws[:1] + (ws[-1:] if kw.get("ceil_mode") and ow % 2 and len(ws) > 1 else [])
    return widths


def run_pool_case(x, kw, threads=None, msg=""):
    set_threads(threads)
    ours, native = max_pool2d_pair(return_indices=True, **kw)
    out, indices = compare_with_native(ours, native, (x,), msg=msg)
    if x.dim() == 4 and x.size(1) > 1 and x.is_contiguous(memory_format=torch.channels_last):
        assert out.is_contiguous(memory_format=torch.channels_last), f"{msg}: layout"
        assert indices.is_contiguous(memory_format=torch.channels_last), f"{msg}: indices layout"
    return out, indices


def assert_pool_exactly_as_native(x, kw, msg, ours_input=None):
    """Ours (on ours_input: x in another layout, if given) against native on x: the indices equal,
    NaN in the same places, every other value bitwise. Returns native's output."""
    ref, ref_idx = F.max_pool2d(x, return_indices=True, **kw)
    ours, idx = torch_cnnbp.max_pool2d(x if ours_input is None else ours_input, return_indices=True, **kw)
    assert torch.equal(idx, ref_idx), msg
    assert torch.equal(ours.isnan(), ref.isnan()), msg
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num()), msg
    return ref


@pytest.mark.parametrize("kw", POOL_CASES, ids=kw_id)
def test_max_pool2d_nchw_every_output_width(kw):
    """Every output width 1..40 (the odd ones leave a tail after the vector loop), NCHW, float64."""
    seen = set()
    for W in pool_widths(kw):
        out, _ = run_pool_case(randn(1, 2, 7, W), kw, msg=f"{kw_id(kw)}, W={W}")
        seen.add(out.shape[-1])
    assert set(range(1, 40, 2)) <= seen, sorted(set(range(1, 40, 2)) - seen)


def test_empty_pool_windows_matches_its_definition():
    """_args.empty_pool_windows looks only at the windows that reach past an edge; against the
    definition (no tap of the window inside the input), over every small dilated geometry."""
    import itertools
    checked = with_empty = 0
    for in_len, k, pad, stride, dilation, ceil in itertools.product(range(1, 12), range(1, 6), range(3), range(1, 4),
                                                                     range(2, 5), (False, True)):
        if pad > k // 2 or pad > ((k - 1) * dilation + 1) // 2:
            continue
        out_len = _args.pooled_size(in_len, k, pad, stride, dilation, ceil)
        if out_len < 1:
            continue
        expected = [i for i in range(out_len)
                    if not any(0 <= i * stride - pad + m * dilation < in_len for m in range(k))]
        assert _args.empty_pool_windows(in_len, out_len, k, pad, stride, dilation) == expected, \
            (in_len, k, pad, stride, dilation, ceil)
        checked += 1
        with_empty += bool(expected)
    assert checked > 1000 and with_empty > 10, (checked, with_empty)


@pytest.mark.parametrize("with_nan", [False, True], ids=["no_nan", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", POOL_CASES, ids=kw_id)
def test_max_pool2d_nchw_blocks_ties_inf_nan(kw, dtype, with_nan):
    """The NCHW kernels that keep a block of outputs in registers (max_pool2d_plane_blocks, the 2x2
    blocks): values from a small set, so that windows hold ties, ±inf and all −inf, with and without
    NaN (a plane with a NaN runs its own variant of the kernel). Output widths on both sides of the
    block widths (8 and 16 lanes in float32, 4 and 8 in float64), several planes; values and
    indices exactly as native's (first maximum, last NaN)."""
    g = torch.Generator().manual_seed(5)
    values = [-math.inf, -1.0, 0.0, 1.0, math.inf] + ([math.nan] if with_nan else [])
    pool = torch.tensor(values, dtype=torch.float64)
    widths = [W for W in pool_widths(kw, most=34) if pooled_width(W, kw) in (1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33)]
    for W in widths:
        x = pool[torch.randint(len(pool), (2, 3, 7, W), generator=g)].to(dtype)
        assert_pool_exactly_as_native(x, kw, f"{kw_id(kw)}, W={W}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32])
def test_max_pool2d_2x2_stride_2_ties_nan_inf(dtype, channels_last):
    """The 2x2 stride-2 paths (max_pool2d_plane_2x2_blocks, max_pool2d_pixel_2x2_cl; int32 NCHW
    takes the row kernel) on values from a small set, so that windows hold ties, NaN, +-inf and all
    -inf: values and indices as native (first maximum, last NaN), at output widths across the
    16-wide blocks, odd input sizes (last row / column unused). Native's channels_last int32 pool
    is compared on a contiguous copy."""
    g = torch.Generator().manual_seed(7)
    if dtype.is_floating_point:
        pool = torch.tensor([-math.inf, -1.0, 0.0, 1.0, math.inf, math.nan], dtype=torch.float64)
    else:
        pool = torch.tensor([-(2**31), -1, 0, 1, 2**31 - 1], dtype=torch.float64)
    for H, W in ((2, 2), (5, 9), (4, 33), (7, 64), (3, 67)):
        x = pool[torch.randint(len(pool), (2, 3, H, W), generator=g)].to(dtype)
        ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ours, idx = torch_cnnbp.max_pool2d(x, 2, return_indices=True)
        assert torch.equal(idx, ref_idx), (H, W)
        if dtype.is_floating_point:
            assert torch.equal(ours.isnan(), ref.isnan()), (H, W)
            assert torch.equal(ours.nan_to_num(), ref.nan_to_num()), (H, W)
        else:
            assert torch.equal(ours, ref), (H, W)


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_max_pool2d_2x2_short_rows_and_few_channels(dtype, channels_last, threads):
    """The 2x2 stride-2 kernels on short rows and few channels: NCHW planes with output rows
    shorter than 16 (max_pool2d_plane_2x2_blocks in half blocks, whose last block of a row reads on
    into the next rows and planes, copied instead at the end of the input; a thread's planes
    starting past 0) and channels_last with fewer than 16 channels (max_pool2d_row_2x2_cl: a row
    of OW·C lanes, more than one block of 128 when OW·C > 128). Values from a small set (ties, NaN,
    ±inf), values and indices against native, then gradients."""
    set_threads(threads)
    g = torch.Generator().manual_seed(11)
    pool = torch.tensor([-math.inf, -1.0, 0.0, 1.0, math.inf, math.nan], dtype=torch.float64)
    # (8, 12, 29, 27) and (16, 6, 28, 28) are large enough to be split over two threads
    shapes = [(8, 12, 29, 27), (3, 6, 28, 28), (2, 15, 10, 29), (4, 1, 9, 9)] if not channels_last else \
        [(16, 6, 28, 28), (2, 15, 10, 29), (5, 1, 7, 31), (2, 9, 4, 2)]
    for shape in shapes:
        x = pool[torch.randint(len(pool), shape, generator=g)].to(dtype)
        ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ours, idx = torch_cnnbp.max_pool2d(x, 2, return_indices=True)
        assert torch.equal(idx, ref_idx), shape
        assert torch.equal(ours.isnan(), ref.isnan()), shape
        assert torch.equal(ours.nan_to_num(), ref.nan_to_num()), shape
        run_pool_case(randn(*shape, dtype=dtype).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format),
            dict(kernel_size=2, stride=2), threads=threads, msg=f"{shape}, {dtype}")


CL_CHANNELS = (1, 3, 16, 17, 64, 65)
CL_CASES = [
    dict(kernel_size=2, stride=2),
    dict(kernel_size=2, stride=2, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=3, stride=1, dilation=2, padding=1),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1)),
]


TILING_CASES = [
    dict(kernel_size=2, stride=2),
    dict(kernel_size=2, stride=2, ceil_mode=True),
    dict(kernel_size=3, stride=3, padding=1),
    dict(kernel_size=(2, 3), stride=(2, 3), padding=(1, 0), ceil_mode=True),
]


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kw", TILING_CASES, ids=kw_id)
def test_max_pool2d_backward_channels_last_tiling_gather(kw, dtype, threads):
    """channels_last windows that tile the input (kernel = stride): the backward, given the window,
    gathers (max_pool2d_backward_tiled_cl: each gradient written once, from its window's δ where the
    index names it). Channel counts on and past the vector blocks (24 and more, the last vector
    overlapping the one before where the count is not a multiple of it; fewer, 12 and 17 here, take
    the scatter), odd sizes (rows and columns past the last window), ties, ±inf and NaN inputs, and δ
    holding −0, NaN and ±inf: bitwise the scatter's result (the op without the window), which is
    native's; −0 comes out +0, as 0 + (−0) does in the scatter. Indices that this window did not
    make (another window's, or arbitrary in-plane positions) fall back to the scatter, and give its
    result too."""
    set_threads(threads)
    g = torch.Generator().manual_seed(23)
    pool = torch.tensor([-math.inf, -1.0, 0.0, 1.0, math.inf, math.nan], dtype=torch.float64)
    ops = torch.ops.cnnbp
    k, st, pad = (_args.pair("max_pool2d", n, kw.get(n, d)) for n, d in (("kernel_size", 1), ("stride", 1), ("padding", 0)))
    window = (list(k), list(st), list(pad), [1, 1])
    for C in (12, 17, 24, 27, 35):
        for N, H, W in ((1, 9, 11), (3, 8, 7)):
            x = pool[torch.randint(len(pool), (N, C, H, W), generator=g)].to(dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            ref, ref_idx = F.max_pool2d(x, return_indices=True, **kw)
            out, idx = ops.max_pool2d(x, *window, kw.get("ceil_mode", False))
            assert torch.equal(idx, ref_idx)
            delta = torch.randn(out.shape, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
            special = torch.rand(out.shape, generator=g)
            delta[special < 0.1] = -0.0
            delta[(special > 0.1) & (special < 0.15)] = math.nan
            delta[(special > 0.15) & (special < 0.2)] = -math.inf
            msg = f"{kw_id(kw)}, C={C}, {N}x{H}x{W}"
            scatter = ops.max_pool2d_backward(delta, idx, list(x.shape))
            native = torch.ops.aten.max_pool2d_with_indices_backward(
                delta, x, k, st, pad, [1, 1], kw.get("ceil_mode", False), idx)
            for other in (idx, idx.flip(-1), torch.randint(H * W, idx.shape, generator=g)):
                other = other.contiguous(memory_format=torch.channels_last)
                got = ops.max_pool2d_backward(delta, other, list(x.shape), *window)
                want = scatter if other is idx else ops.max_pool2d_backward(delta, other, list(x.shape))
                assert_same_bits(got, want, msg)
            assert torch.equal(scatter.isnan(), native.isnan()) and torch.equal(scatter.nan_to_num(), native.nan_to_num()), msg
            assert not scatter.nan_to_num().eq(0).logical_and(scatter.nan_to_num().signbit()).any(), msg  # no −0


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", [(9, 11), (8, 11), (9, 10), (3, 3), (17, 40)], ids=str)
def test_max_pool2d_2x2_ceil_ties_inf_nan(size, dtype, layout):
    """2x2 stride 2 in ceil mode over odd heights or widths: the windows inside the image take the
    2x2 kernels (NCHW: max_pool2d_rows_2x2_blocks, rows of all planes in vector blocks;
    channels_last: max_pool2d_pixel_2x2_cl), the partial ones of the last row and column the
    general scan (pool_window; channels_last: the general kernels). Values from a small set (ties,
    ±inf, NaN); values and indices exactly as native's."""
    g = torch.Generator().manual_seed(17)
    pool = torch.tensor([-math.inf, -1.0, 0.0, 1.0, math.inf, math.nan], dtype=torch.float64)
    kw = dict(kernel_size=2, stride=2, ceil_mode=True)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for C in (3, 16, 17, 35, 64):
        x = pool[torch.randint(len(pool), (2, C, *size), generator=g)].to(dtype)
        msg = f"{size}, C={C}"
        ref = assert_pool_exactly_as_native(x, kw, msg, ours_input=x.contiguous(memory_format=fmt))
        assert ref.shape[2:] == tuple((d + 1) // 2 for d in size), msg  # the partial windows are there


@pytest.mark.parametrize("threads", (1, 2, 3))
@pytest.mark.parametrize("kw", [dict(kernel_size=2, stride=2), dict(kernel_size=2, stride=2, ceil_mode=True),
                                dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=3, stride=2, ceil_mode=True)],
                         ids=kw_id)
def test_max_pool2d_nchw_short_blocks_stored_whole(kw, threads):
    """NCHW: a block of outputs that runs past its row's end is stored whole where the outputs its
    extra lanes land on are the same thread's later ones (rewritten after: the next rows, the next
    planes, and in ceil mode the row's partial windows, now scanned after the blocks), and stored
    short at the end of a thread's rows or planes. Output widths 1..20, batches whose rows and
    planes split unevenly over 1-3 threads: values and indices exactly as native's."""
    set_threads(threads)
    g = torch.Generator().manual_seed(23)
    for W in range(2, 42, 2 if kw["kernel_size"] == 2 else 3):
        for N, C, H in ((3, 7, 9), (1, 5, 14)):
            x = torch.randn(N, C, H, W + (W % 3 == 1), generator=g)
            ref, ref_idx = F.max_pool2d(x, return_indices=True, **kw)
            ours, idx = torch_cnnbp.max_pool2d(x, return_indices=True, **kw)
            msg = f"{kw_id(kw)}, {tuple(x.shape)}, {threads} threads"
            assert torch.equal(idx, ref_idx), msg
            assert torch.equal(ours, ref), msg


@pytest.mark.parametrize("threads", (1, 2, 3))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=(2, 4), stride=(1, 2), padding=(1, 2), ceil_mode=True),
                                dict(kernel_size=3, stride=3, padding=1)], ids=kw_id)
def test_max_pool2d_nchw_buffer_kept_between_planes(kw, dtype, threads):
    """NCHW, floating types: each thread copies its planes one after another into one padded buffer
    (stride 1 and 2 of float and double vector by vector, writing the padding's lowest values for a
    thread's first plane only; stride 3 and bfloat16 value by value). The planes past a thread's first
    hold NaN on the border (and not its neighbours, whose buffer then holds no NaN), or only −inf (which
    the padding must never beat): values and indices exactly as native's, over 1-3 threads."""
    set_threads(threads)
    g = torch.Generator().manual_seed(29)
    for W in (5, 16, 17, 38):
        x = torch.randn(3, 7, 9, W, generator=g).to(dtype)
        x[1, 2, 0, W - 1] = x[2, 5, 8, 0] = x[2, 6, 4, W // 2] = math.nan
        x[1, 4] = -math.inf
        x[2, 0, :, 0] = -math.inf
        assert_pool_exactly_as_native(x, kw, f"{kw_id(kw)}, {tuple(x.shape)}, {dtype}, {threads} threads")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool2d_2x2_narrow_rows_gathered(ceil_mode, dtype, threads):
    """NCHW 2x2 stride 2 with output rows narrower than two 64-byte vectors (on Intel's AVX-512
    cores, float and double: 16 or 8 consecutive outputs of a plane per vector, rows joined, their
    taps gathered, the last vector of a plane masked; on other CPUs, and for the planes tiled
    exactly with rows of up to 16 in float32, the row kernel and the permuted blocks): every output
    width 1-33 over heights 1-6, odd and even input sizes (the odd last row or column outside every
    window; in ceil mode those planes take the row kernel), values from a small set (ties, ±inf,
    all −inf windows, NaN): values and indices exactly as native's. bfloat16 takes the row kernel
    throughout."""
    set_threads(threads)
    g = torch.Generator().manual_seed(31)
    pool = torch.tensor([-math.inf, -1.0, 0.0, 1.0, math.inf, math.nan], dtype=torch.float64)
    for OH in range(1, 7):
        for OW in range(1, 34):
            H, W = 2 * OH + (OW % 2), 2 * OW + (OH % 3 == 0)
            x = pool[torch.randint(len(pool), (3, 5, H, W), generator=g)].to(dtype)
            x[1, 2] = -math.inf
            assert_pool_exactly_as_native(x, dict(kernel_size=2, stride=2, ceil_mode=ceil_mode),
                                          f"{tuple(x.shape)}, ceil_mode={ceil_mode}, {dtype}, {threads} threads")


@pytest.mark.parametrize("threads", [1, 2])
def test_max_pool2d_2x2_row_blocks_across_planes(threads):
    """NCHW float32 2x2 stride 2 over planes the windows tile exactly (H = 2·OH, W = 2·OW) with
    output rows of at most 16 (on AVX-512: max_pool2d_rows_2x2_permuted, blocks of min(16 // OW, OH)
    output rows of all the planes, their taps picked from one run of inputs by permutes): every
    output width 1-16 over heights 1-8, so that blocks start and end inside planes and the last one
    is short; inputs of 100K values or more, so that on two threads the second thread's first block
    starts at some row of a plane. Values from a small set (ties, ±inf, all −inf windows, NaN):
    values and indices exactly as native's, in floor and ceil mode (the same windows here). Then the
    backward of the same blocks (max_pool2d_backward_rows_2x2_permuted, each block's run of input
    gradients written once from its outputs' δ), by check_2x2_backward_against_scatter."""
    set_threads(threads)
    g = torch.Generator().manual_seed(37)
    pool = torch.tensor([-math.inf, -1.0, 0.0, 1.0, math.inf, math.nan])
    for OW in range(1, 17):
        for OH in (1, 2, 3, 5, 8):
            planes = -(-100_000 // (4 * OH * OW)) + OW  # + OW: not a multiple of the block rows
            x = pool[torch.randint(len(pool), (planes, 1, 2 * OH, 2 * OW), generator=g)]
            x[planes // 2] = -math.inf
            for ceil_mode in (False, True):
                assert_pool_exactly_as_native(x, dict(kernel_size=2, stride=2, ceil_mode=ceil_mode),
                                              f"{tuple(x.shape)}, ceil_mode={ceil_mode}, {threads} threads")
            check_2x2_backward_against_scatter(x, False, g, f"{tuple(x.shape)}, {threads} threads")


def assert_same_bits(got, want, msg):
    """NaN in the same places, every other value bitwise (the sign of a zero included)."""
    assert got.stride() == want.stride(), msg
    assert torch.equal(got.isnan(), want.isnan()), msg
    assert torch.equal(got.nan_to_num(), want.nan_to_num()), msg
    assert torch.equal(got.nan_to_num().signbit(), want.nan_to_num().signbit()), msg


def backward_special_delta(shape, g, dtype=torch.float32):
    """δ of the given shape with −0, NaN, −inf and inf among its values."""
    delta = torch.randn(shape, generator=g, dtype=dtype)
    special = torch.rand(shape, generator=g)
    delta[special < 0.1] = -0.0
    delta[(special > 0.1) & (special < 0.15)] = math.nan
    delta[(special > 0.15) & (special < 0.2)] = -math.inf
    delta[(special > 0.2) & (special < 0.25)] = math.inf
    return delta


def check_2x2_backward_against_scatter(x, ceil_mode, g, msg):
    """The backward op given the 2x2 stride-2 window, on x's forward: bitwise native's and the
    scatter's (the op without the window) for δ holding −0, NaN and ±inf, −0 coming out +0. Then
    indices this window did not make, which send the op back to the scatter and must give its result:
    another window's (flipped), arbitrary in-plane positions, and one index 2^32 past a tap (which a
    narrowing to 32 bits would take for the tap), ignored where its δ is 0 and an error where not."""
    ops = torch.ops.cnnbp
    window = ([2, 2], [2, 2], [0, 0], [1, 1])
    shape = list(x.shape)
    out, idx = ops.max_pool2d(x, *window, ceil_mode)
    delta = backward_special_delta(out.shape, g, x.dtype)
    got = ops.max_pool2d_backward(delta, idx, shape, *window)
    native = torch.ops.aten.max_pool2d_with_indices_backward(delta, x, *window, ceil_mode, idx)
    assert_same_bits(got, native, msg)
    assert_same_bits(got, ops.max_pool2d_backward(delta, idx, shape), msg)
    assert not got.nan_to_num().eq(0).logical_and(got.nan_to_num().signbit()).any(), msg  # no −0
    far, far_delta = idx.clone(), delta.clone()
    far.view(-1)[far.numel() // 2] += 1 << 32
    far_delta.view(-1)[far.numel() // 2] = 0.0
    anywhere = torch.randint(shape[2] * shape[3], idx.shape, generator=g)
    for other, d in ((idx.flip(-1), delta), (anywhere, delta), (far, far_delta)):
        assert_same_bits(ops.max_pool2d_backward(d, other, shape, *window), ops.max_pool2d_backward(d, other, shape), msg)
    with pytest.raises(RuntimeError, match="outside the input plane"):
        ops.max_pool2d_backward(delta.nan_to_num().abs() + 1, far, shape, *window)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_max_pool2d_backward_2x2_rows_gather(threads, dtype):
    """NCHW 2x2 stride 2 backward where the planes are not tiled exactly or their rows are wider
    than 16 outputs (float32), or their rows are 16 inputs or more (float64) (on AVX-512:
    max_pool2d_backward_2x2_rows_gather, each output row writing its two input rows once, 16 float
    / 8 double inputs a vector; narrower double rows take the scatter): widths on both sides of the
    vectors' edges (15-18, 23-25, 31-35) and wide ones, odd heights and widths (rows and columns no
    window covers, in floor mode; windows of one row or column, in ceil mode), inputs of about 100K
    values so that two threads split inside planes; each checked by
    check_2x2_backward_against_scatter."""
    set_threads(threads)
    g = torch.Generator().manual_seed(47)
    pool = torch.tensor([-math.inf, -1.0, 0.0, 1.0, math.inf, math.nan], dtype=dtype)
    for H, W in ((2, 34), (5, 15), (7, 16), (4, 17), (3, 18), (5, 23), (2, 24), (3, 25), (6, 31), (9, 33), (8, 35),
                 (27, 27), (3, 255), (10, 112), (11, 40), (4, 28)):
        for ceil_mode in (False, True):
            shape = [-(-100_000 // (H * W)), 1, H, W]
            x = pool[torch.randint(len(pool), shape, generator=g)]
            check_2x2_backward_against_scatter(x, ceil_mode, g, f"{tuple(shape)}, ceil_mode={ceil_mode}, {threads} threads")


# Planes of 8 KiB or more in inputs of 2 MiB or more (kPrefetchPlaneBytes, kPrefetchCallBytes in
# csrc/max_pool2d.cpp), where the NCHW kernels prefetch the next plane while they work on one: the buffered forward (3x3 stride 2 padding 1, float32;
# 3x3 stride 2 and 2x3 stride (1, 2) ceil mode, float64), the 2x2 gather forward (output rows
# under two vectors, float32 and float64), and the scatter backward behind all of them.
LARGE_POOL_CASES = [
    ((2, 40, 160, 164), dict(kernel_size=3, stride=2, padding=1), torch.float32),
    ((2, 24, 149, 151), dict(kernel_size=3, stride=2), torch.float64),
    ((7, 16, 101, 97), dict(kernel_size=(2, 3), stride=(1, 2), ceil_mode=True), torch.float64),
    ((8, 128, 56, 56), dict(kernel_size=2, stride=2), torch.float32),
    ((10, 64, 60, 30), dict(kernel_size=2, stride=2), torch.float64),
]


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("case", LARGE_POOL_CASES, ids=lambda c: f"{c[0]}-{kw_id(c[1])}-{c[2]}")
def test_max_pool2d_nchw_large_inputs(case, threads):
    """NCHW pools over large planes and inputs (the kernels then prefetch each thread's next plane):
    values from a small set (ties, ±inf, NaN in some planes, one plane all −inf), values and indices
    exactly as native's; then the gradient of a forward+backward (the scatter backward) bitwise as
    native's."""
    shape, kw, dtype = case
    set_threads(threads)
    g = torch.Generator().manual_seed(41)
    pool = torch.tensor([-math.inf, -1.0, 0.0, 0.5, 1.0, math.inf], dtype=dtype)
    x = pool[torch.randint(len(pool), shape, generator=g)]
    assert x[0, 0].numel() * x.element_size() >= 8 << 10 and x.numel() * x.element_size() >= 8 << 20
    x[0, 1] = -math.inf
    x[1, 2, 5, 7] = x[-1, -1, -3, -2] = math.nan
    msg = f"{shape}, {kw_id(kw)}, {dtype}, {threads} threads"
    ref = assert_pool_exactly_as_native(x, kw, msg)
    grad = torch.randn(ref.shape, generator=g, dtype=dtype)
    leaf, ref_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch_cnnbp.max_pool2d(leaf, **kw).backward(grad)
    F.max_pool2d(ref_leaf, **kw).backward(grad)
    assert torch.equal(leaf.grad, ref_leaf.grad), msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", CL_CASES[2:] + [dict(kernel_size=3, stride=2, padding=1, dilation=2)], ids=kw_id)
def test_max_pool2d_channels_last_blocks_ties_inf_nan(kw, dtype):
    """channels_last windows other than 2x2 (max_pool2d_pixel_cl_blocks: blocks of channels in
    registers: in float32 128-byte blocks of 32 under AVX2 or AVX-512, then a 64-byte one of 16; in
    float64 64-byte blocks of 8; the channels past the last whole block in max_pool2d_pixel_cl;
    bfloat16 runs only the latter): channel counts below, on and past each kind of block and their
    mixes (48 = 32 + 16, 56 = 32 + 16 + 8 one by one), values from a small set (ties, ±inf, all −inf
    windows, NaN), values and indices exactly as native's."""
    g = torch.Generator().manual_seed(13)
    pool = torch.tensor([-math.inf, -1.0, 0.0, 1.0, math.inf, math.nan], dtype=torch.float64)
    for C in (3, 8, 9, 16, 17, 24, 32, 35, 48, 56, 65):
        x = pool[torch.randint(len(pool), (2, C, 9, 11), generator=g)].to(dtype)
        assert_pool_exactly_as_native(x, kw, f"{kw_id(kw)}, C={C}",
                                      ours_input=x.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("kw", CL_CASES, ids=kw_id)
@pytest.mark.parametrize("C", CL_CHANNELS)
def test_max_pool2d_channels_last(C, kw):
    """channels_last: the loop over channels with C below, on and past the vector width; batch 1 and
    3 at 2 threads (the backward splits by sample when N ≥ threads, else by blocks of 64 channels);
    odd output widths."""
    for N in (1, 3):
        for H, W in ((9, 11), (6, 7)):
            x = randn(N, C, H, W).contiguous(memory_format=torch.channels_last)
            run_pool_case(x, kw, threads=2, msg=f"{kw_id(kw)}, N={N}, C={C}, {H}x{W}")


OVERLAP_CASES = [
    dict(kernel_size=3, stride=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 5), stride=(1, 2), padding=(1, 2)),
    dict(kernel_size=3, stride=1, dilation=2, ceil_mode=True),
    dict(kernel_size=4, stride=(2, 3), padding=2, ceil_mode=True),
]


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("kw", OVERLAP_CASES, ids=kw_id)
def test_max_pool2d_backward_overlapping_windows(kw, layout, threads):
    """Windows overlap, so an input that wins several receives the sum of their gradients. Values
    from few levels make wins shared between neighbouring windows common; ties go to the first tap
    in both. Batches below and above the thread count; planes big enough to split over threads."""
    for N, C, H, W in ((1, 65, 20, 23), (3, 5, 33, 35), (5, 130, 9, 9)):
        x = (torch.randint(0, 7, (N, C, H, W)).double() + 0.01 * randn(N, C, H, W).round(decimals=1))
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        run_pool_case(x, kw, threads=threads, msg=f"{kw_id(kw)}, {layout}, N={N}, C={C}, {threads} threads")
    # some input really did win more than one window (or the test would not be about overlap)
    x_leaf = x.clone().requires_grad_()
    out = torch_cnnbp.max_pool2d(x_leaf, **kw)
    (g,) = torch.autograd.grad(out, x_leaf, torch.ones_like(out))
    assert g.max() >= 2


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_pool2d_every_dtype(dtype, layout):
    for kw in (dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
               dict(kernel_size=5, stride=(2, 3), padding=2)):
        for W in (1, 7, 17, 33, 40):
            if pooled_width(W, kw) < 1:
                continue
            x = randn(3, 17, 8, W, dtype=dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            run_pool_case(x, kw, threads=2, msg=f"{kw_id(kw)}, {dtype}, W={W}")


# A window can hold no pixel of the image at all: dilation 2 steps over a 1-pixel image from the
# padding before it to the position after it (kernel 2, padding 1, dilation 2 is a valid pooling).
# Native returns -inf with an index past the plane there, and its backward then writes out of
# bounds (a double free here), so native is not run on these.
EMPTY_WINDOW_CASES = [
    ("rows", (1, 3, 1, 4), dict(kernel_size=(2, 1), stride=1, padding=(1, 0), dilation=(2, 1))),
    ("columns", (2, 3, 5, 1), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2))),
]


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("case", EMPTY_WINDOW_CASES, ids=case_id)
def test_max_pool2d_window_with_no_in_image_tap(case, layout):
    _, shape, kw = case
    x = randn(*shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xa = x.clone().requires_grad_()
    out, indices = torch_cnnbp.max_pool2d(xa, return_indices=True, **kw)
    plane = shape[2] * shape[3]
    assert torch.isneginf(out).any(), "the case has an empty window"
    # values and indices are native's (native's forward is safe here; only its backward is not)
    with torch.no_grad():
        native_out, native_indices = F.max_pool2d(x, return_indices=True, **kw)
    assert torch.equal(out.detach(), native_out) and torch.equal(indices, native_indices)
    g = randn(*out.shape)
    (gin,) = torch.autograd.grad(out, xa, g)
    # every finite output passes its gradient to its winner; the empty windows (whose reported
    # index names no tap of theirs) pass none, and nothing is written outside the plane
    expected = torch.zeros(x.shape[0], x.shape[1], plane, dtype=torch.float64)
    finite = torch.isfinite(out)
    expected.scatter_add_(2, indices.where(finite, 0).flatten(2), g.where(finite, 0).flatten(2))
    assert_close(gin, expected.view(x.shape))


# ---- the NumPy reference, tiny float64 sizes ------------------------------------------------------

REFERENCE_CONV_CASES = [
    # (id, input, weight, bias, kwargs, threads)
    ("gemm_Kg13_cols33", (1, 2, 5, 13), (13, 2, 3, 3), True, {}, None),
    ("blocks_3_1", (4, 2, 12, 19), (2, 2, 3, 2), True, dict(padding=(1, 0)), 1),  # OH·OW = 200: block 3
    ("pointwise_direct", (1, 5, 3, 4), (3, 5, 1, 1), False, {}, None),
    ("pointwise_stride2_pad1", (2, 3, 5, 4), (2, 3, 1, 1), True, dict(stride=2, padding=1), None),
    ("depthwise_mult3_s2", (2, 2, 5, 7), (6, 1, 3, 3), True, dict(groups=2, stride=2, padding=1), None),
    ("depthwise_same_asym_d2", (1, 3, 5, 6), (3, 1, 2, 3), False, dict(groups=3, padding="same", dilation=(2, 1)), None),
    ("groups2_dil2", (2, 4, 6, 7), (4, 2, 2, 3), True, dict(groups=2, dilation=2, stride=(1, 2)), None),
]


@pytest.mark.parametrize("case", REFERENCE_CONV_CASES, ids=case_id)
def test_conv2d_matches_numpy_reference(case):
    name, xs, ws, bias, kw, threads = case
    set_threads(threads)
    x, w = randn(*xs), randn(*ws)
    b = randn(ws[0]) if bias else None
    stride, padding, dilation = _args.conv2d_args(w, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1))
    groups = kw.get("groups", 1)
    xa, wa, ba = leaves(x, w, b)
    y = torch_cnnbp.conv2d(xa, wa, ba, **kw)
    g = randn(*y.shape)
    grads = torch.autograd.grad(y, [t for t in (xa, wa, ba) if t is not None], g)
    geo = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    o_np, w_np, g_np = x.numpy(), w.numpy(), g.numpy()
    expected = reference.conv2d_forward(o_np, w_np, None if b is None else b.numpy(), **geo)
    assert_close(y.detach(), torch.from_numpy(expected), msg=f"{name}: output")
    assert_close(grads[0], torch.from_numpy(reference.conv2d_grad_input(g_np, w_np, xs, **geo)), msg=f"{name}: grad_input")
    assert_close(grads[1], torch.from_numpy(reference.conv2d_grad_weight(o_np, g_np, ws, **geo)), msg=f"{name}: grad_weight")
    if b is not None:
        assert_close(grads[2], torch.from_numpy(reference.conv2d_grad_bias(g_np)), msg=f"{name}: grad_bias")


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("kw", (dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True),
                                dict(kernel_size=(2, 3), stride=(1, 3), padding=(1, 1)),
                                dict(kernel_size=3, stride=1),
                                dict(kernel_size=5, stride=3, padding=2, ceil_mode=True)), ids=kw_id)
def test_max_pool2d_matches_numpy_reference(kw, layout):
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    for C, W in ((3, 9), (17, 11), (2, 1)):
        if pooled_width(W, kw) < 1:
            continue
        x = randn(2, C, 6, W)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        xa = x.clone().requires_grad_()
        out, idx = torch_cnnbp.max_pool2d(xa, return_indices=True, **kw)
        g = randn(*out.shape)
        (gin,) = torch.autograd.grad(out, xa, g)
        ref_out, ref_idx = reference.max_pool2d_forward(
            x.numpy(), pair(kw["kernel_size"]), pair(kw.get("stride", kw["kernel_size"])), pair(kw.get("padding", 0)),
            pair(kw.get("dilation", 1)), kw.get("ceil_mode", False))
        msg = f"{kw_id(kw)}, {layout}, C={C}, W={W}"
        assert_close(out.detach(), torch.from_numpy(ref_out), msg=f"{msg}: output")
        assert torch.equal(idx, torch.from_numpy(ref_idx)), f"{msg}: indices"
        ref_gin = reference.max_pool2d_backward(g.numpy(), ref_idx, tuple(x.shape))
        assert_close(gin, torch.from_numpy(ref_gin), msg=f"{msg}: grad_input")


# ---- determinism at a fixed thread count ---------------------------------------------------------

DETERMINISM_CONV = [
    # chunked sample blocks with a remainder; blocked GEMM across KC (rows 513) and NC (3100 cols)
    ("chunked_blocks_out7x7_N13", (13, 16, 9, 9), (16, 16, 3, 3), dict()),
    ("chunked_rows513_N3", (3, 57, 9, 15), (25, 57, 3, 3), dict(padding=1)),
    ("cols3100_N2", (2, 2, 52, 64), (12, 2, 3, 3), dict()),
    ("pointwise_direct_chunked_N3", (3, 32, 24, 24), (48, 32, 1, 1), dict()),
    ("depthwise_mult3", (3, 8, 24, 25), (24, 1, 3, 3), dict(groups=8, padding=1)),
]


def conv_results(x, w, b, kw, g):
    xa, wa, ba = leaves(x, w, b)
    y = torch_cnnbp.conv2d(xa, wa, ba, **kw)
    return (y.detach(), *torch.autograd.grad(y, (xa, wa, ba), g))


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_conv2d_deterministic(dtype, threads):
    """At a fixed thread count two runs are bitwise equal: chunked sample blocks (per-chunk weight
    gradients added in chunk order), the blocked GEMM across k and column blocks, the direct
    pointwise path, the depthwise loops."""
    set_threads(threads)
    for name, xs, ws, kw in DETERMINISM_CONV:
        if threads == 2 and name.startswith("chunked"):
            assert conv_plan(xs, ws, 2, **kw).chunks == 2, name
        x, w, b = randn(*xs, dtype=dtype), randn(*ws, dtype=dtype), randn(ws[0], dtype=dtype)
        g = randn(*torch_cnnbp.conv2d(x, w, b, **kw).shape, dtype=dtype)
        first, second = conv_results(x, w, b, kw, g), conv_results(x, w, b, kw, g)
        for what, a, c in zip(("output", "grad_input", "grad_weight", "grad_bias"), first, second):
            assert torch.equal(a, c), f"{name}, {threads} threads: {what} differs between runs"


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_max_pool2d_deterministic(layout, threads):
    """Overlapping windows (gradients summed where an input wins several), planes split over threads."""
    set_threads(threads)
    x = randn(3, 65, 33, 35, dtype=torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for kw in (dict(kernel_size=3, stride=1), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)):
        runs, g = [], None
        for _ in range(2):
            xa = x.clone().requires_grad_()
            out, idx = torch_cnnbp.max_pool2d(xa, return_indices=True, **kw)
            g = randn(*out.shape, dtype=out.dtype) if g is None else g
            (gin,) = torch.autograd.grad(out, xa, g)
            runs.append((out.detach(), idx, gin))
        for what, a, c in zip(("output", "indices", "grad_input"), *runs):
            assert torch.equal(a, c), f"{kw_id(kw)}, {layout}, {threads} threads: {what} differs"


# ---- the run-time ISA choice: the portable and AVX2 paths on this machine ------------------------

ISA_MARKER = "CNNBP_FAST_PATHS_ISA_OK"


def run_isa_subset():
    """A compact subset of the cases above, run in a fresh process under CNNBP_SIMD (see
    test_isa_paths_in_fresh_processes). Raises on the first mismatch. Returns the number of
    comparisons made. Cases set their own thread count (no pytest fixture runs here)."""
    torch.manual_seed(0)
    count = 0
    gemm = ("Kg13_rows33_cols33", "Kg12_rows256_cols32", "Kg11_rows257_cols55_1x1s2", "Kg257_rows153_cols51",
            "Kg13_rows27_cols1537_1thread", "Kg12_rows18_cols3100_2threads")
    thin = ("Kg40_rows45_cols483", "Kg48_rows72_cols648_chunks", "Kg20_rows81_cols484_chunks")
    packed = ("Kg4_rows8_N2", "Kg5_rows20_N2", "Kg8_rows45_N6_chunks", "Kg20_rows288_tiles_shared")
    plan = (("out7x7_N13", 1), ("out7x7_N13", 2), ("out10x10_N13_blocks_6_6_1", 1), ("pointwise_direct_24x24_N3", 2),
            ("pointwise_16x16_N2", 2), ("pointwise_blocked_7x7_N5", 1), ("pointwise_stride2_pad1_N13", 2))
    for dtype in (torch.float32, torch.float64):
        for name in gemm:
            _, xs, ws, bias, kw, threads = next(c for c in GEMM_CASES if c[0] == name)
            run_conv_case(xs, ws, bias, kw, dtype, threads or 1, msg=name)
            count += 1
        for name in thin:
            _, xs, ws, kw, threads, _ = next(c for c in THIN_CASES if c[0] == name)
            run_conv_case(xs, ws, False, kw, dtype, threads, msg=name)
            count += 1
        for name in packed:
            _, xs, ws, kw, threads = next(c for c in PACKED_CASES if c[0] == name)
            run_conv_case(xs, ws, True, kw, dtype, threads, msg=name)
            count += 1
        for name, threads in plan:
            _, xs, ws, bias, kw = next(c for c in PLAN_CASES if c[0] == name)
            run_conv_case(xs, ws, bias, kw, dtype, threads, msg=f"{name}, {threads} threads")
            count += 1
    for dtype in DTYPES:
        run_conv_case((3, 8, 24, 25), (24, 1, 3, 3), True, dict(groups=8, padding=1), dtype, 2,
                      msg="depthwise")
        run_conv_case((2, 3, 5, 37), (9, 1, 2, 4), False, dict(groups=3, padding="same"), dtype, 1, msg="depthwise same")
        for name in ("k3_p1_7x7", "k3_s2_p1_14x14", "k3_d21_p21_9x5"):  # ∂E/∂W's frames
            _, (H, W), mult, (kh, kw_), kw = next(c for c in DEPTHWISE_WEIGHT_FRAME_CASES if c[0] == name)
            run_conv_case((5, 3, H, W), (3 * mult, 1, kh, kw_), True, dict(groups=3, **kw), dtype, 2, msg=name)
        count += 5
    set_threads(1)
    for kw in (POOL_CASES[1], POOL_CASES[2], POOL_CASES[4], POOL_CASES[6], POOL_CASES[7], POOL_CASES[13], POOL_CASES[3]):
        for W in (1, 5, 17, 33, 39, 41):
            if pooled_width(W, kw) >= 1:
                for dtype in (torch.float64, torch.float32, torch.bfloat16):
                    run_pool_case(randn(3, 2, 9, W, dtype=dtype), kw, msg=f"{kw_id(kw)}, W={W}")
                    count += 1
    for C in (1, 17, 65):
        for N in (1, 3):
            for kw in (CL_CASES[1], CL_CASES[2], OVERLAP_CASES[0]):
                x = randn(N, C, 9, 11).contiguous(memory_format=torch.channels_last)
                run_pool_case(x, kw, threads=2, msg=f"channels_last {kw_id(kw)}, N={N}, C={C}")
                count += 1
    return count


ISA_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    import torch_cnnbp
    import test_fast_paths as t
    from helpers import no_native_kernels_ran
    paths = torch.ops.cnnbp._paths()
    assert paths == {paths!r}, paths
    x, w = torch.randn(1, 4, 6, 10), torch.randn(12, 4, 3, 3)
    blas = no_native_kernels_ran(lambda: torch_cnnbp.conv2d(x, w), forbidden=("mm",))
    if "gemm=blas" in paths:
        assert blas, "{env}: expected the products to go through ATen's BLAS (aten::mm)"
    else:
        assert not blas, "{env}: expected the products to run on the own GEMM, not aten::mm"
    n = t.run_isa_subset()
    assert n > 50, n
    print({marker!r}, {paths!r}, n)
""")


def isa_runs():
    """(environment, expected torch.ops.cnnbp._paths()) for the fresh processes: the portable path
    (products on ATen's BLAS), the AVX2 path with either GEMM backend (ATen's BLAS by default, the own
    AVX2 GEMM with CNNBP_GEMM=own), and on AVX-512 CPUs the GEMM backend this process does not use by
    default, so that every backend this CPU can run runs."""
    runs = [({"CNNBP_SIMD": "portable"}, "isa=portable gemm=blas pool=portable/portable"),
            ({"CNNBP_SIMD": "avx2"}, "isa=avx2 gemm=blas pool=avx2/avx2"),
            ({"CNNBP_SIMD": "avx2", "CNNBP_GEMM": "own"}, "isa=avx2 gemm=own pool=avx2/avx2")]
    paths = torch.ops.cnnbp._paths()
    if paths.startswith("isa=avx512") and "CNNBP_SIMD" not in os.environ:
        other = "blas" if "gemm=own" in paths else "own"
        pool = paths.split(" pool=")[1]  # by vendor (simd.h: blend_isa), not by the GEMM backend
        runs.append(({"CNNBP_GEMM": other}, f"isa=avx512 gemm={other} pool={pool}"))
    return runs


def test_pool_loops_that_combine_comparisons_run_at_256_bits_at_most():
    """max_pool2d's loops that combine comparisons (NaN or larger, counted matches) run in the AVX2
    wrapper on AVX-512 CPUs (csrc/simd.h: compare_isa; in the AVX-512 one GCC computed their
    64-byte comparisons a lane at a time), the select-only loops at blend_isa's width."""
    fields = dict(f.split("=") for f in torch.ops.cnnbp._paths().split())
    select, combine = fields["pool"].split("/")
    isa = fields["isa"]
    assert combine == ("avx2" if isa == "avx512" else isa)
    assert select in ((isa, "avx2") if isa == "avx512" else (isa,))


def test_isa_paths_in_fresh_processes():
    """CNNBP_SIMD=portable and =avx2 (with each GEMM backend), and on AVX-512 CPUs the non-default
    CNNBP_GEMM backend (all read once at load, so in fresh processes): the products go where
    _paths() says (ATen's BLAS seen in the profiler, or not), the depthwise / max-pool loops are
    compiled for the baseline or AVX2, and the compact subset matches native there too. The
    processes run side by side."""
    tests = os.path.dirname(os.path.abspath(__file__))
    procs = {}
    for extra, paths in isa_runs():
        label = " ".join(f"{k}={v}" for k, v in extra.items())
        code = ISA_SCRIPT.format(tests=tests, paths=paths, env=label, marker=ISA_MARKER)
        inherited = {k: v for k, v in os.environ.items() if k not in ("CNNBP_SIMD", "CNNBP_GEMM")}  # the run's own
        env = {**inherited, **extra, "OMP_WAIT_POLICY": "PASSIVE"}
        procs[label] = (paths, subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True))
    try:
        for label, (paths, proc) in procs.items():
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, f"{label}: exit {proc.returncode}\n{out}\n{err[-4000:]}"
            assert f"{ISA_MARKER} {paths}" in out, f"{label}: no marker\n{out}\n{err[-4000:]}"
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()