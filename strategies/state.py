"""A strategy's own state across rounds, as plain tensors, so a resumed run continues it exactly.

Flower's server-side optimisers keep state between rounds in attributes: FedAvgM its momentum
(`momentum_vector`) and the current global arrays; FedAdam/FedYogi their moments `m_t`, `v_t` and the
current arrays; FedAdagrad `v_t`; QFedAvg the current arrays; the adaptive-clipping DP wrapper its
`clipping_norm` (a float); the DP wrappers draw their noise from numpy's global generator. `export_state` captures
all of it (of a wrapped strategy too) as tensors that `torch.load(weights_only=True)` reads back, and
`import_state` puts it back; arrays come back bit for bit with their dtypes.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

STATE_ATTRS = ("current_arrays", "momentum_vector", "m_t", "v_t", "clipping_norm")


def _to_torch(value):
    if value is None:
        return None
    if isinstance(value, float):
        return {"kind": "float", "items": torch.tensor(value, dtype=torch.float64)}
    if isinstance(value, ArrayRecord):
        return {"kind": "arrayrecord", "items": {k: torch.from_numpy(a.numpy().copy()) for k, a in value.items()}}
    if isinstance(value, dict):
        return {"kind": "dict", "items": {k: torch.from_numpy(np.array(v, copy=True)) for k, v in value.items()}}
    if isinstance(value, list):
        return {"kind": "list", "items": [torch.from_numpy(np.array(v, copy=True)) for v in value]}
    raise TypeError(f"cannot save strategy state of type {type(value).__name__}")


def _from_torch(saved):
    if saved is None:
        return None
    kind, items = saved["kind"], saved["items"]
    if kind == "float":
        return float(items.item())
    if kind == "arrayrecord":
        return ArrayRecord({k: Array(v.numpy()) for k, v in items.items()})
    if kind == "dict":
        return {k: v.numpy() for k, v in items.items()}
    return [v.numpy() for v in items]


def _owners(strategy):
    yield "outer", strategy
    inner = getattr(strategy, "strategy", None)  # a wrapper (the DP strategy)
    if inner is not None:
        yield "inner", inner


def export_state(strategy) -> dict:
    out = {}
    for name, owner in _owners(strategy):
        for attr in STATE_ATTRS:
            if hasattr(owner, attr):
                out[f"{name}.{attr}"] = _to_torch(getattr(owner, attr))
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy-global-rng"] = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has-gauss": int(has_gauss),
        "cached-gaussian": float(cached),
    }
    return out


def import_state(strategy, state: dict) -> None:
    for name, owner in _owners(strategy):
        for attr in STATE_ATTRS:
            key = f"{name}.{attr}"
            if key in state:
                setattr(owner, attr, _from_torch(state[key]))
    rng = state["numpy-global-rng"]
    np.random.set_state(
        (rng["kind"], rng["keys"].numpy().astype(np.uint32), rng["pos"], rng["has-gauss"], rng["cached-gaussian"])
    )
