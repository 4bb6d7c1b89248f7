"""One fixed-format metrics line per logging step, mirrored to TensorBoard, metrics.jsonl and (optionally)
Weights & Biases.

    step     10/200 | loss 4.3000 | gnorm 0.400 | lr 3.00e-04 | seq    512 | 612 ms/step | ETA 1h02m |
    tok/s      6,690 (3,345/dev) | TFLOP/s 0.050 | MFU 4.1% | rss 0.21GiB peak 0.21GiB | data 0.4%

(one line). On a GPU the memory part is `mem alloc A / res R / peak P GiB` (torch's allocated, reserved and
peak-allocated bytes of this rank's device); on CPU it is the process's resident set, now and at its peak.
metrics.jsonl holds the same numbers (mem_allocated_bytes, mem_reserved_bytes, mem_peak_bytes on GPU;
rss_bytes, rss_peak_bytes on CPU) with every other field of the record.

MFU = achieved FLOP/s / peak. On GPUs the peak comes from an explicit table (bf16 dense; n/a for an
unknown device, never guessed); on CPU it is the fp32 GEMM rate of this machine, timed once at start-up.

Weights & Biases: `MetricsLogger(..., wandb=True)` (the trainer passes the config's `log.wandb`) logs every
numeric field under `train/` when `import wandb` works; wandb is not a dependency. The mode is WANDB_MODE when
set, else offline without WANDB_API_KEY (the run is written under <run>/wandb/, `wandb sync` uploads it later)
and online with it; WANDB_PROJECT names the project (default lightspan).
"""
from __future__ import annotations

import json
import math
import os
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


def rss_bytes() -> int | None:
    """This process's resident set size now (Linux /proc; None where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_stats(device: torch.device | None = None) -> dict:
    """The device's memory for the metrics record. GPU: allocated / reserved / peak allocated bytes (torch's
    caching allocator, this rank's device). CPU: resident set size now and at its peak."""
    device = _current_device() if device is None else torch.device(device)
    if device.type == "cuda":
        return {"mem_allocated_bytes": torch.cuda.memory_allocated(device),
                "mem_reserved_bytes": torch.cuda.memory_reserved(device),
                "mem_peak_bytes": torch.cuda.max_memory_allocated(device)}
    return {"rss_bytes": rss_bytes(), "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _current_device() -> torch.device:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def format_memory(rec: dict) -> str:
    if "mem_allocated_bytes" in rec:
        return (f"mem alloc {_gib(rec['mem_allocated_bytes'])} / res {_gib(rec['mem_reserved_bytes'])} / "
                f"peak {_gib(rec['mem_peak_bytes'])} GiB")
    if "rss_bytes" in rec:
        return f"rss {_gib(rec['rss_bytes'])}GiB peak {_gib(rec['rss_peak_bytes'])}GiB"
    return f"mem {_gib(rec.get('memory_bytes'))}GiB"


def format_duration(seconds) -> str:
    """ETA: 45s, 12m05s, 3h07m, 2d04h."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_line(rec: dict, total_steps: int) -> str:
    """The console line of one record (MetricsLogger.log fills tflops and mfu first)."""
    mfu = f"{100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else "n/a"
    parts = [f"step {rec['step']:>6}/{total_steps}", f"loss {rec['loss']:.4f}", f"gnorm {rec['grad_norm']:.3f}",
             f"lr {rec['lr']:.2e}", f"seq {rec['seq_len']:>6}"]
    if rec.get("ms_per_step") is not None:
        parts.append(f"{rec['ms_per_step']:,.0f} ms/step")
    if "eta_s" in rec:
        parts.append(f"ETA {format_duration(rec['eta_s'])}")
    tok = f"tok/s {rec['tokens_per_s']:>10,.0f}"
    if rec.get("tokens_per_s_per_device") is not None:
        tok += f" ({rec['tokens_per_s_per_device']:,.0f}/dev)"
    parts += [tok, f"TFLOP/s {rec['tflops']:.3f}", f"MFU {mfu}", format_memory(rec)]
    if rec.get("data_wait") is not None:
        parts.append(f"data {100 * rec['data_wait']:.1f}%")
    return " | ".join(parts)


def _wandb_run(run_dir: Path, config: dict | None):
    """A wandb run writing under run_dir (None, with a note, when wandb is not installed or does not start)."""
    try:
        import wandb
    except ImportError:
        print("log.wandb is on but wandb is not installed (pip install wandb): logging to metrics.jsonl and "
              "TensorBoard only", flush=True)
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "lightspan"), name=run_dir.name,
                          dir=str(run_dir), config=config, mode=mode, resume="allow",
                          id=os.environ.get("WANDB_RUN_ID"))
    except Exception as e:  # noqa: BLE001 - a logger that cannot start must not stop the training
        print(f"wandb did not start ({type(e).__name__}: {e}); logging to metrics.jsonl and TensorBoard only",
              flush=True)
        return None


class MetricsLogger:
    """Writes the stdout line, `<run>/metrics.jsonl`, TensorBoard scalars and optionally wandb (rank 0 only).

    device: whose memory the line reports (default: the current CUDA device once CUDA is in use, else the CPU
    process). wandb: also log to Weights & Biases when it is installed (config: the run's config, recorded
    with it). `MetricsLogger.for_run(cfg, run_dir, device, peak_flops)` reads these from the config."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, peak_flops: float | None = None,
                 device: torch.device | str | None = None, wandb: bool = False, config: dict | None = None):
        self.enabled = enabled
        self.peak = peak_flops
        self.device = None if device is None else torch.device(device)
        self.jsonl = None
        self.tb = None
        self.wandb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            if wandb:
                self.wandb = _wandb_run(run_dir, config)

    @classmethod
    def for_run(cls, cfg, run_dir: Path, device=None, peak_flops: float | None = None, enabled: bool = True):
        """The logger a training run configures: log.tensorboard, and log.wandb when the schema has it."""
        from pretrain.config import to_dict

        return cls(run_dir, enabled=enabled, tensorboard=cfg.log.tensorboard, peak_flops=peak_flops, device=device,
                   wandb=bool(getattr(cfg.log, "wandb", False)), config=to_dict(cfg))

    def log_validation(self, step: int, loss: float, tokens: int) -> None:
        """One line, one metrics.jsonl record (`val_loss`) and the TensorBoard/W&B scalar val/loss."""
        if not self.enabled:
            return
        print(f"step {step:>6} | validation loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f}) on {tokens:,} "
              f"held-out tokens", flush=True)
        self.jsonl.write(json.dumps({"step": step, "val_loss": loss, "val_tokens": tokens}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            self.tb.add_scalar("val/loss", loss, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({"val/loss": loss}, step=step)

    def log(self, rec: dict, total_steps: int) -> None:
        if not self.enabled:
            return
        # flops_per_s is the job's; TFLOP/s and MFU are per device: MFU = job FLOP/s / (world size x device peak)
        per_device = rec.get("flops_per_s", 0.0) / max(int(rec.get("world_size", 1)), 1)
        rec["tflops"] = per_device / 1e12
        rec["mfu"] = per_device / self.peak if self.peak else None
        for key, value in memory_stats(self.device).items():
            rec.setdefault(key, value)
        print(format_line(rec, total_steps), flush=True)
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in rec.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"train/{key}", value, rec["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=rec["step"])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
