"""TransNormerLLM (TNL) decoder on lightning attention, as the reference code computes it.

Block (pre-norm):  x = x + TokenMixer(SRMSNorm(x));  x = x + SGLU(SRMSNorm(x)).
TokenMixer:        q, k, v, u = split(x W_qkvu);  q, k = silu(q), silu(k)  [then LRPE on listed layers]
                   o_t = sum_{s<=t} lambda_h^{t-s} (q_t . k_s) v_s   (no 1/sqrt(d) scale)
                   y = (SRMSNorm_over_all_heads(o) * u) W_o
Decay:             lambda_{h,l} = exp(-s_h * (1 - l/(L-1) + 1e-5)),  s_h the ALiBi slopes.

The module knows nothing of ranks: sequence parallelism swaps `TokenMixer.attn_op` (a strategy object
with the `lightning_attn` signature) and passes the chunk start as `position_offset`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .init import init_parameters, normal
from .stack import run_layers
from .ops import lightning_attn
from .softmax_attention import SoftmaxMixer


class SRMSNorm(nn.Module):
    """Simple RMSNorm: x * rsqrt(mean(x^2) + eps), no weight. Computed in fp32."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi head slopes 2^(-8(h+1)/H); for non-powers of two, the ALiBi interleave rule."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


def tnl_decay_slopes(heads: int, layer: int, layers: int) -> torch.Tensor:
    """s_{h,l} = s_h * (1 - l/(L-1) + 1e-5); a one-layer model uses factor 1. Returns (H,) float32."""
    factor = 1.0 if layers == 1 else 1.0 - layer / (layers - 1) + 1e-5
    return torch.tensor(alibi_slopes(heads), dtype=torch.float32) * factor


def lrpe_theta(heads: int, head_dim: int) -> torch.Tensor:
    """LRPE's initial frequencies 10000^(-2i/d), i < d = H*head_dim, as (H, 1, head_dim)."""
    d = heads * head_dim
    return (10000 ** (-2.0 / d * torch.arange(d, dtype=torch.float32))).reshape(heads, 1, head_dim)


class Lrpe(nn.Module):
    """Linearized relative positional encoding: x -> concat[x cos(theta t), x sin(theta t)].

    theta: (H, 1, head_dim), initialised 10000^(-2i/d) for i < d = H*head_dim. t is the global position,
    so a sequence shard passes its start as `offset`.
    """

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.theta = nn.Parameter(lrpe_theta(heads, head_dim))

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: (B, H, T, head_dim) -> (B, H, T, 2*head_dim)."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # angles grow with t: never in bf16
        t = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=dtype).reshape(1, -1, 1)
        angle = self.theta.to(dtype) * t  # (H, T, head_dim)
        return torch.cat([x * torch.cos(angle).to(x.dtype), x * torch.sin(angle).to(x.dtype)], dim=-1)


class LocalLightningAttention:
    """The default attention strategy: the whole sequence is on this process."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def __call__(self, q, k, v, slope, initial_state=None, output_final_state=False):
        return lightning_attn(q, k, v, slope, initial_state=initial_state,
                              output_final_state=output_final_state, backend=self.backend)


class TokenMixer(nn.Module):
    """NormLinearAttention. x: (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        hidden = cfg.heads * cfg.head_dim
        self.qkvu_proj = nn.Linear(cfg.dim, 4 * hidden, bias=False)
        self.out_proj = nn.Linear(hidden, cfg.dim, bias=False)
        self.norm = SRMSNorm(cfg.norm_eps)  # spans all heads
        self.lrpe = Lrpe(cfg.heads, cfg.head_dim) if layer in cfg.lrpe_layers else None
        # Fixed decay, not learned and not in the state dict, for heads [head_start, head_start + head_count):
        # all of them, unless tensor parallelism gave this module a range of heads.
        self.layer, self.layers, self.head_start, self.head_count = layer, cfg.layers, 0, cfg.heads
        self.register_buffer("slope", torch.empty(cfg.heads), persistent=False)
        self.reset_buffers()
        self.attn_op = LocalLightningAttention(cfg.attn_backend)

    def reset_buffers(self) -> None:
        """(Re)compute the decay slopes of this module's heads, on the buffer's device."""
        part = tnl_decay_slopes(self.heads, self.layer, self.layers)[self.head_start:self.head_start + self.head_count]
        self.register_buffer("slope", part.to(self.slope.device), persistent=False)

    def forward(self, x, position_offset: int = 0, state=None, return_state: bool = False):
        b, t, _ = x.shape
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
        q, k = F.silu(q), F.silu(k)
        q, k, v = (z.reshape(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if self.lrpe is not None:
            q, k = self.lrpe(q, position_offset), self.lrpe(k, position_offset)
        o, new_state = self.attn_op(q, k, v, self.slope, initial_state=state, output_final_state=return_state)
        o = o.transpose(1, 2).reshape(b, t, -1)
        y = self.out_proj(self.norm(o) * u)
        return (y, new_state) if return_state else y


class SGLU(nn.Module):
    """l3(l1(x) * l2(x)), no activation."""

    def __init__(self, dim: int, glu_dim: int):
        super().__init__()
        self.l1 = nn.Linear(dim, glu_dim, bias=False)
        self.l2 = nn.Linear(dim, glu_dim, bias=False)
        self.l3 = nn.Linear(glu_dim, dim, bias=False)

    def forward(self, x):
        return self.l3(self.l1(x) * self.l2(x))


class TNLBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.token_norm = SRMSNorm(cfg.norm_eps)
        # hybrids (cfg.attention_pattern): an 'S' layer mixes tokens with RoPE softmax attention instead
        self.token_mixer = TokenMixer(cfg, layer) if cfg.layer_kind(layer) == "L" else SoftmaxMixer(cfg, layer)
        self.channel_norm = SRMSNorm(cfg.norm_eps)
        self.channel_mixer = SGLU(cfg.dim, cfg.glu_dim)

    def forward(self, x, position_offset: int = 0, state=None, return_state: bool = False):
        mixed = self.token_mixer(self.token_norm(x), position_offset, state, return_state)
        if return_state:
            mixed, state = mixed
        x = x + mixed
        x = x + self.channel_mixer(self.channel_norm(x))
        return (x, state) if return_state else x


class TransnormerLM(nn.Module):
    """input_ids: (B, T) -> logits (B, T, V). lm_head is tied to the embedding.

    `layers` is an nn.ModuleDict keyed "0".."L-1" so a pipeline stage can drop layers and keep the
    global layer names (torchtitan's convention), which keeps checkpoints layout-independent.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(cfg.dim)
        self.layers = nn.ModuleDict({str(i): TNLBlock(cfg, i) for i in range(cfg.layers)})
        self.final_norm = SRMSNorm(cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            init_parameters(self)

    def initial_value(self, name: str, shape, seed: int, device) -> torch.Tensor:
        """A parameter's initial value by name (see `model.init`): LRPE's frequency table, else N(0, init_std);
        the tied head starts as the embedding it is."""
        if name.endswith("lrpe.theta"):
            return lrpe_theta(self.cfg.heads, self.cfg.head_dim).to(device)
        if name == "lm_head.weight":
            name = "embed_tokens.weight"
        return normal(seed, name, shape, self.cfg.init_std, device)

    def forward(self, input_ids, position_offset: int = 0, states=None, return_states: bool = False):
        """states: optional list, one per layer, to continue from (e.g. when decoding): a lightning layer's fp32
        (B, H, Dk, Dv) state, a hybrid softmax layer's (k, v) cache."""
        x = self.embed_tokens(input_ids) * self.embed_scale if self.embed_tokens is not None else input_ids
        x, new_states = run_layers(self.layers.values(), x, position_offset, states, return_states)
        x = self.final_norm(x) if self.final_norm is not None else x
        logits = self.lm_head(x) if self.lm_head is not None else x
        return (logits, new_states) if return_states else logits
