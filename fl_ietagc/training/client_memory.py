"""What a client process keeps in memory between rounds, so a round does not rebuild or re-read it.

A ClientApp process (a Ray actor in simulation, a long-lived ClientApp process in deployment) often serves the
same partition round after round. Without this module, every round builds the UNet afresh (random init of
every weight, then the global weights copied over it), deep-copies it for the EMA, and reads the client's
state file back (Adam's moments: 2 x the weights) that the same process wrote a round earlier.

- `models(key, build)`: one (raw, EMA) UNet pair per architecture key, reused by every partition this process
  serves; each round copies the global weights into it (load_state_dict), so nothing of an earlier round or
  partition survives except the tensors' storage and memory format.
- `buffers(key)`: the flat arrays a reply is built in (federation/wire.flatten), kept with the model pair: a
  fresh 286 MB per round (the paper UNet's raw + EMA) was page-faulted in every round.
- states: per (run token, state directory, partition) the `TrainState` this process last saved, with the round
  it was saved as. A round that starts from exactly that round takes it from memory (the file, written and
  fsync'ed before the reply that made the server count it, stays the durable copy: a new process, or a
  round that starts from another version, reads the file). The copy is used only while the file is the one this
  process wrote (same inode, size and modification time): a file replaced or removed since is read (or its
  absence reported) as without this module. A state is handed out once (`state` removes it: training mutates it
  in place) and kept again only after its round saved it, so a failed round leaves nothing stale here.

The file is still written every round, before the reply (the commit rule: the server commits round R only
after every counted client's state for R is durable); `BackgroundWrite` overlaps that write with building
the reply (checkpoints.BackgroundWrite). Bounded: `budget_bytes` (run-config client-memory-mb; 0 = keep nothing) caps what is kept,
least recently used first out.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from fl_ietagc.training.trainer import TrainState


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nested dict/list/tuple (shared storages counted once per tensor)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if isinstance(obj, torch.nn.Module):
        return sum(tensor_bytes(t) for t in (*obj.parameters(), *obj.buffers()))
    return 0


class ClientMemory:
    def __init__(self):
        self._models: OrderedDict[tuple, tuple[torch.nn.Module, torch.nn.Module]] = OrderedDict()
        self._buffers: dict[tuple, dict] = {}
        self._states: OrderedDict[tuple, tuple[int, tuple, TrainState]] = OrderedDict()
        self.hits = self.misses = 0  # state lookups (tests, benchmarks)

    # --- models ---
    def models(self, key: tuple, build: Callable[[], torch.nn.Module], budget_bytes: int):
        """The process's (raw, EMA) pair for `key`, built with `build` (and its deep copy) on first use; without
        room in the budget, a fresh pair that is not kept."""
        pair = self._models.get(key)
        if pair is not None:
            self._models.move_to_end(key)
            return pair
        model = build()
        pair = (model, _copy_module(model))
        if tensor_bytes(model) * 2 <= budget_bytes:
            self._models.clear()  # one architecture at a time: a process serves one run's clients
            self._buffers.clear()
            self._models[key] = pair
        return pair

    def buffers(self, key: tuple) -> dict:
        """Scratch buffers kept with `key`'s model pair (a new, unkept dict when the pair is not kept)."""
        return self._buffers.setdefault(key, {}) if key in self._models else {}

    # --- states ---
    def state(self, key: tuple, start_round: int, path: Path) -> TrainState | None:
        """The state saved as round `start_round` under `key` to `path`, if this process holds it and `path` is
        still the file it wrote; handed out once (the round mutates it), it comes back with `keep`."""
        held = self._states.pop(key, None)
        if held is None or held[0] != start_round or held[1] != file_stamp(path):
            self.misses += 1
            return None
        self.hits += 1
        return held[2]

    def keep(self, key: tuple, server_round: int, state: TrainState, path: Path, budget_bytes: int) -> None:
        """Hold `state` (just saved as round `server_round` to `path`); the least recently kept go first over
        budget."""
        self._states.pop(key, None)
        size = tensor_bytes(state.to_dict())
        if size > budget_bytes:
            return
        while (
            self._states and size + sum(tensor_bytes(s.to_dict()) for _, _, s in self._states.values()) > budget_bytes
        ):
            self._states.popitem(last=False)
        self._states[key] = (server_round, file_stamp(path), state)

    def held(self, key: tuple) -> tuple[int, TrainState] | None:
        """(round, state) held under `key`, without handing it out (tests)."""
        entry = self._states.get(key)
        return None if entry is None else (entry[0], entry[2])

    def forget(self, key: tuple) -> None:
        self._states.pop(key, None)

    def clear(self) -> None:
        self._models.clear()
        self._buffers.clear()
        self._states.clear()
        self.hits = self.misses = 0


MEMORY = ClientMemory()  # the process's


def file_stamp(path: Path) -> tuple | None:
    """(device, inode, size, mtime in ns) of `path`, None when it does not exist: a replaced file differs."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _copy_module(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)
