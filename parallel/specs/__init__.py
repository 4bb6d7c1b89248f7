"""One spec per architecture: how to build it, check its config, parallelize it and prepare its batch.

The trainer and `parallel.parallelize` call a spec and never name an architecture; this package is the only
place in `pretrain/` and `parallel/` that knows them:

    tnl        TransNormerLLM: lightning attention in every layer (LASP under cp)
    hybrid     TNL with softmax 'S' layers (`model.attention_pattern`): LASP on L layers, distributed MHA on S
    llama      the softmax baseline: the same `SoftmaxMixer`, so ring/Ulysses attention under cp like any S layer
    sharedllm  TNL decoder + context compressor (`specs/sharedllm.py`: all of its distributed pieces)

A spec's hooks, each with a default for plain decoders (embed_tokens, layers, final_norm, lm_head):
    build(model_cfg)                    the model on the current default device (meta in the trainer)
    validate(cfg)                       config checks this architecture adds (raise ValueError naming the field)
    apply_tp(model, tp_mesh, cfg, loss_parallel)   the tensor-parallel plan
    apply_cp(model, cp_group, cfg)      sequence parallelism: LASP + distributed MHA on the softmax layers
    fsdp_units(model)                   the blocks FSDP2 shards one by one before the root
    ac_units(model)                     the modules activation checkpointing wraps (forward replaced in place)
    head(model)                         the output projection the fused chunked loss takes over
    layer_names(model) / stage_view(model, names, first, last)   pipeline stages
    loader_cp(cfg)                      whether the loader cuts sequences over cp (else prepare_batch does)
    prepare_batch(batch, cfg, cp_rank, cp_size)    a loader batch -> the model's inputs on this rank
    model_input_keys                    batch keys forwarded to the model beside input_ids/position_offset
"""
from __future__ import annotations

from torch import nn


class ArchSpec:
    name = "?"
    model_input_keys: tuple[str, ...] = ()

    def build(self, model_cfg) -> nn.Module:
        raise NotImplementedError

    def validate(self, cfg) -> None:
        """Raise ValueError naming the field and the fix for a config this architecture cannot train."""

    def apply_tp(self, model, tp_mesh, cfg, loss_parallel: bool, fused_head: bool = False) -> None:
        from parallel.tensor_parallel import apply_tp

        apply_tp(model, tp_mesh, loss_parallel=loss_parallel, sequence_parallel=cfg.parallel.sequence_parallel,
                 fused_head=fused_head)

    def head(self, model) -> nn.Module:
        """The output projection (tied to the embedding) that the fused chunked loss replaces."""
        return model.lm_head

    def apply_cp(self, model, cp_group, cfg) -> None:
        from parallel.dist_attention import apply_dist_attention
        from parallel.lasp import apply_lasp

        apply_lasp(model, cp_group, impl=cfg.parallel.cp_impl)
        apply_dist_attention(model, cp_group, impl=cfg.parallel.attn_cp_impl)

    def fsdp_units(self, model) -> list[nn.Module]:
        return list(model.layers.values())

    def ac_units(self, model) -> list[nn.Module]:
        return list(model.layers.values())

    def layer_names(self, model) -> list[str]:
        return list(model.layers.keys())

    def stage_view(self, model, names: list[str], first: bool, last: bool) -> nn.Module:
        from parallel.pipeline import decoder_stage_view

        return decoder_stage_view(model, names, first, last)

    def loader_cp(self, cfg) -> bool:
        return True

    def prepare_batch(self, batch: dict, cfg, cp_rank: int, cp_size: int) -> dict:
        return batch


class TNLSpec(ArchSpec):
    name = "tnl"

    def build(self, model_cfg):
        from model.tnl import TransnormerLM

        return TransnormerLM(model_cfg)


class HybridSpec(TNLSpec):
    """TNL with softmax layers: the same modules and plans (LASP skips the S layers, MHA takes them)."""

    name = "hybrid"


class LlamaSpec(ArchSpec):
    name = "llama"

    def build(self, model_cfg):
        from model.llama import LlamaLM

        return LlamaLM(model_cfg)

    def validate(self, cfg) -> None:
        if cfg.parallel.tp > 1:
            raise ValueError(f"parallel.tp={cfg.parallel.tp}: tensor parallelism is implemented for the TNL decoder "
                             f"family, not model.arch=llama; use dp, cp (ring/Ulysses) or pp for the baseline")


def spec_for(model_cfg) -> ArchSpec:
    """The spec of `model_cfg.arch` (a TNL with 'S' in its attention_pattern is the hybrid)."""
    arch = model_cfg.arch
    if arch == "tnl":
        return HybridSpec() if "S" in model_cfg.attention_pattern else TNLSpec()
    if arch == "llama":
        return LlamaSpec()
    if arch == "sharedllm":
        from parallel.specs.sharedllm import SharedLLMSpec

        return SharedLLMSpec()
    raise ValueError(f"model.arch must be one of ['tnl', 'llama', 'sharedllm'], got {arch!r}")
