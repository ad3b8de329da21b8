"""The small-data study's horizon and mechanism report: built from the per-round evaluations of
experiments/studies/small_data.py with the pure arithmetic of experiments/studies/horizon.py.

- per variant: steps to 10% and 25% copies (1/3 rule) with bootstrap intervals; the copy rate at equal step marks;
  the quality score (CFD, per round, at round-samples images) where the copy rate reaches 10% / 25%;
- the horizon: where default training levelled off (`until-plateau`), or the step budget it ran to;
- the mechanism: at each round, each client's own model before averaging (1/3 rule against the whole training set
  and against its own shard; how often its nearest image is in its own shard) next to the averaged model.
Written to horizon.md and results.json's "horizon" / "mechanism"; figures copy_rate_vs_steps.png (extended in
small_data.py), quality_vs_copy_rate.png, mechanism.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.studies import horizon as H

RULE = "one_third"  # the primary copy measure at this size (docs/small-data-calibration.md)


def _flags(runs: list[dict]) -> tuple[list[float], list[list[np.ndarray]]]:
    steps = [float(x["steps"]) for x in runs[0]["rounds"]]
    return steps, [[np.asarray(x["flags"][RULE]) for x in r["rounds"]] for r in runs]


def _by_variant(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        out.setdefault(r["variant"], []).append(r)
    return out


def plateau(results: list[dict], size) -> dict:
    """Where default training's curve levelled off (horizon.plateau_round), or None within its budget."""
    steps, flags = _flags(_by_variant(results)["default"])
    r = H.plateau_round(
        flags,
        window=size.plateau_window,
        floor=size.plateau_floor,
        tolerance=size.plateau_tolerance,
        rng=np.random.default_rng(23),
    )
    return {
        "round": r,
        "steps": None if r is None else steps[r - 1],
        "budget_steps": steps[-1],
        "window": size.plateau_window,
        "floor": size.plateau_floor,
        "tolerance": size.plateau_tolerance,
    }


def truncate(result: dict, rounds: int) -> dict:
    """A run's record cut at `rounds` rounds (default training ran on to its budget; compared at the horizon)."""
    return result | {"rounds": result["rounds"][:rounds], "clients": result.get("clients", [])[:rounds]}


def build(results: list[dict], full_default: list[dict], quality: dict, size, plateau_info: dict | None) -> dict:
    rng = np.random.default_rng(23)
    by = _by_variant(results)
    budget = max(float(r["rounds"][-1]["steps"]) for r in results)
    marks = H.marks_for(_flags(max(by.values(), key=lambda runs: len(runs[0]["rounds"])))[0])
    out = {
        "rule": RULE,
        "targets": list(H.TARGETS),
        "marks": marks,
        "plateau": plateau_info,
        "until_plateau": bool(size.until_plateau),
        "budget_steps": budget,
        "variants": {},
        "round_images": quality.get("round_images"),
    }
    for name, runs in by.items():
        steps, flags = _flags(runs)
        c = H.curve(flags)
        cfd = quality.get("cfd_per_round", {}).get(name)
        out["variants"][name] = {
            "steps": steps,
            "curve": c.tolist(),
            "cfd_per_round": cfd,
            "steps_to": {f"{t:g}": H.steps_to(steps, flags, t, rng) for t in H.TARGETS},
            "at_marks": H.rate_at(steps, flags, marks, rng),
            "cfd_at": {f"{t:g}": None if cfd is None else H.quality_at_rate(steps, c, cfd, t) for t in H.TARGETS},
        }
    if full_default and len(full_default[0]["rounds"]) > len(by["default"][0]["rounds"]):
        steps, flags = _flags(sorted(full_default, key=lambda r: r["seed"]))
        boot = H.bootstrap_curves(flags, rng)
        out["default_to_budget"] = {
            "steps": steps,
            "curve": H.curve(flags).tolist(),
            "lo": np.quantile(boot, 0.025, axis=0).tolist(),
            "hi": np.quantile(boot, 0.975, axis=0).tolist(),
        }
    return out


def mechanism(results: list[dict]) -> dict:
    """Per federated variant and round: the averaged model's copy rate, its clients' own models' (mean over
    clients and seeds) against the whole set and against their own shards, and the share of client samples whose
    nearest training image is in the client's own shard. Rounds not recorded in every run are left out."""
    out = {}
    for name, runs in _by_variant(results).items():
        if not runs[0].get("clients"):
            continue
        rows = []
        for i, rnd in enumerate(runs[0]["rounds"]):
            recs = [r["clients"][i] if i < len(r["clients"]) else None for r in runs]
            if any(x is None for x in recs):
                continue
            clients = [c for x in recs for c in x["clients"]]
            rows.append(
                {
                    "round": rnd["round"],
                    "steps": rnd["steps"],
                    "averaged": float(np.mean([np.mean(r["rounds"][i]["flags"][RULE]) for r in runs])),
                    "client_whole": float(np.mean([np.mean(c["whole"]) for c in clients])),
                    "client_own": float(np.mean([np.mean(c["own"]) for c in clients])),
                    "nearest_in_own": float(np.mean([np.mean(c["nearest_in_own"]) for c in clients])),
                }
            )
        out[name] = rows
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def to_markdown(summary: dict) -> str:
    h, size = summary["horizon"], summary["size"]
    p = h["plateau"]
    if p is None:
        where = f"a fixed budget of {h['budget_steps']:,.0f} optimizer steps per run"
    elif p["round"] is None:
        where = (
            f"default training did NOT level off within its budget of {p['budget_steps']:,.0f} steps (rule: "
            f"95% interval of the rise over {p['window']} rounds within +-{100 * p.get('tolerance', 0.05):g} points, "
            f"at >= {100 * p['floor']:g}%); every "
            f"variant ran the whole budget"
        )
    else:
        where = (
            f"default training levelled off at {p['steps']:,.0f} steps (round {p['round']}; rule: rise over "
            f"{p['window']} rounds within +-{100 * p.get('tolerance', 0.05):g} points (95% interval), at >= "
            f"{100 * p['floor']:g}%), so every variant is "
            f"compared at {h['budget_steps']:,.0f} steps (default training itself ran to {p['budget_steps']:,.0f})"
        )
    head = (
        f"Horizon: {where}. {size['train_images']} training images ({summary.get('dataset', 'digits')}) at "
        f"{size['image_size']}x{size['image_size']}, seeds {', '.join(map(str, size['seeds']))}; copy rate = "
        f"1/3 rule, mean over seeds [hierarchical bootstrap 95% interval over seeds and samples]."
    )
    lines = []
    if summary.get("pipeline_check"):
        lines += ["SMOKE RUN: pipeline check, not a finding.", ""]
    lines += [
        head,
        "",
        "| variant | steps to 10% copies | steps to 25% copies | CFD at 10% copies | CFD at 25% copies |",
        "|---|---|---|---|---|",
    ]
    for name, v in h["variants"].items():
        cfd = [f"{x:.1f}" if x is not None else "-" for x in (v["cfd_at"]["0.1"], v["cfd_at"]["0.25"])]
        lines.append(
            f"| {name} | {H.fmt_steps(v['steps_to']['0.1'])} | {H.fmt_steps(v['steps_to']['0.25'])} | "
            f"{cfd[0]} | {cfd[1]} |"
        )
    lines += [
        "",
        "Steps to X: linear between the evaluated rounds around the first crossing; '<= N' = reached by "
        "the first evaluation; an upper end '> N' = some bootstrap draws do not reach it within the budget. "
        f"CFD (lower is better) at {h.get('round_images')} images per round, interpolated at the crossing "
        "(no interval); not FID.",
        "",
        "| variant | " + " | ".join(f"{m:,} steps" for m in h["marks"]) + " |",
        "|---|" + "---|" * len(h["marks"]),
    ]
    for name, v in h["variants"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(
                "-" if a is None else f"{100 * a['rate']:.1f}% [{100 * a['lo']:.1f}, {100 * a['hi']:.1f}]"
                for a in v["at_marks"]
            )
            + " |"
        )
    lines += [
        "",
        "Copy rate at equal optimizer steps (linear between evaluated rounds; '-' = outside the evaluated rounds).",
    ]
    for name, rows in summary.get("mechanism", {}).items():
        lines += [
            "",
            f"Mechanism, {name}: each client's own model before averaging vs the averaged model (1/3 rule)",
            "",
            "| round | steps | averaged model | clients vs whole set | clients vs own shard | "
            "client samples nearest to own shard |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['round']} | {r['steps']:,} | {_pct(r['averaged'])} | {_pct(r['client_whole'])} | "
            f"{_pct(r['client_own'])} | {_pct(r['nearest_in_own'])} |"
            for r in rows
        ]
    return "\n".join(lines)


def figures(summary: dict, fig_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    h = summary["horizon"]
    if any(v.get("cfd_per_round") for v in h["variants"].values()):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, v in h["variants"].items():
            if v.get("cfd_per_round"):
                ax.plot([100 * c for c in v["curve"]], v["cfd_per_round"], marker="o", ms=3, label=name)
        ax.set_xlabel("copy rate, 1/3 rule (%)")
        ax.set_ylabel(f"CFD at {h.get('round_images')} images (lower is better)")
        ax.set_title("quality vs copy rate, every evaluated round", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out["quality_vs_copy_rate"] = fig_dir / "quality_vs_copy_rate.png"
        fig.savefig(out["quality_vs_copy_rate"], dpi=110)
        plt.close(fig)
    mech = summary.get("mechanism") or {}
    if mech:
        fig, axes = plt.subplots(1, len(mech), figsize=(5 * len(mech), 3.8), squeeze=False)
        for ax, (name, rows) in zip(axes[0], mech.items()):
            x = [r["steps"] for r in rows]
            for key, label in (
                ("averaged", "averaged model"),
                ("client_whole", "clients vs whole set"),
                ("client_own", "clients vs own shard"),
            ):
                ax.plot(x, [100 * r[key] for r in rows], marker="o", ms=3, label=label)
            ax.set_title(f"{name}: before vs after averaging", fontsize=9)
            ax.set_xlabel("optimizer steps")
            ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("copy rate, 1/3 rule (%)")
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        out["mechanism"] = fig_dir / "mechanism.png"
        fig.savefig(out["mechanism"], dpi=110)
        plt.close(fig)
    return out


def extend_copy_rate_axes(ax, summary: dict) -> None:
    """The horizon on the copy-rate figure's 1/3-rule panel: the 10% / 25% lines, default training beyond the
    horizon (dashed), and where it levelled off."""
    h = summary.get("horizon")
    if not h:
        return
    for t in H.TARGETS:
        ax.axhline(100 * t, color="grey", ls=":", lw=1)
    beyond = h.get("default_to_budget")
    if beyond:
        ax.plot(
            beyond["steps"],
            [100 * c for c in beyond["curve"]],
            color="C0",
            ls="--",
            lw=1,
            label="default, to its budget",
        )
        ax.fill_between(
            beyond["steps"], [100 * c for c in beyond["lo"]], [100 * c for c in beyond["hi"]], color="C0", alpha=0.07
        )
    p = h.get("plateau")
    if p and p.get("steps") is not None:
        ax.axvline(p["steps"], color="k", ls="-.", lw=1, label="default levelled off")
    if beyond or (p and p.get("steps") is not None):
        ax.legend(fontsize=7, loc="upper left")
