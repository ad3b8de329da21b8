"""Weights on the wire: a few flat arrays per message instead of one array per tensor.

Why: Flower 1.41 moves every Array of a message as its own object (one request each, chunked at 5 MB). The
tiny UNet's raw + EMA weights are 360 tensors, so one message was 264 objects and a deployment round spent ~20 s
in per-object requests for 1.7 MB. Here the packed weights (`net.*` and `ema.*`, checkpoints.pack_weights) become
one flat 1-D array per group: `net` and `ema` for float32 tensors (other dtypes, if a model has any, get their own
`net:<dtype>` / `ema:<dtype>` group), with the tensors' names, shapes and dtypes sent once beside them as a
`Layout` (a plain dict that the apps put into a ConfigRecord).

Every strategy's arithmetic is elementwise (weighted mean, median, trimmed mean, FedAdam/FedYogi/FedAvgM
moments), so averaging flat arrays gives bit for bit what averaging the tensors gave: the same float operations
on the same elements in the same order.

`transport-dtype = "bf16"` halves the bytes: float32 groups travel as bfloat16 (their bits in an int16 array,
since numpy has no bfloat16) and are turned back into float32 before anything is averaged. What changes: every
weight a client or the server receives is rounded to bfloat16 (8 significant bits: relative error <= 2^-8), so
the averaged weights are averages of rounded weights. Optimizer state, AGC banks and checkpoints stay float32.

Plain torch/numpy (no Flower import): the core stays usable without Flower.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fl_ietagc.settings.config import TRANSPORT_DTYPES

_FLOAT = "float32"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def group_of(name: str, dtype: str) -> str:
    """The flat array a packed tensor travels in: its prefix (net / ema), plus its dtype unless float32."""
    prefix = name.split(".", 1)[0]
    return prefix if dtype == _FLOAT else f"{prefix}:{dtype}"


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of the packed tensors, in order; and how float32 groups travel."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    transport: str = "fp32"

    @classmethod
    def of(cls, packed: dict[str, torch.Tensor], transport: str = "fp32") -> Layout:
        if transport not in TRANSPORT_DTYPES:
            raise ValueError(f"transport-dtype = {transport!r}: must be one of {', '.join(TRANSPORT_DTYPES)}")
        # float64 weights are a server-side optimiser's arithmetic (FedAdam, DP noise: numpy float64), never a
        # model's: they travel, and are laid out, as the model's float32 (the server keeps its float64 values)
        return cls(
            names=tuple(packed),
            shapes=tuple(tuple(v.shape) for v in packed.values()),
            dtypes=tuple(_FLOAT if v.dtype == torch.float64 else _dtype_name(v.dtype) for v in packed.values()),
            transport=transport,
        )

    def groups(self) -> dict[str, list[int]]:
        """group name -> indices of its tensors, in layout order."""
        out: dict[str, list[int]] = {}
        for i, (name, dtype) in enumerate(zip(self.names, self.dtypes)):
            out.setdefault(group_of(name, dtype), []).append(i)
        return out

    def numel(self, i: int) -> int:
        return int(np.prod(self.shapes[i], dtype=np.int64))

    def digest(self) -> str:
        """Names, shapes and dtypes (not the transport): replies must have the layout the server sent."""
        text = json.dumps([self.names, self.shapes, self.dtypes])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_record(self) -> dict:
        """A ConfigRecord-compatible dict (lists of str / int)."""
        return {
            "names": list(self.names),
            "ndims": [len(s) for s in self.shapes],
            "dims": [d for s in self.shapes for d in s],
            "dtypes": list(self.dtypes),
            "transport": self.transport,
        }

    @classmethod
    def from_record(cls, rec) -> Layout:
        names, ndims, dims, dtypes = (list(rec[k]) for k in ("names", "ndims", "dims", "dtypes"))
        if not (len(names) == len(ndims) == len(dtypes)) or sum(ndims) != len(dims):
            raise ValueError("weight layout record is inconsistent (names, ndims, dims, dtypes disagree)")
        shapes, at = [], 0
        for n in ndims:
            shapes.append(tuple(int(d) for d in dims[at : at + n]))
            at += n
        transport = str(rec["transport"])
        if transport not in TRANSPORT_DTYPES:
            raise ValueError(f"weight layout: transport {transport!r} is not one of {', '.join(TRANSPORT_DTYPES)}")
        return cls(tuple(str(n) for n in names), tuple(shapes), tuple(str(d) for d in dtypes), transport)

    def where(self, group: str, index: int) -> str:
        """The tensor (and element) that flat position `index` of `group` belongs to, for error messages."""
        at = 0
        for i in self.groups()[group]:
            if index < at + self.numel(i):
                return f"{self.names[i]}[{index - at}]"
            at += self.numel(i)
        return f"{group}[{index}]"


def flatten(
    packed: dict[str, torch.Tensor], layout: Layout, buffers: dict[str, torch.Tensor] | None = None
) -> dict[str, np.ndarray]:
    """One contiguous 1-D numpy array per group, in the tensors' own dtype (one copy, made on the CPU). With
    `buffers` (the caller's, kept between rounds), the arrays are written into them: views of those buffers, valid
    until the next call with the same dict. Why: a fresh 143 MB buffer per round is page-faulted in, which cost
    more than the copy itself on this project's CPU machine (benchmarks/round_overhead.py)."""
    if tuple(packed) != layout.names:
        raise ValueError("weights to send do not match the layout: different tensor names or order")
    values = list(packed.values())
    out = {}
    for group, idx in layout.groups().items():
        parts = [values[i].detach().reshape(-1).cpu() for i in idx]
        if buffers is None:
            out[group] = torch.cat(parts).numpy()
            continue
        numel, dtype = sum(p.numel() for p in parts), parts[0].dtype
        buf = buffers.get(group)
        if buf is None or buf.numel() != numel or buf.dtype != dtype:
            buf = buffers[group] = torch.empty(numel, dtype=dtype)
        out[group] = torch.cat(parts, out=buf).numpy()
    return out


def unflatten(arrays: dict[str, np.ndarray], layout: Layout, *, borrowed: bool = False) -> dict[str, torch.Tensor]:
    """The packed tensors back from `flatten`'s arrays (CPU tensors, views into one buffer per group). A float
    group in another float dtype (a server-side optimiser or Flower's DP noise can make float64) keeps it: the
    server commits and resumes from exactly what its strategy holds; a model's `load_state_dict` casts it.
    `borrowed`: read-only arrays (views of a message's bytes, `array_view`) are wrapped, not copied; the caller
    only reads the tensors (a client copies them into its model) and drops them before the message."""
    groups = layout.groups()
    if set(arrays) != set(groups):
        raise ValueError(f"weights hold arrays {sorted(arrays)}, the layout expects {sorted(groups)}")
    out: dict[str, torch.Tensor] = {}
    for group, idx in groups.items():
        flat = _tensor(arrays[group], borrowed)
        _as_layout_dtype(flat[:0], layout.dtypes[idx[0]], group)  # (only checks that it can be)
        sizes = [layout.numel(i) for i in idx]
        if flat.dim() != 1 or flat.numel() != sum(sizes):
            raise ValueError(
                f"weights: array {group!r} has shape {tuple(flat.shape)}, the layout expects ({sum(sizes)},)"
            )
        for i, part in zip(idx, torch.split(flat, sizes)):
            out[layout.names[i]] = part.view(layout.shapes[i])
    return {name: out[name] for name in layout.names}


def encode(arrays: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """`flatten`'s arrays (or the strategy's aggregate of them) as they travel: in the layout's dtype (a float64
    aggregate is cast once here, not on every client), and with bf16 transport each float32 group's bfloat16
    bits in an int16 array (round to nearest even)."""
    groups, out = layout.groups(), {}
    for g, a in arrays.items():
        t = _as_layout_dtype(_tensor(a), layout.dtypes[groups[g][0]], g) if g in groups else _tensor(a)
        if layout.transport == "bf16" and t.dtype == torch.float32:
            t = t.to(torch.bfloat16).view(torch.int16)
        out[g] = t.numpy()
    return out


def _as_layout_dtype(t: torch.Tensor, dtype: str, group: str) -> torch.Tensor:
    if _dtype_name(t.dtype) == dtype:
        return t
    if t.is_floating_point() and getattr(torch, dtype).is_floating_point:
        return t.to(getattr(torch, dtype))
    raise ValueError(f"weights: array {group!r} is {_dtype_name(t.dtype)}, the layout expects {dtype}")


def decode(arrays: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """Arrays received back in their layout dtypes (bf16-coded groups to float32): what `unflatten` and the
    strategies' averaging take."""
    if layout.transport == "fp32":
        return dict(arrays)
    groups = layout.groups()
    out = {}
    for g, a in arrays.items():
        if g in groups and layout.dtypes[groups[g][0]] == _FLOAT:
            if a.dtype != np.int16:
                raise ValueError(f"weights: array {g!r} is {a.dtype}, bf16 transport sends int16-coded bfloat16")
            a = _tensor(a, borrowed=True).view(torch.bfloat16).to(torch.float32).numpy()  # (.to copies)
        out[g] = a
    return out


def _tensor(array: np.ndarray, borrowed: bool = False) -> torch.Tensor:
    if array.flags.writeable:
        return torch.from_numpy(array)
    if not borrowed:  # (a Flower Array's numpy() can be read-only; torch wants writable memory)
        return torch.from_numpy(array.copy())
    with warnings.catch_warnings():  # torch's one-time warning about exactly this, expected here: only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(array)


def array_view(a) -> np.ndarray:
    """A read-only view of a Flower Array's numbers in its serialized bytes (Array.numpy() copies them out, into
    fresh memory): the server's non-finite check and mean, and a client's unpacking, read each message once.
    Duck-typed (`data`, `stype`, `numpy()`): no Flower import here."""
    data = a.data
    if a.stype != NPY_STYPE or not isinstance(data, (bytes, bytearray, memoryview)):
        return a.numpy()
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = header(buf)
    if dtype.hasobject:
        return a.numpy()  # (refused there: no pickles)
    count = math.prod(shape)
    view = np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell())
    return view.reshape(shape, order="F" if fortran else "C")


NPY_STYPE = "numpy.ndarray"  # Flower's SType.NUMPY: an Array whose bytes are np.save's


def npy_fields(array: np.ndarray) -> dict:
    """Flower's `Array(**npy_fields(a))`: the same Array as `Array(a)`, byte for byte (np.save's format), built in
    one copy. Why: `Array(a)` runs np.save into a growing BytesIO and copies out of it, 0.1-0.4 s for each of
    the paper UNet's two 143 MB arrays, on every reply and every aggregate."""
    data = None
    if array.flags.c_contiguous and not array.dtype.hasobject and array.dtype.names is None:
        header = io.BytesIO()
        try:
            np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
            data = b"".join((header.getvalue(), memoryview(array.reshape(-1).view(np.uint8))))
        except ValueError:  # (a header too long for format 1.0: np.save picks a later version)
            data = None
    if data is None:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        data = buf.getvalue()
    return {"dtype": str(array.dtype), "shape": tuple(array.shape), "stype": NPY_STYPE, "data": data}


def nonfinite_at(array: np.ndarray) -> int | None:
    """Index (flat, C order) of the first NaN or Inf, or None. Why the sum first: a finite sum means every
    element is finite (NaN and Inf propagate; +Inf + -Inf is NaN), and summing 36M floats reads them once
    without allocating, where np.isfinite allocates a mask (5-10x slower); only a non-finite sum (a NaN, an
    Inf, or finite values overflowing float32) pays for the exact search."""
    if array.dtype.kind not in "fc" or array.size == 0:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(array.sum(dtype=array.dtype)):
            return None
    finite = np.isfinite(array.reshape(-1))
    return None if finite.all() else int(np.argmin(finite))


def wire_bytes(layout: Layout) -> int:
    """Bytes of weights in one message under this layout (what a link carries per message)."""
    total = 0
    for i, dtype in enumerate(layout.dtypes):
        bf16 = dtype == _FLOAT and layout.transport == "bf16"
        total += layout.numel(i) * (2 if bf16 else torch.empty(0, dtype=getattr(torch, dtype)).element_size())
    return total
