"""The one training loss: summed token cross-entropy in fp32, labels equal to IGNORE_INDEX (-100) left out.

Every path divides this sum by the step's global count of valid labels, so micro-batches, dp/cp shards and
pipeline micro-batches all add up to the unsharded token mean. Vocab-sharded DTensor logits (tensor-parallel
loss) take torch's loss-parallel path and come back as this rank's (replicated) value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipeline.sharding import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (..., V), labels (...) -> 0-d fp32 sum of -log p(label) over labels != IGNORE_INDEX."""
    from torch.distributed.tensor import DTensor

    loss = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss.to_local() if isinstance(loss, DTensor) else loss


def valid_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum()
