"""Run a function in N real processes over torch.distributed (gloo on CPU), for tests and benchmarks.

    results = run_distributed(fn, world_size=2, args=(x,))   # fn(rank, world_size, *args) -> picklable

Each process gets its own process group on a free localhost port, with a timeout on every collective so a
hang fails in seconds; stdout/stderr lines are prefixed with "[rank N]"; the group is destroyed in `finally`.
A failure in any rank raises in the caller with that rank's traceback.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Prefixed:
    def __init__(self, stream, prefix):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text):
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                self.stream.write(self.prefix)
            self.stream.write(piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self):
        self.stream.flush()


def _worker(rank, world_size, port, backend, timeout_s, fn, args, env, queue):
    import torch
    import torch.distributed as dist

    sys.stdout = _Prefixed(sys.stdout, f"[rank {rank}] ")
    sys.stderr = _Prefixed(sys.stderr, f"[rank {rank}] ")
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)})
    os.environ.update(env)
    torch.set_num_threads(1)  # N ranks share the cores; oversubscription only slows every rank down
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, args: tuple = (), backend: str = "gloo", timeout_s: float = 60.0,
                    env: dict | None = None) -> list:
    """Run fn(rank, world_size, *args) in world_size processes; returns the per-rank results in rank order.

    fn must be importable (a module-level function), as the processes are spawned fresh.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout_s, fn, args, env or {}, queue),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s * 3 + 60)
    try:
        while len(results) + len(errors) < world_size:
            if datetime.datetime.now() > deadline:
                raise TimeoutError(f"distributed run of {fn.__name__} did not finish in {timeout_s * 3 + 60:.0f}s")
            if queue.empty():
                if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    raise RuntimeError(f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]}) "
                                       f"in {fn.__name__}")
                import time

                time.sleep(0.05)
                continue
            rank, status, payload = queue.get()
            if status == "ok":
                results[rank] = payload
            else:
                errors.append((rank, payload))
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank, tb = errors[0]
        raise RuntimeError(f"rank {rank} failed in {fn.__name__}:\n{tb}")
    return [results[r] for r in range(world_size)]
