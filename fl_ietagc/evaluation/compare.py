"""Compare evaluated runs: one table of every metric per run, and the relative change against the first.

    fl-ietagc compare RUN_A RUN_B ... [--out DIR]      (each run evaluated first with `fl-ietagc evaluate`)

Pixel runs: fractions of generated images flagged by each memorization rule (MQ at every tau, the 1/3 rule,
Carlini, exact copies), the held-out null rate of MQ at 0.2 and of the 1/3 rule, and FID when computed.
Text-to-image runs: the copy scores under the evaluation's embedder (named in each row), the held-out null and the
CLIP score when measured. Runs evaluated with different metrics, or with different numbers of samples, are refused.
MQ values of a run whose evaluation flagged MQ as unreliable (small training set) are marked "unreliable".
Writes comparison.md and comparison.json to --out (default: the current directory) and prints the table.
"""

from __future__ import annotations

from pathlib import Path

from fl_ietagc.evaluation.evaluate import read_results
from fl_ietagc.runs.checkpoints import BadFileError, atomic_write_json


def metric_values(r: dict) -> dict[str, float | None]:
    if r.get("model-type") == "latent-t2i":
        return t2i_metric_values(r)
    mem, null = r["memorization"], r["null"]
    values: dict[str, float | None] = {f"MQ r<{tau}": mem["mq"][tau]["fraction"] for tau in mem["mq"]}
    values["1/3 rule"] = mem["one_third_rule"]["fraction"]
    values["Carlini l<1"] = mem["carlini"]["fraction"]
    values["exact copies"] = mem["exact_copies"]["fraction"]
    values["null: MQ r<0.2"] = null["mq"].get("0.2", {}).get("fraction")
    values["null: 1/3 rule"] = null["one_third_rule"]["fraction"]
    values["FID"] = r["quality"].get("fid") if r["quality"].get("computed") else None
    return values


def t2i_metric_values(r: dict) -> dict[str, float | None]:
    """A text-to-image run: copy scores under its main embedder (named in every row), the held-out null, CLIP."""
    mem, null = r["memorization"], r["null"]
    e = mem["embedder"]
    clip = r.get("clip_score")
    return {
        f"{e}: mean top-1 similarity": mem["mean_top1"],
        f"{e}: 95th pct top-1": mem["q95_top1"],
        f"{e}: fraction > {mem['threshold']:g}": mem["fraction_above"],
        "nearest is its caption's image": mem["fraction_nearest_own_caption"],
        f"null: {e} mean top-1": null.get("mean_top1"),
        "CLIP score": clip if isinstance(clip, (int, float)) else None,
    }


def relative(v: float | None, base: float | None) -> str:
    if v is None or base is None:
        return "n/a"
    if base == 0:
        return "0%" if v == 0 else "n/a (base 0)"
    return f"{100 * (v - base) / base:+.1f}%"


def compare(run_dirs: list[str]) -> dict:
    results = [read_results(d) for d in run_dirs]  # each missing / corrupt results.json named
    names, values, settings = [], [], []
    for d, r in zip(run_dirs, results):
        try:
            names.append(Path(r["run"]).name)
            values.append(metric_values(r))
            settings.append(
                {
                    "kind": r["kind"],
                    "num_samples": r.get("num_samples", r.get("num_generations")),
                    **{k: r[k] for k in ("sampler", "steps", "weights", "round")},
                    "mq_reliable": r["memorization"].get("mq_reliable"),
                }
            )
        except (KeyError, TypeError, AttributeError) as e:
            path = Path(d) / "results.json" if Path(d).is_dir() else Path(d)
            raise BadFileError(
                f"{path}: corrupt evaluation results ({type(e).__name__}: {e}); evaluate the run again"
            ) from e
    if len({tuple(v) for v in values}) > 1:
        raise BadFileError(
            f"{', '.join(run_dirs)}: these runs were evaluated with different metrics (pixel vs "
            f"text-to-image, or another embedder); compare like with like"
        )
    counts = [s["num_samples"] for s in settings]
    if len(set(counts)) > 1:  # a rate over 64 samples and one over 1000 differ by noise alone
        raise ValueError(
            f"these runs were evaluated with different numbers of samples "
            f"({', '.join(f'{n}: {c}' for n, c in zip(names, counts))}); evaluate them again with the "
            f"same --num-samples (text-to-image: --num-captions x --seeds-per-caption) and compare"
        )
    metrics = list(values[0])
    return {
        "runs": names,
        "paths": [r["run"] for r in results],
        "settings": settings,
        "metrics": {m: [v.get(m) for v in values] for m in metrics},
        "relative_to_first": {m: [relative(v.get(m), values[0].get(m)) for v in values] for m in metrics},
    }


def to_markdown(table: dict) -> str:
    runs = table["runs"]

    def fmt(v):
        return "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    head = "| metric | " + " | ".join(runs) + " |\n|---|" + "---|" * len(runs) + "\n"
    unreliable = [s.get("mq_reliable") is False for s in table["settings"]]
    rows = []
    for m, vals in table["metrics"].items():
        rel = table["relative_to_first"][m]
        cells = [fmt(vals[0])] + [f"{fmt(v)} ({r})" for v, r in zip(vals[1:], rel[1:])]
        if "MQ" in m:  # evaluate's own flag: too few training images per neighbour for MQ ratios to mean much
            cells = [f"{c} unreliable" if u else c for c, u in zip(cells, unreliable)]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    settings = "; ".join(
        f"{n}: {s['kind']}, {s['num_samples']} {s['sampler']}-{s['steps']} samples, {s['weights']} "
        f"weights, round {s['round']}"
        for n, s in zip(runs, table["settings"])
    )
    note = ""
    if any(unreliable):
        note = (
            f" MQ is marked unreliable for {', '.join(n for n, u in zip(runs, unreliable) if u)}: the training "
            f"set is small for its k nearest neighbours (fl-ietagc evaluate's flag); lean on the 1/3 rule."
        )
    first = f"{table['note']}\n\n" if table.get("note") else ""  # e.g. a smoke study's "pipeline check" label
    return first + head + "\n".join(rows) + f"\n\nRelative change against {runs[0]} in parentheses. {settings}{note}\n"


def write_comparison(table: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "comparison.json", table)
    (out / "comparison.md").write_text(to_markdown(table))
    return out / "comparison.md"
