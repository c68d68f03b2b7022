"""A model built from torch_cnnbp's modules, trained with DistributedDataParallel (gloo, CPU) in two
processes on this machine, checked against one process training on the full batch.

    python -m torch_cnnbp.examples.ddp [--world-size 2] [--steps 4]

Each of the W processes takes 1/W of every batch; DDP averages the gradients across processes in
its backward, so with a mean loss and equal shards every step equals the single-process step on the
whole batch, and the parameters stay equal (up to rounding). Everything stays on the loopback
interface: the rendezvous is tcp://127.0.0.1:<free port> and gloo is told to use the loopback device.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import torch_cnnbp

BATCH, CLASSES, LR = 16, 4, 0.1


def make_model(dtype=torch.float64) -> nn.Module:
    """A small LeNet-style CNN of our modules, the same initial values in every process."""
    torch.manual_seed(0)
    return nn.Sequential(
        torch_cnnbp.Conv2d(1, 6, 3, padding=1), nn.ReLU(), torch_cnnbp.MaxPool2d(2),
        torch_cnnbp.Conv2d(6, 8, 3, padding="same", padding_mode="reflect"), nn.ReLU(), torch_cnnbp.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 3 * 3, CLASSES),
    ).to(dtype)


def make_batches(steps: int, dtype=torch.float64):
    """The same `steps` batches of (images, labels) in every process."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 1, 12, 12, generator=g, dtype=dtype), torch.randint(0, CLASSES, (BATCH,), generator=g))
            for _ in range(steps)]


def train(model: nn.Module, batches, rank: int = 0, world_size: int = 1) -> nn.Module:
    """Plain SGD on a mean cross-entropy; process `rank` of `world_size` sees its shard of each batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for images, labels in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(images.chunk(world_size)[rank]), labels.chunk(world_size)[rank]).backward()
        optimizer.step()
    return model


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), names[0])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, init_method: str, steps: int, dtype, result_path: str):
    torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        model = DistributedDataParallel(make_model(dtype))
        train(model, make_batches(steps, dtype), rank, world_size)
        if rank == 0:
            torch.save(model.module.state_dict(), result_path)
        # Leave together: a process that tears its connections down while its peer is still
        # finishing can make gloo abort the peer (seen as a rare SIGABRT of rank 1).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_ddp(world_size: int = 2, steps: int = 4, dtype=torch.float64, timeout: float = 120.0):
    """State dict of the model after `steps` DDP steps in `world_size` spawned processes. Raises
    TimeoutError (after stopping the processes) if they take longer than `timeout` seconds."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "ddp_state.pt")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.spawn(_worker, args=(world_size, init_method, steps, dtype, result_path), nprocs=world_size,
                           join=False)
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                raise TimeoutError(f"DDP training did not finish within {timeout:.0f} s")
        return torch.load(result_path, weights_only=True)


def compare(world_size: int = 2, steps: int = 4, dtype=torch.float64, timeout: float = 120.0) -> float:
    """Largest |parameter difference| between DDP in `world_size` processes and one process."""
    ddp_state = train_ddp(world_size, steps, dtype, timeout)
    single_state = train(make_model(dtype), make_batches(steps, dtype)).state_dict()
    assert ddp_state.keys() == single_state.keys()
    return max((ddp_state[k] - single_state[k]).abs().max().item() for k in single_state)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_cnnbp.examples.ddp", description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--float32", action="store_true", help="train in float32 instead of float64")
    args = parser.parse_args(argv)
    dtype = torch.float32 if args.float32 else torch.float64
    print(f"training with DistributedDataParallel (gloo) in {args.world_size} processes, {args.steps} steps ...")
    diff = compare(args.world_size, args.steps, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    verdict = "equal" if diff <= tolerance else "DIFFERENT"
    print(f"max |DDP parameter - single-process parameter| = {diff:.3g} ({verdict}, tolerance {tolerance:g})")
    return 0 if diff <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
