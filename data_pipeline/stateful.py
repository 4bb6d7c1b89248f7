"""The resumable-iterator skeleton both loaders share: position = (epoch, step in epoch), plus a config check.

The global batch of a step is a pure function of (config, seed, epoch, step), and each dp/cp rank reads its
share of it, so the state is one global position (two integers) plus a description of the config, the same
on every rank. It resumes on any dp x cp layout: after a change of layout the ranks cut the same global batches
differently, and the token stream continues exactly. ``load_state_dict`` refuses a state saved under another
data config, with both values in the message: the same position would mean different batches.
"""

from __future__ import annotations

from typing import Any


class StatefulLoader:
    """Infinite iterator of batch dicts; ``state_dict()`` / ``load_state_dict()`` (torch.distributed.checkpoint's
    ``Stateful`` protocol). Subclasses set ``self.config`` (dict of plain values, identical on all ranks),
    ``self.dp_rank``, ``self.dp_size``, ``self.cp_rank``, ``self.cp_size`` and implement ``_start_epoch(epoch)``
    (returns steps in that epoch) and ``_make_batch(step)``."""

    kind = "?"

    def _init_position(self) -> None:
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.steps_per_epoch = self._start_epoch(0)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            self.steps_per_epoch = self._start_epoch(self.epoch)
        batch = self._make_batch(self.step_in_epoch)
        batch["epoch"] = self.epoch
        batch["step"] = self.global_step
        self.step_in_epoch += 1
        self.global_step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        # the global position: the same on every rank, whatever the layout
        return {"kind": self.kind, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "config": dict(self.config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"loader state is for a {state.get('kind')!r} loader, this one is {self.kind!r}")
        diff = {k: (state["config"].get(k), v) for k, v in self.config.items() if state["config"].get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"loader state was saved under another data config ({lines})")
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.steps_per_epoch = self._start_epoch(self.epoch)
        self._seek(self.step_in_epoch)

    def _seek(self, step: int) -> None:
        """Restore whatever per-epoch progress the subclass tracks up to ``step``; default: nothing."""

    def _start_epoch(self, epoch: int) -> int:
        raise NotImplementedError

    def _make_batch(self, step: int) -> dict[str, Any]:
        raise NotImplementedError
