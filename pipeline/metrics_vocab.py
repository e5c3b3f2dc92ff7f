"""Every metric name the project reports, which way it improves, and how to read one.

Names are `<prefix>/<task>/<kind>` for a task's metric and `<prefix>/mean_<kind>` for the
mean over the binary tasks; the prefix is the split (`val`, `test`), `best/val` for the
selected epoch's validation metrics, and empty for `adatt evaluate`'s keys (`click/gauc`,
`mean_gauc`). Training (`pipeline.training.metrics`), the config's early-stopping check,
Tune, `adatt evaluate` and the registry all take their names and directions from here.

Example:
    >>> m = parse_metric("best/val/click/ne")
    >>> (m.prefix, m.task, m.kind, m.lower_is_better)
    ('best/val', 'click', 'ne', True)
    >>> metric_name("val", None, "gauc")
    'val/mean_gauc'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pipeline.errors import ConfigError, InputError

# What an evaluation reports per task, by task type; GAUC for binary tasks with a group.
TASK_METRICS = {
    "binary": ("auc", "logloss", "ne", "calibration", "count"),
    "regression": ("mse", "count"),
}
GROUPED_METRICS = ("gauc", "gauc_groups")
MEAN_METRICS = ("auc", "ne", "gauc")  # `<prefix>/mean_<kind>`, over the binary tasks
# What `adatt evaluate` reports per task (and their means), with bootstrap intervals.
EVALUATED_METRICS = ("auc", "gauc", "ne", "mse")
LOWER_IS_BETTER = frozenset({"ne", "logloss", "loss", "mse"})
# Not a quality that ranks models: calibration is best at 1; counts and times.
NOT_RANKING = frozenset({"calibration", "count", "gauc_groups", "seconds", "rows"})
PREFIXES = ("best/val", "best/test", "val", "test", "train")


class Task(Protocol):
    """What this module needs of a task (`pipeline.config.TaskSpec` is one)."""

    name: str
    type: str
    group_column: str | None


@dataclass(frozen=True)
class Metric:
    """A parsed metric name: its prefix (split), task (None for a mean) and kind."""

    prefix: str
    task: str | None
    kind: str

    @property
    def lower_is_better(self) -> bool:
        return self.kind in LOWER_IS_BETTER

    @property
    def ranks_models(self) -> bool:
        return self.kind not in NOT_RANKING

    @property
    def name(self) -> str:
        return metric_name(self.prefix, self.task, self.kind)


def metric_name(prefix: str, task: str | None, kind: str) -> str:
    """`val/click/auc` for a task, `val/mean_auc` for a mean (task None); no prefix: `click/auc`."""
    leaf = f"{task}/{kind}" if task is not None else f"mean_{kind}"
    return f"{prefix}/{leaf}" if prefix else leaf


def parse_metric(name: str) -> Metric:
    """Read a metric name (see the module docstring)."""
    prefix = next((p for p in PREFIXES if name.startswith(p + "/")), "")
    rest = name[len(prefix) + 1 :] if prefix else name
    task, _, kind = rest.rpartition("/")
    if not task and kind.startswith("mean_"):
        return Metric(prefix, None, kind.removeprefix("mean_"))
    return Metric(prefix, task or None, kind)


def lower_is_better(name: str) -> bool:
    """Whether the metric improves downwards (NE, log loss, MSE, loss)."""
    return parse_metric(name).lower_is_better


def direction(name: str) -> str:
    """`"min"` for a metric that improves downwards, else `"max"` (Ray Tune's words).

    Example:
        >>> direction("val/mean_ne"), direction("val/click/auc")
        ('min', 'max')
    """
    return "min" if lower_is_better(name) else "max"


def check_mode(metric: str, mode: str | None) -> None:
    """ValueError when a stated `mode` contradicts `metric`'s direction (a config field's
    validator raises it, so the error names the field). The mode is optional everywhere (the
    direction comes from here); configs that state the right one keep loading."""
    if mode is not None and mode != direction(metric):
        raise ValueError(
            f"{mode!r} contradicts {metric}, which is better when "
            f"{'lower' if lower_is_better(metric) else 'higher'} ({direction(metric)!r}); "
            "leave the mode out: it follows the metric"
        )


def beats(new: float, old: float | None, name: str) -> bool:
    """Whether `new` is strictly better than `old` on metric `name`; any value beats None,
    NaN beats nothing."""
    if new != new:  # NaN
        return False
    if old is None:
        return True
    return new < old if lower_is_better(name) else new > old


def reported_metrics(tasks: Sequence[Task], prefix: str = "val") -> list[str]:
    """The metrics an evaluation of these tasks reports under `prefix` (`val`, `test`)."""
    names = []
    for task in tasks:
        kinds = TASK_METRICS[task.type]
        if task.type == "binary" and task.group_column:
            kinds += GROUPED_METRICS
        names += [metric_name(prefix, task.name, kind) for kind in kinds]
    if any(t.type == "binary" for t in tasks):
        names += [metric_name(prefix, None, "auc"), metric_name(prefix, None, "ne")]
    if any(t.type == "binary" and t.group_column for t in tasks):
        names.append(metric_name(prefix, None, "gauc"))
    return names


def check_validation_metric(metric: str, tasks: Sequence[Task], field: str) -> None:
    """ConfigError naming `field` unless `metric` is a validation metric of these tasks."""
    if metric in reported_metrics(tasks, "val"):
        return
    binary, regression = (", ".join(TASK_METRICS[k]) for k in ("binary", "regression"))
    raise ConfigError(
        f"{field}: {metric!r} is not a validation metric of tasks {[t.name for t in tasks]}; "
        f"use val/mean_auc, val/mean_ne, or val/<task>/<metric> with a metric in {binary} "
        f"(binary tasks) or {regression} (regression); with a group_column, also "
        "val/mean_gauc and val/<task>/gauc"
    )


def check_ranking_metric(metric: str, field: str) -> None:
    """InputError naming `field` unless `metric` is a validation quality that ranks models
    (`val/...` or `best/val/...`; test metrics stay out of model selection)."""
    parsed = parse_metric(metric)
    if parsed.prefix not in ("val", "best/val"):
        raise InputError(
            f"{field} {metric}: use a validation metric (val/...); test metrics stay out of "
            "model selection"
        )
    if not parsed.ranks_models:
        raise InputError(f"{field} {metric}: not a metric that ranks models")


def evaluated_key(metric: str, field: str) -> str:
    """The key `adatt evaluate` reports for `metric` (`val/mean_gauc` or `mean_gauc` ->
    `mean_gauc`); InputError naming `field` unless it is AUC, GAUC, NE or MSE of a task or a
    mean of them."""
    parsed = parse_metric(metric)
    nested = parsed.task is not None and "/" in parsed.task
    if (
        parsed.prefix not in ("", "val", "best/val")
        or parsed.kind not in EVALUATED_METRICS
        or nested
    ):
        raise InputError(
            f"{field} {metric}: use a metric `adatt evaluate` reports: mean_auc, mean_gauc, "
            "mean_ne or <task>/<auc|gauc|ne|mse>"
        )
    return metric_name("", parsed.task, parsed.kind)
