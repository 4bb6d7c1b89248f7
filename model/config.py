"""The `model` section of the config schema.

It lives in `model/` so that models can be built without the trainer; `pretrain.config` nests it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# The numeric ranges of the model section: field -> (type, lowest value, whether the lowest itself is allowed).
# Floats must also be finite. Checked first in validate(), so a config.json value of the wrong type ("512")
# is refused naming the field rather than failing as a TypeError further on.
RANGES = {
    "vocab_size": (int, 1, True),
    "dim": (int, 1, True),
    "layers": (int, 1, True),
    "heads": (int, 1, True),
    "glu_dim": (int, 1, True),
    "norm_eps": (float, 0.0, False),
    "init_std": (float, 0.0, False),
    "rope_theta": (float, 0.0, False),
    "vocab_size_multiple_of": (int, 0, True),
}


@dataclass
class ModelConfig:
    arch: str = "tnl"  # "tnl" (TransNormerLLM), "llama" (softmax baseline), "sharedllm" (TNL + compressor)
    vocab_size: int = 64000
    # pad the vocabulary to a multiple of this x parallel.tp that holds the tokenizer (Megatron's rule); 0: as given
    vocab_size_multiple_of: int = 0
    dim: int = 1024  # TNL: decoder_embed_dim == hidden_dim
    layers: int = 24
    heads: int = 8
    glu_dim: int = 2816  # TNL: SGLU width; llama: SwiGLU width
    lrpe_layers: list = field(default_factory=lambda: [0])  # layer indices with LRPE (released: layer 0 only)
    no_scale_embedding: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02
    attn_backend: str = "auto"  # lightning_attn backend: auto | naive | recurrent | chunked | triton
    # TNL hybrids: one letter per layer, L lightning / S softmax (RoPE), tiled over the layers ("LLLLLLLS")
    attention_pattern: str = "L"
    # SharedLLM compressor (arch "sharedllm"): lower tower = the first M layers, read by cross-attention in the
    # lowest M upper layers; each context chunk of `sharedllm_chunk` tokens is halved `sharedllm_depth` times
    # (depth+1 tree nodes), every node keeping `sharedllm_node_positions` positions
    sharedllm_layers: int = 4
    sharedllm_chunk: int = 1024  # SharedLLM: tokens per context chunk
    sharedllm_depth: int = 3  # SharedLLM: how many times each context chunk is halved (tree depth)
    sharedllm_node_positions: int = 32  # SharedLLM: positions kept per tree node
    sharedllm_lower: str = "shared"  # shared (same weights as the upper tower) | copy (own weights)
    sharedllm_trainable: str = "all"  # all | cross (only the cross-attention blocks train)
    sharedllm_select: str = "right"  # right (language modelling) | query (cosine to the query's summary)
    # SharedLLM's random split point in training (eps uniform, seeded per batch row; evaluation: exact halves)
    sharedllm_split_jitter: float = 0.0  # training: split a node of l tokens at l/2 - eps, |eps| <= j*l/2 (0: halves)
    # training input: the first `sharedllm_context_chunks` x `sharedllm_chunk` tokens of each sequence are the
    # context (compressed), the rest is the running text the loss is taken on (SharedLLM: 4 x 1024 + 4096)
    sharedllm_context_chunks: int = 4
    # softmax layers (llama baseline, hybrid S layers, cross-attention)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def layer_kind(self, layer: int) -> str:
        """'L' (lightning) or 'S' (softmax) for a TNL layer: attention_pattern tiled over the layers."""
        return self.attention_pattern[layer % len(self.attention_pattern)]

    def validate(self) -> None:
        """Raise ValueError naming the field when the shapes cannot work."""
        if self.arch not in ("tnl", "llama", "sharedllm"):
            raise ValueError(f"model.arch must be one of ['tnl', 'llama', 'sharedllm'], got {self.arch!r}")
        self._check_ranges()
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
        if not self.attention_pattern or set(self.attention_pattern) - {"L", "S"}:
            raise ValueError(f"model.attention_pattern must be letters L (lightning) / S (softmax) only, "
                             f"e.g. 'LLLLLLLS', got {self.attention_pattern!r}")
        if self.arch == "sharedllm":
            self._validate_sharedllm()

    def _check_ranges(self) -> None:
        for name, (typ, low, inclusive) in RANGES.items():
            value = getattr(self, name)
            rule = f"{'>=' if inclusive else '>'} {low:g}"
            kind = "an integer" if typ is int else "a finite number"
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or (typ is int and not isinstance(value, int)):
                raise ValueError(f"model.{name} must be {kind} {rule}, got {value!r} ({type(value).__name__}); "
                                 f"write it as a bare number (no quotes) in the config or the checkpoint's config")
            if not math.isfinite(value) or value < low or (value == low and not inclusive):
                raise ValueError(f"model.{name} must be {kind} {rule}, got {value!r}; "
                                 f"set --model.{name} to a value {rule}")

    def _validate_sharedllm(self) -> None:
        m = self.sharedllm_layers
        if not 1 <= m <= self.layers:
            raise ValueError(f"model.sharedllm_layers ({m}) must be between 1 and model.layers ({self.layers})")
        if self.sharedllm_context_chunks < 1:
            raise ValueError(f"model.sharedllm_context_chunks must be >= 1, got {self.sharedllm_context_chunks}")
        if self.sharedllm_depth < 1 or self.sharedllm_node_positions < 1:
            raise ValueError(f"model.sharedllm_depth ({self.sharedllm_depth}) and model.sharedllm_node_positions "
                             f"({self.sharedllm_node_positions}) must be positive")
        unit = 2 ** self.sharedllm_depth * self.sharedllm_node_positions
        if self.sharedllm_chunk % unit:
            raise ValueError(f"model.sharedllm_chunk ({self.sharedllm_chunk}) must be a multiple of "
                             f"2^sharedllm_depth * sharedllm_node_positions = {unit}: every tree node (the "
                             f"leaves hold chunk/2^depth tokens) is subsampled by a whole stride")
        j = self.sharedllm_split_jitter
        if isinstance(j, bool) or not isinstance(j, (int, float)) or not (math.isfinite(j) and 0 <= j <= 1):
            raise ValueError(f"model.sharedllm_split_jitter must be a number in [0, 1] (the random split point's "
                             f"reach as a fraction of half a node; 0: exact halves), got {j!r}")
        for name, allowed in (("sharedllm_lower", ("shared", "copy")), ("sharedllm_trainable", ("all", "cross")),
                              ("sharedllm_select", ("right", "query"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if any(self.layer_kind(i) == "S" for i in range(m)):
            raise ValueError(f"model.attention_pattern {self.attention_pattern!r}: the SharedLLM lower tower "
                             f"(the first {m} layers) must be lightning layers 'L'")
