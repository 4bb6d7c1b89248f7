"""An lm-eval `LM` for our models, registered as "lightspan".

    lightspan-lm-eval --model lightspan --model_args path=runs/tiny --tasks TASK ...
    # the same: python -m evaluation.lm_eval_adapter ...
    # or, in Python: import evaluation.lm_eval_adapter, then lm_eval.simple_evaluate(model="lightspan", ...)

lm-eval finds models only through its registry, filled by imports (it has no plugin entry points), so the
plain `lm_eval` command does not see this one: `lightspan-lm-eval` (installed with the project) is that very
command with "lightspan" registered first.
lm-eval is imported when this module is; the rest of `evaluation` never imports this module.

Scoring, in our tokens (sentencepiece, no BOS; an empty context is replaced by EOS, lm-eval's convention):
- loglikelihood(context, continuation): log p(continuation | context) summed over the continuation's tokens,
  and whether each of them is the argmax; the input keeps the last max_length + 1 tokens.
- loglikelihood_rolling(text): log p(text | EOS) over windows of max_length + 1 tokens advancing by
  max_length, so every token is scored once with as much context as fits (evaluation.perplexity.windows).
- generate_until(context, {until, max_gen_toks}): greedy, cut at the first stop string.

Batching (model_args batch_size=N, or auto: rows filling batch_tokens padded tokens, at most max_batch_size;
lm-eval's --batch_size sets it, default 1): scoring rows are sorted longest first and right-padded, padding
never scored. Every model here is causal and keeps absolute positions, so padding after a row changes none of its
logits and a batch scores what one row at a time does (tested to 1e-5). SharedLLM, whose context/running-text
split depends on the input length, batches only rows of equal length. generate_until batches requests of equal
prompt length and token limit (no padding: left padding would shift TNL's recurrent state and positions).
A tqdm bar counts requests (loglikelihood_rolling: windows); lm-eval's disable_tqdm turns it off.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from .model_io import IGNORE
from .perplexity import window_targets, windows

try:
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model
except ImportError:  # the adapter's methods still work (and are tested) without lm-eval
    _Base, register_model = object, None


def _args(request) -> tuple:
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


def _batches(lengths: list[int], batch_size: int | None, batch_tokens: int, max_batch_size: int,
             same_length: bool = False) -> list[list[int]]:
    """Indices of rows grouped into batches, longest first (the largest batch runs first; similar lengths pad
    little). batch_size N: at most N rows; None ("auto"): rows x longest length <= batch_tokens, at most
    max_batch_size rows. same_length: only rows of one length share a batch (no padding at all)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    out: list[list[int]] = []
    for i in order:
        cur = out[-1] if out else None
        if cur is not None:
            width, rows = lengths[cur[0]], len(cur) + 1
            full = rows > batch_size if batch_size else (rows > max_batch_size or rows * width > batch_tokens)
            if not (full or (same_length and lengths[i] != width)):
                cur.append(i)
                continue
        out.append([i])
    return out


class LightspanLM(_Base):
    """model_args: path (run folder, checkpoint folder or HF export), tokenizer, max_length, max_gen_toks,
    device (auto: cuda when visible, else cpu), chunk_size (TNL tokens per forward), batch_size (rows per
    forward, or "auto": fill batch_tokens padded tokens, at most max_batch_size rows), batch_tokens."""

    def __init__(self, path: str | None = None, runner=None, tokenizer=None, max_length: int | None = None,
                 max_gen_toks: int = 256, device: str | None = "auto", chunk_size: int = 2048,
                 batch_size: int | str | None = 1, max_batch_size: int | None = 64, batch_tokens: int = 16384,
                 **_lm_eval_extras):
        super().__init__()
        if runner is None:
            from .distributed import resolve_device
            from .model_io import load_for_eval

            if path is None:
                raise ValueError("lightspan: pass model_args path=RUN_OR_CHECKPOINT_OR_HF_FOLDER")
            requested = str(device or "auto")
            if requested.startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI may pass device=cuda unless told otherwise: on a CPU-only machine, run on the CPU
                print(f"[lightspan] device {requested!r} requested but no CUDA device is visible: using cpu",
                      flush=True)
                requested = "cpu"
            device = resolve_device(requested)
            loaded = load_for_eval(path, device=device, chunk_size=int(chunk_size),
                                   tokenizer=tokenizer if isinstance(tokenizer, str) else None)
            runner, max_length = loaded.runner, max_length or loaded.train_len
            tokenizer = loaded.tokenizer if not hasattr(tokenizer, "encode") else tokenizer
        if tokenizer is None or not hasattr(tokenizer, "encode"):
            raise ValueError("lightspan: no tokenizer found for this model; pass model_args tokenizer=PATH")
        self.runner, self.tok = runner, tokenizer
        self._device = getattr(runner, "device", None)
        self.max_length = int(max_length or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.prefix_id = tokenizer.eos_id
        size = str(batch_size if batch_size is not None else 1).strip().lower()
        if size.startswith("auto"):  # lm-eval's "auto" / "auto:N": here, a padded-token budget per forward
            self._rows = None
        elif size.isdigit() and int(size) >= 1:
            self._rows = int(size)
        else:
            raise ValueError(f"lightspan: batch_size must be a positive integer or auto, got {batch_size!r}")
        self.max_batch_size = int(max_batch_size or 64)
        self.batch_tokens = int(batch_tokens)
        if self.max_batch_size < 1 or self.batch_tokens < 1:
            raise ValueError("lightspan: max_batch_size and batch_tokens must be >= 1")
        # SharedLLM splits an input into context and running text by its length: rows are batched unpadded
        self._same_length = bool(getattr(runner, "sharedllm", False))

    @property
    def batch_size(self):
        return self._rows or "auto"

    # -- helpers -------------------------------------------------------------------------------------------
    def _split(self, context: str, continuation: str) -> tuple[list, list]:
        """Token ids of context and continuation, tokenized together where the split is clean."""
        if not context:
            return [self.prefix_id], self.tok.encode(continuation)
        ctx, whole = self.tok.encode(context), self.tok.encode(context + continuation)
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.tok.encode(continuation)

    def _row(self, ctx: list, cont: list) -> tuple[list, list]:
        """(input ids, targets) scoring cont after ctx; the input keeps the last max_length + 1 tokens."""
        full = (ctx + cont)[-(self.max_length + 1):]
        ids = full[:-1]
        n = min(len(cont), len(ids))
        return ids, [IGNORE] * (len(ids) - n) + full[len(full) - n:]

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        return _batches(lengths, self._rows, self.batch_tokens, self.max_batch_size,
                        self._same_length)

    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[list, list]]) -> list[tuple[float, bool]]:
        """(sum of log p over each row's targets, whether every target is the argmax) for rows of
        (ids, targets) of any lengths: right-padded (the models are causal, so padding after a row's tokens
        changes none of its logits; positions keep their offsets), padding never scored."""
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.prefix_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for r, (row_ids, row_targets) in enumerate(rows):
            ids[r, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            targets[r, :len(row_targets)] = torch.tensor(row_targets, dtype=torch.long)
        logprob = torch.zeros(len(rows), dtype=torch.float64)
        missed = torch.zeros(len(rows), dtype=torch.long)
        for start, logits in self.runner.logits_chunks(ids):
            tgt = targets[:, start:start + logits.shape[1]].to(logits.device)
            where = (tgt != IGNORE).nonzero()
            # only the scored positions, in slices: log-softmax in float64 over (positions, vocab)
            step = max(1, (1 << 26) // logits.shape[-1])
            for lo in range(0, where.shape[0], step):
                rr, cc = where[lo:lo + step, 0], where[lo:lo + step, 1]
                sel, want = logits[rr, cc], tgt[rr, cc]
                lp = torch.log_softmax(sel.double(), dim=-1).gather(-1, want[:, None])[:, 0]
                logprob.index_add_(0, rr.cpu(), lp.cpu())
                missed.index_add_(0, rr.cpu(), (sel.argmax(-1) != want).long().cpu())
        return [(float(logprob[r]), bool(missed[r] == 0)) for r in range(len(rows))]

    def _cache(self, kind: str, request, answer) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None and hasattr(request, "args"):
            hook.add_partial(kind, request.args, answer)

    # -- the LM interface ----------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = [self._row(*self._split(*_args(r)[:2])) for r in requests]
        out: list = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="lightspan loglikelihood", disable=disable_tqdm)
        for batch in self._batches([len(ids) for ids, _ in rows]):
            scorable = [i for i in batch if rows[i][0]]  # an empty continuation scores 0, greedily
            for i, result in zip(scorable, self._score_batch([rows[i] for i in scorable]) if scorable else []):
                out[i] = result
            for i in batch:
                out[i] = out[i] or (0.0, True)
                self._cache("loglikelihood", requests[i], out[i])
            bar.update(len(batch))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []  # every window of every text is one row
        for k, r in enumerate(requests):
            stream = torch.tensor([self.prefix_id] + self.tok.encode(_args(r)[0]), dtype=torch.long)
            for begin, end, first in windows(len(stream), self.max_length + 1, self.max_length):
                ids, targets = window_targets(stream, begin, end, first)
                rows.append((ids.tolist(), targets.tolist()))
                owner.append(k)
        scores: list = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="lightspan loglikelihood_rolling (windows)", disable=disable_tqdm)
        for batch in self._batches([len(ids) for ids, _ in rows]):
            for i, (logprob, _) in zip(batch, self._score_batch([rows[i] for i in batch])):
                scores[i] = logprob
            bar.update(len(batch))
        bar.close()
        out = [0.0] * len(requests)
        for k, logprob in zip(owner, scores):  # summed in window order, as one text at a time would
            out[k] += logprob
        for r, total in zip(requests, out):
            self._cache("loglikelihood_rolling", r, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy; requests of the same prompt length and token limit decode together (no padding)."""
        jobs = []
        for r in requests:
            context, kwargs = _args(r)[:2]
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = (self.tok.encode(context) or [self.prefix_id])[-max(1, self.max_length - n_new):]
            jobs.append((ids, n_new, until))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (ids, n_new, _) in enumerate(jobs):
            groups.setdefault((len(ids), n_new), []).append(i)
        out: list = [None] * len(jobs)
        bar = tqdm(total=len(jobs), desc="lightspan generate_until", disable=disable_tqdm)
        for (length, n_new), members in groups.items():
            for part in self._batches([length + n_new] * len(members)):
                batch = [members[j] for j in part]
                new = self.runner.generate(torch.tensor([jobs[i][0] for i in batch], dtype=torch.long), n_new,
                                           eos_id=self.tok.eos_id)
                for row, i in enumerate(batch):
                    toks = [int(t) for t in new[row].tolist()]
                    if self.tok.eos_id in toks:
                        toks = toks[:toks.index(self.tok.eos_id)]
                    text = self.tok.decode(toks)
                    for stop in jobs[i][2]:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    out[i] = text
                    self._cache("generate_until", requests[i], text)
                bar.update(len(batch))
        bar.close()
        return out


if register_model is not None:
    register_model("lightspan")(LightspanLM)


def main() -> None:
    """`lightspan-lm-eval`: lm-eval's own command line with "lightspan" registered."""
    if register_model is None:
        raise SystemExit("lm-eval is not installed: pip install lm-eval (or the project's `eval` extra)")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
