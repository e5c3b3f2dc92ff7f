"""The metric vocabulary: names, their parser, directions, and which metrics a config,
Tune, the registry and `adatt evaluate` accept."""

from __future__ import annotations

import pytest

from pipeline.config import TaskSpec
from pipeline.errors import ConfigError, InputError
from pipeline.metrics_vocab import (
    beats,
    check_ranking_metric,
    check_validation_metric,
    evaluated_key,
    lower_is_better,
    metric_name,
    parse_metric,
    reported_metrics,
)


def test_metric_direction_and_choice() -> None:
    assert lower_is_better("val/mean_ne") and lower_is_better("best/val/watch_time/mse")
    assert not lower_is_better("val/mean_auc") and not lower_is_better("val/click/auc")
    assert beats(0.71, 0.70, "val/mean_auc") and not beats(0.70, 0.71, "val/mean_auc")
    assert beats(0.95, 0.97, "val/click/ne") and not beats(0.97, 0.95, "val/click/ne")
    assert not beats(0.7, 0.7, "val/mean_auc")  # a tie keeps the holder
    assert beats(0.1, None, "val/mean_auc")
    check_ranking_metric("val/click/logloss", "--promote-if-better")
    with pytest.raises(InputError, match="validation metric"):
        check_ranking_metric("test/mean_auc", "--promote-if-better")
    with pytest.raises(InputError, match="not a metric that ranks"):
        check_ranking_metric("val/click/calibration", "--promote-if-better")
    with pytest.raises(InputError, match="not a metric that ranks"):
        check_ranking_metric("val/click/gauc_groups", "--promote-if-better")
    assert not lower_is_better("val/mean_gauc")


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("val/click/auc", ("val", "click", "auc")),
        ("best/val/mean_ne", ("best/val", None, "ne")),
        ("test/watch_time/mse", ("test", "watch_time", "mse")),
        ("mean_gauc", ("", None, "gauc")),
        ("like/gauc", ("", "like", "gauc")),
        ("train/loss", ("train", None, "loss")),
    ],
)
def test_names_parse_and_rebuild(name: str, parsed: tuple) -> None:
    metric = parse_metric(name)
    assert (metric.prefix, metric.task, metric.kind) == parsed
    if metric.kind != "loss":
        assert metric.name == name == metric_name(*parsed)


def test_what_tasks_report_and_which_metrics_each_check_takes() -> None:
    tasks = [
        TaskSpec(name="click", group_column="user_id"),
        TaskSpec(name="watch", type="regression"),
    ]
    names = reported_metrics(tasks, "val")
    assert names == [
        "val/click/auc",
        "val/click/logloss",
        "val/click/ne",
        "val/click/calibration",
        "val/click/count",
        "val/click/gauc",
        "val/click/gauc_groups",
        "val/watch/mse",
        "val/watch/count",
        "val/mean_auc",
        "val/mean_ne",
        "val/mean_gauc",
    ]
    check_validation_metric("val/mean_gauc", tasks, "train.early_stopping.metric")
    with pytest.raises(ConfigError, match="train.early_stopping.metric: 'val/clik/auc'"):
        check_validation_metric("val/clik/auc", tasks, "train.early_stopping.metric")
    assert evaluated_key("val/mean_gauc", "--metric") == "mean_gauc"
    assert evaluated_key("best/val/click/ne", "--metric") == "click/ne"
    for bad in ("val/click/calibration", "test/mean_auc", "a/b/auc"):
        with pytest.raises(InputError, match="--metric"):
            evaluated_key(bad, "--metric")
