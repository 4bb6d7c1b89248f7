"""SharedLLM compressor: the context tree (node sizes, query-aware choice, the random split point of training),
cross-attention vs float64, the lower tower vs the TNL's own layers, the trainable set, and cp=2 parity (memory
spread over the ranks, ring/Ulysses cross-attention, LASP-2 on the decoder; with random split points too) vs one
process."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import ModelConfig, build_model
from model.sharedllm import CrossAttention, SharedLLM, build_tree, split_context, split_draws, split_seeds
from parallel.dist_attention import apply_dist_attention
from parallel.specs.sharedllm import SharedLLMSpec
from parallel.harness import run_distributed
from parallel.lasp import apply_lasp, cp_position_offset
from parallel_parity import check_cp_share


def block_feats(c=1024, block=128):
    """feats[t] = one-hot(t // block): the summary of a span is the share of each block in it."""
    return F.one_hot(torch.arange(c) // block, c // block).float().unsqueeze(0)


def spans(nodes, row=0):
    return [(int(start[row]), int(length[row])) for start, length in nodes]


def test_tree_node_sizes_and_right_policy():
    index, nodes = build_tree(block_feats(), depth=3, node_positions=32)
    # 1024 tokens: 512->32, 256->32, 2x128->2x32 = 128 positions; LM policy expands the right half
    assert spans(nodes) == [(0, 512), (512, 256), (768, 128), (896, 128)]
    assert index.shape == (1, 128)
    assert index[0, :32].tolist() == [16 * i + 15 for i in range(32)]  # stride 16 over [0, 512)
    assert index[0, 32:64].tolist() == [512 + 8 * i + 7 for i in range(32)]  # stride 8
    assert index[0, 64:96].tolist() == [768 + 4 * i + 3 for i in range(32)]  # stride 4
    assert index[0, 96:].tolist() == [896 + 4 * i + 3 for i in range(32)]


def test_tree_query_aware_choice():
    feats = block_feats()
    # a query like block 1 ([128, 256)): expand [0,512) then [0,256); coarse [512,1024) and [256,512)
    _, nodes = build_tree(feats, 3, 32, query=F.one_hot(torch.tensor([1]), 8).float())
    assert spans(nodes) == [(512, 512), (256, 256), (0, 128), (128, 128)]
    # a query like block 6 ([768, 896)): right, then right
    _, nodes = build_tree(feats, 3, 32, query=F.one_hot(torch.tensor([6]), 8).float())
    assert spans(nodes) == [(0, 512), (512, 256), (768, 128), (896, 128)]
    # per row: two chunks, two queries, two different trees
    _, nodes = build_tree(feats.repeat(2, 1, 1), 3, 32, query=F.one_hot(torch.tensor([2, 5]), 8).float())
    assert [int(s) for s in nodes[0][0]] == [512, 0] and [int(s) for s in nodes[1][0]] == [0, 768]


def test_cross_attention_matches_float64():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="sharedllm", vocab_size=10, dim=8, layers=2, heads=2, glu_dim=8, sharedllm_layers=1,
                      sharedllm_chunk=8, sharedllm_depth=1, sharedllm_node_positions=4)
    ca = CrossAttention(cfg).double()
    torch.nn.init.normal_(ca.o_proj.weight)
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, 5, 4, dtype=torch.float64), torch.randn(1, 2, 5, 4, dtype=torch.float64)
    kpos = torch.tensor([0, 0, 1, 1, 2])
    got = ca(x, k, v, 3, kpos)

    hd = 4

    def rope(vec, pos):
        out = vec.clone()
        for i in range(hd // 2):
            a = pos * cfg.rope_theta ** (-2 * i / hd)
            out[i] = vec[i] * math.cos(a) - vec[i + hd // 2] * math.sin(a)
            out[i + hd // 2] = vec[i + hd // 2] * math.cos(a) + vec[i] * math.sin(a)
        return out

    o = torch.zeros(3, 8, dtype=torch.float64)
    for t in range(3):
        xn = x[0, t] / torch.sqrt(x[0, t].pow(2).mean() + 1e-6)
        q = ca.q_proj.weight @ xn
        for h in range(2):
            qh = rope(q[h * hd:(h + 1) * hd], 3)
            s = torch.stack([qh @ rope(k[0, h, m], int(kpos[m])) / math.sqrt(hd) for m in range(5)])
            o[t, h * hd:(h + 1) * hd] = torch.softmax(s, 0) @ v[0, h]
    torch.testing.assert_close(got[0], o @ ca.o_proj.weight.T)


def tiny_cfg(**kw):
    base = dict(arch="sharedllm", vocab_size=64, dim=32, layers=3, heads=2, glu_dim=48, lrpe_layers=[0],
                attn_backend="chunked", sharedllm_layers=2, sharedllm_chunk=16, sharedllm_depth=2,
                sharedllm_node_positions=2)
    base.update(kw)
    return ModelConfig(**base)


def _randomize_cross(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for ca in model.cross.values():
        with torch.no_grad():
            ca.o_proj.weight.copy_(torch.randn(ca.o_proj.weight.shape, generator=g) * 0.2)


def test_lower_tower_is_the_decoder_layers():
    """Lower layer j's k, v equal silu(k), v of the TNL's layer j on the chunk, run by TNLBlock itself."""
    torch.manual_seed(0)
    model = SharedLLM(tiny_cfg())
    ids = torch.randint(0, 64, (3, 16))
    kv = model.lower_tower(ids)
    dec = model.decoder
    x = dec.embed_tokens(ids) * dec.embed_scale
    for j, (k, v) in enumerate(kv):
        block = dec.layers[str(j)]
        _, kk, vv, _ = block.token_mixer.qkvu_proj(block.token_norm(x)).chunk(4, dim=-1)
        torch.testing.assert_close(k.flatten(2), F.silu(kk), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v.flatten(2), vv, atol=1e-6, rtol=1e-6)
        x = block(x)


def test_forward_starts_as_the_decoder_and_trains():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    assert isinstance(model, SharedLLM)
    chunks, ids = torch.randint(0, 64, (2, 3, 16)), torch.randint(0, 64, (2, 8))
    # o_proj starts at zero: an untrained compressor leaves the decoder's logits unchanged
    torch.testing.assert_close(model(ids, context_chunks=chunks), model.decoder(ids))
    _randomize_cross(model)
    logits = model(ids, context_chunks=chunks)
    assert logits.shape == (2, 8, 64)
    assert not torch.allclose(logits, model.decoder(ids))
    mem, pos = model.memory(chunks)
    assert len(mem) == 2 and mem[0][0].shape == (2, 2, 3 * 3 * 2, 16)  # 3 chunks x (depth+1) nodes x 2
    assert pos.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert model.decoder.layers["0"].token_mixer.qkvu_proj.weight.grad.abs().sum() > 0


def test_split_context():
    ids = torch.arange(2 * 40).view(2, 40)
    chunks, text = split_context(ids, 2, 16)
    assert chunks.shape == (2, 2, 16) and text.shape == (2, 8)
    assert chunks[1, 1, 0] == 40 + 16 and text[0].tolist() == list(range(32, 40))
    with pytest.raises(ValueError, match="no running text"):
        split_context(ids, 3, 16)


def test_query_select_needs_query():
    model = SharedLLM(tiny_cfg(sharedllm_select="query"))
    chunks, ids = torch.randint(0, 64, (1, 2, 16)), torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match="needs query_ids"):
        model(ids, context_chunks=chunks)
    assert model(ids, context_chunks=chunks, query_ids=torch.randint(0, 64, (1, 5))).shape == (1, 4, 64)


@pytest.mark.parametrize("lower", ["shared", "copy"])
def test_trainable_set(lower):
    model = SharedLLM(tiny_cfg(sharedllm_trainable="cross", sharedllm_lower=lower))
    _randomize_cross(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"cross.{j}.{p}_proj.weight" for j in range(2) for p in "qo"}
    chunks, ids = torch.randint(0, 64, (1, 2, 16)), torch.randint(0, 64, (1, 4))
    model(ids, context_chunks=chunks).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    everything = SharedLLM(tiny_cfg(sharedllm_trainable="all", sharedllm_lower=lower))
    assert all(p.requires_grad for p in everything.parameters())
    names = {n for n, _ in everything.named_parameters()}
    assert any(n.startswith("lower_layers.") for n in names) == (lower == "copy")


def _cp_parity(rank, world, impl, B=2, n=4, T=8):
    torch.manual_seed(0)
    model = SharedLLM(tiny_cfg())
    _randomize_cross(model)
    sharded = apply_dist_attention(apply_lasp(copy.deepcopy(model), dist.group.WORLD), dist.group.WORLD, impl,
                                   extra_types=(CrossAttention,))
    g = torch.Generator().manual_seed(5)
    chunks = torch.randint(0, 64, (B, n, 16), generator=g)
    ids, labels = torch.randint(0, 64, (B, T), generator=g), torch.randint(0, 64, (B, T), generator=g)

    logits_ref = model(ids, context_chunks=chunks)
    loss_ref = F.cross_entropy(logits_ref.flatten(0, 1), labels.flatten())
    loss_ref.backward()

    C = T // world
    sl = slice(rank * C, (rank + 1) * C)
    per = n // world  # this rank's share of the chunks, as SharedLLMSpec.prepare_batch cuts them
    local_chunks, chunk_offset = chunks[:, rank * per:(rank + 1) * per], rank * per
    logits = sharded(ids[:, sl], context_chunks=local_chunks, position_offset=cp_position_offset(rank, C),
                     chunk_offset=chunk_offset, total_chunks=n)
    return check_cp_share(model, sharded, logits, logits_ref, loss_ref, labels, sl, impl)


def _both(rank, world):
    return [_cp_parity(rank, world, impl) for impl in ("ring", "ulysses")]


def test_sharedllm_cp2_parity():
    """cp=2: each rank compresses its own chunks; ring (then Ulysses) cross-attention over the spread memory."""
    a, b = run_distributed(_both, 2, timeout_s=90)
    assert a == b


def _tp_parity(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = SharedLLM(tiny_cfg())
    _randomize_cross(model)
    sharded = copy.deepcopy(model)
    SharedLLMSpec().apply_tp(sharded, init_device_mesh("cpu", (world,)), None, loss_parallel=False)
    g = torch.Generator().manual_seed(5)
    chunks = torch.randint(0, 64, (2, 3, 16), generator=g)
    ids, labels = torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)
    logits_ref = model(ids, context_chunks=chunks)
    F.cross_entropy(logits_ref.flatten(0, 1), labels.flatten()).backward()
    logits = sharded(ids, context_chunks=chunks)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    ref = dict(model.named_parameters())
    for name, p in sharded.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(grad, ref[name].grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"tp {name}: {m}")
    return True


def test_sharedllm_tp2_parity():
    """tp=2: TNL plan on the decoder (and so the shared lower tower), cross-attention sharded by heads."""
    assert run_distributed(_tp_parity, 2, timeout_s=90) == [True, True]


def test_eval_runner_reads_context_like_training():
    """evaluation's ModelRunner: whole chunks before the last text_len+ tokens are context; logits of the
    running text and greedy decoding equal the model's own forward on (text, context_chunks)."""
    from evaluation.model_io import ModelRunner

    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    _randomize_cross(model)
    runner = ModelRunner(model, text_len=8)
    ids = torch.randint(0, 64, (2, 2 * 16 + 11))  # 43 tokens -> 2 chunks of context + 11 of text
    assert runner.context_tokens(43) == 32 and runner.context_tokens(23) == 0
    chunks = list(runner.logits_chunks(ids))
    assert [s for s, _ in chunks] == [0, 32] and sum(x.shape[1] for _, x in chunks) == 43
    context = ids[:, :32].reshape(2, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(chunks[0][1], model.decoder(ids[:, :32]))
        torch.testing.assert_close(chunks[1][1], model(ids[:, 32:], context_chunks=context))
        seq = ids[:, 32:]
        for _ in range(3):
            seq = torch.cat([seq, model(seq, context_chunks=context)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(runner.generate(ids, 3), seq[:, -3:])
    short = ids[:, :20]  # shorter than text_len + a chunk: no context, the plain decoder
    with torch.no_grad():
        assert [s for s, _ in runner.logits_chunks(short)] == [0]
        torch.testing.assert_close(next(runner.logits_chunks(short))[1], model.decoder(short))


def test_sharedllm_layouts_and_lengths_refused_clearly():
    from pretrain.config import ConfigError, load_config

    base = ["--model.arch=sharedllm", "--model.layers=4", "--model.sharedllm_layers=2", "--model.sharedllm_chunk=64",
            "--model.sharedllm_depth=1", "--model.sharedllm_node_positions=8", "--model.sharedllm_context_chunks=2",
            "--data.loader=concat", "--data.seq_len=256", "--data.tokens_per_step=1024"]
    load_config(None, base)
    with pytest.raises(ConfigError, match=r"data.seq_len \(128\) leaves no running text .* raise data.seq_len above 128"):
        load_config(None, base + ["--data.seq_len=128"])
    with pytest.raises(ConfigError, match=r"sharedllm_context_chunks \(2\) not divisible by parallel.cp \(4\)"):
        load_config(None, base + ["--parallel.cp=4"])
    with pytest.raises(ConfigError, match=r"sharedllm_layers \(2\) must fit in the first pipeline stage \(1 layers"):
        load_config(None, base + ["--parallel.pp=4"])
    with pytest.raises(ConfigError, match="sequence_parallel is not supported"):
        load_config(None, base + ["--parallel.tp=2", "--parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="needs a query per example.*set model.sharedllm_select=right"):
        load_config(None, base + ["--model.sharedllm_select=query"])


def test_sharedllm_batch_shares_context_and_text_over_cp():
    from types import SimpleNamespace

    cfg = SimpleNamespace(sharedllm_context_chunks=2, sharedllm_chunk=4)
    ids = torch.arange(2 * 16).view(2, 16)
    full = {"input_ids": ids, "labels": ids + 1, "seq_len": 16, "position_offset": 0}
    parts = [SharedLLMSpec().prepare_batch(full, cfg, r, 2) for r in range(2)]
    assert parts[1]["context_chunks"].tolist() == [[[4, 5, 6, 7]], [[20, 21, 22, 23]]]
    assert parts[0]["input_ids"][0].tolist() == [8, 9, 10, 11] and parts[1]["labels"][0].tolist() == [13, 14, 15, 16]
    assert [p["position_offset"] for p in parts] == [0, 4] and [p["chunk_offset"] for p in parts] == [0, 1]
    assert parts[0]["total_chunks"] == 2 and parts[0]["seq_len"] == 16


# -- the random split point (training) -------------------------------------------------------------------------
def _check_tree(index, nodes, c, p):
    """Every kept position inside the chunk and inside its own node, p increasing positions per node, every node
    >= p tokens, and the nodes tile [0, c) exactly (coarse nodes + the two leaves)."""
    assert index.min() >= 0 and index.max() < c
    for row in range(index.shape[0]):
        covered = []
        for k, (start, length) in enumerate(nodes):
            s, l = int(start[row]), int(length[row])
            pos = index[row, k * p:(k + 1) * p]
            assert l >= p and bool((pos >= s).all()) and bool((pos < s + l).all())
            assert bool((pos.diff() > 0).all()) and int(pos[-1]) == s + l - 1  # the node's last token is kept
            covered += range(s, s + l)
        assert sorted(covered) == list(range(c))


@pytest.mark.parametrize("jitter", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("query", [False, True])
def test_random_split_keeps_every_position_inside_the_chunk(jitter, query):
    c, depth, p, rows = 64, 3, 4, 200
    feats = torch.randn(rows, c, 6, generator=torch.Generator().manual_seed(1))
    q = torch.randn(rows, 6, generator=torch.Generator().manual_seed(2)) if query else None
    u = split_draws(torch.arange(rows), rows, 0, 1, depth)
    index, nodes = build_tree(feats, depth, p, q, split_u=u, jitter=jitter)
    assert index.shape == (rows, (depth + 1) * p)
    _check_tree(index, nodes, c, p)
    exact, _ = build_tree(feats, depth, p, q)
    assert not torch.equal(index, exact)  # the split points do move...
    first = {int(nodes[0][1][r]) for r in range(rows)}  # ...within |eps| <= jitter * 32
    assert len(first) > 5 and all(abs(l - 32) <= jitter * 32 for l in first)
    # extreme draws (u -> 0 and u -> 1) still leave p positions per node
    for edge in (0.0, 1 - 1e-12):
        index, nodes = build_tree(feats[:3], depth, p, None if q is None else q[:3],
                                  split_u=torch.full((3, depth), edge, dtype=torch.float64), jitter=jitter)
        _check_tree(index, nodes, c, p)


def test_random_split_is_off_by_default_and_exact_when_off():
    feats = torch.randn(4, 64, 6, generator=torch.Generator().manual_seed(0))
    u = split_draws(7, 4, 0, 1, 3)
    exact = build_tree(feats, 3, 4)[0]
    assert torch.equal(build_tree(feats, 3, 4, split_u=u, jitter=0.0)[0], exact)
    assert ModelConfig().sharedllm_split_jitter == 0.0
    # the model: off -> the exact-halves tree in training too; on -> only in training, never at evaluation
    torch.manual_seed(0)
    off = SharedLLM(tiny_cfg(sharedllm_chunk=32))
    on = SharedLLM(tiny_cfg(sharedllm_chunk=32, sharedllm_split_jitter=0.5))
    on.load_state_dict(off.state_dict())
    chunks = torch.randint(0, 64, (3, 2, 32), generator=torch.Generator().manual_seed(1))
    seeds = split_seeds(chunks.flatten(1), seed=1)
    kv = off.lower_tower(chunks.flatten(0, 1))
    ref = off.eval().context_tree(kv, 2)[0]
    assert torch.equal(off.train().context_tree(kv, 2, split_seed=seeds)[0], ref)
    assert torch.equal(on.eval().context_tree(kv, 2, split_seed=seeds)[0], ref)
    got, nodes = on.train().context_tree(kv, 2, split_seed=seeds)
    assert not torch.equal(got, ref)
    _check_tree(got, nodes, 32, 2)
    with pytest.raises(ValueError, match="split_seed"):
        on.train().context_tree(kv, 2)


def test_random_split_is_deterministic_from_the_seed_and_a_function_of_each_row():
    ids = torch.randint(0, 64, (4, 40), generator=torch.Generator().manual_seed(0))
    a = split_seeds(ids, seed=1234, step=7)
    assert torch.equal(a, split_seeds(ids.clone(), seed=1234, step=7)) and a.dtype == torch.int64
    assert len(set(a.tolist())) == 4 and bool((a >= 0).all())
    assert not torch.equal(a, split_seeds(ids, seed=1234, step=8))
    assert not torch.equal(a, split_seeds(ids, seed=1, step=7))
    assert torch.equal(split_seeds(ids[2:]), split_seeds(ids)[2:])  # a dp rank's rows: the same seeds
    # draws: per (seed, global chunk index); a cp rank's chunks [2, 4) equal the slice of all 4
    d = split_draws(a, 4, 0, 4, 3)
    assert torch.equal(d, split_draws(a, 4, 0, 4, 3)) and not torch.equal(d, split_draws(a + 1, 4, 0, 4, 3))
    assert torch.equal(split_draws(a, 4, 2, 2, 3), d.view(4, 4, 3)[:, 2:].reshape(-1, 3))
    assert torch.equal(split_draws(a[1:3], 2, 0, 4, 3), d[4:12])
    # the model, in training: the same seeds give the same memory; other seeds another tree
    torch.manual_seed(0)
    model = SharedLLM(tiny_cfg(sharedllm_split_jitter=0.5)).train()
    _randomize_cross(model)
    chunks, text = torch.randint(0, 64, (4, 4, 16)), torch.randint(0, 64, (4, 8))
    with torch.no_grad():
        one = model(text, context_chunks=chunks, split_seed=a)
        assert torch.equal(one, model(text, context_chunks=chunks, split_seed=a.clone()))
        halves = [model(text[r], context_chunks=chunks[r], split_seed=a[r]) for r in (slice(0, 2), slice(2, 4))]
        torch.testing.assert_close(torch.cat(halves), one)  # micro-batches / dp shares: the same trees per row
        mem_all, _ = model.memory(chunks, split_seed=a)
        mem_cp, _ = model.memory(chunks[:, 2:], chunk_offset=2, split_seed=a)  # cp rank 1 of 2
        torch.testing.assert_close(mem_cp[0][0], mem_all[0][0][:, :, mem_all[0][0].shape[2] // 2:])
        assert not torch.equal(one, model(text, context_chunks=chunks, split_seed=a + 1))


def test_prepare_batch_adds_the_split_seed_only_when_on():
    from types import SimpleNamespace

    ids = torch.arange(2 * 40).view(2, 40) % 64
    full = {"input_ids": ids, "labels": ids + 1, "seq_len": 40, "position_offset": 0, "step": 3}
    off = SharedLLMSpec().prepare_batch(full, tiny_cfg(sharedllm_context_chunks=2), 0, 1)
    assert "split_seed" not in off
    cfg = SimpleNamespace(model=tiny_cfg(sharedllm_context_chunks=2, sharedllm_split_jitter=0.5),
                          train=SimpleNamespace(seed=11))
    parts = [SharedLLMSpec().prepare_batch(full, cfg, r, 2) for r in range(2)]
    assert torch.equal(parts[0]["split_seed"], parts[1]["split_seed"])  # identical on every cp rank
    assert torch.equal(parts[0]["split_seed"], split_seeds(ids, 11, 3))
    assert "split_seed" in SharedLLMSpec.model_input_keys


def _cp_jitter_parity(rank, world, B=2, n=4, T=8):
    """cp=2 with random split points: each rank's batch from prepare_batch (its chunks, the same seeds)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(sharedllm_split_jitter=0.5, sharedllm_context_chunks=n)
    model = SharedLLM(cfg).train()
    _randomize_cross(model)
    sharded = apply_dist_attention(apply_lasp(copy.deepcopy(model), dist.group.WORLD), dist.group.WORLD, "ring",
                                   extra_types=(CrossAttention,))
    g = torch.Generator().manual_seed(5)
    seqs = torch.randint(0, 64, (B, n * 16 + T), generator=g)
    full = {"input_ids": seqs, "labels": torch.randint(0, 64, seqs.shape, generator=g), "step": 4}
    whole, mine = (SharedLLMSpec().prepare_batch(full, cfg, r, w) for r, w in ((0, 1), (rank, world)))
    keys = ("context_chunks", "chunk_offset", "total_chunks", "split_seed")
    logits_ref = model(whole["input_ids"], **{k: whole[k] for k in keys})
    loss_ref = F.cross_entropy(logits_ref.flatten(0, 1), whole["labels"].flatten())
    loss_ref.backward()
    exact = model.eval()(whole["input_ids"], **{k: whole[k] for k in keys})
    model.train()
    assert not torch.allclose(exact, logits_ref)  # the random trees are in use
    logits = sharded(mine["input_ids"], position_offset=mine["position_offset"], **{k: mine[k] for k in keys})
    sl = slice(rank * (T // world), (rank + 1) * (T // world))
    return check_cp_share(model, sharded, logits, logits_ref, loss_ref, whole["labels"], sl, "jitter")


def test_sharedllm_cp2_parity_with_random_split_points():
    a, b = run_distributed(_cp_jitter_parity, 2, timeout_s=90)
    assert a == b


# -- query-aware expansion ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("jitter", [0.0, 0.5])
def test_query_aware_selection_expands_the_half_holding_the_key(jitter):
    """Random background features and one 'key' feature at position k; the query is the key's feature: every
    halving expands the half holding k, so k lies in a leaf (the finest node) wherever it is."""
    c, depth, p = 64, 3, 4
    g = torch.Generator().manual_seed(0)
    key = torch.randn(8, generator=g)
    feats = torch.rand(c, c, 8, generator=g)  # row r: the key at position r
    feats[torch.arange(c), torch.arange(c)] = key * 3
    u = split_draws(torch.arange(c), c, 0, 1, depth) if jitter else None
    index, nodes = build_tree(feats, depth, p, key.expand(c, -1), split_u=u, jitter=jitter)
    _check_tree(index, nodes, c, p)
    for r in range(c):
        leaves = [(int(s[r]), int(l[r])) for s, l in nodes[-2:]]
        assert any(s <= r < s + l for s, l in leaves), (r, spans(nodes, r))
    right, right_nodes = build_tree(feats, depth, p)  # without the query: always the right half
    assert all(spans(right_nodes, r)[-2][0] == 48 for r in range(c))


def test_query_aware_memory_picks_the_key_half_in_the_model():
    """One lower layer (per-token features): filler tokens with a key token at position k; query_ids = the key:
    the tree's leaves hold k, while the right policy keeps k only in coarse nodes when it lies left."""
    torch.manual_seed(0)
    model = SharedLLM(tiny_cfg(sharedllm_layers=1, sharedllm_chunk=32, sharedllm_select="query")).eval()
    chunks = torch.full((6, 1, 32), 5)
    where = [0, 3, 9, 17, 26, 31]
    for row, k in enumerate(where):
        chunks[row, 0, k] = 42
    kv = model.lower_tower(chunks.flatten(0, 1))
    query = torch.full((6, 3), 42)
    _, nodes = model.context_tree(kv, 1, query_ids=query)
    for row, k in enumerate(where):
        assert any(int(s[row]) <= k < int(s[row]) + int(l[row]) for s, l in nodes[-2:]), (k, spans(nodes, row))
    _, right = model.context_tree(kv, 1, select="right")
    assert spans(right, 0) == [(0, 16), (16, 8), (24, 8)]  # key at 0: only in the coarse node


def test_context_chunks_are_compressed_in_one_lower_tower_call():
    model = SharedLLM(tiny_cfg())
    calls = []
    inner = model.lower_tower
    model.lower_tower = lambda ids: calls.append(tuple(ids.shape)) or inner(ids)
    model.memory(torch.randint(0, 64, (2, 3, 16)))
    assert calls == [(6, 16)]  # all B*n chunks as one batch


def test_eval_runner_passes_the_question_as_the_query():
    """ModelRunner of a query-selecting SharedLLM: generate/logits with query_ids equal the model's forward with
    them; without a query it falls back to the right half (language modelling) rather than failing."""
    from evaluation.model_io import ModelRunner

    torch.manual_seed(0)
    model = build_model(tiny_cfg(sharedllm_select="query"))
    _randomize_cross(model)
    runner = ModelRunner(model, text_len=8)
    assert runner.selects_by_query
    ids, q = torch.randint(0, 64, (2, 2 * 16 + 11)), torch.randint(0, 64, (2, 5))
    context = ids[:, :32].reshape(2, 2, 16)
    with torch.no_grad():
        seq = ids[:, 32:]
        for _ in range(3):
            seq = torch.cat([seq, model(seq, context_chunks=context, query_ids=q)[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(runner.generate(ids, 3, query_ids=q), seq[:, -3:])
        text = dict(runner.logits_chunks(ids, query_ids=q))[32]
        torch.testing.assert_close(text, model(ids[:, 32:], context_chunks=context, query_ids=q))
        fallback = dict(runner.logits_chunks(ids))[32]
        torch.testing.assert_close(fallback, model(ids[:, 32:], memory=model.memory(context, select="right")))
