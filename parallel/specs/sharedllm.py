"""SharedLLM's spec: every distributed piece of the TNL decoder + context compressor, in one place.

- config: the lengths the loader emits must leave running text after the n x C context tokens, and the chunks
  and the text must split over cp; the compressor and its cross-attention run on pipeline stage 0; tensor
  parallelism needs the shared lower tower (its heads are the decoder's) and no Megatron-SP.
- batch: the loader reads whole sequences on every cp rank (`loader_cp` False); `prepare_batch` cuts them into
  context chunks (n/cp per rank, compressed there) and a contiguous share of the running text (loss on it only);
  with model.sharedllm_split_jitter > 0 it adds `split_seed` (B,): one seed of the random split points per row,
  hashed from the row's whole sequence, the step and train.seed, so it is the same on every cp/tp/pp rank, under
  any dp split or micro-batching, and after a resume (no RNG state involved).
- tp: the decoder's TNL plan; the shared lower tower runs those same modules, so it yields this rank's heads of
  K_j, V_j, and the cross-attention shards over the same heads (q_proj column-, o_proj row-parallel).
- cp: LASP on the lightning layers, distributed MHA on the cross-attention (the memory spreads over cp).
- FSDP: a shared lower tower runs its blocks twice per forward (over the context chunks, then over the text), so
  those blocks and the cross-attention stay in the root unit; the other decoder blocks and a copied tower's
  blocks are units of their own.
- pp: the stage holding the lowest M layers keeps the compressor; later stages see hidden states.
"""
from __future__ import annotations

from torch import nn

from parallel.specs import ArchSpec


def sequence_lengths(data_cfg) -> tuple[list[int], str]:
    if data_cfg.loader == "concat":
        return [data_cfg.seq_len], "data.seq_len"
    return [1 << i for i in range(data_cfg.min_log2, data_cfg.max_log2 + 1)], "2^data.min_log2"


class SharedLLMSpec(ArchSpec):
    name = "sharedllm"
    model_input_keys = ("context_chunks", "chunk_offset", "total_chunks", "split_seed")

    def build(self, model_cfg):
        from model.sharedllm import SharedLLM

        return SharedLLM(model_cfg)

    # -- config ------------------------------------------------------------------------------------------------
    def validate(self, cfg) -> None:
        m, p = cfg.model, cfg.parallel
        n, c, cp = m.sharedllm_context_chunks, m.sharedllm_chunk, p.cp
        if m.sharedllm_select != "right":
            raise ValueError(f"model.sharedllm_select={m.sharedllm_select!r} needs a query per example (instruction "
                             f"or QA data); language-model pretraining on the corpus expands the half nearest the "
                             f"running text: set model.sharedllm_select=right")
        lengths, field = sequence_lengths(cfg.data)
        short = min(lengths)
        if short <= n * c:
            raise ValueError(f"model.arch=sharedllm: {field} ({short}) leaves no running text after the "
                             f"{n} x {c} context tokens (model.sharedllm_context_chunks x model.sharedllm_chunk): "
                             f"raise {field} above {n * c} or lower model.sharedllm_context_chunks")
        if n % cp:
            raise ValueError(f"model.sharedllm_context_chunks ({n}) not divisible by parallel.cp ({cp}): each cp "
                             f"rank compresses an equal share of the context chunks")
        bad = [t - n * c for t in lengths if (t - n * c) % cp]
        if bad:
            raise ValueError(f"model.arch=sharedllm: running text of {bad[0]} tokens not divisible by parallel.cp "
                             f"({cp})")
        if p.pp > 1 and m.sharedllm_layers > m.layers // p.pp:
            raise ValueError(f"model.sharedllm_layers ({m.sharedllm_layers}) must fit in the first pipeline stage "
                             f"({m.layers // p.pp} layers at parallel.pp={p.pp}): the compressor and the "
                             f"cross-attention it feeds run on stage 0; lower parallel.pp or sharedllm_layers")
        if p.tp > 1 and p.sequence_parallel:
            raise ValueError("parallel.sequence_parallel is not supported for model.arch=sharedllm (its cross-"
                             "attention reads the unsharded sequence); set parallel.sequence_parallel=false")
        if p.tp > 1 and m.sharedllm_lower != "shared":
            raise ValueError("tensor parallelism for model.arch=sharedllm needs model.sharedllm_lower=shared")

    # -- parallelisms ----------------------------------------------------------------------------------------------
    def head(self, model) -> nn.Module:
        return model.decoder.lm_head

    def apply_tp(self, model, tp_mesh, cfg, loss_parallel: bool, fused_head: bool = False) -> None:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        from parallel.tensor_parallel import apply_tp

        if model.cfg.sharedllm_lower != "shared":
            raise ValueError("tensor parallelism for model.arch=sharedllm needs model.sharedllm_lower=shared")
        apply_tp(model.decoder, tp_mesh, loss_parallel=loss_parallel, fused_head=fused_head)
        for ca in model.cross.values():
            parallelize_module(ca, tp_mesh, {"q_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})

    def apply_cp(self, model, cp_group, cfg) -> None:
        from model.sharedllm import CrossAttention
        from parallel.dist_attention import apply_dist_attention
        from parallel.lasp import apply_lasp

        apply_lasp(model, cp_group, impl=cfg.parallel.cp_impl)
        apply_dist_attention(model, cp_group, impl=cfg.parallel.attn_cp_impl, extra_types=(CrossAttention,))

    def fsdp_units(self, model) -> list[nn.Module]:
        shared = model.cfg.sharedllm_lower == "shared"
        m = model.cfg.sharedllm_layers
        blocks = [b for name, b in model.decoder.layers.items() if not (shared and int(name) < m)]
        lower = getattr(model, "lower_layers", None)
        return blocks + (list(lower.values()) if lower else [])

    def ac_units(self, model) -> list[nn.Module]:
        """Decoder blocks above the compressor whole; in the lowest M layers (run piecewise by SharedLLM's
        forward and, shared, by the lower tower) their token and channel mixers and the cross-attention."""
        m = model.cfg.sharedllm_layers
        units = []
        for name, block in model.decoder.layers.items():
            units += [block.token_mixer, block.channel_mixer] if int(name) < m else [block]
        units += list(model.cross.values())
        lower = getattr(model, "lower_layers", None)
        return units + ([b.token_mixer for b in lower.values()] + [b.channel_mixer for b in lower.values()]
                        if lower else [])

    def layer_names(self, model) -> list[str]:
        return list(model.decoder.layers.keys())

    def stage_view(self, model, names: list[str], first: bool, last: bool) -> nn.Module:
        """The decoder's stage view; the first stage keeps the compressor, which must then hold the lowest M
        layers (the context is compressed and read there)."""
        from parallel.mesh import LayoutError
        from parallel.pipeline import decoder_stage_view, shallow_view

        stage = shallow_view(model)
        stage.decoder = decoder_stage_view(model.decoder, names, first, last)
        if first:
            missing = [name for name in model.cross if name not in names]
            if missing:
                raise LayoutError(f"SharedLLM cross-attention layers {missing} fall outside the first pipeline stage "
                                  f"(layers {names}): lower parallel.pp or model.sharedllm_layers")
        else:
            stage.cross = nn.ModuleDict()
            if getattr(model, "lower_layers", None) is not None:
                stage.lower_embed, stage.lower_layers = None, nn.ModuleDict()
        return stage

    # -- data ------------------------------------------------------------------------------------------------------
    def loader_cp(self, cfg) -> bool:
        return False  # every cp rank reads the whole sequences and takes its share after the context split

    def prepare_batch(self, batch: dict, cfg, cp_rank: int = 0, cp_size: int = 1) -> dict:
        """A loader batch of whole sequences (B, n*C + T) -> this cp rank's share of SharedLLM's inputs.

        input_ids / labels: the running text's columns [cp_rank*T/cp, (cp_rank+1)*T/cp) (labels of the context
        are dropped: the loss is on the running text); context_chunks: (B, n/cp, C) this rank's chunks;
        chunk_offset, total_chunks (n) and position_offset (the text shard's start) for `SharedLLM.forward`;
        split_seed (B,) when model.sharedllm_split_jitter > 0 (a pure function of each row, the step and
        train.seed: see `model.sharedllm.split_seeds`).
        """
        from model.sharedllm import split_context, split_seeds

        model_cfg = cfg.model if hasattr(cfg, "model") else cfg
        n, c = model_cfg.sharedllm_context_chunks, model_cfg.sharedllm_chunk
        if int(batch.get("position_offset", 0)):
            raise ValueError("SharedLLM batches need whole sequences: build the loader with cp_size=1")
        chunks, text = split_context(batch["input_ids"], n, c)
        labels = batch["labels"][:, n * c:]
        t = text.shape[1]
        if n % cp_size or t % cp_size:
            raise ValueError(f"SharedLLM context chunks ({n}) and running text ({t} tokens) must both divide by "
                             f"parallel.cp ({cp_size})")
        per_chunks, per_text = n // cp_size, t // cp_size
        cols = slice(cp_rank * per_text, (cp_rank + 1) * per_text)
        out = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
        out.update(input_ids=text[:, cols], labels=labels[:, cols], position_offset=cp_rank * per_text,
                   context_chunks=chunks[:, cp_rank * per_chunks:(cp_rank + 1) * per_chunks],
                   chunk_offset=cp_rank * per_chunks, total_chunks=n)
        if getattr(model_cfg, "sharedllm_split_jitter", 0) > 0:
            seed = int(cfg.train.seed) if hasattr(cfg, "train") else 0
            out["split_seed"] = split_seeds(batch["input_ids"], seed, int(batch.get("step", 0)))
        return out
