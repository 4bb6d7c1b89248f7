"""A softmax Llama-style baseline of the same size as a TNL config, for comparisons.

RMSNorm (with weight) -> causal RoPE softmax attention -> RMSNorm -> SwiGLU; embedding tied to the head when
`tie_embeddings`. Same forward signature as `TransnormerLM`: input_ids (B, T) -> logits (B, T, V). Its attention
is the hybrids' `SoftmaxMixer` (the same strategy object), so sequence parallelism installs ring or Ulysses
attention in it exactly as in every other softmax layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .init import init_parameters, normal
from .stack import run_layers
from .softmax_attention import SoftmaxMixer


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = SoftmaxMixer(cfg, layer)
        self.post_attention_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.glu_dim)

    def forward(self, x, position_offset: int = 0, state=None, return_state: bool = False):
        """state: this layer's key/value cache (see `SoftmaxMixer.forward`); return_state: also return it, extended."""
        a = self.self_attn(self.input_layernorm(x), position_offset, state, return_state)
        a, state = a if return_state else (a, None)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, state) if return_state else x


class LlamaLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): LlamaBlock(cfg, i) for i in range(cfg.layers)})
        self.final_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            init_parameters(self)

    def initial_value(self, name: str, shape, seed: int, device) -> torch.Tensor:
        """Norm weights start at one, every matrix at N(0, init_std); a tied head as its embedding."""
        if name.endswith("layernorm.weight") or name == "final_norm.weight":
            return torch.ones(tuple(shape), device=device)
        if name == "lm_head.weight" and self.cfg.tie_embeddings:
            name = "embed_tokens.weight"
        return normal(seed, name, shape, self.cfg.init_std, device)

    def forward(self, input_ids, position_offset: int = 0, states=None, return_states: bool = False):
        """states: one key/value cache per layer, to continue from (decoding); return_states: also return them."""
        x = self.embed_tokens(input_ids) if self.embed_tokens is not None else input_ids
        x, new_states = run_layers(self.layers.values(), x, position_offset, states, return_states)
        x = self.final_norm(x) if self.final_norm is not None else x
        logits = self.lm_head(x) if self.lm_head is not None else x
        return (logits, new_states) if return_states else logits
