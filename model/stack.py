"""The layer loop TransnormerLM and LlamaLM share: blocks that may carry a decoding state per layer (a lightning
layer's fp32 recurrent state, a softmax layer's key/value cache)."""
from __future__ import annotations


def run_layers(layers, x, position_offset: int = 0, states=None, return_states: bool = False):
    """x through every block of `layers` in order -> (x, the blocks' new states, or [] unless return_states).

    A block is called as block(x, position_offset, state[, True]); states: one per block, to continue from."""
    new_states = []
    for i, layer in enumerate(layers):
        state = states[i] if states is not None else None
        if return_states:
            x, state = layer(x, position_offset, state, True)
            new_states.append(state)
        else:
            x = layer(x, position_offset, state)
    return x, new_states
