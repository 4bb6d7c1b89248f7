"""Parity worker shared by the parallel tests: unsharded in this process vs sharded over the gloo ranks.

Every rank builds the same tiny model from the same seed, computes the reference on the whole global batch
unsharded, then the sharded run on its share of the batch (dp: rows, cp: a contiguous chunk of columns;
SharedLLM: the context chunks split over cp and a contiguous chunk of the running text, as the trainer does),
and asserts: logits and loss to 1e-5, the full gradient of every parameter to 1e-4, full state-dict values
identical (layout-independent checkpoints), and the losses of `steps` optimizer steps to 1e-4.
"""
from __future__ import annotations

import copy

import torch

from model import build_model
from pretrain.config import Config, ModelConfig
from pretrain.optim import build_optimizer, build_scheduler

B, T = 4, 32
# a SharedLLM small enough for these tests: M=1 compressor layer, 2 context chunks of 16 tokens each
# (depth-2 tree, 4 positions per node: 8->4, 2x4->2x4 = 12 positions) before the T-token running text
SHAREDLLM = dict(arch="sharedllm", sharedllm_layers=1, sharedllm_chunk=16, sharedllm_depth=2,
                 sharedllm_node_positions=4, sharedllm_context_chunks=2)


def tiny_config(parallel: dict, grad_accum: int = 1, backend: str = "naive", **model_kw) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(**{**dict(vocab_size=64, dim=32, layers=2, heads=4, glu_dim=64, lrpe_layers=[0],
                                      attn_backend=backend), **model_kw})
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps = 1e-2, 2, 10
    cfg.train.weight_decay, cfg.train.grad_clip, cfg.train.grad_accum = 0.1, 0.5, grad_accum
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def batch(step: int, model_cfg) -> dict:
    """The global batch of a step; a SharedLLM's is already split into context chunks + running text."""
    from parallel.specs import spec_for

    vocab, sharedllm = model_cfg.vocab_size, model_cfg.arch == "sharedllm"
    context = model_cfg.sharedllm_context_chunks * model_cfg.sharedllm_chunk if sharedllm else 0
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, vocab, (B, context + T), generator=g)
    labels = torch.randint(0, vocab, (B, context + T), generator=g)
    labels[0, context:context + 5] = -100  # uneven valid counts across dp/cp ranks: the loss must stay the global mean
    labels[3, -2:] = -100
    full = {"input_ids": ids, "labels": labels}
    return spec_for(model_cfg).prepare_batch(full, model_cfg, 0, 1)


def shard_batch(full: dict, c) -> dict:
    """This rank's share: rows by dp rank, a contiguous column chunk by cp rank (position_offset its start);
    a SharedLLM's context chunks split over cp too (chunk_offset their start)."""
    dp, cp = c["dp_size"], c["cp_size"]
    rows = slice(c["dp"] * B // dp, (c["dp"] + 1) * B // dp)
    tl = T // cp
    cols = slice(c["cp"] * tl, (c["cp"] + 1) * tl)
    out = {"input_ids": full["input_ids"][rows, cols], "labels": full["labels"][rows, cols],
           "position_offset": c["cp"] * tl}
    if "context_chunks" in full:
        per = full["context_chunks"].shape[1] // cp
        out.update(context_chunks=full["context_chunks"][rows, c["cp"] * per:(c["cp"] + 1) * per],
                   chunk_offset=c["cp"] * per, total_chunks=full["total_chunks"])
    return out


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _unshared(name: str, reference: dict) -> str:
    """The last pipeline stage holds the tied table as `lm_head.weight`; the unsharded model as the embedding."""
    if name.endswith("lm_head.weight") and name not in reference:
        return name[:-len("lm_head.weight")] + "embed_tokens.weight"
    return name


def _grads(model, engine=None) -> dict:
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen (SharedLLM with sharedllm_trainable=cross)
            continue
        if engine is not None:
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        else:
            g = p.grad
        out[name] = _full(g).detach().clone()
    return out


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("context_chunks", "chunk_offset", "total_chunks") if k in batch}


def reference(cfg: Config, steps: int):
    """Unsharded, by hand: logits, mean loss and grads on batch 0, then the losses of `steps` plain steps
    (F.cross_entropy on the whole batch, clip_grad_norm_, AdamW, the schedule): the simple reference that
    every layout's TrainStep, the (1, 1, 1, 1) one included, must reproduce."""
    import torch.nn.functional as F

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    init = copy.deepcopy(model.state_dict())
    b0 = batch(0, cfg.model)
    logits = model(b0["input_ids"], **model_inputs(b0))
    loss = F.cross_entropy(logits.flatten(0, 1), b0["labels"].flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    opt = build_optimizer(model, cfg.train)
    sched = build_scheduler(opt, cfg.train)
    losses = []
    for s in range(steps):
        b = batch(s, cfg.model)
        out = model(b["input_ids"], **model_inputs(b))
        step_loss = F.cross_entropy(out.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        step_loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(step_loss))
    return {"logits": logits.detach(), "loss": float(loss.detach()), "grads": grads, "state": init, "losses": losses}


def parity_worker(rank: int, world: int, parallel: dict, steps: int = 10, grad_accum: int = 1,
                  backend: str = "naive", model_kw: dict | None = None) -> dict:
    from parallel.mesh import build_mesh, coords
    from parallel.parallelize import TrainStep, build, trainable_module

    torch.set_num_threads(1)
    cfg = tiny_config(parallel, grad_accum, backend, **(model_kw or {}))
    ref = reference(cfg, steps)

    mesh = build_mesh(cfg.parallel)
    c = coords(mesh)
    cd = {"dp": c.dp, "cp": c.cp, "dp_size": cfg.parallel.dp, "cp_size": cfg.parallel.cp}
    parallelized = build(cfg, mesh)  # on the meta device, sharded, then materialised: the trainer's path
    model = trainable_module(parallelized)  # a pipeline stage under pp: its parameters keep their global names
    for name, value in model.state_dict().items():
        name = _unshared(name, ref["state"])
        torch.testing.assert_close(_full(value), ref["state"][name], rtol=0, atol=0, msg=f"state {name}")
    opt = build_optimizer(model, cfg.train)
    step = TrainStep(parallelized, opt, build_scheduler(opt, cfg.train), cfg, mesh)

    # logits of this rank's share vs the same rows/columns of the unsharded logits
    b0 = shard_batch(batch(0, cfg.model), cd)
    rows = slice(c.dp * B // cfg.parallel.dp, (c.dp + 1) * B // cfg.parallel.dp)
    cols = slice(b0["position_offset"], b0["position_offset"] + b0["input_ids"].shape[1])
    if cfg.parallel.pp == 1:  # (a pipeline's logits stay inside its schedule; its loss is checked below)
        with torch.no_grad():
            logits = _full((step.engine or model)(b0["input_ids"], position_offset=b0["position_offset"],
                                                  **model_inputs(b0)))
        torch.testing.assert_close(logits, ref["logits"][rows, cols], rtol=1e-5, atol=1e-5, msg="logits")

    loss = step.forward_backward(b0)
    torch.testing.assert_close(loss, ref["loss"], rtol=1e-5, atol=1e-5, msg="loss")
    grads = {_unshared(n, ref["grads"]): g for n, g in _grads(model, step.engine).items()}
    if cfg.parallel.pp == 1:
        assert grads.keys() == ref["grads"].keys(), (sorted(grads), sorted(ref["grads"]))
    worst = 0.0
    for name, g in grads.items():
        torch.testing.assert_close(g, ref["grads"][name], rtol=1e-4, atol=1e-4, msg=f"grad {name}")
        worst = max(worst, float((g - ref["grads"][name]).abs().max()))
    step.optimizer_step()  # batch 0 trained: the steps below go on from the same point as the reference's
    losses = [loss] + [step(shard_batch(batch(s, cfg.model), cd))[0] for s in range(1, steps)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref["losses"]), rtol=1e-4, atol=1e-4,
                               msg="losses over steps")
    return {"grad_err": worst, "losses": losses}


def trainer_args(corpus, out) -> list[str]:
    """CLI overrides for a seconds-long trainer run on the `corpus` fixture (tests of the torchrun path)."""
    return [
        f"--data.source={corpus / 'docs.jsonl'}", f"--data.prepared_dir={corpus / 'prepared'}",
        "--data.min_log2=5", "--data.max_log2=7", "--data.tokens_per_step=512", "--data.cycles=2",
        "--model.vocab_size=512", "--model.dim=32", "--model.layers=2", "--model.heads=2", "--model.glu_dim=64",
        "--model.attn_backend=chunked", "--train.lr=1e-2", "--train.warmup_steps=2", "--train.device=cpu",
        "--train.steps=4", f"--train.out_dir={out}", "--log.every=1", "--log.tensorboard=false",
    ]


def check_cp_share(model, sharded, logits, logits_ref, loss_ref, labels, sl, tag: str = "") -> float:
    """This cp rank's share vs the unsharded run (whose loss_ref.backward() is done).

    logits: this rank's (B, C, V) for tokens `sl`. The local token-sum loss over the global token count, summed
    over cp, is the unsharded mean; logits to 1e-5, loss to 1e-5, every replicated parameter's gradient summed
    over cp to 1e-4. Returns the global loss.
    """
    import torch.distributed as dist
    import torch.nn.functional as F

    loss = F.cross_entropy(logits.flatten(0, 1), labels[:, sl].flatten(), reduction="sum") / labels.numel()
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(logits, logits_ref[:, sl], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, loss_ref.detach(), atol=1e-5, rtol=1e-5)
    ref = dict(model.named_parameters())
    for name, p in sharded.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)  # replicated parameters: grads summed over cp
        torch.testing.assert_close(grad, ref[name].grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{tag} {name}: {m}")
    return float(total)


def cp_share_parity(model, sharded, vocab: int, rank: int, world: int, B: int, T: int, tag: str = "") -> float:
    """A cp-sharded copy of `model` (its token mixers replaced) on this rank's contiguous chunk of a seeded batch
    vs the unsharded model on the whole batch: `check_cp_share`'s assertions. Returns the global loss."""
    import torch.nn.functional as F

    from parallel.lasp import cp_position_offset

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    logits_ref = model(ids)
    loss_ref = F.cross_entropy(logits_ref.flatten(0, 1), labels.flatten())
    loss_ref.backward()
    C = T // world
    sl = slice(rank * C, (rank + 1) * C)
    logits = sharded(ids[:, sl], position_offset=cp_position_offset(rank, C))
    return check_cp_share(model, sharded, logits, logits_ref, loss_ref, labels, sl, tag)
