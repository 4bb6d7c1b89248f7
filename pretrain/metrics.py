"""One fixed-format metrics line per logging step, mirrored to TensorBoard and metrics.jsonl.

MFU = achieved FLOP/s / peak. On GPUs the peak comes from an explicit table (bf16 dense; n/a for an
unknown device, never guessed); on CPU it is the fp32 GEMM rate of this machine, timed once at start-up.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets (SXM parts).
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
}


def cpu_gemm_peak(n: int = 1024, repeats: int = 5) -> float:
    """Best observed fp32 n x n matmul rate (FLOP/s) on this CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak(device: torch.device) -> float | None:
    if device.type == "cpu":
        return cpu_gemm_peak()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak
    return None


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsLogger:
    """Writes the stdout line, `<run>/metrics.jsonl` and TensorBoard scalars (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, peak_flops: float | None = None):
        self.enabled = enabled
        self.peak = peak_flops
        self.jsonl = None
        self.tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, rec: dict, total_steps: int) -> None:
        if not self.enabled:
            return
        flops = rec.get("flops_per_s", 0.0)
        rec["tflops"] = flops / 1e12
        rec["mfu"] = flops / self.peak if self.peak else None
        mfu = f"{100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else "n/a"
        print(
            f"step {rec['step']:>6}/{total_steps} | loss {rec['loss']:.4f} | gnorm {rec['grad_norm']:.3f} | "
            f"lr {rec['lr']:.2e} | seq {rec['seq_len']:>6} | tok/s {rec['tokens_per_s']:>10,.0f} | "
            f"TFLOP/s {rec['tflops']:.3f} | MFU {mfu} | mem {rec['memory_bytes'] / 2**30:.2f}GiB | "
            f"data {100 * rec['data_wait']:.1f}%",
            flush=True,
        )
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key in ("loss", "grad_norm", "lr", "seq_len", "tokens_per_s", "tflops", "data_wait", "memory_bytes"):
                self.tb.add_scalar(f"train/{key}", rec[key], rec["step"])
            if rec["mfu"] is not None:
                self.tb.add_scalar("train/mfu", rec["mfu"], rec["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
