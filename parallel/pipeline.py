"""Pipeline parallelism over `torch.distributed.pipelining`: stages split by layers, 1F1B / GPipe / interleaved.

    runner = PipelineRunner(model, pp_group, parallel_cfg, loss_fn=None, device="cpu")
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

Loss scale. `loss_fn(logits (b, T, V), labels (b, T)) -> mean over the micro-batch's valid tokens` (default:
cross entropy ignoring label -100). The runner turns it into the unsharded token-weighted mean: each micro-batch
loss is multiplied by n_valid(micro-batch) / num_tokens, with num_tokens = the batch's valid labels (or the
caller's, e.g. summed over dp/cp ranks), and the schedule's own 1/n_microbatches scaling is switched off
(`scale_grads=False`). The returned loss, the sum over micro-batches, is broadcast from the last stage.

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
import torch.nn.functional as F
from torch import nn

from parallel.mesh import LayoutError

IGNORE_INDEX = -100
SCHEDULES = ("1f1b", "gpipe", "interleaved")


def _process_group(group):
    return group.get_group() if hasattr(group, "get_group") else group


def default_loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the tokens whose label is not -100. logits (b, T, V), labels (b, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


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


def decoder_of(model: nn.Module) -> nn.Module:
    """The module holding `embed_tokens`, `layers`, `final_norm`, `lm_head`: the model, or SharedLLM's decoder."""
    return model.decoder if hasattr(model, "cross") and hasattr(model, "decoder") else model


def _shallow(model: nn.Module) -> nn.Module:
    stage = copy.copy(model)  # same class and forward
    for attr, value in list(vars(stage).items()):  # own submodule/parameter/hook dicts: FSDP hooks one view only
        if isinstance(value, dict):
            object.__setattr__(stage, attr, copy.copy(value))
    return stage


def stage_view(model: nn.Module, layer_names: list[str], first: bool, last: bool) -> nn.Module:
    """The model with only `layer_names`, its embedding only if first, final norm + head only if last.

    Shares submodules and parameters with `model` (no copy of weights). A SharedLLM keeps its compressor
    (cross-attention, a copied lower tower) on the first stage only, which must then hold the lowest M layers:
    the context is compressed and read there, and later stages see hidden states like any decoder's."""
    if model is not decoder_of(model):
        stage = _shallow(model)
        stage.decoder = stage_view(model.decoder, layer_names, first, last)
        if first:
            missing = [name for name in model.cross if name not in layer_names]
            if missing:
                raise LayoutError(f"SharedLLM cross-attention layers {missing} fall outside the first pipeline stage "
                                  f"(layers {layer_names}): lower parallel.pp or model.sharedllm_layers")
        else:
            stage.cross = nn.ModuleDict()
            if getattr(model, "lower_layers", None) is not None:
                stage.lower_embed, stage.lower_layers = None, nn.ModuleDict()
        return stage
    stage = _shallow(model)
    stage.layers = nn.ModuleDict({name: model.layers[name] for name in layer_names})
    if not first:
        stage.embed_tokens = None
    if not last:
        stage.final_norm = None
        stage.lm_head = None
    return stage


class PipelineRunner:
    """One pp rank's stages and the cached schedules. See the module docstring for the contract.

    model: the built (unsharded) model with `embed_tokens`, `layers` (ModuleDict), `final_norm`, `lm_head`.
    pp_group: ProcessGroup or 1-D DeviceMesh of the pipeline dimension. parallel_cfg: has `pp_schedule`,
    `microbatches`. device: where activations live. virtual_stages: stages per rank for "interleaved".
    """

    def __init__(self, model, pp_group, parallel_cfg, loss_fn=None, device="cpu", virtual_stages: int = 2):
        self.group = _process_group(pp_group)
        self.pp_rank, self.pp_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.schedule_name = parallel_cfg.pp_schedule
        if self.schedule_name not in SCHEDULES:
            raise ValueError(f"parallel.pp_schedule must be one of {SCHEDULES}, got {self.schedule_name!r}")
        self.microbatches = parallel_cfg.microbatches
        self.device = torch.device(device)
        self.loss_fn = loss_fn or default_loss_fn
        v = virtual_stages if self.schedule_name == "interleaved" else 1
        self.num_stages = self.pp_size * v
        self.stage_ids = [self.pp_rank + i * self.pp_size for i in range(v)]
        chunks = split_layers(list(decoder_of(model).layers.keys()), self.num_stages)
        self.stage_modules = [stage_view(model, chunks[s], s == 0, s == self.num_stages - 1) for s in self.stage_ids]
        # What the optimizer, grad clipping and checkpoints see: the stage itself, or (interleaved) one view over
        # all of this rank's layers, sharing the stages' submodules, so names stay global ("layers.5....").
        mine = [name for s in self.stage_ids for name in chunks[s]]
        self.module = self.stage_modules[0] if v == 1 else \
            stage_view(model, mine, 0 in self.stage_ids, self.num_stages - 1 in self.stage_ids)
        self.is_first, self.is_last = 0 in self.stage_ids, self.num_stages - 1 in self.stage_ids
        self.first_rank, self.last_rank = 0, (self.num_stages - 1) % self.pp_size
        self._tied = self._tied_parameters(model)
        self._schedules: dict[tuple, object] = {}
        self._num_tokens = 1

    # -- tied weights -------------------------------------------------------------------------------------
    def _tied_parameters(self, model) -> list[nn.Parameter]:
        """Parameters the model registers under several names and that this rank holds as first or last
        stage, when first and last stage sit on different ranks (else autograd already sums them)."""
        if self.first_rank == self.last_rank or not (self.is_first or self.is_last):
            return []
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        mine = {id(p): p for _, p in self.named_parameters()}
        return [mine[i] for i, n in names.items() if len(n) > 1 and i in mine]

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
        n_valid = (labels != IGNORE_INDEX).sum()
        if int(n_valid) == 0:
            return logits.sum() * 0.0
        return self.loss_fn(logits, labels) * (n_valid / self._num_tokens)

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
        self._num_tokens = int(num_tokens) if num_tokens is not None else int((labels != IGNORE_INDEX).sum())
        args = (input_ids.to(self.device),) if self.is_first else ()
        kwargs = {"position_offset": position_offset,
                  **{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in model_kwargs.items()}}
        losses: list[torch.Tensor] = []
        if self.is_last:
            schedule.step(*args, target=labels.to(self.device), losses=losses, return_outputs=False, **kwargs)
        else:
            schedule.step(*args, return_outputs=False, **kwargs)
        if self._tied:
            self._sync_tied_grads()
        loss = torch.stack([x.detach().float() for x in losses]).sum() if self.is_last else \
            torch.zeros((), dtype=torch.float32, device=self.device)
        dist.broadcast(loss, group=self.group, group_src=self.last_rank)
        return loss
