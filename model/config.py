"""The `model` section of the config schema.

It lives in `model/` so that models can be built without the trainer; `pretrain.config` nests it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    arch: str = "tnl"  # "tnl" (TransNormerLLM on lightning attention) or "llama" (softmax baseline)
    vocab_size: int = 64000
    dim: int = 1024  # TNL: decoder_embed_dim == hidden_dim
    layers: int = 24
    heads: int = 8
    glu_dim: int = 2816  # TNL: SGLU width; llama: SwiGLU width
    lrpe_layers: list = field(default_factory=lambda: [0])  # layer indices with LRPE (released: layer 0 only)
    no_scale_embedding: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02
    attn_backend: str = "auto"  # lightning_attn backend: auto | naive | recurrent | chunked | triton
    # llama baseline only
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def validate(self) -> None:
        """Raise ValueError naming the field when the shapes cannot work."""
        if self.arch not in ("tnl", "llama"):
            raise ValueError(f"model.arch must be one of ['tnl', 'llama'], got {self.arch!r}")
        for name in ("vocab_size", "dim", "layers", "heads", "glu_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(
                f"model.heads ({self.heads}) does not divide model.dim ({self.dim}): "
                f"pick heads so that dim/heads is an integer head size"
            )
        bad = [i for i in self.lrpe_layers if not 0 <= int(i) < self.layers]
        if bad:
            raise ValueError(f"model.lrpe_layers {bad} out of range for model.layers={self.layers}")
        backends = ("auto", "naive", "recurrent", "chunked", "triton")
        if self.attn_backend not in backends:
            raise ValueError(f"model.attn_backend must be one of {list(backends)}, got {self.attn_backend!r}")
