"""The docstring examples run: every module of `models/`, and the pure modules of `pipeline/`
whose examples need neither Ray nor MLflow (those are marked `+SKIP` where they stand)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import models

MODELS = sorted(m.name for m in pkgutil.iter_modules(models.__path__, "models."))
PIPELINE = [
    "pipeline.cluster_rules",
    "pipeline.config",
    "pipeline.data.collate",
    "pipeline.data.feed",
    "pipeline.data.hashing",
    "pipeline.data.plan",
    "pipeline.data.split",
    "pipeline.metrics_vocab",
    "pipeline.release.evaluate",
    "pipeline.tracking.security",
    "pipeline.training.balancing",
    "pipeline.training.faults",
    "pipeline.training.resources",
    "pipeline.training.losses",
    "pipeline.training.metrics",
    "pipeline.ranking",
    "cluster.submit",
    "tune.search",
]


@pytest.mark.parametrize("name", [*MODELS, *PIPELINE])
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0, f"{name} has no runnable example"
