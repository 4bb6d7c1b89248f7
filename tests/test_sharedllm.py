"""SharedLLM compressor: the context tree (node sizes, query-aware choice), cross-attention vs float64,
the lower tower vs the TNL's own layers, the trainable set, and cp=2 parity (memory spread over the ranks,
ring/Ulysses cross-attention, LASP-2 on the decoder) vs one process."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import ModelConfig, build_model
from model.sharedllm import CrossAttention, SharedLLM, build_tree, split_context
from parallel.dist_attention import apply_dist_attention
from parallel.specs.sharedllm import SharedLLMSpec
from parallel.harness import run_distributed
from parallel.lasp import apply_lasp, cp_position_offset
from parallel_parity import check_cp_share


def block_feats(c=1024, block=128):
    """feats[t] = one-hot(t // block): the summary of a span is the share of each block in it."""
    return F.one_hot(torch.arange(c) // block, c // block).float().unsqueeze(0)


def spans(nodes):
    return [(int(start[0]), length) for start, length in nodes]


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
