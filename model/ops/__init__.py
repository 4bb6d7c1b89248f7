"""Lightning attention ops: ``lightning_attn`` (sequences) and ``lightning_attn_step`` (one decoding token).

See ``model/ops/lightning.py`` for the math and the shapes; backends live one per module
(``naive``, ``recurrent``, ``chunked``, ``triton_backend``).
"""

from model.ops.lightning import BACKENDS, lightning_attn, lightning_attn_step

__all__ = ["BACKENDS", "lightning_attn", "lightning_attn_step"]
