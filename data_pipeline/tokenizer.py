"""The sentencepiece tokenizer: train one on a source, or load an existing ``.model``.

Special ids are fixed so every model we train agrees: unk 0, bos 1, eos 2, pad 3. Training keeps text exactly
(identity normalisation, whitespace kept, byte fallback on by default) so ``decode(encode(x)) == x`` for source code.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path
from typing import Iterable

import sentencepiece as spm


class Tokenizer:
    """A loaded sentencepiece model.

    ``encode(text) -> list[int]`` (no BOS/EOS added), ``decode(ids) -> str``; ``vocab_size``, ``eos_id``,
    ``bos_id``, ``pad_id`` (-1 when the model has none) and ``sha256`` (of the serialized model: its identity).
    """

    def __init__(self, model_bytes: bytes, path: str | None = None):
        self.model_bytes = model_bytes
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist")
        try:
            return cls(path.read_bytes(), str(path))
        except RuntimeError as e:  # sentencepiece's parse error: a C++ source line, no file name
            raise ValueError(f"{path} is not a sentencepiece model (it does not parse: {str(e).strip()[:80]}); "
                             f"give the .model file written by sentencepiece or by `lightspan prepare`") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1)  # parallelism comes from worker processes

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.model_bytes)
        tmp.replace(path)
        return path

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, sha256={self.sha256[:12]}, path={self.path})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a sentencepiece ``.model`` file (or a prepared folder, which holds ``tokenizer.model``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    return Tokenizer.load(path)


def _sample_lines(texts: Iterable[str], sample_bytes: int, seed: int) -> list[str]:
    """Lines from a seeded random subset of the documents, about ``sample_bytes`` in all.

    Documents are kept with probability 1/4 (seeded) so a sorted corpus is not sampled by its first names only;
    if that leaves too little, the skipped documents fill up the rest. Lines, not documents, are the training
    "sentences": sentencepiece skips sentences longer than its max_sentence_length.
    """
    rng = random.Random(seed)
    kept: list[str] = []
    skipped: list[str] = []
    size = skipped_size = 0
    for text in texts:
        if rng.random() < 0.25:
            kept.append(text)
            size += len(text)
            if size >= sample_bytes:
                break
        elif size + skipped_size < sample_bytes:
            skipped.append(text)
            skipped_size += len(text)
    for text in skipped:
        if size >= sample_bytes:
            break
        kept.append(text)
        size += len(text)
    return [line for text in kept for line in text.split("\n") if line.strip()]


def train_tokenizer(
    texts: Iterable[str],
    out_path: str | Path,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    sample_bytes: int | None = None,
    seed: int = 0,
    num_threads: int = 2,
) -> Tokenizer:
    """Train a sentencepiece model on a sample of ``texts`` (capped at ``sample_bytes``) and save it to ``out_path``.

    sample_bytes: None = max(4 MB, 250 bytes per vocabulary entry): a large vocabulary needs enough distinct
    text to find that many pieces (4 MB of Python source yields at most about 62K BPE pieces).
    BPE at 8192 pieces on 4 MB trains in about a second on 2 cores. With ``byte_fallback`` the vocabulary must
    exceed 256 byte pieces + 4 specials + the kept characters (about 100 for ASCII code): use >= 384.
    """
    if sample_bytes is None:
        sample_bytes = max(4_000_000, 250 * vocab_size)
    lines = _sample_lines(texts, sample_bytes, seed)
    if not lines:
        raise ValueError("cannot train a tokenizer: the source yielded no text")
    if len(lines) <= 100:  # sentencepiece's own limit, reported as a C++ check otherwise
        raise ValueError(f"cannot train a tokenizer on {len(lines)} non-blank lines of text (sentencepiece needs "
                         f"more than 100): use a bigger source, or pass an existing tokenizer (--tokenizer / "
                         f"data.tokenizer)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            input_sentence_size=len(lines),
            shuffle_input_sentence=True,
            max_sentence_length=16384,
            num_threads=num_threads,
            seed_sentencepiece_size=200_000,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece could not train a {model_type} model with vocab_size={vocab_size}, "
            f"byte_fallback={byte_fallback}: {e}"
        ) from e
    tok = Tokenizer(model.getvalue(), str(out_path))
    tok.save(out_path)
    return tok
