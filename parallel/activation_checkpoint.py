"""Activation checkpointing (`train.activation_checkpointing`: none | full | selective), applied per block from
outside the model, after TP and CP and before FSDP (torchtitan's order).

- full: a block keeps only its input; its whole forward runs again in the backward.
- selective: a block keeps the outputs of its matrix products with weights (aten.mm / addmm: the q/k/v/u, output
  and SGLU/SwiGLU projections) and of softmax attention (SDPA / flash), and recomputes the rest: norms,
  activations, elementwise products and the lightning-attention intra-block part (batched matmuls, cheap
  relative to the projections and O(T) in memory per block). Measured by `bench/memory.py`.

The wrap replaces the block's `forward` on the instance (non-reentrant `torch.utils.checkpoint`), so the module
tree and every parameter name stay as they are: checkpoints, init and the optimizer see no wrapper.

Under LASP the recomputed forward must see the same incoming state without communicating again: during the
checkpointed forward each `LaspAttention` stashes the state it received (`mode() == "save"`), and during the
recomputation it replays it (`mode() == "replay"`, first in, first out: micro-batches run backward in the order
they ran forward, under 1F1B/GPipe as in plain accumulation). Its backward still exchanges the state gradient.
Distributed softmax attention (ring / Ulysses) communicates again when recomputed (deterministic, same values).
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch import nn

MODES = ("none", "full", "selective")
_local = threading.local()


def mode() -> str | None:
    """None outside checkpointed regions; "save" in a checkpointed forward; "replay" in its recomputation."""
    return getattr(_local, "mode", None)


@contextlib.contextmanager
def _set_mode(value: str):
    previous = mode()
    _local.mode = value
    try:
        yield
    finally:
        _local.mode = previous


class _Both:
    """Enter several context managers as one (checkpoint's context_fn wants one per phase)."""

    def __init__(self, *contexts):
        self.contexts, self.stack = contexts, None

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        for c in self.contexts:
            self.stack.enter_context(c)
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def _save_policy():
    ops = torch.ops.aten
    keep = {ops.mm.default, ops.addmm.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention"):
        if hasattr(ops, name):
            keep.add(getattr(ops, name).default)
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _contexts(selective: bool):
    if not selective:
        return _set_mode("save"), _set_mode("replay")
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    forward, recompute = create_selective_checkpoint_contexts(_save_policy())
    return _Both(forward, _set_mode("save")), _Both(recompute, _set_mode("replay"))


def checkpoint_block(block: nn.Module, selective: bool = False) -> nn.Module:
    """Checkpoint `block`'s forward in place (idempotent); returns the block."""
    if getattr(block, "_lightspan_ac", None):
        return block
    inner = block.forward
    context_fn = functools.partial(_contexts, selective)

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
            return inner(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, context_fn=context_fn,
                                                 determinism_check="none", **kwargs)

    block.forward = forward
    block._lightspan_ac = "selective" if selective else "full"
    return block


def apply_ac(blocks, how: str) -> None:
    """Apply `train.activation_checkpointing` to each block (the architecture spec's list)."""
    if how not in MODES:
        raise ValueError(f"train.activation_checkpointing must be one of {list(MODES)}, got {how!r}")
    if how == "none":
        return
    for block in blocks:
        checkpoint_block(block, selective=how == "selective")
