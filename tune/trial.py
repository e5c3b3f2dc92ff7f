"""One trial: a Tune function trainable that builds the same TorchTrainer as `adatt train`.

The Ray Train V2 + Tune pattern: the trial function is a light driver (it reserves no CPU)
that starts a Ray Train run whose workers hold the resources; `TrialReporter` forwards every
epoch's report to Tune so the scheduler (ASHA) can stop the trial. Each trial logs to its own
MLflow run, nested under the search's parent run and found again by its Tune trial id, so a
restarted or resumed trial continues the same run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray.tune
from mlflow.tracking import MlflowClient
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.config import Config
from pipeline.data.files import InputFiles
from pipeline.data.plan import SplitRows
from pipeline.data.preprocess import Preprocessor
from pipeline.tracking import tags
from pipeline.tracking.runs import client_for, run_lifecycle, start_run
from pipeline.training.driver import RunContext, make_trainer
from tune.space import SearchSpec

logger = logging.getLogger(__name__)


@dataclass
class SearchInputs:
    """What every trial shares, computed once on the search driver.

    `files` (schema-checked), `counts` (their rows of each split) and `preprocessor` (fitted
    statistics) are not recomputed per trial; each trial's workers plan and read their own
    rows from them.
    """

    spec: SearchSpec
    files: InputFiles
    counts: SplitRows
    preprocessor: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    train_storage: str


class TrialReporter(TuneReportCallback):
    """`TuneReportCallback` that forwards the validations (inside and at the end of epochs;
    their count `validations` is ASHA's time axis) and a last report carrying the selected
    model's validation metrics.

    The worker loop's final report holds `best/val/...` (the best validation) and test
    metrics; copying `best/val/x` to `val/x` there makes every Tune result carry the search
    metric and makes a finished trial's last result the score of the model it selected.
    Reports of step metrics or checkpoints alone are not forwarded: Tune requires the
    search metric in every result.
    """

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        report = metrics[0]
        if report.get("final"):
            best = {k[len("best/") :]: v for k, v in report.items() if k.startswith("best/val/")}
            metrics = [{**report, **best}, *metrics[1:]]
        elif not any(k.startswith("val/") for k in report):
            return  # step metrics and checkpoints alone: Tune compares validations only
        super().after_report(run_context, metrics, checkpoint)


def find_trial_run(
    client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str
) -> str | None:
    """The MLflow run of a trial, if it was created before (a restarted or resumed trial)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tags.PARENT}` = '{parent_run_id}' AND tags.`{tags.TRIAL}` = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every trial run of a search."""
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{tags.PARENT}` = '{parent_run_id}'", max_results=5000
    )


def trial_training_config(inputs: SearchInputs, sample: dict[str, Any], trial_name: str) -> Config:
    """The trial's training config; the selected epoch follows the search metric."""
    config = inputs.spec.trial_config(inputs.spec.decode(sample))
    settings = inputs.spec.settings
    stopping = config.train.early_stopping.model_copy(
        update={"metric": settings.metric, "mode": None}
    )
    return config.model_copy(
        update={
            "train": config.train.model_copy(update={"early_stopping": stopping}),
            "tracking": config.tracking.model_copy(update={"run_name": trial_name}),
        }
    )


def trial_run_name(trial_id: str) -> str:
    """A trial's Ray Train run name: stable, so a restarted trial resumes its Train run."""
    return f"train-trial_id={trial_id}"


def run_trial(sample: dict[str, Any], inputs: SearchInputs) -> None:
    """Tune entry point: train one sampled config, logging to the trial's child run."""
    context = ray.tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    config = trial_training_config(inputs, sample, trial_name)
    client = client_for(inputs.tracking_uri)
    name = trial_run_name(trial_id)
    run_id = find_trial_run(client, inputs.experiment_id, inputs.parent_run_id, trial_id)
    if run_id is None:
        run_tags = {
            tags.PARENT: inputs.parent_run_id,
            tags.TRIAL: trial_id,
            tags.MODEL: config.model.name,
            tags.STORAGE: inputs.train_storage,
            tags.RAY_RUN: name,
        }
        run_id = start_run(client, config, inputs.tracking_uri, tags=run_tags)
    run = RunContext(run_id, inputs.tracking_uri, name, inputs.train_storage)
    with run_lifecycle(client, run_id):
        trainer = make_trainer(
            config,
            Preprocessor.from_dict(inputs.preprocessor),
            inputs.counts,
            run,
            callbacks=[TrialReporter()],
        )
        trainer.fit()


def remove_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor is dead; return how many.

    When the scheduler stops a trial, its actor is killed and the Train controller it owns
    dies with it, leaving the workers' placement group reserved until the job ends. Ray
    Train's own cleaner removes it through the state API, which needs `ray[default]` and
    fails when several Ray instances run on one machine; this does the same from the search
    driver through the GCS, so a stopped trial never holds CPUs that later trials' Ray Data
    tasks need. A running trial's groups have a live creator and are left alone.
    """
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job_id = ray.get_runtime_context().get_job_id()
    nil_actor = ray.ActorID.nil().binary()
    removed = 0
    for blob in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(blob)
        if (
            pg.state == gcs_pb2.PlacementGroupTableData.CREATED
            # Groups made by a driver (Tune's trial groups) have the nil actor id and
            # count as "actor dead": only groups made by an actor that died qualify.
            and pg.creator_actor_id != nil_actor
            and pg.creator_actor_dead
            and not pg.is_detached
            and pg.creator_job_id.hex() == job_id
        ):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


class TrialRunCloser(ray.tune.Callback):
    """Driver-side: a trial that ends without finishing its run (stopped by the scheduler,
    or its process died) gets its MLflow run marked KILLED or FAILED, never left RUNNING,
    and its orphaned placement group removed (see `remove_orphaned_placement_groups`)."""

    CLEANUP_INTERVAL_S = 2.0

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self._last_cleanup = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last_cleanup >= self.CLEANUP_INTERVAL_S:
            self._last_cleanup = now
            try:
                remove_orphaned_placement_groups()
            except Exception as err:  # private Ray API: never fail the search over it
                logger.warning("could not check for orphaned placement groups: %s", err)

    def _close(self, trial: Any, status: str) -> None:
        client = client_for(self.tracking_uri)
        run_id = find_trial_run(client, self.experiment_id, self.parent_run_id, trial.trial_id)
        if run_id is None:
            return
        current = client.get_run(run_id).info.status
        stopped = status == "KILLED" and not trial.last_result.get("final")
        if stopped:
            # Its Train run may have failed while the trial was torn down: still a stop.
            client.set_tag(run_id, tags.STOPPED, "true")
        if current == "RUNNING" or (stopped and current == "FAILED"):
            client.set_terminated(run_id, status=status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED")
