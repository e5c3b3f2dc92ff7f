"""Trial concurrency from the cluster's resources (no Ray needed)."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from tests.conftest import REPO_ROOT
from tune.search import trial_concurrency
from tune.space import parse_search_spec


def base(**train):
    raw = {
        "base": str(REPO_ROOT / "configs" / "synthetic.yaml"),
        "set": {f"train.{k}": v for k, v in train.items()},
        "search": {"train.lr": {"grid": [0.001]}},
    }
    return parse_search_spec(raw, "spec", REPO_ROOT / "configs", "t").base


@pytest.mark.parametrize(
    ("cluster", "train", "gpu", "requested", "expected"),
    [
        (
            {"CPU": 2},
            {"num_workers": 2, "cpus_per_worker": 0.5},
            False,
            None,
            1,
        ),  # 1 CPU left to data
        ({"CPU": 2}, {"num_workers": 1, "cpus_per_worker": 0.5}, False, None, 2),
        ({"CPU": 2}, {"num_workers": 1, "cpus_per_worker": 0.5}, False, 1, 1),
        ({"CPU": 16}, {"num_workers": 2, "cpus_per_worker": 1.0}, False, None, 7),
        ({"CPU": 16, "GPU": 4}, {"num_workers": 2, "cpus_per_worker": 1.0}, True, None, 2),
        ({"CPU": 16, "GPU": 4}, {"num_workers": 1, "cpus_per_worker": 1.0}, True, 3, 3),
    ],
)
def test_concurrency_leaves_a_cpu_for_ray_data(cluster, train, gpu, requested, expected) -> None:
    assert gpu == ("GPU" in cluster)  # use_gpu: auto follows the cluster
    assert trial_concurrency(cluster, base(**train), requested) == expected


def test_no_cpu_left_for_data_is_refused() -> None:
    with pytest.raises(ConfigError, match="train.num_workers x train.cpus_per_worker = 2 CPUs"):
        trial_concurrency({"CPU": 2}, base(num_workers=2, cpus_per_worker=1.0), None)
