"""SharedLLM-style context compressor on TNL (DESIGN section 5).

    logits = SharedLLM(cfg)(input_ids (B, T), context_chunks=(B, n, C))  -> (B, T, V), loss on the running text

Training sequences of n*C + T tokens are cut by `split_context` (n = model.sharedllm_context_chunks); the
trainer does it in `pretrain.data.sharedllm_batch`, which also shares chunks and text out over cp ranks.

Lower tower: the first M layers of a TNL (the decoder's own weights, or a copy), run over each context chunk
independently (positions from 0, always on this process). Per lower layer j it yields the per-position
post-activation keys k = silu(x W_k) and values v = x W_v, (H, hd) per position, i.e. what the lightning
mixer attends with (before LRPE).

Context tree per chunk (depth d, p positions per node): the span [0, C) is halved d times; at each of the
first d-1 halvings one half is expanded further and the other becomes a coarse node; the last halving keeps
both halves as leaves. Each node of length l keeps p positions, the last token of each of its p windows
[floor(i l/p), floor((i+1) l/p)) (a uniform stride l/p when p divides l). C=1024, d=3, p=32: 512->32,
256->32, 2x128->2x32 = 128 positions (8x). Which half to expand: `right` (language modelling: the half
nearest the running text) or `query`: the half whose summary (the mean of the last lower layer's keys over
the half) has the larger cosine similarity with the query's summary (the same mean over `query_ids` run
through the lower tower; at evaluation, the question).

Random split point (the paper's training, `model.sharedllm_split_jitter` j > 0, training mode only): a node of
l tokens splits at b = floor(l/2) - eps, eps a uniform integer with |eps| <= j*l/2, narrowed so that each half
keeps at least p * 2^(levels below it) tokens: every node still holds >= p tokens and every kept position
lies inside the chunk. The draws are a pure function of (`split_seed`, the chunk's global index): one seed
per batch row, which `SharedLLMSpec.prepare_batch` derives from the row's tokens, the step and train.seed, so
every dp/cp/tp/pp rank and micro-batch draws the same tree for the same row, a resumed run the same trees, and
no global RNG state is read or advanced. Evaluation (eval mode) always splits into exact halves.

Context chunks are compressed together: the lower tower runs once over all B*n chunks as one (B*n, C) batch.

Upper tower: the TNL decoder over the running text; in its lowest M layers a cross-attention block follows
the token mixer: x = x + o_proj(Attn(q_proj(SRMSNorm(x)), K_j, V_j)), with no k/v projections (upper layer j
reads lower layer j's keys/values directly). RoPE at chunk level: every key of chunk i has position i, every
query position n (the number of chunks), so a query sees how far back a chunk lies. o_proj starts at zero:
an untrained compressor leaves a pretrained TNL's outputs unchanged.

Under sequence parallelism (`parallel.dist_attention`): each cp rank passes its own chunks (with
`chunk_offset`, `total_chunks`) and its running-text shard; the memory stays spread over the ranks and the
cross-attention's `attn_op` (ring or Ulysses, non-causal) attends to all of it.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .init import init_parameters, normal
from .ops import lightning_attn
from .softmax_attention import LocalSoftmaxAttention, rope
from .tnl import SRMSNorm, TransnormerLM


def split_context(ids: torch.Tensor, n_chunks: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A training sequence (B, n*C + T) -> context chunks (B, n, C) and running text (B, T).

    The loss is taken on the running text only (its next-token labels), as in the SharedLLM LM setting
    (4 x 1024 context + 4096 text from 8192-token sequences; `model.sharedllm_context_chunks` is n).
    """
    b, total = ids.shape
    if total <= n_chunks * chunk:
        raise ValueError(f"a sequence of {total} tokens leaves no running text after the {n_chunks} x {chunk} "
                         f"context tokens: raise the sequence length (data.seq_len / 2^data.min_log2) above "
                         f"{n_chunks * chunk} or lower model.sharedllm_context_chunks")
    return ids[:, :n_chunks * chunk].reshape(b, n_chunks, chunk), ids[:, n_chunks * chunk:]


class CrossAttention(nn.Module):
    """x (B, T, D) attends to a memory k, v (B, H, M, hd); returns (B, T, D). Not causal.

    q_position: the queries' (shared) RoPE position; k_positions: (M,) the keys' positions.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim, self.theta = cfg.heads, cfg.head_dim, cfg.rope_theta
        hidden = cfg.heads * cfg.head_dim
        self.norm = SRMSNorm(cfg.norm_eps)
        self.q_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, cfg.dim, bias=False)
        self.attn_op = LocalSoftmaxAttention()

    def forward(self, x, k, v, q_position: int, k_positions: torch.Tensor):
        b, t, _ = x.shape
        q = self.q_proj(self.norm(x)).reshape(b, t, -1, self.head_dim).transpose(1, 2)
        q = rope(q, torch.full((1,), q_position, device=x.device), self.theta)
        k = rope(k, k_positions, self.theta)
        o = self.attn_op(q, k, v, causal=False)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


def _half_means(cum: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Mean of feats[start : start+length] per row from cum = [0, cumsum(feats)]: (N, C+1, F) -> (N, F)."""
    idx = lambda s: cum.gather(1, s.view(-1, 1, 1).expand(-1, 1, cum.shape[-1])).squeeze(1)  # noqa: E731
    return (idx(start + length) - idx(start)) / length.view(-1, 1).to(cum.dtype)


def split_seeds(ids: torch.Tensor, seed: int = 0, step: int = 0) -> torch.Tensor:
    """(B, L) token ids -> (B,) int64 seeds of the random split points, one per row: a hash of the row's tokens,
    `seed` and `step`. A pure function of the row, so a row draws the same tree on whatever rank or micro-batch
    it lands (see the module docstring)."""
    rows = ids.detach().to("cpu", torch.int64).contiguous().numpy()
    out = []
    for row in rows:
        h = hashlib.blake2b(row.tobytes(), digest_size=8, key=f"{int(seed)}/{int(step)}".encode())
        out.append(int.from_bytes(h.digest(), "little") >> 1)  # 63 bits: a non-negative int64
    return torch.tensor(out, dtype=torch.int64)


def split_draws(split_seed, n_rows: int, chunk_offset: int, n_chunks: int, depth: int) -> torch.Tensor:
    """Uniform [0, 1) draws (n_rows*n_chunks, depth) float64, one per halving of each chunk: row b's chunk i
    (global index chunk_offset + i) from a CPU generator seeded by (split_seed[b], chunk_offset + i) alone.

    split_seed: (n_rows,) int tensor, or an int for every row."""
    seeds = [int(split_seed)] * n_rows if not torch.is_tensor(split_seed) or split_seed.dim() == 0 \
        else [int(s) for s in split_seed.tolist()]
    if len(seeds) != n_rows:
        raise ValueError(f"split_seed holds {len(seeds)} seeds for {n_rows} batch rows")
    out = torch.empty(n_rows * n_chunks, depth, dtype=torch.float64)
    for b, s in enumerate(seeds):
        for i in range(n_chunks):
            g = torch.Generator().manual_seed((s * 1_000_003 + chunk_offset + i) % (1 << 63))
            out[b * n_chunks + i] = torch.rand(depth, generator=g, dtype=torch.float64)
    return out


def build_tree(feats: torch.Tensor, depth: int, node_positions: int, query: torch.Tensor | None = None,
               split_u: torch.Tensor | None = None, jitter: float = 0.0):
    """The context tree of each chunk: which positions its nodes keep.

    feats: (N, C, F) per-position summary features; query: (N, F) or None (always expand the right half);
    split_u: (N, depth) uniform [0, 1) draws and jitter j > 0: random split points (module docstring), else
    exact halves. Returns (index (N, (depth+1)*p) long, every entry in [0, C); nodes [(start (N,), length (N,))]
    in the same order: coarse nodes from the top down, then the two leaves).
    """
    n, c, _ = feats.shape
    p = node_positions
    dev = feats.device
    cum = F.pad(feats.double().cumsum(1), (0, 0, 1, 0)) if query is not None else None
    start = torch.zeros(n, dtype=torch.long, device=dev)
    length = torch.full((n,), c, dtype=torch.long, device=dev)
    random = split_u is not None and jitter > 0
    nodes = []
    for level in range(depth):
        half = length // 2
        if random:
            need = p << (depth - 1 - level)  # each half: p positions for every node that will come from it
            reach = torch.floor(length.double() * (jitter / 2)).long()
            lo = torch.maximum(-reach, need - (length - half))  # the right half keeps >= need
            hi = torch.minimum(reach, half - need)  # the left half keeps >= need
            u = split_u[:, level].to(device=dev, dtype=torch.float64)
            eps = torch.minimum(lo + torch.floor(u * (hi - lo + 1).double()).long(), hi)
            half = half - eps
        left, right, left_len, right_len = start, start + half, half, length - half
        if level == depth - 1:
            nodes += [(left, left_len), (right, right_len)]
            break
        if query is None:
            go_right = torch.ones(n, dtype=torch.bool, device=dev)
        else:
            sim_l = F.cosine_similarity(_half_means(cum, left, left_len), query.double(), dim=-1)
            sim_r = F.cosine_similarity(_half_means(cum, right, right_len), query.double(), dim=-1)
            go_right = sim_r > sim_l
        nodes.append((torch.where(go_right, left, right), torch.where(go_right, left_len, right_len)))
        start, length = torch.where(go_right, right, left), torch.where(go_right, right_len, left_len)
    windows = torch.arange(1, p + 1, device=dev).view(1, -1)
    index = [node_start.view(-1, 1) + (windows * node_len.view(-1, 1)) // p - 1  # last token of each window
             for node_start, node_len in nodes]
    return torch.cat(index, dim=1), nodes


def lower_block(block, x, full: bool = True):
    """One lightning TNL block on whole chunks, always locally; also returns the mixer's k, v.

    x: (N, C, D) -> (x_out, k (N, C, H, hd), v (N, C, H, hd)); x_out is None when not `full` (the last
    lower layer only feeds its keys/values). Same math as TNLBlock/TokenMixer.forward (checked by the
    tests), but never through an installed sequence-parallel op: chunks are not sharded.
    """
    mixer = block.token_mixer
    n, c, _ = x.shape
    q, k, v, u = mixer.qkvu_proj(block.token_norm(x)).chunk(4, dim=-1)
    q, k = F.silu(q), F.silu(k)
    k_out, v_out = k.reshape(n, c, -1, mixer.head_dim), v.reshape(n, c, -1, mixer.head_dim)
    if not full:
        return None, k_out, v_out
    q, k, v = (z.reshape(n, c, -1, mixer.head_dim).transpose(1, 2) for z in (q, k, v))
    if mixer.lrpe is not None:
        q, k = mixer.lrpe(q), mixer.lrpe(k)
    o, _ = lightning_attn(q, k, v, mixer.slope, backend=getattr(mixer.attn_op, "backend", "auto"))
    x = x + mixer.out_proj(mixer.norm(o.transpose(1, 2).reshape(n, c, -1)) * u)
    x = x + block.channel_mixer(block.channel_norm(x))
    return x, k_out, v_out


class SharedLLM(nn.Module):
    """TNL decoder + its own first M layers as a context compressor. See the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.arch != "sharedllm":
            raise ValueError(f"SharedLLM needs model.arch 'sharedllm', got {cfg.arch!r}")
        self.cfg = cfg
        self.decoder = TransnormerLM(dataclasses.replace(cfg, arch="tnl"))
        m = cfg.sharedllm_layers
        self.cross = nn.ModuleDict({str(j): CrossAttention(cfg) for j in range(m)})
        if cfg.sharedllm_lower == "copy":
            self.lower_embed = copy.deepcopy(self.decoder.embed_tokens)
            self.lower_layers = nn.ModuleDict({str(j): copy.deepcopy(self.decoder.layers[str(j)]) for j in range(m)})
        if not any(p.is_meta for p in self.parameters()):
            init_parameters(self)
        self.set_trainable(cfg.sharedllm_trainable)

    def initial_value(self, name: str, shape, seed: int, device) -> torch.Tensor:
        """The decoder's own rule for its weights (a copied lower tower starts as the layers it copies); the
        cross-attention's q_proj N(0, init_std) and o_proj zero, so training starts from the plain decoder."""
        if name.startswith("cross."):
            if name.endswith("o_proj.weight"):
                return torch.zeros(tuple(shape), device=device)
            return normal(seed, name, shape, self.cfg.init_std, device)
        if name.startswith("lower_embed."):
            name = "embed_tokens." + name[len("lower_embed."):]
        elif name.startswith("lower_layers."):
            name = "layers." + name[len("lower_layers."):]
        else:
            name = name[len("decoder."):]
        return self.decoder.initial_value(name, shape, seed, device)

    def set_trainable(self, which: str) -> None:
        """'all': every parameter trains; 'cross': only the cross-attention blocks do."""
        if which not in ("all", "cross"):
            raise ValueError(f"model.sharedllm_trainable must be 'all' or 'cross', got {which!r}")
        for name, p in self.named_parameters():
            p.requires_grad_(which == "all" or name.startswith("cross."))

    def _lower(self):
        if self.cfg.sharedllm_lower == "copy":
            return self.lower_embed, [self.lower_layers[str(j)] for j in range(self.cfg.sharedllm_layers)]
        return self.decoder.embed_tokens, [self.decoder.layers[str(j)] for j in range(self.cfg.sharedllm_layers)]

    def lower_tower(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """ids (N, C) -> per lower layer j, (k_j, v_j) each (N, C, H, hd). Layer M-1 runs only its projections."""
        embed, layers = self._lower()
        x = embed(ids) * self.decoder.embed_scale
        kv = []
        for j, block in enumerate(layers):
            x, k, v = lower_block(block, x, full=j < len(layers) - 1)
            kv.append((k, v))
        return kv

    def context_tree(self, kv, n_chunks: int, query_ids=None, chunk_offset: int = 0, split_seed=None,
                     select: str | None = None):
        """The tree of every chunk from the lower tower's output `kv` over (B*n, C): build_tree's (index, nodes).

        select: 'right' or 'query' (default model.sharedllm_select); split_seed: see `forward`."""
        cfg = self.cfg
        select = select or cfg.sharedllm_select
        rows = kv[-1][0].shape[0] // n_chunks
        query = None
        if select == "query":
            if query_ids is None:
                raise ValueError("model.sharedllm_select='query' needs query_ids (B, Tq)")
            qk = self.lower_tower(query_ids)[-1][0]  # (B, Tq, H, hd)
            query = qk.flatten(2).mean(1).repeat_interleave(n_chunks, dim=0)
        split_u = None
        if self.training and cfg.sharedllm_split_jitter > 0:
            if split_seed is None:
                raise ValueError("model.sharedllm_split_jitter > 0 draws random split points in training from a "
                                 "split_seed per batch row (SharedLLMSpec.prepare_batch adds it); pass split_seed, "
                                 "or call model.eval() for exact halves")
            split_u = split_draws(split_seed, rows, chunk_offset, n_chunks, cfg.sharedllm_depth)
        with torch.no_grad():
            return build_tree(kv[-1][0].flatten(2).detach(), cfg.sharedllm_depth, cfg.sharedllm_node_positions,
                              None if query is None else query.detach(), split_u, cfg.sharedllm_split_jitter)

    def memory(self, context_chunks, query_ids=None, chunk_offset: int = 0, split_seed=None,
               select: str | None = None):
        """context_chunks (B, n, C) -> per layer j, (K_j, V_j) each (B, H, n*P, hd), and key positions (n*P,).

        All B*n chunks go through the lower tower as one batch. select overrides model.sharedllm_select."""
        cfg = self.cfg
        b, n, c = context_chunks.shape
        if c != cfg.sharedllm_chunk:
            raise ValueError(f"context chunks hold {c} tokens but model.sharedllm_chunk is {cfg.sharedllm_chunk}")
        kv = self.lower_tower(context_chunks.reshape(b * n, c))
        index, _ = self.context_tree(kv, n, query_ids, chunk_offset, split_seed, select)
        per_chunk = index.shape[1]
        gather = index.view(b * n, per_chunk, 1, 1)
        mem = []
        for k, v in kv:
            sel = [z.gather(1, gather.expand(-1, -1, *z.shape[2:])) for z in (k, v)]  # (B*n, P, H, hd)
            mem.append(tuple(z.reshape(b, n * per_chunk, *z.shape[2:]).transpose(1, 2) for z in sel))
        positions = torch.arange(chunk_offset, chunk_offset + n, device=index.device).repeat_interleave(per_chunk)
        return mem, positions

    def forward(self, input_ids, position_offset: int = 0, context_chunks=None, memory=None, query_ids=None,
                chunk_offset: int = 0, total_chunks: int | None = None, split_seed=None):
        """input_ids (B, T) running text, context_chunks (B, n, C) -> logits (B, T, V).

        split_seed: (B,) int64 (or an int), the seeds of the random split points (read only in training with
        model.sharedllm_split_jitter > 0; `split_seeds` makes them from whole sequences).

        memory: a precomputed `self.memory(...)` result instead of context_chunks (evaluation decodes many
        steps against one context); neither: no cross-attention (the plain decoder). Under cp: this rank's
        chunks (global `chunk_offset`, of `total_chunks`) and its running-text shard (global start
        `position_offset`). A pipeline stage (a view holding some decoder layers, see
        `parallel.pipeline.stage_view`) takes hidden states when it has no embedding and returns them when
        it has no head; only the stage holding the lowest M layers holds `cross` and reads the context.
        """
        n = None if context_chunks is None else context_chunks.shape[1]
        if memory is None and context_chunks is not None and len(self.cross):
            memory = self.memory(context_chunks, query_ids, chunk_offset, split_seed)
        if memory is not None:
            mem, positions = memory
            q_position = total_chunks if total_chunks is not None else (n if n is not None else int(positions[-1]) + 1)
        dec = self.decoder
        x = dec.embed_tokens(input_ids) * dec.embed_scale if dec.embed_tokens is not None else input_ids
        for name, block in dec.layers.items():
            if memory is not None and name in self.cross:
                x = x + block.token_mixer(block.token_norm(x), position_offset)
                x = x + self.cross[name](x, *mem[int(name)], q_position, positions)
                x = x + block.channel_mixer(block.channel_norm(x))
            else:
                x = block(x, position_offset)
        x = dec.final_norm(x) if dec.final_norm is not None else x
        return dec.lm_head(x) if dec.lm_head is not None else x
