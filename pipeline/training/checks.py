"""The checks before a training (or a search) writes anything, in one order for both:

0. `pipeline.session.open_session`: the tracking store reachable (with a timeout).
1. `check_before_ray`: credentials in URIs, the fault-injection hook, and the files'
   footers (`check_schema`). No Ray, no writes.
2. `pipeline.data.fit.fit_preprocessor`: one pass over the rows (NaN/inf, label values).
3. `start_ray_and_check_cluster`: start or join Ray, then the cluster rules (shared
   storage on several nodes, a tracking server for a remote job) and the workers'
   resources (`resources.plan_workers`: GPUs enough for the workers, `cuda_graph` only
   with a GPU; `num_workers: auto` resolved).

Only then is the MLflow run created. See docs/reliability.md.
"""

from __future__ import annotations

import ray

from pipeline.cluster_rules import check_cluster_rules, is_remote_submission
from pipeline.config import Config
from pipeline.data.files import InputFiles
from pipeline.data.validate import check_schema
from pipeline.session import Session
from pipeline.tracking.security import check_no_credentials
from pipeline.training.faults import fault_from_env
from pipeline.training.resources import plan_workers, with_workers


def check_before_ray(config: Config) -> InputFiles:
    """The checks that need neither Ray nor a write; returns the checked input files."""
    check_no_credentials(config)
    fault_from_env()  # a malformed ADATT_FAULT fails here, not in a worker
    return check_schema(config.data)


def start_ray_and_check_cluster(session: Session, storage: str, config: Config) -> Config:
    """Start (or join) Ray and check the cluster rules (shared storage, a tracking server)
    and that the cluster holds the workers; `config` with `train.num_workers` resolved."""
    session.start_ray()
    alive = [n for n in ray.nodes() if n["Alive"]]
    check_cluster_rules(storage, session.tracking_uri, len(alive), is_remote_submission())
    return with_workers(config, plan_workers(config.train, ray.cluster_resources()))
