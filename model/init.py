"""Layout-independent initialisation: every parameter's initial value is a pure function of (seed, its name).

A model asks `initial_value(name, shape, seed, device)` for each of its parameters. The value comes from a
generator seeded with the seed and the parameter's canonical name (a tied or copied weight names the tensor it
starts equal to), so a model built whole and one built on the meta device, sharded over any layout and then
materialised piece by piece hold bit-identical weights. No ranks here: `parallel.build` does the sharding.
"""
from __future__ import annotations

import zlib

import torch
from torch import nn


def generator(seed: int, name: str, device) -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
    return g


def normal(seed: int, name: str, shape, std: float, device="cpu", dtype=torch.float32) -> torch.Tensor:
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    return out.normal_(0.0, std, generator=generator(seed, name, device))


def default_seed() -> int:
    """The seed of torch's default generator (what `torch.manual_seed` set): a model built without an explicit
    seed is reproducible from the usual `torch.manual_seed(s)`."""
    return torch.initial_seed()


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Set every parameter of a whole (unsharded, materialised) model to its initial value; returns the model."""
    seed = default_seed() if seed is None else seed
    for name, p in model.named_parameters():
        p.copy_(model.initial_value(name, p.shape, seed, p.device).to(p.dtype))
    return model
