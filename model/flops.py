"""Parameter and FLOP counts per token, with lightning attention counted as linear in T."""
from __future__ import annotations

from .config import ModelConfig

LIGHTNING_BLOCK = 64  # intra-block (quadratic) part is over blocks of this size


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token (embedding lookup excluded, the head included)."""
    d, g, L, V = cfg.dim, cfg.glu_dim, cfg.layers, cfg.vocab_size
    mixer = 4 * d * d + d * d  # qkvu + out (TNL)  or q,k,v,o (llama)
    if cfg.arch == "llama":
        mixer = 4 * d * d
    return L * (mixer + 3 * d * g) + d * V


def attention_flops_fwd(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the token-mixing op itself, summed over layers.

    Lightning (per head, per token): intra-block causal (QK^T then PV over ~B/2 keys), plus
    q S (2 Dk Dv) and the state update k^T v (2 Dk Dv). Softmax: causal QK^T and PV over ~T/2 keys.
    LRPE doubles Dk on the layers that use it.
    """
    hd, H = cfg.head_dim, cfg.heads
    if cfg.arch == "llama":
        return cfg.layers * H * 2 * 2 * hd * (seq_len / 2)
    total = 0.0
    for layer in range(cfg.layers):
        dk = 2 * hd if layer in cfg.lrpe_layers else hd
        blk = min(LIGHTNING_BLOCK, seq_len)
        total += H * (2 * (dk + hd) * blk / 2 + 4 * dk * hd)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """2 FLOPs per weight per token forward (x3 with backward), plus the attention op."""
    fwd = 2 * matmul_params(cfg) + attention_flops_fwd(cfg, seq_len)
    return 3 * fwd if training else fwd


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
