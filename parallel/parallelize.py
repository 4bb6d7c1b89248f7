"""One entry that parallelizes a built model over the (dp, pp, cp, tp) mesh, in torchtitan's order:
tensor parallel, then sequence parallel (LASP), then data parallel (FSDP2), plus the training step that
every layout shares (micro-batches, vocab-parallel loss, backward without redundant syncs, global clip).

    mesh = build_mesh(cfg.parallel)
    model = parallelize(build_model(cfg.model), mesh, cfg)
    optimizer = build_optimizer(model, cfg.train)          # after: it must see the sharded parameters
    step = TrainStep(model, optimizer, scheduler, cfg, mesh)
    loss, grad_norm = step(batch)

Pipeline parallelism (pp > 1) goes through `parallel.pipeline` (stage module + schedule); DeepSpeed wraps the
model with the optimizer, so `TrainStep` builds its engine.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.data_parallel import apply_deepspeed, apply_fsdp, check_deepspeed, clip_grad_norm, set_grad_sync
from parallel.mesh import DIMS, check_layout
from parallel.tensor_parallel import apply_tp


def dp_mesh(mesh):
    """The 1-D mesh over which weights are replicated and gradients averaged: dp x cp (flattened)."""
    if mesh["cp"].size() == 1:
        return mesh["dp"]
    return mesh["dp", "cp"]._flatten("dp_cp")


def parallelize(model: nn.Module, mesh, cfg, device="cpu"):
    """Apply TP, CP, PP and FSDP2 (per `cfg.parallel`) to a built, unsharded model; returns the model, or
    with pp > 1 a `parallel.pipeline.PipelineRunner` over this rank's stages (its `.module` holds them).

    With dp_engine=deepspeed the data-parallel wrap happens in `TrainStep` (DeepSpeed needs the optimizer).
    """
    p = cfg.parallel
    check_layout(p, mesh.size(), cfg.model)
    if p.dp_engine == "deepspeed":
        check_deepspeed(p)
    if p.tp > 1:
        # Under pp the last stage's loss runs inside the schedule, outside a loss_parallel context: full logits.
        if getattr(model, "cross", None) is not None:  # SharedLLM: the decoder's plan + cross-attention by heads
            from parallel.dist_attention import apply_sharedllm_tp

            if p.sequence_parallel:
                raise ValueError("parallel.sequence_parallel is not supported for SharedLLM; set it to false")
            apply_sharedllm_tp(model, mesh["tp"], loss_parallel=p.pp == 1)
        else:
            apply_tp(model, mesh["tp"], loss_parallel=p.pp == 1, sequence_parallel=p.sequence_parallel)
    if p.cp > 1:
        from parallel.lasp import apply_lasp  # lazy: a layout without cp never needs it

        apply_lasp(model, mesh["cp"].get_group(), impl=p.cp_impl)
        # Softmax layers (hybrid stacks) and SharedLLM cross-attention get distributed MHA; none: a no-op.
        from parallel.dist_attention import apply_dist_attention

        apply_dist_attention(model, mesh["cp"].get_group(), impl=p.attn_cp_impl)
    fsdp = p.dp * p.cp > 1 and p.dp_engine == "fsdp2"
    if p.pp > 1:
        from parallel.pipeline import PipelineRunner  # stages share the (tp/cp-parallelized) modules

        runner = PipelineRunner(model, mesh["pp"], p, device=device)
        if fsdp:
            for stage in runner.stage_modules:
                apply_fsdp(stage, dp_mesh(mesh))
            if runner._tied:  # FSDP replaced the parameter objects: point the tied-gradient exchange at them
                runner._tied = [p for n, p in runner.named_parameters()
                                if n.split(".")[-2:] in (["embed_tokens", "weight"], ["lm_head", "weight"])]
        return runner
    if fsdp:
        apply_fsdp(model, dp_mesh(mesh))
    return model


def trainable_module(parallelized) -> nn.Module:
    """What the optimizer steps: the model, or a pipeline runner's stage module(s)."""
    return parallelized.module if hasattr(parallelized, "stage_modules") else parallelized


MODEL_INPUTS = ("context_chunks", "chunk_offset", "total_chunks")  # batch keys forwarded to the model


def model_inputs(batch: dict) -> dict:
    """The forward arguments a batch carries beyond input_ids and position_offset (SharedLLM's context)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def micro_batches(ids, labels, extra: dict, n: int) -> list[tuple]:
    """Split a batch into n micro-batches along dim 0: (ids, labels, extra) each, tensors split, ints kept."""
    split = {k: v.tensor_split(n) if torch.is_tensor(v) else [v] * n for k, v in extra.items()}
    out = []
    for i, (mb_ids, mb_labels) in enumerate(zip(ids.tensor_split(n), labels.tensor_split(n))):
        if mb_ids.numel():
            out.append((mb_ids, mb_labels, {k: v[i] for k, v in split.items()}))
    return out


def _cross_entropy_sum(logits, labels) -> torch.Tensor:
    """Summed token cross-entropy; vocab-sharded DTensor logits take the loss-parallel path."""
    from torch.distributed.tensor import DTensor

    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss.to_local() if isinstance(loss, DTensor) else loss


class TrainStep:
    """One optimizer step of a parallelized model on this rank's share of the global batch.

    batch: input_ids, labels (B_local, T_local), optional position_offset (cp chunk start) and the model's
    further inputs (`MODEL_INPUTS`: SharedLLM's context chunks, split with the micro-batches). The loss each rank
    backpropagates is local_sum / N_global * G, where N_global counts valid labels over the dp x cp group and
    G is that group's size (the data-parallel engine averages over it), so the update equals the unsharded
    one on the whole batch. Returns (global mean loss, global grad norm) as floats.
    """

    def __init__(self, model, optimizer, scheduler, cfg, mesh=None, autocast=None):
        self.runner = model if hasattr(model, "stage_modules") else None  # pp > 1: a PipelineRunner
        model = trainable_module(model)
        self.cfg, self.mesh = cfg, mesh
        self.grad_accum = cfg.train.grad_accum
        self.autocast = autocast or nullcontext()
        p = cfg.parallel
        self.group = dp_mesh(mesh).get_group() if mesh is not None and p.dp * p.cp > 1 else None
        self.group_size = p.dp * p.cp if self.group is not None else 1
        self.pp_group = mesh["pp"].get_group() if mesh is not None and p.pp > 1 else None
        self.loss_parallel = mesh is not None and p.tp > 1 and self.runner is None
        self.engine = None
        if p.dp_engine == "deepspeed" and self.group is not None:
            self.engine = apply_deepspeed(model, optimizer, scheduler, cfg.train, p.zero_stage, self.group_size,
                                          self.grad_accum)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def _all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x

    def __call__(self, batch: dict) -> tuple[float, float]:
        loss = self.forward_backward(batch)
        return loss, self.optimizer_step()

    def forward_backward(self, batch: dict) -> float:
        """Accumulate this step's gradients over the micro-batches; returns the global mean loss."""
        ids, labels = batch["input_ids"], batch["labels"]
        offset = int(batch.get("position_offset", 0))
        n_global = float(self._all_sum((labels != -100).sum().to(torch.float64)))
        if self.runner is not None:  # micro-batches are the schedule's; its loss is local_sum / n_global
            loss = self.runner.step(ids, labels, position_offset=offset, num_tokens=int(n_global), **model_inputs(batch))
            if self.group_size > 1:  # FSDP averaged over dp x cp what must be a sum (gloo has no PREMUL_SUM)
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.group_size)
            return float(self._all_sum(loss.detach().to(torch.float64)))
        scale = self.group_size / max(n_global, 1.0)
        micro = micro_batches(ids, labels, model_inputs(batch), self.grad_accum)
        total = torch.zeros((), dtype=torch.float64, device=ids.device)
        forward = self.engine if self.engine is not None else self.model
        for n, (mb_ids, mb_labels, mb_extra) in enumerate(micro):
            last = n == len(micro) - 1
            set_grad_sync(self.model, last)
            if self.loss_parallel:
                from torch.distributed.tensor.parallel import loss_parallel

                lp = loss_parallel()
            else:
                lp = nullcontext()
            with lp:  # the vocab-parallel loss needs its context around the backward too
                with self.autocast:
                    logits = forward(mb_ids, position_offset=offset, **mb_extra)
                loss_sum = _cross_entropy_sum(logits, mb_labels)
                if self.engine is not None:
                    self.engine.set_gradient_accumulation_boundary(last)
                    self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
                else:
                    (loss_sum * scale).backward()
            total += loss_sum.detach().to(torch.float64)
        return float(self._all_sum(total)) / max(n_global, 1.0)

    def optimizer_step(self) -> float:
        """Clip by the global grad norm, step optimizer and LR schedule, zero the grads; returns the norm."""
        if self.engine is not None:
            self.engine.step()
            grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        else:
            counted = self.runner.norm_parameters() if self.runner is not None else None
            grad_norm = float(clip_grad_norm(self.model.parameters(), self.cfg.train.grad_clip, self.pp_group,
                                             counted))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm


def fake_mesh(pcfg, model_cfg=None, data_cfg=None):
    """Validate the layout and build the full mesh on the fake process-group backend (no communication).

    Lets `--dry-run` check a 1024-rank layout from one process; this process plays global rank 0.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = 1
    for d in DIMS:
        world *= getattr(pcfg, d)
    check_layout(pcfg, world, model_cfg, data_cfg)
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    from parallel.mesh import build_mesh

    return build_mesh(pcfg, "cpu")
