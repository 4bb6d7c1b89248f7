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
"""
from __future__ import annotations

import torch

from .model_io import IGNORE, token_nll
from .perplexity import window_targets, windows

try:
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model
except ImportError:  # the adapter's methods still work (and are tested) without lm-eval
    _Base, register_model = object, None


def _args(request) -> tuple:
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


class LightspanLM(_Base):
    def __init__(self, path: str | None = None, runner=None, tokenizer=None, max_length: int | None = None,
                 max_gen_toks: int = 256, device: str = "cpu", chunk_size: int = 2048, **_lm_eval_extras):
        super().__init__()
        if runner is None:
            from .model_io import load_for_eval

            if path is None:
                raise ValueError("lightspan: pass model_args path=RUN_OR_CHECKPOINT_OR_HF_FOLDER")
            device = str(device or "cpu")
            if device.startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes device=cuda unless told otherwise: on a CPU-only machine, run on the CPU
                print(f"[lightspan] device {device!r} requested but no CUDA device is visible: using cpu", flush=True)
                device = "cpu"
            loaded = load_for_eval(path, device=device, chunk_size=int(chunk_size),
                                   tokenizer=tokenizer if isinstance(tokenizer, str) else None)
            runner, max_length = loaded.runner, max_length or loaded.train_len
            tokenizer = loaded.tokenizer if not hasattr(tokenizer, "encode") else tokenizer
        if tokenizer is None or not hasattr(tokenizer, "encode"):
            raise ValueError("lightspan: no tokenizer found for this model; pass model_args tokenizer=PATH")
        self.runner, self.tok = runner, tokenizer
        self.max_length = int(max_length or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.prefix_id = tokenizer.eos_id

    # -- helpers -------------------------------------------------------------------------------------------
    def _split(self, context: str, continuation: str) -> tuple[list, list]:
        """Token ids of context and continuation, tokenized together where the split is clean."""
        if not context:
            return [self.prefix_id], self.tok.encode(continuation)
        ctx, whole = self.tok.encode(context), self.tok.encode(context + continuation)
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.tok.encode(continuation)

    def _score(self, ctx: list, cont: list) -> tuple[float, bool]:
        full = (ctx + cont)[-(self.max_length + 1):]
        ids = torch.tensor([full[:-1]], dtype=torch.long)
        targets = torch.full_like(ids, IGNORE)
        n = min(len(cont), ids.shape[1])
        targets[0, ids.shape[1] - n:] = torch.tensor(full[-n:])
        nll, hit = token_nll(self.runner, ids, targets)
        return -float(nll.sum()), bool(hit[0, ids.shape[1] - n:].all())

    # -- the LM interface ----------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self._score(*self._split(*_args(r)[:2])) for r in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            stream = torch.tensor([self.prefix_id] + self.tok.encode(_args(r)[0]), dtype=torch.long)
            total = 0.0
            for begin, end, first in windows(len(stream), self.max_length + 1, self.max_length):
                ids, targets = window_targets(stream, begin, end, first)
                nll, _ = token_nll(self.runner, ids[None], targets[None])
                total -= float(nll.sum())
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = _args(r)[:2]
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = (self.tok.encode(context) or [self.prefix_id])[-max(1, self.max_length - n_new):]
            new = self.runner.generate(torch.tensor([ids], dtype=torch.long), n_new, eos_id=self.tok.eos_id)[0]
            toks = [int(t) for t in new.tolist()]
            if self.tok.eos_id in toks:
                toks = toks[:toks.index(self.tok.eos_id)]
            text = self.tok.decode(toks)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
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
