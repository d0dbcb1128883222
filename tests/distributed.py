"""Multi-process tests: spawned CPU processes in one gloo group, bounded in time.

    results = run_ranks(worker, world=2, args=(...,))   # worker(rank, world, *args) -> picklable (tensors, ...)

Each rank runs `worker` inside an initialised default group (gloo, one thread) and returns a value, which comes back
in rank order. A rank that raises fails the test with its traceback; ranks that run past `timeout` seconds are
killed and the test fails (a hung collective never hangs CI). The worker must be a module-level function of an
importable module (spawn pickles it by name).
"""
from __future__ import annotations

import os
import socket
import tempfile
import time

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, worker, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = worker(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(worker, world: int = 2, args: tuple = (), timeout: float = 240.0) -> list:
    """worker(rank, world, *args) on `world` spawned ranks; returns their results in rank order."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(_entry, args=(world, free_port(), out_dir, worker, args), nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{worker.__name__} on {world} ranks ran past {timeout} s (killed)")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world)]
