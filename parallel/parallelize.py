"""The one way a model meets the (dp, pp, cp, tp) mesh, and the one training step, for every world size.

    mesh = build_mesh(cfg.parallel)                     # (1, 1, 1, 1) for a single process
    parallelized = build(cfg, mesh, device)             # meta-device build, sharded, then materialised
    optimizer = build_optimizer(trainable_module(parallelized), cfg.train)
    step = TrainStep(parallelized, optimizer, scheduler, cfg, mesh)
    loss = step.forward_backward(batch); grad_norm, stepped = step.optimizer_step()

`build` constructs the model on the meta device, applies the architecture spec's plans in torchtitan's order
(tensor parallel, sequence parallel (LASP / distributed MHA), activation checkpointing, compile, pipeline stages,
FSDP2), and only then allocates
this rank's shards and fills them with their initial values (`model.init`: each parameter a pure function of
the seed and its name), so a 7B model never exists whole on any rank and every layout starts from the same
weights as one process. A degree-1 dimension is a no-op. DeepSpeed wraps the model with the optimizer, so
`TrainStep` builds its engine.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from parallel.activation_checkpoint import apply_ac
from parallel.data_parallel import apply_deepspeed, apply_fsdp, check_deepspeed, clip_grad_norm, set_grad_sync
from parallel.loss import cross_entropy_sum, loss_targets, valid_tokens
from parallel.mesh import DIMS, check_layout
from parallel.specs import spec_for


def dp_mesh(mesh):
    """The 1-D mesh over which weights are replicated and gradients averaged: dp x cp (flattened)."""
    if mesh["cp"].size() == 1:
        return mesh["dp"]
    return mesh["dp", "cp"]._flatten("dp_cp")


def parallelize(model: nn.Module, mesh, cfg, device="cpu"):
    """Apply TP, CP, PP and FSDP2 (per `cfg.parallel`, through the architecture's spec) to a built, unsharded
    model (materialised or on the meta device); returns the model, or with pp > 1 a
    `parallel.pipeline.PipelineRunner` over this rank's stages (its `.module` holds them).

    With dp_engine=deepspeed the data-parallel wrap happens in `TrainStep` (DeepSpeed needs the optimizer).
    """
    p = cfg.parallel
    spec = spec_for(cfg.model)
    check_layout(p, mesh.size(), cfg.model)
    if p.dp_engine == "deepspeed":
        check_deepspeed(p)
    # The fused chunked head+loss (never full logits) when the loss runs in TrainStep; a pipeline's last stage
    # computes its (micro-batch) logits inside the schedule.
    fused = cfg.train.loss_chunk > 0 and p.pp == 1
    if p.tp > 1:
        # Under pp the last stage's loss runs inside the schedule, outside a loss_parallel context: full logits.
        spec.apply_tp(model, mesh["tp"], cfg, loss_parallel=p.pp == 1, fused_head=fused)
    if fused:
        from parallel.loss import install_fused_head

        sp = mesh["tp"].get_group() if p.tp > 1 and p.sequence_parallel else None
        install_fused_head(spec.head(model), cfg.train.loss_chunk, seq_group=sp)
    if p.cp > 1:
        spec.apply_cp(model, mesh["cp"].get_group(), cfg)
    apply_ac(spec.ac_units(model), cfg.train.activation_checkpointing)
    if cfg.train.compile:
        compile_blocks(spec.ac_units(model))
    fsdp = p.dp * p.cp > 1 and p.dp_engine == "fsdp2"
    if p.pp > 1:
        from parallel.pipeline import PipelineRunner  # stages share the (tp/cp-parallelized) modules

        runner = PipelineRunner(model, mesh["pp"], p, device=device, spec=spec)
        if fsdp:
            for stage in runner.stage_modules:
                apply_fsdp(stage, dp_mesh(mesh), spec.fsdp_units(stage))
        return runner
    if fsdp:
        apply_fsdp(model, dp_mesh(mesh), spec.fsdp_units(model))
    return model


@torch.no_grad()
def materialize(module: nn.Module, full_model: nn.Module, device, seed: int) -> None:
    """Allocate this rank's (meta) shards on `device` and fill them with their initial values.

    full_model: the whole model object (it answers `initial_value` by global name); module: what this rank
    holds (the model, or a pipeline stage view), its parameter names global. One parameter is generated whole
    at a time and only this rank's piece is kept.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    groups: dict[int, list[str]] = {}  # tied parameters (the embedding and the head): to_empty would untie them
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    module.to_empty(device=device)
    for names in groups.values():
        first = module.get_parameter(names[0])
        for alias in names[1:]:
            owner, _, attr = alias.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, attr, first)
    for m in module.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    for name, p in module.named_parameters():
        full = full_model.initial_value(name, p.shape, seed, device).to(p.dtype)
        if isinstance(p, DTensor):
            piece = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(piece)
        else:
            p.copy_(full)


def build(cfg, mesh, device="cpu"):
    """The parallelized model of `cfg` on this rank: a model, or a PipelineRunner under pp (see `parallelize`).

    Built on the meta device and materialised after sharding; the weights equal those of
    `torch.manual_seed(cfg.train.seed); build_model(cfg.model)` in one process, whatever the layout."""
    spec = spec_for(cfg.model)
    with torch.device("meta"):
        model = spec.build(cfg.model)
    parallelized = parallelize(model, mesh, cfg, device=device)
    module = trainable_module(parallelized)
    materialize(module, model, torch.device(device), cfg.train.seed)  # pipeline stages share the module's modules
    return parallelized


def compile_blocks(blocks) -> None:
    """Regional torch.compile: each block's call compiled in place (names and modules unchanged). Dynamic
    lengths: dynamo's automatic dynamic shapes compile a block once for its first length, then once more with the
    length symbolic; lightning attention's block loop still specialises on the number of blocks, so under
    dataset decomposition expect at most one compile per bucket (the cache limit is raised to hold them)."""
    import torch._dynamo

    from parallel.loss import compile_loss

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in blocks:
        block.compile()
    compile_loss()  # and the fused loss's chunk math (another region)


def trainable_module(parallelized) -> nn.Module:
    """What the optimizer steps: the model, or a pipeline runner's stage module(s)."""
    return parallelized.module if hasattr(parallelized, "stage_modules") else parallelized


def micro_batches(ids, labels, extra: dict, n: int) -> list[tuple]:
    """Split a batch into n micro-batches along dim 0: (ids, labels, extra) each, tensors split, ints kept."""
    split = {k: v.tensor_split(n) if torch.is_tensor(v) else [v] * n for k, v in extra.items()}
    out = []
    for i, (mb_ids, mb_labels) in enumerate(zip(ids.tensor_split(n), labels.tensor_split(n))):
        if mb_ids.numel():
            out.append((mb_ids, mb_labels, {k: v[i] for k, v in split.items()}))
    return out


class TrainStep:
    """One optimizer step of a parallelized model on this rank's share of the global batch (any mesh, a
    (1, 1, 1, 1) one included: it is the only training step).

    batch: input_ids, labels (B_local, T_local), optional position_offset (cp chunk start) and the model's
    further inputs (the spec's `model_input_keys`, split with the micro-batches). The loss each rank
    backpropagates is local_sum / N_global * G, where N_global counts valid labels over the dp x cp group and
    G is that group's size (the data-parallel engine averages over it), so the update equals the unsharded
    one on the whole batch.
    """

    def __init__(self, model, optimizer, scheduler, cfg, mesh, autocast=None):
        self.runner = model if hasattr(model, "stage_modules") else None  # pp > 1: a PipelineRunner
        model = trainable_module(model)
        self.cfg, self.mesh = cfg, mesh
        self.input_keys = spec_for(cfg.model).model_input_keys
        self.grad_accum = cfg.train.grad_accum
        self.autocast = autocast or nullcontext()
        p = cfg.parallel
        self.group = dp_mesh(mesh).get_group() if p.dp * p.cp > 1 else None
        self.group_size = p.dp * p.cp if self.group is not None else 1
        self.pp_group = mesh["pp"].get_group() if p.pp > 1 else None
        self.fused = cfg.train.loss_chunk > 0 and self.runner is None  # the model's head returns the loss sum
        self.loss_parallel = p.tp > 1 and self.runner is None and not self.fused
        self.engine = None
        if p.dp_engine == "deepspeed" and self.group is not None:
            self.engine = apply_deepspeed(model, optimizer, scheduler, cfg.train, p.zero_stage, self.group_size,
                                          self.grad_accum)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def _all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x

    def model_inputs(self, batch: dict) -> dict:
        return {k: batch[k] for k in self.input_keys if k in batch}

    def __call__(self, batch: dict) -> tuple[float, float]:
        loss = self.forward_backward(batch)
        return loss, self.optimizer_step()[0]

    def forward_backward(self, batch: dict) -> float:
        """Accumulate this step's gradients over the micro-batches; returns the global mean loss."""
        ids, labels = batch["input_ids"], batch["labels"]
        offset = int(batch.get("position_offset", 0))
        n_global = float(self._all_sum(valid_tokens(labels).to(torch.float64)))
        if self.runner is not None:  # micro-batches are the schedule's; its loss is local_sum / n_global
            loss = self.runner.step(ids, labels, position_offset=offset, num_tokens=int(n_global),
                                    **self.model_inputs(batch))
            if self.group_size > 1:  # FSDP averaged over dp x cp what must be a sum (gloo has no PREMUL_SUM)
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.group_size)
            return float(self._all_sum(loss.detach().to(torch.float64)))
        scale = self.group_size / max(n_global, 1.0)
        micro = micro_batches(ids, labels, self.model_inputs(batch), self.grad_accum)
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
                if self.fused:
                    with self.autocast, loss_targets(mb_labels):
                        loss_sum = forward(mb_ids, position_offset=offset, **mb_extra)
                else:
                    with self.autocast:
                        logits = forward(mb_ids, position_offset=offset, **mb_extra)
                    loss_sum = cross_entropy_sum(logits, mb_labels)
                if self.engine is not None:
                    self.engine.set_gradient_accumulation_boundary(last)
                    self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
                else:
                    (loss_sum * scale).backward()
            total += loss_sum.detach().to(torch.float64)
        return float(self._all_sum(total)) / max(n_global, 1.0)

    @torch.no_grad()
    def evaluate(self, batch: dict) -> float:
        """The global mean loss of a batch (this rank's share, as in `forward_backward`), no gradients."""
        if self.runner is not None:
            raise NotImplementedError("evaluation through the pipeline schedule (pp > 1) is not implemented")
        ids, labels = batch["input_ids"], batch["labels"]
        offset = int(batch.get("position_offset", 0))
        n_global = float(self._all_sum(valid_tokens(labels).to(torch.float64)))
        forward = self.engine if self.engine is not None else self.model
        total = torch.zeros((), dtype=torch.float64, device=ids.device)
        for mb_ids, mb_labels, mb_extra in micro_batches(ids, labels, self.model_inputs(batch), self.grad_accum):
            if self.fused:
                with self.autocast, loss_targets(mb_labels):
                    loss_sum = forward(mb_ids, position_offset=offset, **mb_extra)
            else:
                lp = nullcontext()
                if self.loss_parallel:
                    from torch.distributed.tensor.parallel import loss_parallel

                    lp = loss_parallel()
                with lp, self.autocast:
                    loss_sum = cross_entropy_sum(forward(mb_ids, position_offset=offset, **mb_extra), mb_labels)
            total += loss_sum.to(torch.float64)
        return float(self._all_sum(total)) / max(n_global, 1.0)

    def optimizer_step(self, skip: bool = False) -> tuple[float, bool]:
        """Clip by the global grad norm and step optimizer and LR schedule, then zero the grads.

        Returns (grad norm, stepped). The update is skipped (grads dropped, the schedule still advances) when
        `skip` is set or the global norm is not finite; every rank agrees, the norm being global."""
        if self.engine is not None:
            if skip:
                self.engine.zero_grad()
                self.scheduler.step()
                return float("nan"), False
            self.engine.step()
            return float(self.engine.get_global_grad_norm() or 0.0), True
        counted = self.runner.norm_parameters() if self.runner is not None else None
        grad_norm = float(clip_grad_norm(self.model.parameters(), self.cfg.train.grad_clip, self.pp_group, counted,
                                         clip=not skip))
        stepped = not skip and torch.isfinite(torch.tensor(grad_norm)).item()
        if stepped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, bool(stepped)


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
