"""`adatt evaluate`: champion against challengers on the same holdout rows, computed where
the rows are.

Every model URI is resolved once (pinned) and every model read once on the driver, as
data; Ray Data scores each row with every model (an actor pool) into a materialised
dataset in Ray's object store. Then each metric is reduced from parts that the workers
compute on their own rows (`pipeline.release.bootstrap`): sums for NE and MSE, sorted
score ranges for AUC, one row per group for GAUC. The driver only ever holds one vector
per part and replicate, whatever the size of the holdout.

Confidence intervals come from a paired bootstrap by group: each replicate weights every
row by a Poisson(1) count drawn for its user (the `--group-column`, default the model's
`data.group_column`), the same for every task and model; a challenger's gain over the first
model is computed within each replicate, so its interval accounts for both being scored on
the same users. A task's GAUC groups its rows by its own group column, and its replicates
weight each of those groups by its own count. Rows whose group value is null are left out
of GAUC (counted in `<task>/gauc_null_rows`); for the bootstrap they form one group.
Intervals are the 2.5 and 97.5 percentiles.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import ray
from mlflow.tracking import MlflowClient

from pipeline.config import DataConfig, SplitConfig, TaskSpec
from pipeline.data.hashing import as_arrow, group_keys
from pipeline.data.ingest import DATA_TASK_CPUS, naming_corrupt_files, read_files
from pipeline.data.preprocess import as_float
from pipeline.data.split import split_mask
from pipeline.data.validate import check_schema
from pipeline.errors import InputError, Stopped
from pipeline.metrics_vocab import MEAN_METRICS, lower_is_better, metric_name
from pipeline.modelfile.format import ModelData
from pipeline.modelfile.store import read_model, resolve_model
from pipeline.ranking import binary_entropy
from pipeline.release import bootstrap as bs
from pipeline.serving.scoring import ScoringModel
from pipeline.session import start_ray
from pipeline.tracking.runs import ensure_experiment, log_metrics, log_params, run_lifecycle

EXPERIMENT = "adatt-evaluation"


class EvaluationError(Stopped):
    """The models' scores cannot be evaluated (NaN or inf scores)."""


@dataclass
class Estimate:
    """A metric's value on the holdout and its 95 % bootstrap interval."""

    value: float
    low: float
    high: float


@dataclass
class Evaluation:
    """What `evaluate` measured.

    Attributes:
        models: the model URIs as given, the first being the one the others are compared with.
        pinned: the same, resolved once to fixed versions (what was scored).
        rows: holdout rows scored.
        metrics: per model index, `<task>/<metric>` or `mean_<metric>` -> estimate.
        gains: per challenger index (1, 2, ...), the same keys -> its value minus the
            first model's, with the paired interval.
        counts: `<task>/gauc_null_rows` (rows left out of GAUC) and `groups`.
        run_id: the MLflow run holding the comparison.
    """

    models: list[str]
    pinned: list[str]
    rows: int
    metrics: dict[int, dict[str, Estimate]]
    gains: dict[int, dict[str, Estimate]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    run_id: str | None = None


@dataclass(frozen=True)
class _Plan:
    """What the scoring actors emit and the reductions read.

    Attributes:
        tasks: the tasks (each with the GAUC group column it uses, or None).
        group: the bootstrap's group column.
        split: only the rows of this split of the data (config, name), or None.
    """

    tasks: tuple[TaskSpec, ...]
    group: str
    split: tuple[SplitConfig, str] | None

    @property
    def key_columns(self) -> list[str]:
        return list(
            dict.fromkeys([self.group, *(t.group_column for t in self.tasks if t.group_column)])
        )


class _MultiScorer:
    """A Ray Data actor: builds every model once; per batch, the rows' group keys and
    labels, and each model's scores."""

    def __init__(self, models: list[ModelData], plan: _Plan) -> None:
        self.models = [(ScoringModel(m), m.data.feature_columns) for m in models]
        self.plan = plan

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        if self.plan.split is not None:  # only the rows of one split (e.g. a day's holdout)
            config, name = self.plan.split
            batch = batch[split_mask(batch[config.column], config, name)]
        out = {}
        for column in self.plan.key_columns:
            out[f"key.{column}"] = group_keys(batch[column])
            out[f"null.{column}"] = as_arrow(batch[column]).is_null().to_numpy(zero_copy_only=False)
        for task in self.plan.tasks:
            out[f"label.{task.name}"] = as_float(batch[task.label_column])
        for i, (model, features) in enumerate(self.models):
            scores = model.predict(batch[features]) if len(batch) else None
            for task in self.plan.tasks:
                values = scores[task.name] if scores is not None else np.zeros(0)
                out[f"score.{i}.{task.name}"] = np.asarray(values, dtype=np.float64)
        return out


def _read_models(client: MlflowClient, uris: list[str]) -> list[ModelData]:
    models = [read_model(resolve_model(uri, client), client) for uri in uris]
    first = [t.name for t in models[0].tasks]
    for uri, model in zip(uris[1:], models[1:], strict=True):
        if [t.name for t in model.tasks] != first:
            raise InputError(
                f"--model {uri}: tasks {[t.name for t in model.tasks]} differ from "
                f"{uris[0]}'s {first}; models are compared task by task"
            )
    return models


def _plan(data: DataConfig, group_column: str | None, split: Any, uri: str) -> _Plan:
    group = group_column or data.group_column or next(iter(data.group_columns), None)
    if not group:
        raise InputError(
            f"--group-column: {uri} has no data.group_column; name the column of users"
        )
    tasks = tuple(
        t.model_copy(update={"group_column": group_column})
        if group_column and t.group_column
        else t
        for t in data.tasks
    )
    return _Plan(tasks, group, split)


def _check_data(
    models: list[ModelData], plan: _Plan, data_path: Any
) -> tuple[list[str], list[str]]:
    """The holdout's files, checked from their footers, and the columns to read."""
    features = [c for m in models for c in m.data.feature_columns]
    columns = features + [t.label_column for t in plan.tasks] + plan.key_columns
    columns = list(dict.fromkeys(columns + ([plan.split[0].column] if plan.split else [])))
    checked = models[0].data.model_copy(update={"path": data_path, "passthrough": columns})
    return check_schema(checked, labels=False).paths, columns


def scoring_pool(cluster: dict[str, float]) -> tuple[int, int]:
    """(most actors, GPUs per actor) of the scoring pool on a cluster with these resources
    (`ray.cluster_resources()`): one actor per GPU where there are GPUs, else one per two
    CPUs (each reserves `DATA_TASK_CPUS`, the reads the rest), at least one. Ray Data grows
    the pool from one actor up to that as the rows wait.

    Example:
        >>> scoring_pool({"CPU": 2.0}), scoring_pool({"CPU": 16.0}), scoring_pool({"CPU": 16.0, "GPU": 4.0})
        ((1, 0), (8, 0), (4, 1))
    """
    gpus = int(cluster.get("GPU", 0))
    if gpus:
        return gpus, 1
    return max(1, int(cluster.get("CPU", 1)) // 2), 0


def _scored(
    files: list[str], columns: list[str], models: list[ModelData], plan: _Plan, batch_size: int
):
    actors, gpus = scoring_pool(ray.cluster_resources())
    with naming_corrupt_files(files, columns):
        scored = read_files(files, columns).map_batches(
            _MultiScorer,
            fn_constructor_args=(models, plan),
            batch_size=batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
            num_cpus=DATA_TASK_CPUS,  # a whole CPU would leave none to the reads on 2 CPUs
            num_gpus=gpus,
        )
        return scored.materialize()  # blocks stay in the object store for the reductions


CHUNK_ROWS = 32_768  # rows per piece of a block: bounds a worker's [replicates, rows] counts


def _chunks(rows: int) -> list[slice]:
    return [slice(i, min(i + CHUNK_ROWS, rows)) for i in range(0, max(rows, 1), CHUNK_ROWS)]


def _sums_batch(batch: dict[str, np.ndarray], plan: _Plan, models: int, seed: int, replicates: int):
    """One row per block: per task the `bootstrap.sums`, the rows, the non-finite scores per
    model, and the rows left out of GAUC for a null group."""
    rows = len(batch[f"key.{plan.group}"])
    out: dict[str, np.ndarray] = {"rows": np.array([rows], dtype=np.float64)}
    for task in plan.tasks:
        y = batch[f"label.{task.name}"]
        scores = np.stack([batch[f"score.{i}.{task.name}"] for i in range(models)])
        total = np.zeros((2 + models, replicates + 1))
        for piece in _chunks(rows):
            counts = bs.replicate_counts(batch[f"key.{plan.group}"][piece], seed, replicates)
            total += bs.sums(counts, y[piece], scores[:, piece], task.type == "binary")
        seen = np.isfinite(y)
        out[f"sums.{task.name}"] = total[None]
        out[f"bad.{task.name}"] = (~np.isfinite(scores[:, seen])).sum(1)[None].astype(np.float64)
        nulls = batch[f"null.{task.group_column}"][seen].sum() if task.group_column else 0
        out[f"nulls.{task.name}"] = np.array([nulls], dtype=np.float64)
    return out


def _observed(
    batch: dict[str, np.ndarray], task: str, key: str, scores: list[str], groups: bool = False
):
    """The rows whose label is observed: key, label, scores. For GAUC's `groups`, only those
    whose group is not null."""
    keep = np.isfinite(batch[f"label.{task}"])
    if groups:
        keep &= ~batch[f"null.{key}"]
    return {
        "key": batch[f"key.{key}"][keep],
        "label": batch[f"label.{task}"][keep],
        **{name: batch[name][keep] for name in scores},
    }


def _auc_batch(batch: dict[str, np.ndarray], score: str, seed: int, replicates: int):
    """The `bootstrap.AucPart`s of a block of rows sorted by `score`, one row each."""
    parts = []
    for piece in _chunks(len(batch["label"])):
        counts = bs.replicate_counts(batch["key"][piece], seed, replicates)
        part = bs.auc_part(counts, batch["label"][piece], batch[score][piece])
        if part is not None:
            parts.append(np.concatenate([
                [part.first, part.last], part.positive, part.negative, part.within,
                part.first_pos, part.first_neg, part.last_pos, part.last_neg,
            ]))  # fmt: skip
    return {"part": np.array(parts).reshape(len(parts), 2 + 7 * (replicates + 1))}


def _as_auc_part(vector: np.ndarray, replicates: int) -> bs.AucPart:
    fields = vector[2:].reshape(7, replicates + 1)
    return bs.AucPart(float(vector[0]), float(vector[1]), *fields)


def _group_batch(group: dict[str, np.ndarray], scores: list[str]) -> dict[str, np.ndarray]:
    """One group's rows -> its key, rows and each model's AUC (NaN without both classes)."""
    stacked = np.stack([group[name] for name in scores])
    aucs = bs.group_auc(group["label"], stacked)
    return {"key": group["key"][:1], "rows": np.array([len(group["label"])]), "auc": aucs[None]}


def _gauc_batch(batch: dict[str, np.ndarray], seed: int, replicates: int):
    counts = bs.replicate_counts(batch["key"], seed, replicates)
    return {"part": bs.gauc_sums(counts, batch["rows"].astype(np.float64), batch["auc"].T)[None]}


# A holdout whose scored rows fit this share of the smallest node's memory is reduced in
# one Ray task: the distributed reduction costs ~10 Ray Data executions (a sort per task and
# model, a groupby per task), minutes on a small cluster for what one task sums in seconds.
# The task holds the rows about `ONE_TASK_COPIES` times at its peak (the concatenated
# table, its numpy arrays, one sorted or grouped copy, the chunk being summed).
ONE_TASK_MEMORY_SHARE = 0.25
ONE_TASK_COPIES = 4


def one_task_fits(scored_bytes: int, node_memory: float) -> bool:
    """Whether a holdout of `scored_bytes` scored bytes is reduced in one task on nodes with
    at least `node_memory` bytes of memory for tasks (a memory budget, not a row count).

    Example:
        >>> one_task_fits(100 * 2**20, 8 * 2**30), one_task_fits(1 * 2**30, 8 * 2**30)
        (True, False)
    """
    return scored_bytes * ONE_TASK_COPIES <= ONE_TASK_MEMORY_SHARE * node_memory


def smallest_node_memory() -> float:
    """The memory Ray gives tasks on the smallest live node of the cluster (bytes)."""
    memory = [n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")]
    return min(memory, default=0.0)


def _as_numpy(table: Any) -> dict[str, np.ndarray]:
    return {name: table[name].to_numpy() for name in table.column_names}


def _groups(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """`batch` split into its groups by `key` (what `groupby("key").map_groups` hands over)."""
    order = np.argsort(batch["key"], kind="stable")
    ordered = {k: v[order] for k, v in batch.items()}
    starts = np.flatnonzero(np.r_[True, ordered["key"][1:] != ordered["key"][:-1]])
    bounds = np.r_[starts, len(order)]
    return [{k: v[a:b] for k, v in ordered.items()} for a, b in itertools.pairwise(bounds)]


@ray.remote(num_cpus=DATA_TASK_CPUS)
def _reduce_in_one_task(plan: _Plan, models: int, seed: int, replicates: int, *blocks: Any):
    """`_reduce` of a small holdout, with the same per-part functions, on one worker."""
    import pyarrow as pa

    batch = _as_numpy(pa.concat_tables([b for b in blocks if b.num_rows]))
    kwargs = {"seed": seed, "replicates": replicates}
    total = {k: v[0] for k, v in _sums_batch(batch, plan, models, **kwargs).items()}
    aucs, gaucs = {}, {}
    for task in plan.tasks:
        names = [f"score.{i}.{task.name}" for i in range(models)]
        observed = _observed(batch, task.name, plan.group, names)
        for i, name in enumerate(names):
            order = np.argsort(observed[name], kind="stable")
            part = _auc_batch({k: v[order] for k, v in observed.items()}, name, **kwargs)["part"]
            aucs[task.name, i] = bs.merge_auc([_as_auc_part(v, replicates) for v in part])
        if task.group_column and task.type == "binary":
            grouped = _observed(batch, task.name, task.group_column, names, groups=True)
            rows = [_group_batch(group, names) for group in _groups(grouped)]
            gaucs[task.name] = 0  # no group: as the distributed path's empty sum
            if rows:
                merged = {k: np.concatenate([r[k] for r in rows]) for k in ("key", "rows", "auc")}
                gaucs[task.name] = _gauc_batch(merged, **kwargs)["part"][0]
    groups = len(np.unique(batch[f"key.{plan.group}"]))
    return total, aucs, gaucs, groups


def _reduce(scored: Any, plan: _Plan, models: int, seed: int, replicates: int):
    """Per task: the summed `sums`, the AUC per model and replicate, the GAUC sums; and the
    counts (rows, non-finite scores, null groups, groups)."""
    rows = scored.count()
    if not rows:
        return {"rows": 0}, {}, {}, 0
    if one_task_fits(scored.size_bytes(), smallest_node_memory()):
        blocks = scored.to_arrow_refs()
        return ray.get(_reduce_in_one_task.remote(plan, models, seed, replicates, *blocks))
    kwargs = {"seed": seed, "replicates": replicates}
    # As many hash partitions as blocks (Ray's default, 200, is that many aggregator actors).
    partitions = max(1, scored.num_blocks())
    parts = scored.map_batches(
        _sums_batch, fn_kwargs={"plan": plan, "models": models, **kwargs}, batch_size=None
    ).take_all()
    total = {k: sum(np.asarray(r[k]) for r in parts) for k in parts[0]}
    aucs, gaucs = {}, {}
    for task in plan.tasks:
        names = [f"score.{i}.{task.name}" for i in range(models)]
        given = {"task": task.name, "scores": names}
        observed = scored.map_batches(
            _observed, fn_kwargs={**given, "key": plan.group}, batch_size=None
        )
        for i, name in enumerate(names):
            parts = observed.sort(name).map_batches(
                _auc_batch, fn_kwargs={"score": name, **kwargs}, batch_size=None
            )
            vectors = [r["part"] for r in parts.take_all()]
            aucs[task.name, i] = bs.merge_auc([_as_auc_part(v, replicates) for v in vectors])
        if task.group_column and task.type == "binary":
            grouped = scored.map_batches(
                _observed,
                fn_kwargs={**given, "key": task.group_column, "groups": True},
                batch_size=None,
            )
            groups = grouped.groupby("key", num_partitions=partitions).map_groups(
                _group_batch, fn_kwargs={"scores": names}, batch_format="numpy"
            )
            parts = groups.map_batches(_gauc_batch, fn_kwargs=kwargs, batch_size=None).take_all()
            gaucs[task.name] = sum(np.asarray(r["part"]) for r in parts)
    groups = scored.groupby(f"key.{plan.group}", num_partitions=partitions).count().count()
    return total, aucs, gaucs, groups


def _per_replicate(
    plan: _Plan, models: int, total: dict, aucs: dict, gaucs: dict
) -> list[dict[str, np.ndarray]]:
    """Per model, every metric as a vector over replicates (replicate 0: the point value)."""
    out: list[dict[str, np.ndarray]] = [{} for _ in range(models)]
    for task in plan.tasks:
        sums = total[f"sums.{task.name}"]
        rows, labels = sums[0], sums[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            for i in range(models):
                if task.type != "binary":
                    out[i][f"{task.name}/mse"] = sums[2 + i] / rows
                    continue
                entropy = np.array([binary_entropy(r) for r in labels / rows])
                out[i][f"{task.name}/auc"] = aucs[task.name, i]
                ne = (sums[2 + i] / rows) / np.where(entropy > 0, entropy, np.nan)
                out[i][f"{task.name}/ne"] = ne
                if task.name in gaucs:
                    weights, weighted = gaucs[task.name][0], gaucs[task.name][1 + i]
                    out[i][f"{task.name}/gauc"] = np.where(weights > 0, weighted / weights, np.nan)
    for values in out:
        for kind in MEAN_METRICS:
            found = [v for k, v in values.items() if k.endswith(f"/{kind}")]
            if found:
                values[metric_name("", None, kind)] = np.nanmean(np.stack(found), axis=0)
    return out


def _summary(values: dict[str, np.ndarray]) -> dict[str, Estimate]:
    """The point value (replicate 0) and the 2.5 / 97.5 percentiles of the others."""
    out = {}
    for key, vector in values.items():
        draws = vector[1:][np.isfinite(vector[1:])]
        low, high = np.percentile(draws, [2.5, 97.5]) if len(draws) else (np.nan, np.nan)
        out[key] = Estimate(float(vector[0]), float(low), float(high))
    return out


def _check_scores(total: dict[str, np.ndarray], plan: _Plan, pinned: list[str]) -> None:
    for task in plan.tasks:
        for i, bad in enumerate(total[f"bad.{task.name}"].ravel()):
            if bad:
                raise EvaluationError(
                    f"{pinned[i]}: {int(bad):,} row(s) with NaN or inf {task.name} scores; "
                    "no metric is computed from them"
                )


def evaluate(
    client: MlflowClient,
    model_uris: Sequence[str],
    data_path: str | list[str],
    group_column: str | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    batch_size: int = 4096,
    experiment: str = EXPERIMENT,
    split: tuple[SplitConfig, str] | None = None,
) -> Evaluation:
    """Score `data_path` with every model and compare them with the first (see module doc).

    Args:
        client: the MLflow client holding the models; the comparison is logged there.
        model_uris: two or more model URIs; the first is the reference (the champion).
        data_path: holdout Parquet logs with the label columns (and the group columns).
        group_column: the bootstrap's groups, and every task's GAUC groups; default the
            first model's `data.group_column` and each task's own group column.
        bootstrap: replicates for the intervals (at least 20).
        seed: seed of the replicates' group counts.
        batch_size: rows per scoring call.
        experiment: the MLflow experiment of the comparison run.
        split: evaluate only the rows of this split of `data_path` (config, name), e.g. the
            test rows of a day that `adatt retrain` trained on.

    Raises:
        InputError: before scoring, when a model cannot be read, the models' tasks differ,
            there is no group column, or a column is missing from the data.
        EvaluationError: a model gave NaN or inf scores (the count is in the message).
    """
    uris = list(model_uris)
    if len(uris) < 2:
        raise InputError("--model: give at least two models (the first is the champion)")
    if bootstrap < 20:
        raise InputError(f"--bootstrap {bootstrap}: at least 20 replicates for 95 % intervals")
    models = _read_models(client, uris)
    plan = _plan(models[0].data, group_column, split, uris[0])
    files, columns = _check_data(models, plan, data_path)
    start_ray()
    scored = _scored(files, columns, models, plan, batch_size)
    total, aucs, gaucs, groups = _reduce(scored, plan, len(models), seed, bootstrap)
    if not (rows := int(total["rows"])):
        raise InputError(f"--data {data_path}: no rows to evaluate on")
    pinned = [m.source for m in models]
    _check_scores(total, plan, pinned)
    values = _per_replicate(plan, len(models), total, aucs, gaucs)
    result = Evaluation(uris, pinned, rows, {i: _summary(v) for i, v in enumerate(values)})
    for i in range(1, len(models)):
        result.gains[i] = _summary(
            {k: v - values[0][k] for k, v in values[i].items() if k in values[0]}
        )
    result.counts = {
        f"{t.name}/gauc_null_rows": int(total[f"nulls.{t.name}"])
        for t in plan.tasks
        if t.group_column
    }
    result.counts["groups"] = groups
    result.run_id = _log(client, result, data_path, plan.group, bootstrap, seed, experiment)
    return result


def _log(
    client: MlflowClient,
    result: Evaluation,
    data_path: Any,
    group: str,
    bootstrap: int,
    seed: int,
    experiment: str,
) -> str:
    """One MLflow run with the comparison: params, metrics, `evaluation.json`."""
    experiment_id = ensure_experiment(client, experiment, client.tracking_uri)
    run_id = client.create_run(experiment_id, run_name="evaluate").info.run_id
    with run_lifecycle(client, run_id):
        params = {f"model.{i}": model for i, model in enumerate(result.models)}
        params.update({f"pinned.{i}": model for i, model in enumerate(result.pinned)})
        params.update(
            data=json.dumps(data_path), group_column=group, bootstrap=bootstrap, seed=seed
        )
        log_params(client, run_id, params)
        metrics = {"rows": float(result.rows), **{k: float(v) for k, v in result.counts.items()}}
        named = [(str(i), v) for i, v in result.metrics.items()]
        named += [(f"gain.{i}", v) for i, v in result.gains.items()]
        for prefix, values in named:
            for key, e in values.items():
                metrics[f"{prefix}/{key}"] = e.value
                metrics[f"{prefix}/{key}/low"] = e.low
                metrics[f"{prefix}/{key}/high"] = e.high
        log_metrics(client, run_id, {k: v for k, v in metrics.items() if np.isfinite(v)})
        client.log_dict(run_id, _as_json(result), "evaluation.json")
    return run_id


def _as_json(result: Evaluation) -> dict[str, Any]:
    def table(values: dict[str, Estimate]) -> dict[str, list[float]]:
        return {k: [e.value, e.low, e.high] for k, e in values.items()}

    return {
        "models": result.models,
        "pinned": result.pinned,
        "rows": result.rows,
        "counts": result.counts,
        "metrics": {str(i): table(v) for i, v in result.metrics.items()},
        "gains": {str(i): table(v) for i, v in result.gains.items()},
    }


def report_lines(result: Evaluation) -> list[str]:
    """The table `adatt evaluate` prints: each metric per model, and each gain, with 95 %
    intervals; `better` marks a gain whose interval excludes 0 in the good direction."""
    lines = [f"{result.rows:,} rows; [95 % bootstrap interval by group]"]
    for i, (uri, pinned) in enumerate(zip(result.models, result.pinned, strict=True)):
        shown = uri if uri == pinned else f"{uri} = {pinned}"
        lines.append(f"  model {i}: {shown}" + (" (reference)" if i == 0 else ""))
    for key in result.metrics[0]:
        cells = [f"{key:<22}"]
        for i in result.metrics:
            e = result.metrics[i][key]
            cells.append(f"{e.value:.4f} [{e.low:.4f}, {e.high:.4f}]")
        for i, gains in result.gains.items():
            g = gains.get(key)
            if g is None:
                continue
            better = g.high < 0 if lower_is_better(key) else g.low > 0
            cells.append(
                f"gain {i} {g.value:+.4f} [{g.low:+.4f}, {g.high:+.4f}]"
                + (" better" if better else "")
            )
        lines.append("  " + "  ".join(cells))
    return lines
