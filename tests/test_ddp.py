"""DistributedDataParallel (gloo, 2 processes on this machine) over a model of our modules.

Oracle: one process training the same model on the full batches (torch_cnnbp/examples/ddp.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from torch_cnnbp.examples import ddp

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def test_ddp_two_processes_equal_one_process_on_full_batch():
    # In float64 the only difference is the order of two additions, so "equal" is tight.
    assert ddp.compare(world_size=2, steps=3, dtype=torch.float64, timeout=150) <= 1e-12


def test_the_check_can_fail():
    """A process that trains on its half of each batch alone ends elsewhere: the comparison above
    passes only because DDP averaged the gradients."""
    batches = ddp.make_batches(3)
    half = ddp.train(ddp.make_model(), batches, rank=0, world_size=2).state_dict()
    full = ddp.train(ddp.make_model(), batches).state_dict()
    assert max((half[k] - full[k]).abs().max().item() for k in full) > 1e-3
