"""Parameter and FLOP counts per token, with lightning attention counted as linear in T.

Covers every arch: TNL and its hybrids (lightning 'L' and softmax 'S' layers, per `attention_pattern`), the
softmax baseline, and SharedLLM, whose count is the average over a whole training sequence of
n*C context tokens (through the lower tower only) and T running-text tokens (decoder + cross-attention).
"""
from __future__ import annotations

import dataclasses

from .config import ModelConfig

LIGHTNING_BLOCK = 64  # intra-block (quadratic) part is over blocks of this size


def _layer_kinds(cfg: ModelConfig) -> list[str]:
    if cfg.arch == "llama":
        return ["S"] * cfg.layers
    return [cfg.layer_kind(i) for i in range(cfg.layers)]


def _mixer_params(cfg: ModelConfig, kind: str) -> int:
    d = cfg.dim
    return 5 * d * d if kind == "L" else 4 * d * d  # qkvu + out (lightning) or q, k, v, o (softmax)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token (embedding lookup excluded, the head included).
    SharedLLM: the decoder's (its cross-attention is counted in `flops_per_token`)."""
    d, g, V = cfg.dim, cfg.glu_dim, cfg.vocab_size
    return sum(_mixer_params(cfg, k) + 3 * d * g for k in _layer_kinds(cfg)) + d * V


def _lightning_flops(cfg: ModelConfig, layer: int, seq_len: int) -> float:
    hd, H = cfg.head_dim, cfg.heads
    dk = 2 * hd if layer in cfg.lrpe_layers else hd
    blk = min(LIGHTNING_BLOCK, seq_len)
    return H * (2 * (dk + hd) * blk / 2 + 4 * dk * hd)


def attention_flops_fwd(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the token-mixing op itself, summed over layers.

    Lightning (per head, per token): intra-block causal (QK^T then PV over ~B/2 keys), plus
    q S (2 Dk Dv) and the state update k^T v (2 Dk Dv). Softmax: causal QK^T and PV over ~T/2 keys.
    LRPE doubles Dk on the layers that use it.
    """
    hd, H = cfg.head_dim, cfg.heads
    total = 0.0
    for layer, kind in enumerate(_layer_kinds(cfg)):
        total += _lightning_flops(cfg, layer, seq_len) if kind == "L" else H * 2 * 2 * hd * (seq_len / 2)
    return total


def _sharedllm_fwd(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a SharedLLM training sequence (context + running text), averaged."""
    d, g, hd, H, m = cfg.dim, cfg.glu_dim, cfg.head_dim, cfg.heads, cfg.sharedllm_layers
    n, c = cfg.sharedllm_context_chunks, cfg.sharedllm_chunk
    context = min(n * c, seq_len - 1)
    text = seq_len - context
    # lower tower per context token: M-1 whole layers over chunks of C, the last one's projections only
    lower = 2 * ((m - 1) * (5 * d * d + 3 * d * g) + 4 * d * d)
    lower += sum(_lightning_flops(cfg, j, c) for j in range(m - 1))
    memory = (context // c) * (cfg.sharedllm_depth + 1) * cfg.sharedllm_node_positions
    decoder = dataclasses.replace(cfg, arch="tnl")
    upper = 2 * matmul_params(decoder) + attention_flops_fwd(decoder, text)
    upper += m * (2 * 2 * d * d + H * 2 * 2 * hd * memory)  # q_proj + o_proj, QK^T + PV over the memory
    return (context * lower + text * upper) / seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """2 FLOPs per weight per token forward (x3 with backward), plus the attention op."""
    if cfg.arch == "sharedllm":
        fwd = _sharedllm_fwd(cfg, seq_len)
    else:
        fwd = 2 * matmul_params(cfg) + attention_flops_fwd(cfg, seq_len)
    return 3 * fwd if training else fwd


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
