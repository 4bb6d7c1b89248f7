"""Tokenizers: a sentencepiece ``.model`` (train one on a source, or load one), or a Hugging Face tokenizer
(``tokenizer.json``, alone or in a folder with its ``tokenizer_config.json``), read locally through ``tokenizers``.

Both kinds give one interface: ``encode(text) -> list[int]`` (no BOS/EOS added), ``encode_batch``, ``decode``,
``vocab_size``, ``eos_id``, ``bos_id``, ``pad_id``, ``unk_id`` (-1 when the tokenizer has none), ``sha256`` (of the
tokenizer file: its identity), ``file_name`` (what a prepared folder calls it) and ``record()`` (what a manifest
records about it).

Sentencepiece models we train fix the special ids: unk 0, bos 1, eos 2, pad 3. Training keeps text exactly
(identity normalisation, whitespace kept, byte fallback on by default) so ``decode(encode(x)) == x`` for source code.

A Hugging Face tokenizer's special tokens come from its ``tokenizer_config.json`` (``eos_token`` ...; a
``special_tokens_map.json`` beside it fills gaps), else from well-known names among its special tokens (EOS:
``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``, ``<eos>``); one without an EOS is refused, since every document
ends with EOS. Special-token text inside a document is encoded as plain text (``encode_special_tokens``), as
sentencepiece does, so a corpus that quotes ``<|endoftext|>`` does not gain control tokens; the exported
``tokenizer_config.json`` says ``split_special_tokens: true`` so ``AutoTokenizer`` encodes the same way. Nothing is
downloaded: a name that is not a local file or folder is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
HF_SPECIAL_MAP = "special_tokens_map.json"
TOKENIZER_FILES = (SP_FILE, HF_FILE, HF_CONFIG)  # what a prepared folder may hold of a tokenizer

_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")
_UNK_NAMES = ("<unk>", "[UNK]")


class TokenizerBase:
    """What both tokenizer kinds share; see the module docstring."""

    kind = "?"
    file_name = "?"
    sha256: str
    path: str | None

    @property
    def fingerprint(self) -> str:
        """What decides whether tokens made with this tokenizer are the same: the file hash (+ the special ids where
        they are not part of the file)."""
        return self.sha256

    def record(self) -> dict:
        """The manifest's ``tokenizer`` entry."""
        return {"file": self.file_name, "kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id}, sha256={self.sha256[:12]}, "
                f"path={self.path})")


class Tokenizer(TokenizerBase):
    """A loaded sentencepiece model (``Tokenizer(model_bytes)``)."""

    kind = "sentencepiece"
    file_name = SP_FILE

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
                             f"give the .model file written by sentencepiece or by `lightspan prepare`, or a Hugging "
                             f"Face tokenizer.json (or its folder)") from None

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

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1)  # parallelism comes from worker processes

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def payload(self) -> tuple:
        """What a worker process rebuilds this tokenizer from (``from_payload``)."""
        return ("sentencepiece", self.model_bytes, None)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.model_bytes)
        tmp.replace(path)
        return path

    def save_into(self, folder: str | Path) -> Path:
        """Write the tokenizer into a (prepared) folder under its ``file_name``; returns the path."""
        return self.save(Path(folder) / self.file_name)

    def files(self) -> list[Path]:
        return [Path(self.path)] if self.path else []


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...} (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer(TokenizerBase):
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``) with the special tokens of its
    ``tokenizer_config.json`` (``HFTokenizer(json_bytes, config)``)."""

    kind = "hf"
    file_name = HF_FILE

    def __init__(self, json_bytes: bytes, config: dict | None = None, path: str | None = None):
        from tokenizers import Tokenizer as _Tk

        self.json_bytes = json_bytes
        self.path = path
        where = path or "tokenizer.json"
        try:
            self.tk = _Tk.from_str(json_bytes.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - the Rust parser raises a plain Exception
            raise ValueError(f"{where} is not a Hugging Face tokenizer.json (it does not parse: "
                             f"{str(e).strip()[:80]}); give a tokenizer.json written by `tokenizers` / "
                             f"`transformers`, its folder, or a sentencepiece .model") from None
        self.tk.encode_special_tokens = True  # special-token text in a document is text (see the module docstring)
        self.sha256 = hashlib.sha256(json_bytes).hexdigest()
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self._vocab_size = max(self.tk.get_vocab_size(with_added_tokens=True), 1 + max(vocab.values(), default=-1))
        self.config = dict(config or {})
        specials = {}
        for key, names in (("eos", _EOS_NAMES), ("bos", _BOS_NAMES), ("pad", _PAD_NAMES), ("unk", _UNK_NAMES)):
            text = _token_text(self.config.get(f"{key}_token"))
            if text is not None and text not in vocab:
                raise ValueError(f"{where}: {HF_CONFIG} names {key}_token {text!r}, which is not in the tokenizer's "
                                 f"vocabulary; fix {HF_CONFIG}")
            if text is None:
                text = next((n for n in names if n in vocab), None)
            specials[key] = text
        if specials["eos"] is None:
            raise ValueError(f"{where}: cannot tell which token is EOS (no eos_token in a {HF_CONFIG} beside it, and "
                             f"none of {list(_EOS_NAMES)} in its vocabulary); every document ends with EOS: add a "
                             f"{HF_CONFIG} with \"eos_token\" next to the tokenizer.json")
        self.specials = specials
        self.ids = {k: (vocab[v] if v is not None else -1) for k, v in specials.items()}
        for key, text in specials.items():  # the config written into prepared folders and exports
            if text is not None:
                self.config.setdefault(f"{key}_token", text)
        self.config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        self.config["split_special_tokens"] = True
        self.config.setdefault("add_bos_token", False)
        self.config.setdefault("add_eos_token", False)
        self.config.setdefault("clean_up_tokenization_spaces", False)

    @classmethod
    def load(cls, path: str | Path) -> "HFTokenizer":
        """From a ``tokenizer.json`` (its folder's ``tokenizer_config.json`` / ``special_tokens_map.json`` give the
        special tokens)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} does not exist")
        config: dict = {}
        for name in (HF_SPECIAL_MAP, HF_CONFIG):  # the config's own entries win
            side = path.parent / name
            if side.is_file():
                try:
                    raw = json.loads(side.read_bytes())
                except ValueError as e:
                    raise ValueError(f"{side} is not valid JSON ({e}); fix or remove it") from None
                if isinstance(raw, dict):
                    config.update({k: v for k, v in raw.items() if v is not None})
        return cls(path.read_bytes(), config, str(path))

    @property
    def fingerprint(self) -> str:
        ids = json.dumps(self.ids, sort_keys=True)
        return hashlib.sha256(f"{self.sha256}\0{ids}".encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self.ids["eos"]

    @property
    def bos_id(self) -> int:
        return self.ids["bos"]

    @property
    def pad_id(self) -> int:
        return self.ids["pad"]

    @property
    def unk_id(self) -> int:
        return self.ids["unk"]

    def id_to_piece(self, i: int) -> str:
        return self.tk.id_to_token(i)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # one thread: parallelism comes from worker processes (encode_batch would start Rayon threads per process)
        return [self.tk.encode(t, add_special_tokens=False).ids for t in texts]

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def payload(self) -> tuple:
        return ("hf", self.json_bytes, self.config)

    def config_bytes(self) -> bytes:
        return (json.dumps(self.config, indent=2, sort_keys=True) + "\n").encode()

    def save_into(self, folder: str | Path) -> Path:
        """Write ``tokenizer.json`` and the resolved ``tokenizer_config.json`` into ``folder``; returns the first."""
        folder = Path(folder)
        for name, data in ((HF_FILE, self.json_bytes), (HF_CONFIG, self.config_bytes())):
            tmp = folder / (name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(folder / name)
        return folder / HF_FILE

    def files(self) -> list[Path]:
        return [Path(self.path)] if self.path else []


def tokenizer_from_payload(payload: tuple) -> TokenizerBase:
    kind, data, config = payload
    return Tokenizer(data) if kind == "sentencepiece" else HFTokenizer(data, config)


def is_hf_tokenizer(path: str | Path) -> bool:
    """A Hugging Face tokenizer: a ``.json`` file, or a folder holding ``tokenizer.json`` and no ``tokenizer.model``."""
    path = Path(path)
    if path.is_dir():
        return (path / HF_FILE).is_file() and not (path / SP_FILE).is_file()
    return path.suffix.lower() == ".json"


def load_tokenizer(path: str | Path) -> TokenizerBase:
    """Load a tokenizer: a sentencepiece ``.model``, a Hugging Face ``tokenizer.json``, or a folder holding either
    (a prepared folder, or a Hugging Face model/tokenizer folder; ``tokenizer.model`` first). Local only."""
    path = Path(path)
    if path.is_dir():
        if (path / SP_FILE).is_file():
            return Tokenizer.load(path / SP_FILE)
        if (path / HF_FILE).is_file():
            return HFTokenizer.load(path / HF_FILE)
        raise FileNotFoundError(f"tokenizer folder {path} holds neither {SP_FILE} (sentencepiece) nor {HF_FILE} "
                                f"(Hugging Face); give the tokenizer file, or the folder that holds it")
    if path.suffix.lower() == ".json":
        return HFTokenizer.load(path)
    if not path.exists() and path.suffix == "" and not str(path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer {str(path)!r} is not a local file or folder (tokenizers are never "
                                f"downloaded): give a path to a .model, a tokenizer.json, or a folder with one")
    return Tokenizer.load(path)


def padded_vocab_size(tokenizer_vocab: int, multiple_of: int, tp: int = 1) -> int:
    """The model vocabulary for a tokenizer of ``tokenizer_vocab`` ids: the smallest multiple of
    ``multiple_of x tp`` that holds them (Megatron's ``--make-vocab-size-divisible-by``, which also multiplies by
    the tensor-parallel size so every vocab-parallel shard is equal); ``multiple_of`` 0 counts as 1. The extra
    ids never occur in the data; their embeddings get no gradient but the loss's softmax covers them."""
    if tokenizer_vocab < 1:
        raise ValueError(f"tokenizer vocabulary must be >= 1, got {tokenizer_vocab}")
    if multiple_of < 0 or tp < 1:
        raise ValueError(f"need multiple_of >= 0 and tp >= 1, got {multiple_of} and {tp}")
    unit = max(multiple_of, 1) * tp
    return -(-tokenizer_vocab // unit) * unit


def check_model_vocab(tokenizer_vocab: int, model_vocab: int, where: str = "the tokenizer") -> None:
    """Refuse a tokenizer with more ids than the model's vocabulary, naming both numbers and the fixes."""
    if tokenizer_vocab > model_vocab:
        raise ValueError(f"{where} has {tokenizer_vocab} ids but model.vocab_size is {model_vocab}: a model cannot "
                         f"embed ids it has no rows for; set model.vocab_size to at least {tokenizer_vocab} (padding "
                         f"is fine: e.g. {padded_vocab_size(tokenizer_vocab, 128)}), or use a smaller tokenizer")


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
