"""Greedy decoding with our own models: the reference that exported Hugging Face models are checked against.

TNL decodes recurrently: one forward over the prompt returns each layer's fp32 state (a hybrid's softmax layers:
their key/value cache), then every new token is one step from those states at its global position (the LRPE
and RoPE offset). The softmax baseline decodes the same way from its key/value cache; any other model (SharedLLM's
decoder alone) re-runs the whole sequence per token.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                    pad_id: int | None = None) -> torch.Tensor:
    """input_ids: (B, T) -> (B, T + n), n <= max_new_tokens; argmax at every step.

    With `eos_id`, a row that has produced it is filled with `pad_id` (default: eos_id) afterwards and decoding
    stops once every row has (what `transformers` generate() does).
    """
    stateful = getattr(getattr(model, "cfg", None), "arch", "tnl") in ("tnl", "llama")
    out = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    fill = eos_id if pad_id is None else pad_id
    if stateful:
        logits, states = model(input_ids, return_states=True)
    else:
        logits, states = model(input_ids), None
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            done = done | (nxt == eos_id)
        position = out.shape[1]
        out = torch.cat([out, nxt[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
        if stateful:
            logits, states = model(nxt[:, None], position_offset=position, states=states, return_states=True)
        else:
            logits = model(out)
    return out
