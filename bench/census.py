"""The AdaTT paper's Census-Income table, reproduced through the product path.

    python -m bench.census                 # full grid of configs/census-bench.yaml
    python -m bench.census --quick         # sanity run: 1 seed, AdaTT/PLE/ML-MMoE, 3 epochs
    python -m bench.census --settings experts6 --models adatt,ple --seeds 5 --budget-minutes 60

Steps: convert the raw UCI files (`pipeline.census.convert_census`, i.e. `adatt data
census`), then one `pipeline.train.run_training` per (setting, model, seed): Ray Data ->
Ray Train -> an MLflow run in `<workdir>/mlflow.db`, tagged `bench.*`, and a row in the
committed ledger `docs/results/census-runs.csv`. Finished runs (in either) are reused, so
an interrupted or budget-limited benchmark continues where it stopped, and the report
always aggregates every finished run of the requested epochs (see
`bench/census_report.py`). Jobs run seed by seed, so a time budget leaves every cell with
about the same number of seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from pipeline.config import Config, apply_overrides, parse_config
from pipeline.datasets.census import convert_census
from pipeline.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
# ../shared/data beside the repository root: works from any clone next to shared/.
RAW_DIR = REPO_ROOT.parent / "shared" / "data" / "census-income"
BENCH_CONFIG = REPO_ROOT / "configs" / "census-bench.yaml"
TAG = "adatt.bench"
BENCH_NAME = "census"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Setting(_Strict):
    """One column group of the paper's table: expert widths and the models run with them."""

    title: str
    expert_dims: list[PositiveInt | list[PositiveInt]]
    models: dict[str, dict[str, Any]]


class QuickRun(_Strict):
    settings: list[str]
    models: list[str]
    seeds: PositiveInt = 1
    epochs: PositiveInt = 3


class BenchSpec(_Strict):
    """`configs/census-bench.yaml`: the base training config, overrides and the grid."""

    base: str
    data: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    tracking: dict[str, Any] = Field(default_factory=dict)
    paper: dict[str, dict[str, list[float]]] = Field(default_factory=dict)
    settings: dict[str, Setting]
    quick: QuickRun

    def base_config(self, spec_path: Path) -> dict[str, Any]:
        """The base training config (relative to the spec file) with this spec's overrides."""
        raw = yaml.safe_load((spec_path.parent / self.base).read_text())
        for section in ("data", "train", "tracking"):
            raw.setdefault(section, {}).update(
                yaml.safe_load(yaml.safe_dump(getattr(self, section)))
            )
        return raw


def load_spec(path: Path) -> BenchSpec:
    """Read and validate a benchmark spec; errors name the file and field."""
    try:
        return BenchSpec.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None


@dataclass(frozen=True)
class Job:
    """One training of the grid."""

    setting: str
    model: str
    seed: int

    @property
    def name(self) -> str:
        return f"census-{self.setting}-{self.model}-seed{self.seed}"


def plan_jobs(settings: list[str], models: list[str], seeds: int) -> list[Job]:
    """Seed-major order, so that a time budget leaves every cell with similar N.

    Example:
        >>> [j.name for j in plan_jobs(["experts6"], ["adatt", "ple"], 2)][:2]
        ['census-experts6-adatt-seed0', 'census-experts6-ple-seed0']
    """
    return [Job(s, m, seed) for seed in range(seeds) for s in settings for m in models]


def training_config(
    spec: BenchSpec,
    spec_path: Path,
    job: Job,
    data_path: Path,
    workdir: Path,
    epochs: int,
    extra: list[str] | tuple[str, ...] = (),
) -> Config:
    """The full training config of one job: base + spec overrides + the setting's model.

    `extra` holds further `key=value` overrides. The spec's `data.batch_size` is the global
    batch (the paper's 512): each of the `train.num_workers` workers gets its share.
    """
    raw = spec.base_config(spec_path)
    setting = spec.settings[job.setting]
    counts = {"name", "experts_per_task", "shared_experts", "num_experts", "expert_dims"}
    model = {k: v for k, v in raw.get("model", {}).items() if k not in counts}
    model.update({"expert_dims": setting.expert_dims, **setting.models[job.model]})
    raw["model"] = model
    overrides = [
        f"data.path={data_path}",
        f"train.epochs={epochs}",
        f"train.seed={job.seed}",
        f"train.storage_path={workdir / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        f"tracking.run_name={job.name}",
    ]
    source = f"{spec_path} ({job.name})"
    config = parse_config(apply_overrides(raw, [*overrides, *extra]), source=source)
    batch = max(1, config.data.batch_size // config.train.num_workers)
    return config.model_copy(update={"data": config.data.model_copy(update={"batch_size": batch})})


def check_features(config_path: Path, reference: Config) -> None:
    """The converter's feature columns must be the ones the tracked config trains on."""
    written = yaml.safe_load(config_path.read_text())["data"]
    columns = {f["column"] for f in (*written["categorical"], *written["dense"])}
    if columns != set(reference.data.feature_columns):
        raise ConfigError(
            f"{config_path}: converted features differ from configs/census.yaml: "
            f"{sorted(columns ^ set(reference.data.feature_columns))}"
        )


def setup_lines(config: Config, spec_path: Path) -> list[str]:
    """The report's description of what every training shares (from a job's config)."""
    data, train = config.data, config.train
    dims = sorted({f.dim for f in data.categorical})
    transforms = ", ".join(f"{f.column} {f.transform}" for f in data.dense)
    return [
        "## Setup",
        "",
        "- Data: UCI Census-Income (KDD), 199,523 training rows; the 99,762 rows of the test "
        "file halved at random (seed 0) into validation and test, as in the paper.",
        "- Tasks: income > 50K, marital status never married, education at least a "
        "bachelor's degree; `instance_weight` is neither a feature nor a loss weight.",
        f"- Features: {len(data.categorical)} categorical columns hashed into buckets and "
        f"embedded (dim {', '.join(map(str, dims))}), {len(data.dense)} numeric columns "
        f"({transforms}); the paper one-hot encodes the inputs into 482 dims.",
        f"- Optimiser: {train.optimizer}, lr {train.lr:g}, weight decay {train.weight_decay:g}, "
        f"global batch {data.batch_size * train.num_workers}, up to {train.epochs} epochs, epoch "
        f"chosen by `{train.early_stopping.metric}` ({train.early_stopping.mode}); "
        f"{train.num_workers} Ray Train worker(s) x {train.cpus_per_worker:g} CPU.",
        f"- Grid and model settings: `{spec_path.name}`; the paper averages 100 runs per cell.",
        "",
    ]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.census", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="sanity run (the spec's `quick`)")
    parser.add_argument("--raw", type=Path, default=RAW_DIR, help="raw census-income folder")
    parser.add_argument("--spec", type=Path, default=BENCH_CONFIG, help="benchmark spec YAML")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "runs" / "census-bench")
    parser.add_argument("--out", type=Path, default=None, help="results markdown")
    parser.add_argument("--settings", help="comma-separated settings (default: all)")
    parser.add_argument("--models", help="comma-separated models (default: all)")
    parser.add_argument("--seeds", type=int, help="seeds per cell (default 5)")
    parser.add_argument("--epochs", type=int, help="epochs per training (default: spec)")
    parser.add_argument("--workers", type=int, help="train.num_workers override")
    parser.add_argument("--cpus-per-worker", type=float, help="train.cpus_per_worker override")
    parser.add_argument("--budget-minutes", type=float, help="start no training after this")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report")
    return parser.parse_args(argv)


def _choose(
    given: str | None, quick: list[str], available: list[str], use_quick: bool
) -> list[str]:
    chosen = given.split(",") if given else (quick if use_quick else available)
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise ConfigError(f"unknown {unknown}; choose from {available}")
    return chosen


def _start_ray(cpus: int = 2) -> bool:
    """A local Ray cluster unless one is up (a test's); True when this call started it.

    Started as `adatt train` starts it (`pipeline.session.start_ray`): named by its address
    in every process of the job. A plain `ray.init()` here let Ray Train's placement-group
    cleaner resolve `auto` to a Ray cluster started later on the machine (a test run's),
    find no controller there, and remove this run's placement group: two trainings died
    that way on 2026-12-04."""
    import ray

    from pipeline.session import start_ray

    if ray.is_initialized():
        return False
    # Ray workers import `models` and `pipeline` from this checkout.
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    start_ray(cpus)
    return True


def run_jobs(
    jobs: list[Job],
    make_config: Any,
    done: set[tuple[str, str, int]],
    budget_s: float | None,
    ledger: Path,
) -> list[str]:
    """Train each job not in `done` until `budget_s` would be exceeded, appending each
    finished run to `ledger`; returns failures."""
    from mlflow.tracking import MlflowClient

    from bench.census_report import append_ledger, run_result
    from pipeline.training.driver import run_training

    start, times, failed = time.monotonic(), [], []
    for index, job in enumerate(jobs):
        if (job.setting, job.model, job.seed) in done:
            continue
        spent = time.monotonic() - start
        expected = sum(times) / len(times) if times else 0.0
        if budget_s is not None and spent + expected > budget_s:
            print(f"[bench] time budget spent: {len(jobs) - index} job(s) not started", flush=True)
            break
        config = make_config(job)
        print(f"[bench] {job.name}: {config.train.epochs} epochs", flush=True)
        began = time.monotonic()
        try:
            outcome = run_training(config)
        except Exception as err:  # one broken model must not lose the rest of the grid
            print(f"[bench] {job.name} FAILED: {err}", flush=True)
            failed.append(f"{job.name}: {type(err).__name__}: {err}")
            continue
        seconds = time.monotonic() - began
        times.append(seconds)
        client = MlflowClient(outcome.tracking_uri)
        tags = {
            TAG: BENCH_NAME,
            "bench.setting": job.setting,
            "bench.model": job.model,
            "bench.seed": str(job.seed),
            "bench.epochs": str(config.train.epochs),
            "bench.seconds": f"{seconds:.1f}",
            "bench.workers": f"{config.train.num_workers}x{config.train.cpus_per_worker}",
        }
        for key, value in tags.items():
            client.set_tag(outcome.run_id, key, value)
        result = run_result(client.get_run(outcome.run_id))
        if result is not None:
            append_ledger(ledger, result, config.train.epochs)
        print(f"[bench] {job.name}: {seconds:.0f} s, run {outcome.run_id}", flush=True)
    return failed


def _has_raw(raw: Path) -> bool:
    return any((raw / f"census-income.data{ext}").exists() for ext in ("", ".gz"))


def main(argv: list[str] | None = None) -> int:
    """Run (or continue) the benchmark and write its report. Returns the exit code."""
    from bench.census_report import LEDGER, all_runs, write_report

    args = _parse_args(argv)
    spec = load_spec(args.spec)
    settings = _choose(args.settings, spec.quick.settings, list(spec.settings), args.quick)
    all_models = list(dict.fromkeys(m for s in spec.settings.values() for m in s.models))
    models = _choose(args.models, spec.quick.models, all_models, args.quick)
    seeds = args.seeds or (spec.quick.seeds if args.quick else 5)
    epochs = args.epochs or (spec.quick.epochs if args.quick else spec.train.get("epochs", 10))
    default_out = "census-quick.md" if args.quick else "census.md"
    out = args.out or (
        args.workdir / default_out if args.quick else REPO_ROOT / "docs" / "results" / default_out
    )
    workdir = args.workdir.resolve()
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    data_path = workdir / "data"
    extra = [f"train.num_workers={args.workers}"] if args.workers else []
    if args.cpus_per_worker:
        extra.append(f"train.cpus_per_worker={args.cpus_per_worker}")

    def make_config(job: Job) -> Config:
        return training_config(spec, args.spec, job, data_path, workdir, epochs, extra)

    jobs = [
        j for j in plan_jobs(settings, models, seeds) if j.model in spec.settings[j.setting].models
    ]
    failed, wall = [], None
    if not args.report_only:
        if not _has_raw(args.raw):
            print(f"[bench] no Census-Income raw files in {args.raw}: skipped")
            return 0
        workdir.mkdir(parents=True, exist_ok=True)
        check_features(convert_census(args.raw, data_path), make_config(jobs[0]))
        experiment = spec.tracking.get("experiment", "census-bench")
        runs, _ = all_runs(tracking_uri, experiment, epochs, out.parent / LEDGER)
        done = {(r.setting, r.model, r.seed) for r in runs}
        budget = args.budget_minutes * 60 if args.budget_minutes else None
        started = _start_ray()
        try:
            began = time.monotonic()
            failed = run_jobs(jobs, make_config, done, budget, out.parent / LEDGER)
            wall = time.monotonic() - began
        finally:
            if started:
                import ray

                ray.shutdown()
    setup = setup_lines(make_config(jobs[0]), args.spec)
    last = write_report(
        out, tracking_uri, spec, epochs, jobs, failed, wall, argv or sys.argv[1:], setup
    )
    print(f"[bench] wrote {out}\n{last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
