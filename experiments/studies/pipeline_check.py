"""Labels for smoke-size study outputs: they check that the pipeline runs end to end, they are not findings.

A smoke study trains a tiny model for a few steps and evaluates a handful of samples, so its numbers are noise
(the untrained reference may well score best). Its tables start with NOTE, and every PNG figure in its study
directory (the study's own figures, each run's samples.png and evaluation report figures) gets a red banner saying
so, in the image itself, so a figure copied elsewhere keeps the label. Other PNGs (the smoke data's own images)
are left alone.
"""

from __future__ import annotations

from pathlib import Path

BANNER = "SMOKE RUN - pipeline check, not a finding"
NOTE = (
    f"**{BANNER}.** A tiny model, a few optimizer steps and a handful of samples: these numbers show that every "
    f"stage ran, not how the methods compare (an untrained model may score best). Use --full for results."
)
_STAMP_KEY = "fl-ietagc-pipeline-check"  # PNG text chunk: a stamped figure is not stamped twice


FIGURES = ("figures/*.png", "**/samples.png", "**/report/*.png")  # the study's, each run's grid and report figures


def label_figures(folder: Path) -> list[Path]:
    """Add BANNER above every figure under `folder` (FIGURES: never other PNGs, such as a smoke study's own
    training images) that does not carry it yet; returns those labelled. Each file is replaced atomically."""
    from PIL import Image, ImageDraw, PngImagePlugin

    from fl_ietagc.runs.checkpoints import atomic_write_bytes

    done = []
    for path in sorted({p for pattern in FIGURES for p in Path(folder).glob(pattern)}):
        with Image.open(path) as im:
            if im.info.get(_STAMP_KEY):
                continue
            im = im.convert("RGB")
        bar = max(14, im.width // 40)
        out = Image.new("RGB", (im.width, im.height + bar), (200, 0, 0))
        out.paste(im, (0, bar))
        draw = ImageDraw.Draw(out)
        draw.text((4, (bar - 11) // 2), BANNER if im.width >= 260 else "SMOKE: pipeline check", fill=(255, 255, 255))
        meta = PngImagePlugin.PngInfo()
        meta.add_text(_STAMP_KEY, "1")
        atomic_write_bytes(path, lambda f, out=out, meta=meta: out.save(f, format="png", pnginfo=meta))
        done.append(path)
    return done


def is_labelled(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return bool(im.info.get(_STAMP_KEY))
