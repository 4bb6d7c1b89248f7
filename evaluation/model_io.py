"""What every evaluation talks to: a scoring model with two methods, and the loader that builds one.

The interface (duck-typed, so a test oracle can stand in for a network):

    vocab_size: int
    logits_chunks(ids: (B, T) int64) -> iterator of (start, logits (B, c, V) float32), chunks in order covering T
    generate(ids: (B, T) int64, max_new_tokens: int, eos_id: int | None = None) -> (B, n) int64, new tokens only
    selects_by_query: bool (optional) -> generate/logits_chunks also take query_ids (B, Tq): the question

`ModelRunner` wraps one of our networks. TNL (and its hybrids) runs long inputs in chunks of `chunk_size` tokens, carrying each
layer's fp32 recurrent state (and the global position for LRPE), so a 16x-training-length prompt never holds a
(T, V) logits tensor; the softmax baseline runs the whole input at once and decodes from its key/value cache.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model import ModelConfig, build_model

IGNORE = -100


class ModelRunner:
    """Our model (TNL, a hybrid, SharedLLM or the softmax baseline) behind the evaluation interface.

    SharedLLM reads a long input the way it trained: every whole chunk before the last `text_len` or more
    tokens (its training running text) becomes compressed context, the rest is running text that the decoder
    reads with cross-attention to that memory. Shorter inputs have no context (the plain decoder). Logits of
    context tokens (there is no prediction of them in SharedLLM) come from the decoder alone, so perplexity
    windows cover every position; score windows whose scored tail lies in the running text.

    A SharedLLM with model.sharedllm_select=query (`selects_by_query`) expands, in each context chunk, the half
    most similar to `query_ids` (passkey/needle pass their question); given none (perplexity, MQAR, free
    generation) it expands the right half, as in language modelling.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = 2048, device: str | torch.device = "cpu",
                 text_len: int | None = None):
        self.model = model.eval()
        self.cfg: ModelConfig = model.cfg
        self.vocab_size = self.cfg.vocab_size
        self.chunk_size = int(chunk_size)
        self.device = torch.device(device)
        self.sharedllm = self.cfg.arch == "sharedllm"
        self.text_len = int(text_len) if text_len else 2 * self.cfg.sharedllm_chunk
        # TNL and its hybrids carry states between chunks (a softmax 'S' layer's is its key/value cache); the
        # softmax baseline reads a prompt at once (one causal attention) and then decodes from its key/value cache
        self.recurrent = self.cfg.arch == "tnl"
        self.cached = self.cfg.arch == "llama"

    @property
    def selects_by_query(self) -> bool:
        """Whether a question (query_ids) steers which context the model keeps in detail."""
        return self.sharedllm and self.cfg.sharedllm_select == "query"

    def context_tokens(self, length: int) -> int:
        """SharedLLM: how many leading tokens of a `length`-token input are compressed context (whole chunks)."""
        c = self.cfg.sharedllm_chunk
        return max(0, (length - self.text_len) // c) * c if self.sharedllm else 0

    def _sharedllm_memory(self, ids, query_ids=None, prompt_len: int | None = None):
        ctx = self.context_tokens(ids.shape[1] if prompt_len is None else min(prompt_len, ids.shape[1]))
        if not ctx:
            return 0, None
        chunks = ids[:, :ctx].reshape(ids.shape[0], -1, self.cfg.sharedllm_chunk)
        if query_ids is None or not self.selects_by_query:
            return ctx, self.model.memory(chunks, select="right" if self.selects_by_query else None)
        return ctx, self.model.memory(chunks, query_ids=query_ids.to(self.device))

    @torch.no_grad()
    def logits_chunks(self, ids: torch.Tensor, query_ids: torch.Tensor | None = None, prompt_len: int | None = None):
        """Yield (start, logits (B, n, V)) over `ids`. prompt_len: a SharedLLM splits off its context as it would for
        a prompt that long (what `generate` does for that prompt), so scoring a prompt followed by its answer sees
        the same memory as generating the answer."""
        ids = ids.to(self.device)
        if self.sharedllm:
            ctx, memory = self._sharedllm_memory(ids, query_ids, prompt_len)
            if ctx:
                yield 0, self.model.decoder(ids[:, :ctx]).float()
            yield ctx, self.model(ids[:, ctx:], memory=memory).float()
            return
        if not self.recurrent:
            yield 0, self.model(ids).float()
            return
        states = None
        for start in range(0, ids.shape[1], self.chunk_size):
            logits, states = self.model(ids[:, start:start + self.chunk_size], position_offset=start,
                                        states=states, return_states=True)
            yield start, logits.float()

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                 query_ids: torch.Tensor | None = None, pick=None) -> torch.Tensor:
        """Greedy decoding, or `pick(logits (B, V)) -> (B,)` choosing each token (sampling); rows that emitted
        eos_id are padded with it (and decoding stops when all have). query_ids (B, Tq): the question, read only
        by a SharedLLM that selects by query."""
        pick = pick or (lambda logits: logits.argmax(-1))
        ids = ids.to(self.device)
        states, position, seq = None, 0, ids
        memory = None
        if self.sharedllm:  # the context is compressed once; the running text is re-run every step (no cache)
            ctx, memory = self._sharedllm_memory(ids, query_ids)
            seq = ids[:, ctx:]
            last = self.model(seq, memory=memory)[:, -1]
        elif self.cached:
            logits, states = self.model(ids, return_states=True)
            position, last = ids.shape[1], logits[:, -1]
        for start in range(0, ids.shape[1] if self.recurrent else 0, self.chunk_size):
            # prefill in chunks: only the last logits are kept
            logits, states = self.model(ids[:, start:start + self.chunk_size], position_offset=start,
                                        states=states, return_states=True)
            position = start + logits.shape[1]
            last = logits[:, -1]
        out = []
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            nxt = pick(last)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            out.append(nxt)
            if eos_id is not None and bool(done.all()):
                break
            if self.recurrent or self.cached:
                logits, states = self.model(nxt[:, None], position_offset=position, states=states,
                                            return_states=True)
                position += 1
            else:
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                logits = self.model(seq, memory=memory)
            last = logits[:, -1]
        return torch.stack(out, dim=1).cpu() if out else ids.new_zeros((ids.shape[0], 0)).cpu()


def token_nll(model, ids: torch.Tensor, targets: torch.Tensor, query_ids: torch.Tensor | None = None,
              prompt_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood and greedy hit. ids, targets: (B, T); targets[b, t] is the token that
    should follow ids[b, :t+1] or IGNORE; query_ids: the question, for a model that `selects_by_query`;
    prompt_len: see `ModelRunner.logits_chunks` (a SharedLLM's context split).
    Returns (nll (B, T) float64, zero where ignored; hit (B, T) bool)."""
    nll = torch.zeros(targets.shape, dtype=torch.float64)
    hit = torch.zeros(targets.shape, dtype=torch.bool)
    kw = {"query_ids": query_ids} if query_ids is not None and getattr(model, "selects_by_query", False) else {}
    if prompt_len is not None and getattr(model, "sharedllm", False):
        kw["prompt_len"] = prompt_len
    for start, logits in model.logits_chunks(ids, **kw):
        logits = logits.cpu()
        tgt = targets[:, start:start + logits.shape[1]]
        mask = tgt != IGNORE
        if not bool(mask.any()):
            continue
        safe = tgt.clamp_min(0)
        lp = F.log_softmax(logits.double(), dim=-1).gather(-1, safe[..., None])[..., 0]
        nll[:, start:start + logits.shape[1]] = torch.where(mask, -lp, torch.zeros_like(lp))
        hit[:, start:start + logits.shape[1]] = mask & (logits.argmax(-1) == safe)
    return nll, hit


def argmax_tokens(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) argmax of the next-token distribution at every position."""
    return torch.cat([logits.argmax(-1).cpu() for _, logits in model.logits_chunks(ids)], dim=1)


# ------------------------------------------------------------------------------------------------------------
# loading a run folder, a checkpoint folder or a Hugging Face export
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    runner: ModelRunner
    tokenizer: object | None  # data_pipeline.Tokenizer, or None when none was found
    train_len: int  # the longest training sequence, the unit of the length grids
    prepared_dir: Path | None  # the corpus the run trained on, if recorded and present
    source: str  # which folder the weights came from
    mqar: dict | None = None  # the MQAR spec a model of the MQAR recipe was trained on
    step: int | None = None  # the training step of the weights, when known


def _train_len(data: dict) -> int:
    if not data:
        return 2048
    return int(data.get("seq_len", 2048)) if data.get("loader") == "concat" else int(2 ** data.get("max_log2", 11))


def _from_checkpoint(path: Path):
    from pretrain import checkpoint
    from pretrain.convert import find_tokenizer, model_config_from_meta

    ckpt = checkpoint.resolve(path)
    meta, state = checkpoint.load_model_weights(ckpt)
    cfg = model_config_from_meta(meta)
    data = (meta.get("config") or {}).get("data") or {}
    tok = find_tokenizer(meta, ckpt)
    prepared = Path(data["prepared_dir"]) if data.get("prepared_dir") else None
    step = meta.get("step")
    if step is None and ckpt.name.startswith(checkpoint.PREFIX) and ckpt.name[len(checkpoint.PREFIX):].isdigit():
        step = checkpoint.step_of(ckpt)
    return cfg, state, tok, _train_len(data), prepared, str(ckpt), meta.get("mqar"), step


def load_for_eval(path, device: str = "cpu", chunk_size: int = 2048, tokenizer: str | None = None,
                  sharedllm_select: str | None = None) -> Loaded:
    """Build the model of a run folder (its latest checkpoint), a checkpoint folder, or an HF export folder.

    sharedllm_select: a SharedLLM's context selection at evaluation ('right' or 'query'; parameter-free, so any
    checkpoint can use either); None keeps the checkpoint's."""
    from data_pipeline import load_tokenizer
    from pretrain.convert import is_hf_folder

    path = Path(path)
    if is_hf_folder(path):
        from model.hf.format import read_hf_model

        cfg, state, raw = read_hf_model(path)  # the one HF reader (the converter's)
        tok = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None
        extra = raw.get("lightspan") or {}
        train_len, prepared, source, mqar = int(extra.get("context", 2048)), None, str(path), None
        step = extra.get("step")
    else:
        cfg, state, tok, train_len, prepared, source, mqar, step = _from_checkpoint(path)
        if mqar:
            train_len = int(mqar["seq_len"])
    if sharedllm_select is not None:
        if cfg.arch != "sharedllm":
            raise ValueError(f"--sharedllm-select applies to a SharedLLM checkpoint; {path} holds model.arch "
                             f"{cfg.arch!r}: drop the option")
        cfg = dataclasses.replace(cfg, sharedllm_select=sharedllm_select)
    with torch.device(device):
        model = build_model(cfg)
    model.load_state_dict(state)
    tok_obj = load_tokenizer(tokenizer or tok) if (tokenizer or tok) else None
    text_len = None
    if cfg.arch == "sharedllm":  # its training running text: the sequence after the context chunks
        text_len = max(1, train_len - cfg.sharedllm_context_chunks * cfg.sharedllm_chunk)
    return Loaded(ModelRunner(model, chunk_size, device, text_len), tok_obj, train_len,
                  prepared if prepared is not None and prepared.is_dir() else None, source, mqar,
                  int(step) if step is not None else None)
