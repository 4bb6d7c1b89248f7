"""Pipeline parallelism over `torch.distributed.pipelining`: stages split by layers, 1F1B / GPipe / interleaved.

    runner = PipelineRunner(model, pp_group, parallel_cfg, device="cpu", spec=spec)
    loss = runner.step(input_ids, labels, position_offset=0)   # forward + backward of one batch, every pp rank
    optimizer = AdamW(runner.module.parameters()); clip over runner.norm_parameters(); optimizer.step()

Stages. The L layers are cut into n = pp·v contiguous stages (v = 2 virtual stages per rank for the
interleaved schedule, else 1); rank p holds stages p, p+pp, ... (the looped layout of Interleaved1F1B).
A stage module is a view of the model (same class, same forward, same parameter objects) keeping only its
layers, with their global names ("layers.5...."), so state dicts stay layout-independent (torchtitan's
convention; with interleaved stages `runner.module` is one such view over all of the rank's layers): the first stage keeps `embed_tokens`, the last keeps `final_norm` and `lm_head`, the others set
them to None (the model's forward skips a None embedding/head). Drop the reference to the full model after
building the runner so the layers this rank does not run are freed.

Tied embedding / head. `lm_head.weight` is `embed_tokens.weight`: on pp > 1 the first stage holds it as the
embedding and the last stage as the head, two copies on two ranks. After the backward, `step` adds the two
partial gradients (a p2p exchange between the first and last pp rank; both sides compute g_first + g_last,
bit-identical), so both copies see the full gradient and, with identical optimizers, stay identical. For
a global grad norm over pp count that tensor once: `norm_parameters()` leaves it out on the last stage.

Loss scale. Each micro-batch's loss is `parallel.loss.cross_entropy_sum / num_tokens`, with num_tokens = the
batch's valid labels (or the caller's, e.g. summed over dp/cp ranks), and the schedule's own 1/n_microbatches
scaling is switched off (`scale_grads=False`), so the sum over micro-batches is the unsharded token mean. The
returned loss is broadcast from the last stage.

Variable sequence lengths (dataset decomposition). The schedule infers the inter-stage shapes once, at its
first step, so the runner builds one (stages, schedule) per micro-batch shape (b, T) and caches it; a new
length costs one metadata exchange, the next step of the same length none.

Micro-batches: `parallel_cfg.microbatches` splits the batch dimension and must divide it; 1F1B needs at least
as many micro-batches as stages (the schedule says so). `parallel_cfg.pp_schedule`: "1f1b" (default), "gpipe",
"interleaved".
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from parallel.loss import cross_entropy_sum, valid_tokens
from parallel.mesh import LayoutError

SCHEDULES = ("1f1b", "gpipe", "interleaved")


def _process_group(group):
    return group.get_group() if hasattr(group, "get_group") else group


def split_layers(names: list[str], n_stages: int) -> list[list[str]]:
    """Contiguous, as even as possible; the first stages take the remainder."""
    if len(names) < n_stages:
        raise LayoutError(f"model.layers ({len(names)}) is fewer than the pipeline stages ({n_stages})")
    base, extra = divmod(len(names), n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (s < extra)
        out.append(names[start:start + size])
        start += size
    return out


def shallow_view(model: nn.Module) -> nn.Module:
    """A copy of the module object sharing its submodules and parameters (own dicts: FSDP hooks one view only)."""
    stage = copy.copy(model)  # same class and forward
    for attr, value in list(vars(stage).items()):
        if isinstance(value, dict):
            object.__setattr__(stage, attr, copy.copy(value))
    return stage


def decoder_stage_view(model: nn.Module, layer_names: list[str], first: bool, last: bool) -> nn.Module:
    """A decoder with only `layer_names`, its embedding only if first, final norm + head only if last.

    Shares submodules and parameters with `model` (no copy of weights). Other architectures build their views
    in their spec (`parallel.specs`) around this one."""
    stage = shallow_view(model)
    stage.layers = nn.ModuleDict({name: model.layers[name] for name in layer_names})
    if not first:
        stage.embed_tokens = None
    if not last:
        stage.final_norm = None
        stage.lm_head = None
    return stage


class PipelineRunner:
    """One pp rank's stages and the cached schedules. See the module docstring for the contract.

    model: the built (unsharded, possibly meta) model; spec: its `parallel.specs` spec (layer names, stage views;
    default: a plain decoder with `embed_tokens`, `layers` (ModuleDict), `final_norm`, `lm_head`).
    pp_group: ProcessGroup or 1-D DeviceMesh of the pipeline dimension. parallel_cfg: has `pp_schedule`,
    `microbatches`. device: where activations live. virtual_stages: stages per rank for "interleaved".
    """

    def __init__(self, model, pp_group, parallel_cfg, device="cpu", virtual_stages: int = 2, spec=None):
        if spec is None:
            from parallel.specs import TNLSpec

            spec = TNLSpec()
        self.group = _process_group(pp_group)
        self.pp_rank, self.pp_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.schedule_name = parallel_cfg.pp_schedule
        if self.schedule_name not in SCHEDULES:
            raise ValueError(f"parallel.pp_schedule must be one of {SCHEDULES}, got {self.schedule_name!r}")
        self.microbatches = parallel_cfg.microbatches or self.pp_size  # 0: one per stage
        self.device = torch.device(device)
        v = virtual_stages if self.schedule_name == "interleaved" else 1
        self.num_stages = self.pp_size * v
        self.stage_ids = [self.pp_rank + i * self.pp_size for i in range(v)]
        chunks = split_layers(spec.layer_names(model), self.num_stages)
        self.stage_modules = [spec.stage_view(model, chunks[s], s == 0, s == self.num_stages - 1)
                              for s in self.stage_ids]
        # What the optimizer, grad clipping and checkpoints see: the stage itself, or (interleaved) one view over
        # all of this rank's layers, sharing the stages' submodules, so names stay global ("layers.5....").
        mine = [name for s in self.stage_ids for name in chunks[s]]
        self.module = self.stage_modules[0] if v == 1 else \
            spec.stage_view(model, mine, 0 in self.stage_ids, self.num_stages - 1 in self.stage_ids)
        self.is_first, self.is_last = 0 in self.stage_ids, self.num_stages - 1 in self.stage_ids
        self.first_rank, self.last_rank = 0, (self.num_stages - 1) % self.pp_size
        self._tied_names = self._tied_parameter_names(model)
        self._schedules: dict[tuple, object] = {}
        self._num_tokens = 1

    # -- tied weights -------------------------------------------------------------------------------------
    def _tied_parameter_names(self, model) -> set[str]:
        """The names of parameters the model registers under several names (the tied embedding and head), when
        this rank holds them as first or last stage and those sit on different ranks (else autograd sums)."""
        if self.first_rank == self.last_rank or not (self.is_first or self.is_last):
            return set()
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        return {n for aliases in names.values() if len(aliases) > 1 for n in aliases}

    @property
    def _tied(self) -> list[nn.Parameter]:
        """This rank's copy of each tied parameter, looked up by name (materialising or FSDP may replace the
        parameter objects after the runner was built)."""
        return [p for name, p in self.named_parameters() if name in self._tied_names]

    def _align_grads(self) -> None:
        """A tensor-parallel embedding's backward alone (a first stage without the head) yields a replicated
        table gradient; lay it out like the (vocab-sharded) weight, so the exchange between stages and the
        optimizer see matching shards."""
        for _, p in self.named_parameters():
            g = p.grad
            if g is not None and hasattr(g, "placements") and g.placements != p.placements:
                p.grad = g.redistribute(placements=p.placements)

    def _sync_tied_grads(self) -> None:
        peer = self.last_rank if self.pp_rank == self.first_rank else self.first_rank
        for p in self._tied:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            other = torch.empty_like(grad)
            if self.pp_rank == self.first_rank:  # ordered pair: first sends then receives, last the reverse
                dist.send(grad.contiguous(), group=self.group, group_dst=peer)
                dist.recv(other, group=self.group, group_src=peer)
            else:
                dist.recv(other, group=self.group, group_src=peer)
                dist.send(grad.contiguous(), group=self.group, group_dst=peer)
            grad.add_(other)

    def named_parameters(self):
        """(global name, parameter) over this rank's stages, as the unsharded model names them."""
        seen = set()
        for m in self.stage_modules:
            for name, p in m.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def norm_parameters(self) -> list[nn.Parameter]:
        """This stage's parameters counted once across pp: the tied copy is left out on the last stage."""
        skip = {id(p) for p in self._tied} if (self.is_last and not self.is_first) else set()
        return [p for _, p in self.named_parameters() if id(p) not in skip]

    # -- schedules ----------------------------------------------------------------------------------------
    def _scaled_loss(self, logits, labels):
        return cross_entropy_sum(logits, labels) / max(self._num_tokens, 1)

    def _schedule(self, batch: int, seq_len: int):
        key = (batch, seq_len)
        if key not in self._schedules:
            from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                      ScheduleInterleaved1F1B)

            if batch % self.microbatches:
                raise LayoutError(f"parallel.microbatches ({self.microbatches}) does not divide the batch of "
                                  f"{batch} sequences of length {seq_len}")
            stages = [PipelineStage(m, s, self.num_stages, self.device, group=self.group)
                      for m, s in zip(self.stage_modules, self.stage_ids)]
            kw = dict(n_microbatches=self.microbatches, loss_fn=self._scaled_loss, scale_grads=False)
            if self.schedule_name == "interleaved":
                self._schedules[key] = ScheduleInterleaved1F1B(stages, **kw)
            else:
                cls = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
                self._schedules[key] = cls(stages[0], **kw)
        return self._schedules[key]

    def step(self, input_ids, labels, position_offset: int = 0, num_tokens: int | None = None,
             **model_kwargs) -> torch.Tensor:
        """Forward and backward of one batch; gradients accumulate into `self.module` (zero them yourself).

        input_ids, labels: (B, T) (used on the first / last stage); position_offset: global position of
        token 0 (the cp chunk start). num_tokens: the denominator of the mean (default: this batch's valid
        labels). model_kwargs: further forward arguments (SharedLLM's context_chunks (B, n, C), split into
        micro-batches along dim 0 like the ids; ints passed as they are) given to every stage.
        Returns the batch's mean loss, a 0-d fp32 tensor on every pp rank.
        """
        B, T = input_ids.shape
        schedule = self._schedule(B, T)
        self._num_tokens = int(num_tokens) if num_tokens is not None else int(valid_tokens(labels))
        args = (input_ids.to(self.device),) if self.is_first else ()
        kwargs = {"position_offset": position_offset,
                  **{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in model_kwargs.items()}}
        losses: list[torch.Tensor] = []
        if self.is_last:
            schedule.step(*args, target=labels.to(self.device), losses=losses, return_outputs=False, **kwargs)
        else:
            schedule.step(*args, return_outputs=False, **kwargs)
        self._align_grads()
        if self._tied:
            self._sync_tied_grads()
        loss = torch.stack([x.detach().float() for x in losses]).sum() if self.is_last else \
            torch.zeros((), dtype=torch.float32, device=self.device)
        dist.broadcast(loss, group=self.group, group_src=self.last_rank)
        return loss
