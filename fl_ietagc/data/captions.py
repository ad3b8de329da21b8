"""Image-caption datasets for the text-to-image path: images resized and centre-cropped to the model's size.

Accepted sources (`load_captioned(source, size)`):

- a folder with `metadata.jsonl` (one {"file_name": ..., "text": ...} per line) or `metadata.csv` (columns
  `file_name` and `text`) beside the images: Hugging Face ImageFolder's captioned layout, so a folder made for
  diffusers' text-to-image scripts loads unchanged. `caption` is accepted for `text`;
- a `.csv` file of paths and captions (columns `file_name`, `path` or `image`; `text` or `caption`), paths relative
  to the file's folder;
- a `.parquet` file with the same columns (needs pyarrow).

Every row is checked before any image is decoded: a missing column, an empty caption, a path outside the
dataset folder or a missing file fails with one line naming the file and row. Images are decoded with Pillow
(never unpickled), converted to RGB, the shorter side resized to `size` (bicubic, antialiased) and centre-cropped.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fl_ietagc.data.imagesets import holdout_count
from fl_ietagc.settings.config import ConfigError

PATH_COLUMNS = ("file_name", "path", "image")
TEXT_COLUMNS = ("text", "caption")


@dataclass
class CaptionedImages:
    images: torch.Tensor  # (N, 3, size, size) uint8
    captions: list[str]
    files: list[str]  # as given in the metadata, for reports

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, index) -> CaptionedImages:
        index = np.asarray(index, dtype=np.int64)
        return CaptionedImages(
            self.images[torch.from_numpy(index)], [self.captions[i] for i in index], [self.files[i] for i in index]
        )


def read_rows(source: str | Path) -> tuple[Path, list[dict], str]:
    """(folder the paths are relative to, rows, the metadata file's name for messages)."""
    src = Path(source)
    if src.is_dir():
        for name in ("metadata.jsonl", "metadata.csv"):
            if (src / name).is_file():
                meta = src / name
                break
        else:
            raise ConfigError(
                f"caption data {src}: no metadata.jsonl or metadata.csv in the folder (one row per "
                f"image: file_name and text)"
            )
        return src, _read_table(meta), str(meta)
    if src.is_file() and src.suffix.lower() in (".csv", ".parquet", ".jsonl"):
        return src.parent, _read_table(src), str(src)
    if not src.exists():
        raise ConfigError(f"caption data {src}: not found")
    raise ConfigError(f"caption data {src}: must be a folder with metadata.jsonl/.csv, or a .csv/.jsonl/.parquet file")


def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}: line {n}: not JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise ConfigError(f"{path}: line {n}: not a JSON object")
                    rows.append(row)
            return rows
        if suffix == ".csv":
            return _read_csv(path)
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or give a .csv") from None
        return pq.read_table(path).to_pylist()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _read_csv(path: Path) -> list[dict]:
    """Strict CSV: an unterminated quote (which a lenient reader runs to the end of the file, swallowing every
    later row into one caption) or a row whose field count differs from the header's is an error naming the line."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, strict=True)
        last = 0  # the line the previous row ended on: a bad row starts after it
        try:
            for row in reader:
                if None in row or None in row.values():
                    have = len(row) - (None in row) + len(row.get(None) or []) - sum(v is None for v in row.values())
                    raise ConfigError(
                        f"{path}: line {reader.line_num}: {have} field(s), the header has {len(reader.fieldnames)}"
                    )
                rows.append(row)
                last = reader.line_num
        except csv.Error as e:
            raise ConfigError(f"{path}: line {max(last, 1) + 1}: not valid CSV ({e}; an unterminated quote?)") from None
    return rows


def _column(rows: list[dict], names: tuple[str, ...], meta: str, what: str) -> str:
    have = set(rows[0])
    for name in names:
        if name in have:
            return name
    raise ConfigError(f"{meta}: no {what} column (one of {', '.join(names)}); columns: {', '.join(sorted(have))}")


def check_rows(folder: Path, rows: list[dict], meta: str) -> list[tuple[Path, str, str]]:
    """(image path, caption, path as given) per row; every problem found before decoding, naming file and row."""
    if not rows:
        raise ConfigError(f"{meta}: no rows")
    pcol, tcol = _column(rows, PATH_COLUMNS, meta, "image path"), _column(rows, TEXT_COLUMNS, meta, "caption")
    root = folder.resolve()
    out = []
    for n, row in enumerate(rows, start=1):
        rel, text = row.get(pcol), row.get(tcol)
        if rel is not None and not isinstance(rel, str):  # (JSON lines and parquet carry types)
            raise ConfigError(f"{meta}: row {n}: {pcol} is {type(rel).__name__} {rel!r}, not a string")
        if not isinstance(rel, str) or not rel.strip():
            raise ConfigError(f"{meta}: row {n}: empty {pcol}")
        if text is not None and not isinstance(text, str):
            raise ConfigError(f"{meta}: row {n} ({rel}): {tcol} is {type(text).__name__} {text!r}, not a string")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{meta}: row {n} ({rel}): empty {tcol}")
        path = (folder / rel).resolve()
        if root not in path.parents:
            raise ConfigError(f"{meta}: row {n}: {rel} is outside the dataset folder {folder}")
        if not path.is_file():
            raise ConfigError(f"{meta}: row {n}: image {rel} not found in {folder}")
        out.append((path, " ".join(text.split()), rel))
    return out


def load_image(path: Path, size: int) -> np.ndarray:
    """(3, size, size) uint8: RGB, shorter side resized to `size` (bicubic, antialiased), centre crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize(
                (max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC, reducing_gap=None
            )
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return arr.transpose(2, 0, 1).copy()


def load_captioned(source: str | Path, size: int, max_images: int = 0) -> CaptionedImages:
    """The dataset at `source` (see the module docstring), images at size x size."""
    if size < 8:
        raise ConfigError(f"image-size = {size}: must be >= 8 for a captioned dataset")
    folder, rows, meta = read_rows(source)
    checked = check_rows(folder, rows, meta)
    if max_images:
        checked = checked[:max_images]
    images = np.stack([load_image(path, size) for path, _, _ in checked])
    return CaptionedImages(torch.from_numpy(images), [c for _, c, _ in checked], [r for _, _, r in checked])


def captioned_splits(
    source: str | Path, size: int, max_images: int = 0, holdout_fraction: float = 0.1
) -> tuple[CaptionedImages, CaptionedImages]:
    """(training pairs, held-out pairs), as a run with dataset = captions splits them: the last
    data.holdout_count(N) rows are held out (the null set of the memorization metrics, never trained on);
    `max_images` then caps the training pairs."""
    data = load_captioned(source, size)
    n_hold = holdout_count(len(data), holdout_fraction)
    if holdout_fraction > 0 and n_hold == 0:
        raise ConfigError(
            f"caption data {source}: {len(data)} pair(s) leave none to hold out at holdout-fraction = "
            f"{holdout_fraction}; add pairs or use holdout-fraction = 0"
        )
    train = data.subset(np.arange(len(data) - n_hold))
    if max_images:
        train = train.subset(np.arange(min(max_images, len(train))))
    return train, data.subset(np.arange(len(data) - n_hold, len(data)))
