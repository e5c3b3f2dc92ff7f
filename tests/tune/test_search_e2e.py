"""`adatt tune` end to end on the session's two-node Ray cluster (2 CPUs) with real MLflow,
where users run it (logs, Tune's state and the trials' checkpoints in S3): one 3-trial grid
search of one epoch, validated every 4 of its 21 steps, with ASHA counting validations (so it
stops a bad trial inside the epoch), interrupted after its first trial finished (Ctrl+C's
graceful stop) and continued with `--resume`. The suite pays for one search; each test reads
one side of it."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import ray
import yaml
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient

from pipeline.errors import InputError
from pipeline.tracking import tags
from tests.conftest import FAKE_AWS_SECRET, REPO_ROOT, TINY_OVERRIDES
from tune.search import SearchInterrupted, SearchOutcome, run_search
from tune.space import SearchSpec, parse_search_spec
from tune.trial import child_runs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The last learning rate is too small to move the weights: that trial's normalised entropy
# stays at its initial value (far above 1, the network starts at p = 0.5 for rare events) and
# ASHA stops it at the first rung, after two trials that learn (whether or not the resumed
# search restores ASHA's rungs: it is worse than the trial that ran after the resume too).
# NE rather than AUC: on 6,000 rows AUCs after one epoch are too close to order the trials.
LEARNING_RATES = [0.01, 0.003, 1e-7]
METRIC = "val/mean_ne"
VALIDATIONS = 6  # a trial's: at steps 4, 8, 12, 16, 20 and the epoch's end (one worker:
# 5,144 train rows in batches of 256, 21 steps)


def tiny_spec(
    logs: Path,
    workdir: Path,
    name: str,
    rates: list[float] = LEARNING_RATES,
    epochs: int = 1,
    scheduler: str = "asha",
    storage: str | None = None,
    **fields: object,
):
    fixed = dict(item.split("=", 1) for item in TINY_OVERRIDES)
    fixed.update(
        {
            "data.path": str(logs),
            "tracking.tracking_uri": f"sqlite:///{workdir}/mlflow.db",
            "train.storage_path": storage or str(workdir / "runs"),
            "train.epochs": epochs,
            "train.validate_every": 4,
            "train.num_workers": 1,
            **fields,
        }
    )
    raw = {
        "base": str(REPO_ROOT / "configs" / "synthetic.yaml"),
        "set": {k: yaml.safe_load(str(v)) for k, v in fixed.items()},
        "search": {"train.lr": {"grid": rates}},
        "tune": {
            "name": name,
            "searcher": "grid",
            "metric": METRIC,
            "mode": "min",
            "max_concurrent": 1,  # one trial at a time: ASHA sees the trials in grid order
            "scheduler": {"type": scheduler, "grace_period": 1, "reduction_factor": 2},
        },
    }
    return parse_search_spec(raw, "test spec", REPO_ROOT / "configs", name)


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in client.get_metric_history(run_id, key)]


@dataclass
class Searched:
    """The search, its state when interrupted, and its outcome once resumed."""

    spec: SearchSpec
    outcome: SearchOutcome
    seconds: float
    interrupted: str  # the SearchInterrupted message
    again: str  # the InputError of a second start without --resume
    before: dict[str, Run]  # the trials' MLflow runs when interrupted, by trial id
    first_epochs: list[Metric]  # the epochs the first finished trial logged before the stop
    preprocess_tasks: int  # read-and-preprocess tasks the whole search ran
    ray_logs: dict[Path, bytes]  # what the search wrote to the Ray cluster's log files


@pytest.fixture(scope="module")
def searched(ray_cluster, s3, s3_logs, tmp_path_factory) -> Searched:
    workdir = tmp_path_factory.mktemp("tune")
    spec = tiny_spec(s3_logs, workdir, "grid", storage=s3.uri("tune"))
    uri = f"sqlite:///{workdir}/mlflow.db"
    preprocessed_before = _preprocess_tasks()
    logs = Path(ray_cluster.cluster.head_node.get_logs_dir_path())
    sizes_before = _log_sizes(logs)
    start = time.perf_counter()
    done = threading.Event()
    # A no-op handler in case the signal lands after Tune's own handler is gone.
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    watcher = threading.Thread(target=_interrupt_after_finished_trials, args=(uri, 1, done))
    watcher.start()
    try:
        with pytest.raises(SearchInterrupted) as interrupted:
            run_search(spec)
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)
    client = MlflowClient(uri)
    before = {r.data.tags[tags.TRIAL]: r for r in _trial_runs(client)}
    first = [r for r in before.values() if r.info.status == "FINISHED"]
    first_epochs = client.get_metric_history(first[0].info.run_id, "epoch") if first else []
    with pytest.raises(InputError) as again:
        run_search(spec)
    outcome = run_search(spec, resume=True)
    return Searched(
        spec,
        outcome,
        time.perf_counter() - start,
        str(interrupted.value),
        str(again.value),
        before,
        first_epochs,
        _preprocess_tasks() - preprocessed_before,
        _written_since(logs, sizes_before),
    )


def _log_sizes(logs: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in logs.rglob("*") if p.is_file()}


def _written_since(logs: Path, sizes: dict[Path, int]) -> dict[Path, bytes]:
    """Each log file's bytes written after `sizes` was taken."""
    out = {}
    for path, size in _log_sizes(logs).items():
        with path.open("rb") as f:
            f.seek(sizes.get(path, 0) if size >= sizes.get(path, 0) else 0)
            out[path] = f.read()
    return out


def _preprocess_tasks() -> int:
    """The read-and-preprocess tasks (`feed._read_unit`) the session's cluster ran."""
    from ray.util.state import list_tasks

    found = list_tasks(filters=[("name", "=", "MapBatches(_read_unit)")], limit=10_000)
    return len(found)


def _trial_runs(client: MlflowClient) -> list[Run]:
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`adatt.trial_id` != ''",
    )


def test_search_runs_three_trials_and_asha_stops_one(searched) -> None:
    outcome = searched.outcome
    print(f"search took {searched.seconds:.0f} s, interrupted and resumed")
    assert len(outcome.trials) == 3
    by_lr = {row.values["train.lr"]: row for row in outcome.trials}
    assert by_lr[0.01].status == "completed" and by_lr[0.01].epochs == 1
    assert by_lr[0.01].validations == VALIDATIONS
    assert outcome.stopped_early >= 1
    # ASHA's milestones count validations: it stopped a trial inside its only epoch.
    stopped = [r for r in outcome.trials if r.status == "stopped"]
    assert all(r.epochs == 0 and 1 <= r.validations < VALIDATIONS for r in stopped), stopped
    assert {r.trial_id for r in stopped} >= {
        r.trial_id for r in outcome.trials if r.values["train.lr"] == 1e-7
    }
    # No placement group outlives its trial (a leak would starve later trials' Ray Data).
    table = ray.util.placement_group_table().values()
    assert [pg for pg in table if pg["state"] != "REMOVED"] == []


def test_the_search_preprocesses_the_logs_once(searched, s3_logs) -> None:
    """Three trials, each an epoch with 6 validations, read one preprocessed copy: the
    logs' files were read and preprocessed once per split they hold rows of (14 days: 12
    train, 1 validation, 1 test), not once per trial, epoch and pass; the interrupted
    search's resume found the copy complete and reused it."""
    assert searched.preprocess_tasks == 14, searched.preprocess_tasks
    copy = f"{searched.outcome.experiment_path}-preprocessed"
    from pipeline.data.files import exists

    assert exists(f"{copy}/_SUCCESS.json") and exists(f"{copy}/train")


def test_no_credential_reaches_the_ray_logs(searched) -> None:
    """Ray Tune copies AWS credentials from the driver's environment into each trial
    actor's runtime_env, which Ray writes out in `runtime_env_agent.log`: the search keeps
    them out, and its trials read S3 with the nodes' own environment."""
    written = searched.ray_logs
    agent = [p for p, text in written.items() if p.name.startswith("runtime_env_agent") and text]
    assert agent, sorted(p.name for p in written)  # the trials' runtime envs were written
    assert sum(b"Creating runtime env" in written[p] for p in agent)
    leaked = [p for p, text in written.items() if FAKE_AWS_SECRET.encode() in text]
    assert not leaked, leaked


def test_mlflow_holds_parent_and_three_children(searched) -> None:
    outcome = searched.outcome
    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.train.lr"] == "grid(0.01, 0.003, 1e-07)"
    runs = child_runs(client, parent.info.experiment_id, outcome.parent_run_id)
    assert len(runs) == 3
    assert {r.data.tags[tags.TRIAL] for r in runs} == {t.trial_id for t in outcome.trials}
    statuses = {r.data.tags[tags.TRIAL]: r.info.status for r in runs}
    assert "RUNNING" not in statuses.values()
    for row in outcome.trials:
        run = client.get_run(row.run_id)
        epochs = [int(v) for v in _history(client, row.run_id, "epoch")]
        # Each epoch logged once; a stopped trial may have logged one more epoch than Tune
        # saw (its workers go on while ASHA decides).
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= row.epochs, row
        assert float(run.data.params["train.lr"]) == row.values["train.lr"]
        if row.status == "completed":
            assert statuses[row.trial_id] == "FINISHED"
        else:
            assert statuses[row.trial_id] == "KILLED"
            assert run.data.tags[tags.STOPPED] == "true"


def test_best_trial_is_the_best_metric_and_its_model_reloads(searched, tiny_logs) -> None:
    spec, outcome = searched.spec, searched.outcome
    client = MlflowClient(outcome.tracking_uri)
    runs = child_runs(
        client, client.get_run(outcome.parent_run_id).info.experiment_id, outcome.parent_run_id
    )
    finished = {
        r.info.run_id: r.data.metrics[f"best/{METRIC}"] for r in runs if r.info.status == "FINISHED"
    }
    assert outcome.best.run_id == min(finished, key=finished.get)
    assert outcome.best.value == pytest.approx(finished[outcome.best.run_id])
    # No epoch of any trial beat the best trial's selected epoch.
    best_any = min(min(_history(client, r.info.run_id, METRIC)) for r in runs)
    assert outcome.best.value == pytest.approx(best_any)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags[tags.BEST_RUN] == outcome.best.run_id
    assert float(parent.data.params["best.train.lr"]) == outcome.best.values["train.lr"]
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"best_config.yaml", "search.png", "summary.txt"} <= artifacts
    mlflow.set_tracking_uri(outcome.tracking_uri)  # the fluent API below reads it
    best_config = yaml.safe_load(
        mlflow.artifacts.load_text(f"runs:/{outcome.parent_run_id}/best_config.yaml")
    )
    assert best_config["train"]["lr"] == outcome.best.values["train.lr"]
    model = mlflow.pyfunc.load_model(parent.data.tags[tags.BEST_MODEL])
    import pyarrow.parquet as pq

    rows = pq.read_table(sorted(Path(tiny_logs).rglob("*.parquet"))[0]).to_pandas().head(20)
    scores = model.predict(rows[spec.base.data.feature_columns])
    assert list(scores.columns) == [t.name for t in spec.base.data.tasks]
    assert scores["click"].between(0, 1).all()
    assert outcome.table[0].split()[:3] == ["rank", "trial", "status"]
    assert outcome.table[1].split()[1] == outcome.best.trial_id


def _interrupt_after_finished_trials(tracking_uri: str, count: int, done: threading.Event) -> None:
    """Send the search SIGUSR1 (Tune's graceful stop, like Ctrl+C) once `count` trials finished."""
    client = MlflowClient(tracking_uri)
    while not done.is_set():
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string="attributes.status = 'FINISHED' AND tags.`adatt.trial_id` != ''",
        )
        if len(runs) >= count:
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        time.sleep(1.0)


def test_the_interrupted_search_resumes_without_repeating_finished_trials(searched) -> None:
    assert "continue it with --resume" in searched.interrupted
    assert re.search("already exists .* --resume", searched.again), searched.again
    first = [r for r in searched.before.values() if r.info.status == "FINISHED"]
    assert len(first) == 1
    assert all(r.info.status in ("FINISHED", "KILLED") for r in searched.before.values())
    outcome = searched.outcome
    client = MlflowClient(outcome.tracking_uri)
    runs = {
        r.data.tags[tags.TRIAL]: r
        for r in child_runs(client, first[0].info.experiment_id, outcome.parent_run_id)
    }
    assert len(runs) == 3 and "RUNNING" not in {r.info.status for r in runs.values()}
    # The finished trial was not run again: same run, its epochs logged once, before.
    kept = runs[first[0].data.tags[tags.TRIAL]]
    assert kept.info.status == "FINISHED"
    assert kept.info.start_time == first[0].info.start_time
    after = client.get_metric_history(kept.info.run_id, "epoch")
    before = searched.first_epochs
    assert [(m.step, m.timestamp) for m in after] == [(m.step, m.timestamp) for m in before]
    assert [int(v) for v in _history(client, kept.info.run_id, "epoch")] == [1]
    assert client.get_run(outcome.parent_run_id).info.status == "FINISHED"


@pytest.mark.long
def test_trials_train_with_sharded_tables(ray_cluster, tiny_logs, tmp_path) -> None:
    """A trial is an `adatt train` run: with `model.embeddings: torchrec` its tables are
    sharded row-wise over its two workers, and the best trial logs a dense scoring model."""
    spec = tiny_spec(
        tiny_logs,
        tmp_path,
        "sharded",
        rates=[0.01],
        epochs=1,
        scheduler="none",
        **{"model.embeddings": "torchrec", "train.sharding": "row_wise", "train.num_workers": 2},
    )
    outcome = run_search(spec)
    (trial,) = outcome.trials
    assert trial.status == "completed" and outcome.best.run_id == trial.run_id
    shards = Path(trial.checkpoint_path) / "sharded"
    assert {p.name for p in shards.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(trial.run_id)
    assert run.data.params["model.embeddings"] == "torchrec"
    mlflow.set_tracking_uri(outcome.tracking_uri)
    model = mlflow.pyfunc.load_model(outcome.model_uri)
    rows = pd.read_parquet(sorted(Path(tiny_logs).glob("*.parquet"))[-1]).head(50)
    scores = model.predict(rows)
    assert len(scores) == 50 and scores["click"].between(0, 1).all()
