"""The Census-Income benchmark's report: finished MLflow runs -> tables beside the paper's.

Every number comes from MLflow runs tagged `adatt.bench=census` (see `bench/census.py`):
the test AUC of the epoch selected on validation (`test/<task>/auc`) and that epoch's
validation AUC (`best/val/<task>/auc`). Each finished run is also appended to a ledger
(`census-runs.csv` beside the report, committed with it), so the table survives the loss
of the working MLflow store; the report aggregates the ledger and the store together.
The paper does not name its columns; they are matched to our tasks by validation AUC
level (the paper's columns are in ascending AUC in every row), never by test numbers.
"""

from __future__ import annotations

import csv
import math
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.datasets.census import TASKS

NAMES = {
    "adatt": "AdaTT",
    "adatt_sp": "AdaTT-sp",
    "ple": "PLE",
    "ml_mmoe": "ML-MMoE",
    "mmoe": "MMoE",
    "cross_stitch": "Cross-stitch",
    "shared_bottom": "Shared-bottom",
    "single_task": "Single-task",
}
ADATT_VARIANTS = ("adatt", "adatt_sp")
LAST_LINE_KEY = "adatt_min_delta_vs_paper"
NOTES = "census-notes.md"  # hand-written findings beside the report, linked when present
LEDGER = "census-runs.csv"  # one row per finished run, beside the report
FIGURE_PREFIX = "census-adatt-fusion-"  # the best AdaTT's fusion-weight PNGs, beside the report
FIGURES_RUN = "census-adatt-fusion.run"  # the run id those PNGs come from


@dataclass
class RunResult:
    """One finished benchmark training."""

    setting: str
    model: str
    seed: int
    run_id: str
    val: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    seconds: float

    @property
    def val_mean(self) -> float:
        return statistics.fmean(self.val.values())

    def row(self, epochs: int) -> dict[str, str]:
        """This run as a ledger row."""
        out = {
            "run_id": self.run_id,
            "setting": self.setting,
            "model": self.model,
            "seed": str(self.seed),
            "epochs": str(epochs),
            "best_epoch": str(self.best_epoch),
            "seconds": f"{self.seconds:.1f}",
        }
        out.update({f"val_{t}": repr(v) for t, v in self.val.items()})
        out.update({f"test_{t}": repr(v) for t, v in self.test.items()})
        return out


def ledger_fields() -> list[str]:
    """The ledger's columns, in order."""
    head = ["run_id", "setting", "model", "seed", "epochs", "best_epoch", "seconds"]
    return head + [f"val_{t}" for t in TASKS] + [f"test_{t}" for t in TASKS]


def append_ledger(path: Path, run: RunResult, epochs: int) -> None:
    """Append one finished run to the ledger (written with a header when new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ledger_fields())
        if new:
            writer.writeheader()
        writer.writerow(run.row(epochs))


def read_ledger(path: Path, epochs: int) -> list[RunResult]:
    """The ledger's runs of `epochs` epochs; a malformed ledger is an error naming the line."""
    if not path.exists():
        return []
    out = []
    with path.open(newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            try:
                if int(row["epochs"]) != epochs:
                    continue
                out.append(
                    RunResult(
                        setting=row["setting"],
                        model=row["model"],
                        seed=int(row["seed"]),
                        run_id=row["run_id"],
                        val={t: float(row[f"val_{t}"]) for t in TASKS},
                        test={t: float(row[f"test_{t}"]) for t in TASKS},
                        best_epoch=int(row["best_epoch"]),
                        seconds=float(row["seconds"]),
                    )
                )
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{line}: malformed ledger row ({err!r})") from None
    return out


def all_runs(
    tracking_uri: str, experiment: str, epochs: int, ledger: Path
) -> tuple[list[RunResult], set[str]]:
    """Ledger runs plus tracking-store runs (by run id), and the ids the store still holds."""
    stored = finished_runs(tracking_uri, experiment, epochs)
    by_id = {r.run_id: r for r in read_ledger(ledger, epochs)}
    by_id.update({r.run_id: r for r in stored})
    return list(by_id.values()), {r.run_id for r in stored}


@dataclass
class Cell:
    """All seeds of one (setting, model)."""

    runs: list[RunResult] = field(default_factory=list)

    def mean(self, task: str) -> float:
        return statistics.fmean(r.test[task] for r in self.runs)

    def std(self, task: str) -> float:
        values = [r.test[task] for r in self.runs]
        return statistics.stdev(values) if len(values) > 1 else float("nan")

    @property
    def val_mean(self) -> float:
        return statistics.fmean(r.val_mean for r in self.runs)


def finished_runs(tracking_uri: str, experiment: str, epochs: int) -> list[RunResult]:
    """The benchmark's finished runs of `epochs` epochs in this tracking store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = (
        "tags.`adatt.bench` = 'census' and attributes.status = 'FINISHED' "
        f"and tags.`bench.epochs` = '{epochs}'"
    )
    runs = client.search_runs([found.experiment_id], query, max_results=10_000)
    return [r for r in map(run_result, runs) if r is not None]


def run_result(run: Any) -> RunResult | None:
    """A tagged MLflow run as a RunResult; None when it lacks a test AUC for some task."""
    tags, metrics = run.data.tags, run.data.metrics
    if not all(f"test/{t}/auc" in metrics for t in TASKS):
        return None
    return RunResult(
        setting=tags["bench.setting"],
        model=tags["bench.model"],
        seed=int(tags["bench.seed"]),
        run_id=run.info.run_id,
        val={t: metrics[f"best/val/{t}/auc"] for t in TASKS},
        test={t: metrics[f"test/{t}/auc"] for t in TASKS},
        best_epoch=int(metrics.get("best_epoch", -1)),
        seconds=float(tags.get("bench.seconds", "nan")),
    )


def group(runs: list[RunResult]) -> dict[tuple[str, str], Cell]:
    """Runs by (setting, model), one run per seed (the latest wins)."""
    cells: dict[tuple[str, str], dict[int, RunResult]] = {}
    for run in runs:
        cells.setdefault((run.setting, run.model), {})[run.seed] = run
    return {
        key: Cell(sorted(by_seed.values(), key=lambda r: r.seed)) for key, by_seed in cells.items()
    }


def paper_task_order(cells: dict[tuple[str, str], Cell]) -> tuple[list[str], int, int]:
    """Our tasks in ascending validation AUC (the paper's column order), and in how many
    cells that order holds exactly (a check that the levels are clearly apart).

    Example:
        >>> r = RunResult("s", "m", 0, "id", {"a": .9, "b": .8}, {"a": .9, "b": .8}, 1, 1.0)
        >>> paper_task_order({("s", "m"): Cell([r])})[0]
        ['b', 'a']
    """
    tasks = list(next(iter(cells.values())).runs[0].val)
    level = {t: statistics.fmean(r.val[t] for c in cells.values() for r in c.runs) for t in tasks}
    order = sorted(tasks, key=level.__getitem__)
    agree = sum(
        sorted(tasks, key=lambda t, c=c: statistics.fmean(r.val[t] for r in c.runs)) == order
        for c in cells.values()
    )
    return order, agree, len(cells)


def paper_adatt(cells: dict[tuple[str, str], Cell], setting: str) -> str | None:
    """The AdaTT variant compared with the paper's AdaTT row: the paper tuned m_s, so the
    variant (general AdaTT or AdaTT-sp) with the higher mean validation AUC."""
    found = [m for m in ADATT_VARIANTS if (setting, m) in cells]
    return max(found, key=lambda m: cells[(setting, m)].val_mean) if found else None


def min_delta(
    cells: dict[tuple[str, str], Cell], paper: dict[str, dict[str, list[float]]], order: list[str]
) -> float:
    """Worst (setting, task) of our AdaTT mean test AUC minus the paper's AdaTT AUC."""
    deltas = []
    for setting, rows in paper.items():
        model = paper_adatt(cells, setting)
        if model is None or "adatt" not in rows:
            continue
        cell = cells[(setting, model)]
        deltas += [cell.mean(t) - rows["adatt"][i] for i, t in enumerate(order)]
    return min(deltas) if deltas else float("nan")


def copy_fusion_figures(
    tracking_uri: str, cells: dict[tuple[str, str], Cell], out_dir: Path, stored: set[str]
) -> tuple[RunResult, list[Path]] | None:
    """The fusion-weight PNGs of the best AdaTT or AdaTT-sp run (by validation AUC) that has
    figures: its artifacts in the tracking store (`stored` run ids), copied to `out_dir`, or
    the PNGs already in `out_dir` when `FIGURES_RUN` there names that run (a committed
    figure outlives the store it came from). Returns the run and the PNG paths."""
    import mlflow.artifacts

    runs = [r for (_, m), c in cells.items() if m in ADATT_VARIANTS for r in c.runs]
    marker = out_dir / FIGURES_RUN
    on_disk = sorted(out_dir.glob(f"{FIGURE_PREFIX}*.png"))
    kept = marker.read_text().strip() if marker.exists() and on_disk else None
    with_figures = [r for r in runs if r.run_id in stored or r.run_id == kept]
    if not with_figures:
        return None
    best = max(with_figures, key=lambda r: r.val_mean)
    if best.run_id not in stored:
        return best, on_disk
    copied = []
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                run_id=best.run_id,
                artifact_path="fusion_weights",
                dst_path=tmp,
                tracking_uri=tracking_uri,
            )
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        for png in sorted(local.glob("level_*.png")):
            target = out_dir / f"{FIGURE_PREFIX}{png.stem.replace('_', '')}.png"
            shutil.copyfile(png, target)
            copied.append(target)
    marker.write_text(best.run_id + "\n")
    return best, copied


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def setting_table(
    cells: dict[tuple[str, str], Cell],
    setting: str,
    models: list[str],
    order: list[str],
    paper: dict[str, list[float]],
) -> list[str]:
    """Markdown rows: per model, N, then per task our mean +- std and the paper's AUC."""
    head = "| model | N | " + " | ".join(f"{t} (ours) | paper" for t in order)
    head += " | best epoch | s / training |"
    lines = [head, "|" + " --- |" * (2 * len(order) + 4)]
    for model in models:
        cell = cells.get((setting, model))
        if cell is None:
            continue
        row = [NAMES.get(model, model), str(len(cell.runs))]
        for i, task in enumerate(order):
            row.append(f"{cell.mean(task):.4f} ± {_fmt(cell.std(task))}")
            row.append(f"{paper[model][i]:.4f}" if model in paper else "")
        epochs = sorted(r.best_epoch for r in cell.runs)
        row.append(",".join(str(e) for e in epochs))
        row.append(f"{statistics.fmean(r.seconds for r in cell.runs):.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def comparison_lines(
    cells: dict[tuple[str, str], Cell],
    setting: str,
    order: list[str],
    paper: dict[str, list[float]],
) -> list[str]:
    """The target checks: AdaTT vs the paper's AdaTT, and vs PLE / ML-MMoE (ours and paper's)."""
    model = paper_adatt(cells, setting)
    if model is None:
        return ["No AdaTT run in this setting."]
    adatt = cells[(setting, model)]
    lines = [f"Compared row: {NAMES[model]} (higher mean validation AUC of AdaTT / AdaTT-sp)."]
    if "adatt" in paper:
        deltas = [adatt.mean(t) - paper["adatt"][i] for i, t in enumerate(order)]
        status = "reached" if min(deltas) >= 0 else "NOT reached"
        text = ", ".join(f"{t} {d:+.4f}" for t, d in zip(order, deltas, strict=True))
        lines.append(f"- ours minus paper's AdaTT: {text} (target >= 0 on every task: {status})")
    for rival in ("ple", "ml_mmoe"):
        cell = cells.get((setting, rival))
        if cell is None:
            continue
        deltas = [adatt.mean(t) - cell.mean(t) for t in order]
        ahead = sum(d > 0 for d in deltas)
        text = ", ".join(f"{t} {d:+.4f}" for t, d in zip(order, deltas, strict=True))
        line = (
            f"- {NAMES[model]} minus {NAMES[rival]} (ours): {text}; ahead on {ahead}/{len(order)}"
        )
        if rival in paper and "adatt" in paper:
            ref = ", ".join(
                f"{a - b:+.4f}" for a, b in zip(paper["adatt"], paper[rival], strict=True)
            )
            line += f" (paper: {ref})"
        lines.append(line)
    return lines


def missing_lines(
    cells: dict[tuple[str, str], Cell], jobs: list[Any], failed: list[str]
) -> list[str]:
    """The requested grid's cells with fewer finished seeds than asked, and failed jobs."""
    wanted: dict[tuple[str, str], int] = {}
    for job in jobs:
        wanted[(job.setting, job.model)] = wanted.get((job.setting, job.model), 0) + 1
    short = [
        f"{setting} {NAMES.get(model, model)}: {len(cells[(setting, model)].runs) if (setting, model) in cells else 0}/{n} seeds"
        for (setting, model), n in wanted.items()
        if (setting, model) not in cells or len(cells[(setting, model)].runs) < n
    ]
    if not short and not failed:
        return []
    lines = ["## Not run (time budget) or failed", ""]
    if short:
        lines.append("Requested but not (fully) run: " + "; ".join(short) + ".")
    lines += [f"- failed: {item}" for item in failed]
    return [*lines, ""]


def write_report(
    out: Path,
    tracking_uri: str,
    spec: Any,
    epochs: int,
    jobs: list[Any],
    failed: list[str],
    wall_s: float | None,
    argv: list[str],
    setup: list[str] | None = None,
) -> str:
    """Write the markdown report from every finished run (ledger and tracking store);
    return its last line."""
    ledger = out.parent / LEDGER
    experiment = spec.tracking.get("experiment", "census-bench")
    runs, stored = all_runs(tracking_uri, experiment, epochs, ledger)
    cells = group(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    trained_min = sum(r.seconds for r in runs if not math.isnan(r.seconds)) / 60
    lines = [
        "# Census-Income (KDD): the AdaTT paper's table, reproduced",
        "",
        f"Written by `python -m bench.census {' '.join(argv)}` from the {len(runs)} finished "
        f"{epochs}-epoch runs in [{LEDGER}]({LEDGER}) and `{tracking_uri}` "
        f"(tag `adatt.bench=census`; "
        f"{trained_min:.0f} min of training in all"
        + (f"; this invocation ran {wall_s / 60:.1f} min)." if wall_s is not None else ")."),
        "Each training goes through `adatt train`'s path (Ray Data -> Ray Train -> MLflow); "
        "its epoch is selected on validation mean AUC and its test AUC is reported.",
        "",
        *(setup or []),
    ]
    if (out.parent / NOTES).exists():
        lines += [
            f"How these figures were checked, and what was investigated: [{NOTES}]({NOTES}).",
            "",
        ]
    if not cells:
        lines += ["No finished runs yet.", "", f"{LAST_LINE_KEY}=nan"]
        out.write_text("\n".join(lines) + "\n")
        return lines[-1]
    order, agree, total = paper_task_order(cells)
    lines += [
        "## Which paper column is which task",
        "",
        f"The paper's columns rise in AUC in every row; our tasks' mean validation AUCs rise as "
        f"{' < '.join(order)} (this order holds in {agree} of {total} model/setting cells), so "
        f"the paper's columns are read as {', '.join(order)}. Test AUCs play no part in this.",
        "",
    ]
    all_models = list(dict.fromkeys([*NAMES, *(m for _, m in cells)]))
    for setting in spec.settings:
        if not any((setting, m) in cells for m in all_models):
            continue
        paper = spec.paper.get(setting, {})
        models = "; ".join(
            NAMES.get(m, m) + "".join(f" {k}={v}" for k, v in entry.items() if k != "name")
            for m, entry in spec.settings[setting].models.items()
        )
        lines += [
            f"## {spec.settings[setting].title}",
            "",
            f"Models: {models}. Test AUC, mean ± std over N seeds (sample std); best epoch "
            "per seed; mean wall time per training in seconds.",
            "",
        ]
        lines += setting_table(cells, setting, all_models, order, paper)
        lines += ["", *comparison_lines(cells, setting, order, paper), ""]
    figures = copy_fusion_figures(tracking_uri, cells, out.parent, stored)
    if figures is not None:
        best, paths = figures
        lines += [
            "## Fusion weights of the best AdaTT (by validation AUC, of the runs with figures)",
            "",
            f"Run `{best.run_id}` ({best.setting}, {NAMES[best.model]}, seed {best.seed}).",
            "",
            *[f"![fusion weights]({p.name})" for p in paths],
            "",
        ]
    lines += missing_lines(cells, jobs, failed)
    delta = min_delta(cells, spec.paper, order)
    lines.append(f"{LAST_LINE_KEY}={_fmt(delta)}")
    out.write_text("\n".join(lines) + "\n")
    return lines[-1]
