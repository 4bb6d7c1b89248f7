"""Megatron-LM indexed datasets (``prefix.bin`` + ``prefix.idx``) in and out, through megatron-core.

megatron-core is optional (``pip install 'lightspan[megatron]'``); it imports on CPU with torch and numpy.
A Megatron *document* (one or more sequences) becomes one of our documents, and back: each of our documents is
written as one sequence and one document, EOS included, in our token dtype.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np


class MegatronNotInstalled(ImportError):
    pass


def _indexed_dataset_module():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # megatron.core warns about missing Apex / Transformer Engine on import
            from megatron.core.datasets import indexed_dataset
    except ImportError as e:
        raise MegatronNotInstalled(
            f"reading or writing Megatron .bin/.idx corpora needs megatron-core: pip install 'lightspan[megatron]' "
            f"(or pip install megatron-core); import failed with: {e}"
        ) from e
    return indexed_dataset


def iter_megatron_documents(prefix: str) -> Iterator[np.ndarray]:
    """Each Megatron document of ``prefix`` as one int64 token array (its sequences concatenated)."""
    ds = _indexed_dataset_module().IndexedDataset(str(prefix), multimodal=False, mmap=True)
    doc_idx = np.asarray(ds.document_indices)  # (n_docs + 1,) sequence index where each document starts
    for d in range(len(doc_idx) - 1):
        seqs = [np.asarray(ds[s]) for s in range(int(doc_idx[d]), int(doc_idx[d + 1]))]
        yield np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, np.int64)


def export_megatron(prepared_dir: str | Path, out_prefix: str | Path) -> str:
    """Write a prepared corpus as ``out_prefix.bin`` / ``out_prefix.idx`` (one sequence per document)."""
    from .shards import TokenStore

    module = _indexed_dataset_module()
    store = TokenStore(prepared_dir, verify="size")
    out_prefix = str(out_prefix)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    # megatron-core's builder has no uint32 writer path in every version; int32 holds any real vocabulary
    dtype = np.uint16 if store.dtype == np.uint16 else np.int32
    builder = module.IndexedDatasetBuilder(out_prefix + ".bin", dtype=dtype)
    for start, length in np.asarray(store.documents):
        # a numpy array, not a tensor: the builder converts with np.array either way
        builder.add_document(store.read(int(start), int(length)).astype(dtype), [int(length)])
    builder.finalize(out_prefix + ".idx")
    print(f"[megatron] wrote {len(store.documents)} documents, {store.num_tokens} tokens to {out_prefix}.bin/.idx")
    return out_prefix
