"""Figures (matplotlib) and the self-contained HTML report of an evaluation.

Figures, each a PNG in <out>/report/ and embedded in report.html:
- samples:          the first 64 generated images
- similar_pairs:    the generated images closest to a training image, ascending distance, each shown right
                    after its nearest training image (paper Fig. 3)
- skipped:          most and least skipped training images over the run (Fig. 4)
- skip_histogram:   distribution of per-image skip counts (Fig. 5)
- loss_by_timestep: loss per timestep, mean and 15th-85th percentile band, memorized vs other training
                    images, "memorized" decided by the MQ pass (Fig. 2)
- rounds:           per-round loss, overall skip rate and per-client skip rates of the run
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from fl_ietagc.data.pixels import uint8_to_unit_range  # noqa: E402
from fl_ietagc.runs.checkpoints import atomic_write_bytes  # noqa: E402

PAIRS = 24
SKIPPED = 32


def _grid(images_uint8: torch.Tensor, nrow: int) -> np.ndarray:
    g = make_grid(uint8_to_unit_range(images_uint8), nrow=nrow, padding=2, pad_value=1.0)
    return g.permute(1, 2, 0).numpy()


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _image_panel(ax, images: torch.Tensor, nrow: int, title: str) -> None:
    ax.imshow(_grid(images, nrow), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def read_round_metrics(run) -> list[dict]:
    """The run's per-round records (metrics.json) as the "rounds" figure uses them; a corrupt file, or records
    without round / loss / skip-rate / skip-rate-per-client, raise ValueError naming the file."""
    metrics = run.read_metrics()  # ValueError naming the file if it is not JSON
    ok = isinstance(metrics, list) and all(
        isinstance(m, dict)
        and isinstance(m.get("round"), int)
        and "loss" in m
        and "skip-rate" in m
        and isinstance(m.get("skip-rate-per-client"), list)
        for m in metrics
    )
    if ok and metrics:
        ok = len({len(m["skip-rate-per-client"]) for m in metrics}) == 1
    if not ok:
        raise ValueError(
            f"{run.metrics_path}: corrupt metrics file (expected a list of per-round records with "
            f"round, loss, skip-rate and skip-rate-per-client)"
        )
    return metrics


def read_skip_counts(run, num_train: int) -> np.ndarray | None:
    """skip_counts.npy (one count per training image), None if the run has none; a corrupt file, or one of
    the wrong length, raises ValueError naming it. Loaded with allow_pickle=False: no code can run."""
    path = run.skip_counts_path
    if not path.is_file():
        return None
    try:
        counts = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated, not .npy, or an object array (which would need pickle)
        raise ValueError(f"{path}: corrupt skip counts ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if (
        not isinstance(counts, np.ndarray)
        or counts.ndim != 1
        or counts.dtype.kind not in "iu"
        or len(counts) != num_train
        or (len(counts) and counts.min() < 0)
    ):
        raise ValueError(
            f"{path}: corrupt skip counts (expected {num_train} non-negative integers, one per "
            f"training image, got {getattr(counts, 'dtype', '?')} {getattr(counts, 'shape', '?')})"
        )
    return counts


def make_figures(
    out: Path, *, run, samples: torch.Tensor, train: torch.Tensor, nb, mq: np.ndarray, loss_curves: dict | None
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}

    fig, ax = plt.subplots(figsize=(5, 5))
    _image_panel(ax, samples[:64], 8, f"generated samples (first {min(64, len(samples))})")
    figs["samples"] = _save(fig, out / "samples.png")

    order = np.argsort(nb.d2[:, 0].numpy(), kind="stable")[:PAIRS]
    pairs = torch.stack([img for i in order for img in (train[nb.index[i, 0]], samples[i])])
    fig, ax = plt.subplots(figsize=(7, 7 * max(1, len(order) // 4) / 6 + 0.6))
    _image_panel(
        ax,
        pairs,
        8,
        "closest generated images (right of each pair) and their nearest training image "
        f"(left), ascending distance; MQ r of the first: {mq[order[0]]:.3f}",
    )
    figs["similar_pairs"] = _save(fig, out / "similar_pairs.png")

    counts = read_skip_counts(run, len(train))
    if counts is not None:
        if counts.sum() > 0:
            by = np.argsort(-counts, kind="stable")
            most, least = by[:SKIPPED], by[::-1][:SKIPPED]
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
            _image_panel(
                axes[0],
                train[torch.from_numpy(most.copy())],
                8,
                f"most skipped ({counts[most[0]]}..{counts[most[-1]]} skips)",
            )
            _image_panel(
                axes[1],
                train[torch.from_numpy(least.copy())],
                8,
                f"least skipped ({counts[least[0]]}..{counts[least[-1]]} skips)",
            )
            figs["skipped"] = _save(fig, out / "skipped.png")
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(counts, bins=skip_bins(int(counts.max())), color="tab:blue")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("times skipped by AGC over the run (bins of whole counts; a gap: no image skipped so often)")
        ax.set_ylabel("training images")
        ax.set_title(f"skip counts: mean {counts.mean():.2f}, max {counts.max()}", fontsize=9)
        figs["skip_histogram"] = _save(fig, out / "skip_histogram.png")

    if loss_curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        t = loss_curves["timesteps"]
        for (name, c), colour in zip(loss_curves["groups"].items(), ("tab:red", "tab:blue")):
            ax.plot(t, c["mean"], color=colour, label=f"{name} (n={c['n']})")
            ax.fill_between(t, c["p15"], c["p85"], color=colour, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("epsilon loss (15th-85th pct band)")
        ax.legend(fontsize=8)
        figs["loss_by_timestep"] = _save(fig, out / "loss_by_timestep.png")

    metrics = read_round_metrics(run)
    if metrics:
        rounds = [m["round"] for m in metrics]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3))
        axes[0].plot(rounds, [m["loss"] for m in metrics], marker="o")
        axes[0].set_title("mean loss", fontsize=9)
        axes[1].plot(rounds, [m["skip-rate"] for m in metrics], marker="o")
        axes[1].set_title("skip rate (all clients)", fontsize=9)
        per_client = np.array([m["skip-rate-per-client"] for m in metrics])
        for c in range(per_client.shape[1]):
            axes[2].plot(rounds, per_client[:, c], marker=".", label=f"client {c}")
        axes[2].set_title("skip rate per client", fontsize=9)
        if per_client.shape[1] <= 10:
            axes[2].legend(fontsize=7)
        for a in axes:
            a.set_xlabel("round")
        figs["rounds"] = _save(fig, out / "rounds.png")
    return figs


def metrics_rows(results: dict) -> list[tuple[str, str, str]]:
    """(metric, generated, held-out real images = null) rows of the report's table."""
    mem, null = results["memorization"], results["null"]

    def rate(d):
        return f"{d['count']} ({100 * d['fraction']:.2f}%)"

    rows = [(f"MQ r < {tau}", rate(mem["mq"][tau]), rate(null["mq"][tau])) for tau in mem["mq"]]
    rows += [
        ("1/3 rule (l2 1st / 2nd < 1/3)", rate(mem["one_third_rule"]), rate(null["one_third_rule"])),
        ("Carlini (l2 1st / (0.5 mean l2 of k) < 1)", rate(mem["carlini"]), rate(null["carlini"])),
        ("exact copies (distance 0)", rate(mem["exact_copies"]), rate(null["exact_copies"])),
    ]
    q = results["quality"]
    if q.get("computed"):
        for key in ("fid", "isc_mean", "kid_mean", "precision", "recall"):
            if key in q:
                rows.append((key.upper() if key == "fid" else key, f"{q[key]:.4g}", ""))
    else:
        rows.append(("FID", "not computed", ""))
    return rows


def write_html(path: Path, results: dict, figures: dict[str, Path]) -> Path:
    mem = results["memorization"]
    notes = []
    if not mem["mq_reliable"]:
        notes.append(
            f"The training set ({mem['num_train']} images) is not much larger than k = {mem['k']}: the 50 "
            f"nearest neighbours are a large part of it, so MQ ratios are unreliable here. Lean on the "
            f"1/3 rule and the held-out null rate."
        )
    if not results["quality"].get("computed"):
        notes.append("FID was not computed: " + results["quality"]["reason"])
    info = (
        f"{results['num_samples']} samples, {results['sampler']} ({results['steps']} steps), "
        f"{results['weights']} weights of round {results['round']} ({results['checkpoint']}), seed "
        f"{results['seed']}; {results['num_train']} training images, {results['num_heldout']} held-out; k = {mem['k']}; "
        f"memorized training images ({results.get('memorized_rule', 'n/a')}): {results.get('memorized_train_images', 'n/a')}"
    )
    return write_page(path, results, info, notes, metrics_rows(results), figures)


def write_page(
    path: Path, results: dict, info: str, notes: list[str], rows: list[tuple[str, str, str]], figures: dict[str, Path]
) -> Path:
    """The self-contained report.html (written atomically): title from results' run and kind, the `info` line,
    `notes` highlighted, a (metric, generated, held-out real = null rate) table, the figures embedded."""
    table = "".join(
        f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>" for a, b, c in rows
    )
    imgs = "".join(
        f"<h3>{html.escape(name.replace('_', ' '))}</h3><img src='data:image/png;base64,"
        f"{base64.b64encode(Path(p).read_bytes()).decode()}' style='max-width:100%'>"
        for name, p in figures.items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fl-ietagc evaluation</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td,th{{padding:2px 10px;border-bottom:1px solid #ddd}}
.note{{background:#fff3cd;padding:6px 10px;margin:6px 0}}</style></head><body>
<h1>Evaluation of {html.escape(Path(results["run"]).name)} ({html.escape(results["kind"])})</h1>
<p>{html.escape(info)}</p>{"".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)}
<table><tr><th>metric</th><th>generated</th><th>held-out real (null rate)</th></tr>{table}</table>
{imgs}</body></html>"""
    atomic_write_bytes(path, lambda f: f.write(page.encode()))
    return path


def skip_bins(max_count: int, most: int = 50) -> np.ndarray:
    """Histogram edges for integer skip counts 0..max_count: at most `most` bins, each holding the same whole number
    of counts and centred on them (edges at half-integers). Evenly spaced edges from 0 to max would put some bins
    between two integers, drawn empty though no count is missing."""
    width = max(1, math.ceil((max_count + 1) / most))
    return np.arange(0, max_count + width + 1, width) - 0.5
