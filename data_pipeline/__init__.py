"""lightspan data pipeline: sources -> sentencepiece -> token shards -> dataset decomposition -> stateful loader.

Public API::

    prepare(source, out_dir, tokenizer=None, vocab_size=8192, num_workers=2, ...) -> Path
    load_tokenizer(path) -> Tokenizer ; train_tokenizer(texts, out_path, vocab_size, ...) -> Tokenizer
    build_loader(prepared_dir, kind="dd"|"concat", tokens_per_step, seq_len=None, min_log2=8, max_log2=13,
                 curriculum="grow_p2", cycles=8, seed=0, dp_rank=0, dp_size=1, cp_rank=0, cp_size=1) -> loader
    stats(prepared_dir, tokens_per_step, min_log2, max_log2) -> dict
    verify_prepared(prepared_dir, tokenizer=None) -> manifest
    export_megatron(prepared_dir, out_prefix) -> prefix   (needs megatron-core)
"""

from .concat_loader import ConcatLoader
from .curriculum import CURRICULA, curriculum_odds, epoch_schedule
from .dd_loader import DDLoader
from .decompose import decompose_lengths
from .loader import LOADER_KINDS, build_loader
from .megatron_io import MegatronNotInstalled, export_megatron
from .preparation import prepare, verify_prepared
from .shards import CorruptCorpusError, TokenStore
from .sharding import IGNORE_INDEX
from .sources import open_source, stdlib_files
from .corpus_stats import stats
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "prepare", "verify_prepared", "build_loader", "stats", "load_tokenizer", "train_tokenizer", "Tokenizer",
    "DDLoader", "ConcatLoader", "TokenStore", "CorruptCorpusError", "export_megatron", "MegatronNotInstalled",
    "decompose_lengths", "epoch_schedule", "curriculum_odds", "open_source", "stdlib_files",
    "CURRICULA", "LOADER_KINDS", "IGNORE_INDEX",
]
