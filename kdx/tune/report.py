"""The end of a kdx-tune invocation: report.md (every trial, best first), trials.png (value per trial, per method),
best.json and the best trial as a ready kdx-train command, all in the study folder and rebuilt from the storage
each time (they describe the study, not one invocation)."""
from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from kdx.io import atomic_path, atomic_write_text, write_json
from kdx.text import markdown_table, markdown_text
from kdx.tune.settings import TuneSettings

REPORT = "report.md"
PLOT = "trials.png"
BEST = "best.json"


def trial_rows(study: Any, maximize: bool) -> list[dict[str, Any]]:
    """One dict per trial, those with a value first (best first: complete before pruned at equal value), then the
    rest by number."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        value = t.value if t.value is not None and math.isfinite(t.value) else None
        rows.append({"number": t.number, "state": t.state.name, "value": value,
                     "method": attrs.get("method") or t.params.get("method"), "settings": attrs.get("settings") or {},
                     "epochs": attrs.get("epochs"), "pruned_after_epoch": attrs.get("pruned_after_epoch"),
                     "run_dir": attrs.get("run_dir"), "overrides": attrs.get("overrides") or [],
                     "error": attrs.get("error"), "worker": attrs.get("worker")})
    sign = -1.0 if maximize else 1.0
    valued = sorted((r for r in rows if r["value"] is not None),
                    key=lambda r: (sign * r["value"], r["state"] != "COMPLETE", r["number"]))
    return valued + sorted((r for r in rows if r["value"] is None), key=lambda r: r["number"])


def train_command(overrides: list[str]) -> str:
    return " ".join(["kdx-train", *(shlex.quote(o) for o in overrides)])


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('distill.')}={v}" for k, v in settings.items()) or "preset"


def _state_text(row: dict[str, Any]) -> str:
    if row["state"] == "PRUNED" and row["pruned_after_epoch"]:
        return f"pruned (after epoch {row['pruned_after_epoch']})"
    if row["state"] == "FAIL" and row["error"]:
        return f"failed: {row['error']}"
    return row["state"].lower()


def _plot(rows: list[dict[str, Any]], path: Path, metric: str, maximize: bool) -> None:
    """Trial value against trial number, one colour per method; pruned trials hollow (their last epoch's value);
    the line is the best complete trial so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    methods = sorted({r["method"] for r in rows if r["value"] is not None and r["method"]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(methods):
        colour = colours[i % len(colours)]
        done = [r for r in rows if r["method"] == method and r["value"] is not None]
        complete = [r for r in done if r["state"] == "COMPLETE"]
        pruned = [r for r in done if r["state"] == "PRUNED"]
        if complete:
            ax.scatter([r["number"] for r in complete], [r["value"] for r in complete], color=colour, label=method,
                       zorder=3)
        if pruned:
            ax.scatter([r["number"] for r in pruned], [r["value"] for r in pruned], facecolors="none",
                       edgecolors=colour, label=f"{method} (pruned)", zorder=3)
    complete = sorted((r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None), key=lambda r: r["number"])
    if complete:
        best, xs, ys = None, [], []
        for r in complete:
            best = r["value"] if best is None else (max(best, r["value"]) if maximize else min(best, r["value"]))
            xs.append(r["number"])
            ys.append(best)
        last = max(r["number"] for r in rows)
        if last > xs[-1]:  # the best so far holds up to the last trial
            xs.append(last)
            ys.append(ys[-1])
        ax.step(xs, ys, where="post", color="grey", linewidth=1, label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} (best epoch; pruned: last)")
    ax.set_title(f"kdx-tune: {metric}, {'higher' if maximize else 'lower'} is better")
    ax.grid(alpha=0.3)
    if methods:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_report(study: Any, study_dir: Path, settings: TuneSettings) -> dict[str, Any]:
    """Write report.md, trials.png and best.json into `study_dir`; print the best trial's kdx-train command.
    Returns {report, plot, best (None without a complete trial), counts}."""
    rows = trial_rows(study, settings.maximize)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    best = next((r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None), None)
    table = markdown_table(
        ["rank", "trial", "state", settings.metric, "method", "settings", "epochs", "run folder"],
        [[i + 1 if r["value"] is not None else "", r["number"], _state_text(r),
          f"{r['value']:.4f}" if r["value"] is not None else "", r["method"] or "", _settings_text(r["settings"]),
          r["epochs"] if r["epochs"] is not None else "",
          str(Path(r["run_dir"]).relative_to(study_dir)) if r["run_dir"] and Path(r["run_dir"]).is_relative_to(study_dir)
          else (r["run_dir"] or "")]
         for i, r in enumerate(rows)])
    state_text = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"
    lines = [f"# kdx-tune study {markdown_text(study.study_name)}", "",
             f"- objective: the best {settings.metric} (validation split) of each trial, {settings.direction}d",
             f"- trials: {state_text} (tune.trials={settings.trials} counts complete and pruned ones)",
             "- a trial's value is its best epoch's; a pruned trial's, the last epoch it ran (the pruner's view)",
             f"- methods: {markdown_text(', '.join(settings.methods))}; pruner: {settings.pruner['name']}; "
             f"sampler: {settings.sampler['name']} (seed {settings.seed})", ""]
    best_info = None
    if best is not None:
        command = train_command(best["overrides"])
        best_info = {"trial": best["number"], "value": best["value"], "metric": settings.metric,
                     "method": best["method"], "settings": best["settings"], "epochs": best["epochs"],
                     "run_dir": best["run_dir"], "overrides": best["overrides"], "command": command}
        shown = markdown_text(f"{best['method']} ({_settings_text(best['settings'])})")
        lines += [f"Best: trial {best['number']}, {shown}, {settings.metric} {best['value']:.4f}. "
                  f"Train it again with:", "", "```", command, "```", ""]
        write_json(study_dir / BEST, best_info)
    else:
        lines += ["No trial has completed yet.", ""]
    lines += [table, "", f"![trial values]({PLOT})", ""]
    atomic_write_text(study_dir / REPORT, "\n".join(lines))
    _plot(rows, study_dir / PLOT, settings.metric, settings.maximize)
    print(f"[kdx-tune] report: {study_dir / REPORT} ({state_text}); plot: {study_dir / PLOT}", flush=True)
    if best_info is not None:
        print(f"[kdx-tune] best: trial {best['number']}, {best['method']} ({_settings_text(best['settings'])}), "
              f"{settings.metric} {best['value']:.4f}; train it again with:\n{best_info['command']}", flush=True)
    return {"report": str(study_dir / REPORT), "plot": str(study_dir / PLOT), "best": best_info, "counts": counts}
