"""`lightspan generate RUN --prompt TEXT`: a quick look at what a model writes.

    lightspan generate runs/tiny --prompt "def main(" --max-new-tokens 64                  # greedy
    lightspan generate hf/tiny --prompt "import " --temperature 0.8 --top-k 40 --seed 1    # sampled

RUN is a run folder (its newest complete checkpoint), a checkpoint folder or a Hugging Face export folder, loaded
by evaluation.model_io.load_for_eval (any layout the run trained on). TNL and its hybrids decode with their
recurrent state as the cache: the prompt is read once (in chunks of --chunk-size tokens), then every new token is
one step from the states; the softmax baseline reads the prompt at once and decodes from its key/value cache;
SharedLLM compresses its context once and re-runs its running text per token.

Greedy (the default, --temperature 0) is the evaluation runner's own decoding (ModelRunner.generate); sampling
draws from softmax(logits / temperature), optionally cut to the top k tokens and the top-p probability mass,
with a torch.Generator seeded by --seed: the same seed on the same device gives the same text.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lightspan generate", description=__doc__.split("\n\n")[0],
                                epilog="Greedy by default; --temperature > 0 samples (with --top-k / --top-p / "
                                       "--seed). Generation stops at the tokenizer's end-of-document token unless "
                                       "--ignore-eos.")
    p.add_argument("path", metavar="RUN", help="run folder, checkpoint folder, or Hugging Face export folder")
    p.add_argument("--prompt", default="", help="the text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample at it")
    p.add_argument("--top-k", type=int, default=0, help="sampling: only the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: the smallest set holding this much "
                                                             "probability (1: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    p.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt, decoded together")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-document token")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the run's / the export's)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:N")
    p.add_argument("--chunk-size", type=int, default=2048, help="TNL: prompt tokens per forward, carrying the state")
    p.add_argument("--ids", action="store_true", help="also print the token ids")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: no cut), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1 or args.chunk_size < 1:
        raise ValueError("--num-samples and --chunk-size must be >= 1")
    return args


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device torch knows; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to this process; use --device cpu")
    return name


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits with everything outside the top k / the top-p mass set to -inf (the best token always stays)."""
    logits = logits.float()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the better tokens
        drop = before >= top_p  # the first token has 0 before it: always kept
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


class Sampler:
    """next token = a draw from softmax(filter(logits) / temperature), from its own seeded generator."""

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if temperature <= 0:
            raise ValueError("Sampler needs temperature > 0 (greedy decoding is ModelRunner.generate)")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator(device=torch.device(device)).manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(filter_logits(logits, self.top_k, self.top_p) / self.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


@torch.no_grad()
def sample_generate(runner, ids: torch.Tensor, max_new_tokens: int, pick, eos_id: int | None = None) -> torch.Tensor:
    """ModelRunner.generate with `pick(logits (B, V)) -> (B,)` choosing each token: (B, T) -> (B, n) new tokens
    (the runner's decoding paths: recurrent states for TNL and hybrids, SharedLLM's context compressed once)."""
    return runner.generate(ids, max_new_tokens, eos_id=eos_id, pick=pick)


def generate(loaded, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, num_samples: int = 1, eos_id: int | None = None) -> torch.Tensor:
    """(num_samples, n) new token ids after prompt_ids: greedy (temperature 0) or sampled."""
    runner = loaded.runner
    ids = torch.tensor([prompt_ids] * num_samples, dtype=torch.long)
    if temperature == 0:
        return runner.generate(ids, max_new_tokens, eos_id=eos_id)
    pick = Sampler(temperature, top_k, top_p, seed, runner.device)
    return sample_generate(runner, ids, max_new_tokens, pick, eos_id=eos_id)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = pick_device(args.device)
    from evaluation.model_io import load_for_eval

    with warnings.catch_warnings():  # DCP's note that it loads in a single process: that is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        loaded = load_for_eval(args.path, device=device, chunk_size=args.chunk_size, tokenizer=args.tokenizer)
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"no tokenizer found for {args.path} (looked for the run's data.tokenizer, its prepared "
                         f"folder's tokenizer.model, one beside the checkpoint or in the export): pass --tokenizer "
                         f"PATH/tokenizer.model")
    prompt_ids = tok.encode(args.prompt) if args.prompt else []
    if not prompt_ids:  # an empty prompt starts a new document: the end-of-document token comes before one
        prompt_ids = [tok.eos_id]
    if max(prompt_ids) >= loaded.runner.vocab_size:
        raise ValueError(f"the tokenizer's ids reach {max(prompt_ids)} but the model has {loaded.runner.vocab_size} "
                         f"tokens: pass the tokenizer the model was trained with (--tokenizer)")
    eos = None if args.ignore_eos else tok.eos_id
    mode = ("greedy" if args.temperature == 0 else
            f"sampled at temperature {args.temperature:g}, top-k {args.top_k or 'all'}, top-p {args.top_p:g}, "
            f"seed {args.seed}")
    print(f"# {loaded.source} on {device}: {len(prompt_ids)} prompt token(s), {mode}", file=sys.stderr)
    new = generate(loaded, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                   args.num_samples, eos)
    for i, row in enumerate(new.tolist()):
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tok.decode(prompt_ids + row) if args.prompt else tok.decode(row), flush=True)
        if args.ids:
            print(f"ids: {prompt_ids + row}")
    return 0
