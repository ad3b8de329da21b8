"""What moves the effect: the small-data study's sweep over K, lambda, the local epochs per round and RET.

    fl-ietagc-study small-data --full --set sweep=all                       # every knob, one seed per point
    fl-ietagc-study small-data --full --set sweep=k,lambda --set sweep-seeds=3   # two knobs, three seeds each
    fl-ietagc-study small-data --full --set size=horizon --set sweep=all    # at the horizon's step budget

One knob moves at a time from the size's own values (IET-AGC at K = clients, lambda = agc-lambda, E = local
epochs); every point runs to the same step budget (`max-steps`, else the size's rounds x its steps per round),
evaluated every round, and reports steps to 25% (and 10%) copies (experiments/studies/horizon.py), next to default
training's at the same size (the baseline line of the figure). Knobs:

- k: K in (2, 4, 8). The batch is capped at a shard (32 images at K = 8: shards of 4, batch 4) and the local epochs
  scaled by batch / the size's batch, so a round keeps the same number of optimizer steps (the aggregation period
  in steps stays put; only the number of shards, and where needed the batch, move);
- lambda: AGC's lambda in (1.5, 2, 3);
- epochs: local epochs per round x (1/2, 1, 2): the aggregation period; the rounds follow from the budget;
- ret: RET (agc + redistribution + TAA) with TAA's shift scaled to the image: taa-max-shift = image-size / 8
  (at least 1), the default 4 pixels' share of a 32x32 image.

Runs are ordinary run directories under the study's runs/ (`iet-agc-k4-s0`, `iet-agc-lambda3-s0`,
`iet-agc-epochs100-s0`, `ret-shift1-s0`; a knob's point at the size's own value is the run `iet-agc-s0`, shared):
finished runs are kept, cut ones resumed, as in the study. Output: sweep.md, sweep.json and
figures/sweep_steps_to_25.png in the study directory.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KNOBS = {"k": (2, 4, 8), "lambda": (1.5, 2.0, 3.0), "epochs": (0.5, 1.0, 2.0), "ret": ("scaled",)}
KNOB_NAMES = {
    "k": "K (clients)",
    "lambda": "AGC lambda",
    "epochs": "local epochs per round",
    "ret": "RET, shift scaled",
}


def parse_knobs(value: str) -> tuple[str, ...]:
    """`all` or distinct names among KNOBS, comma-separated; ValueError otherwise."""
    if value.strip() == "all":
        return tuple(KNOBS)
    knobs = tuple(v.strip() for v in value.split(","))
    if not knobs or len(set(knobs)) != len(knobs) or not set(knobs) <= set(KNOBS):
        raise ValueError(value)
    return knobs


@dataclass(frozen=True)
class Point:
    knob: str  # "baseline" for default training
    value: float | int | str
    variant: str
    size: object  # small_data.Size of this point (clients, batch, epochs, rounds, lambda)
    extra: tuple = ()  # run-config (key, value) pairs of this point only
    tag: str = ""  # run-name stem: the run is f"{tag}-s{seed}"


def steps_per_round(size) -> int:
    """Optimizer steps of one round, all clients together (default training matches them)."""
    return size.local_epochs * size.clients * ((size.train_images // size.clients) // size.batch_size)


def sweep_plan(size, knobs: tuple[str, ...]) -> list[Point]:
    """Every run of the sweep (each run once; a knob's point at the size's own value is the shared base run),
    all to the same step budget. Pure: no files, no training."""
    budget = size.max_steps or size.rounds * steps_per_round(size)

    def at_budget(s):
        return dataclasses.replace(s, rounds=max(1, math.ceil(budget / steps_per_round(s))))

    base = Point("base", "", "iet-agc", at_budget(size), tag="iet-agc")
    points = [Point("baseline", "", "default", at_budget(size), tag="default"), base]
    for knob in knobs:
        for value in KNOBS[knob]:
            if knob == "k":
                if value == size.clients:
                    points.append(dataclasses.replace(base, knob=knob, value=value))
                    continue
                batch = min(size.batch_size, size.train_images // value)
                epochs = max(1, round(size.local_epochs * batch / size.batch_size))
                s = dataclasses.replace(size, clients=value, batch_size=batch, local_epochs=epochs)
                points.append(Point(knob, value, "iet-agc", at_budget(s), tag=f"iet-agc-k{value}"))
            elif knob == "lambda":
                if value == size.agc_lambda:
                    points.append(dataclasses.replace(base, knob=knob, value=value))
                    continue
                s = dataclasses.replace(size, agc_lambda=value)
                points.append(Point(knob, value, "iet-agc", at_budget(s), tag=f"iet-agc-lambda{value:g}"))
            elif knob == "epochs":
                epochs = max(1, round(size.local_epochs * value))
                if epochs == size.local_epochs:
                    points.append(dataclasses.replace(base, knob=knob, value=epochs))
                    continue
                s = dataclasses.replace(size, local_epochs=epochs)
                points.append(Point(knob, epochs, "iet-agc", at_budget(s), tag=f"iet-agc-epochs{epochs}"))
            else:
                shift = max(1, size.image_size // 8)
                points.append(
                    Point(
                        knob, shift, "ret", at_budget(size), extra=(("taa-max-shift", shift),), tag=f"ret-shift{shift}"
                    )
                )
    return points


def runs_of(points: list[Point]) -> list[Point]:
    """The distinct runs of a plan (the base point appears under several knobs)."""
    seen, out = set(), []
    for p in points:
        if p.tag not in seen:
            seen.add(p.tag)
            out.append(p)
    return out


def run_sweep(
    size,
    extra: dict,
    study_dir: Path,
    *,
    size_name: str,
    job_config,
    run_pool,
    quality=None,
    workers: int = 2,
    progress: bool = True,
    dry_run: bool = False,
) -> dict | None:
    """The sweep's runs (kept / resumed / trained by small_data's `run_pool`; configs by its `job_config`, passed in:
    small_data imports this module), then sweep.md, sweep.json and the figure. `quality(cfg, results, size)`:
    small_data's final_quality (CFD of each run's last samples), None to leave the column out."""
    from experiments.studies import horizon as H
    from fl_ietagc.validate import check_output_dir

    knobs = tuple(size.sweep.split(","))
    points = sweep_plan(size, knobs)
    seeds = size.seeds[: size.sweep_seeds]
    check_output_dir(str(study_dir))
    tasks = []
    for p in runs_of(points):
        for seed in seeds:
            cfg = job_config(p.variant, seed, p.size, {**extra, **dict(p.extra)}, study_dir, f"{p.tag}-s{seed}")
            tasks.append((p.variant, seed, cfg, p.variant != "default", p.size))
    if dry_run:
        print(
            f"small-data sweep ({size_name}), dry run: {len(tasks)} runs ({len(runs_of(points))} points x "
            f"{len(seeds)} seed(s)) into {study_dir}: {', '.join(t[2].run_name for t in tasks)}",
            flush=True,
        )
        return None
    study_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"small-data sweep ({size_name}): {len(tasks)} runs, {workers} worker(s), in {study_dir}", flush=True)
    results = {Path(r["run"]).name: r for r in run_pool(tasks, workers, t0, progress)}
    scores = quality(tasks[0][2], list(results.values()), size) if quality is not None else None
    rng = np.random.default_rng(23)
    rows = []
    for p in points:
        runs = [results[f"{p.tag}-s{seed}"] for seed in seeds]
        steps = [float(x["steps"]) for x in runs[0]["rounds"]]
        flags = [[np.asarray(x["flags"]["one_third"]) for x in r["rounds"]] for r in runs]
        rows.append(
            {
                "knob": p.knob,
                "value": p.value,
                "variant": p.variant,
                "run": p.tag,
                "clients": p.size.clients,
                "batch_size": p.size.batch_size,
                "local_epochs": p.size.local_epochs,
                "rounds": p.size.rounds,
                "agc_lambda": p.size.agc_lambda,
                "extra": dict(p.extra),
                "steps_to": {f"{t:g}": H.steps_to(steps, flags, t, rng) for t in H.TARGETS},
                "final": float(H.curve(flags)[-1]),
                # quality at the budget: a point that copies less but draws worse digits is no better
                "cfd": None
                if scores is None
                else float(np.mean([scores["runs"][f"{p.tag}-s{s}"]["cfd"] for s in seeds])),
            }
        )
    summary = {
        "size": dataclasses.asdict(size),
        "size_name": size_name,
        "seeds": list(seeds),
        "knobs": list(knobs),
        "points": rows,
        "quality": None if scores is None else {k: v for k, v in scores.items() if k != "runs"},
        "seconds": time.time() - t0,
        "pipeline_check": size_name.endswith("smoke"),
    }
    fig = figure(summary, study_dir / "figures")
    summary["figures"] = {"sweep_steps_to_25": str(fig)}
    if summary["pipeline_check"]:
        from experiments.studies.pipeline_check import label_figures

        label_figures(study_dir)
    from fl_ietagc.runs.checkpoints import atomic_write_bytes, atomic_write_json

    atomic_write_json(study_dir / "sweep.json", summary)
    table = to_markdown(summary)
    atomic_write_bytes(study_dir / "sweep.md", lambda f: f.write((table + "\n").encode()))
    print(table)
    print(f"sweep: {study_dir / 'sweep.md'}, {study_dir / 'sweep.json'}, {fig}", flush=True)
    return summary


def to_markdown(summary: dict) -> str:
    from experiments.studies.horizon import fmt_steps

    lines = ["SMOKE RUN: pipeline check, not a finding.", ""] if summary["pipeline_check"] else []
    lines += [
        "| knob | value | variant | K | batch | local epochs | rounds | lambda | steps to 10% | steps to 25% | "
        "copy rate at the end | CFD at the end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["points"]:
        value = r["value"] if r["value"] != "" else "-"
        lines.append(
            f"| {r['knob']} | {value} | {r['variant']} | {r['clients']} | {r['batch_size']} | "
            f"{r['local_epochs']} | {r['rounds']} | {r['agc_lambda']:g} | {fmt_steps(r['steps_to']['0.1'])} | "
            f"{fmt_steps(r['steps_to']['0.25'])} | {100 * r['final']:.1f}% | "
            f"{'n/a' if r.get('cfd') is None else format(r['cfd'], '.1f')} |"
        )
    lines += [
        "",
        f"1/3 rule; seeds {', '.join(map(str, summary['seeds']))}; every point to the same step budget; "
        "intervals: hierarchical bootstrap over seeds and samples (one seed: over samples only).",
    ]
    q = summary.get("quality")
    if q:
        lines.append(
            f"CFD (lower is better): Frechet distance of {q['num_images']} last-round samples to the training split "
            f"in a small classifier's features (held-out accuracy {100 * q['classifier_accuracy']:.1f}%); held-out "
            f"real images score {q['held-out real']['cfd']:.1f}. Not FID."
        )
    return "\n".join(lines)


def figure(summary: dict, fig_dir: Path) -> Path:
    """Against each knob (one column per knob): steps to 25% copies (a point not reached within the budget drawn
    at the budget as an open triangle), the copy rate at the budget and, where scored, the CFD at the budget;
    default training's value as a dashed line in each. Why three rows: below default training's horizon most
    points never reach 25%, and a point that copies nothing may simply not have learned yet (its CFD says which)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    knobs = summary["knobs"]
    baseline = next(r for r in summary["points"] if r["knob"] == "baseline")
    base = baseline["steps_to"]["0.25"]
    rows = ["steps", "final"] + (["cfd"] if baseline.get("cfd") is not None else [])
    fig, axes = plt.subplots(
        len(rows), len(knobs), figsize=(3.6 * len(knobs), 2.9 * len(rows)), squeeze=False, sharey="row"
    )
    for col, knob in enumerate(knobs):
        pts = [r for r in summary["points"] if r["knob"] == knob]
        labels = [str(r["value"]) for r in pts]
        if knob == "ret":  # one point: next to IET-AGC at the size's own values
            pts = [r for r in summary["points"] if r["knob"] == "base"] + pts
            labels = ["IET-AGC"] + [f"RET, shift {r['value']}" for r in pts[1:]]
        ax = axes[0, col]
        for i, r in enumerate(pts):
            s = r["steps_to"]["0.25"]
            if s["steps"] is None:
                ax.plot(i, s["budget"], marker="^", mfc="none", color="C1")
                continue
            hi = s["budget"] if s["hi"] is None else s["hi"]
            ax.errorbar(
                i, s["steps"], yerr=[[s["steps"] - s["lo"]], [hi - s["steps"]]], marker="o", color="C1", capsize=3
            )
        if base["steps"] is not None:
            ax.axhline(base["steps"], color="C0", ls="--", lw=1, label="default training")
        for row, key in enumerate(rows[1:], start=1):
            scale = 100.0 if key == "final" else 1.0
            axes[row, col].plot(range(len(pts)), [scale * r[key] for r in pts], marker="o", color="C1")
            axes[row, col].axhline(scale * baseline[key], color="C0", ls="--", lw=1, label="default training")
        for row in range(len(rows)):
            axes[row, col].set_xticks(range(len(pts)), labels)
            axes[row, col].grid(alpha=0.3)
        axes[-1, col].set_xlabel(KNOB_NAMES[knob])
    budget = int(base["budget"])
    names = {
        "steps": "optimizer steps to 25% copies\n(1/3 rule)",
        "final": f"copies at {budget:,} steps (%)",
        "cfd": f"CFD at {budget:,} steps\n(lower is better)",
    }
    for row, key in enumerate(rows):
        axes[row, 0].set_ylabel(names[key], fontsize=9)
    axes[min(1, len(rows) - 1), 0].legend(fontsize=8)
    fig.suptitle("what moves the effect (open triangle: not reached within the budget)", fontsize=9)
    fig.tight_layout()
    path = fig_dir / "sweep_steps_to_25.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
