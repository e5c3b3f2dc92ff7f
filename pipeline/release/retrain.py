"""`adatt retrain`: the daily loop as one command.

Every check first, before Ray starts or anything is written: the alias's syntax, the
promotion metric, the day's files (a partition segment: `in_day`), the champion (resolved
once to a version, and read), and that the champion did not train on the day (its run's
`adatt.data_days`). Then:

1. The day's logs, split by a hash of the user (`data.group_column`) salted with the day
   into train, validation and a holdout (the test split) no model trained on: the holdout
   users change every day.
2. Warm start: a new run from the champion's pinned version, trained on the day.
3. Register the run's model as a new version and move the alias only if its gain over the
   holder, both scored on the day's holdout (`adatt evaluate`), is significant
   (`register --data --min-gain`).

Exit codes and MLflow run status agree (docs/registry.md has the table): 0 the day is done
(promoted or kept; run FINISHED); 2 bad input found before anything was written (no run);
1 any other failure: training failed (run FAILED), or the registration failed after a
finished training (run FINISHED, tagged `adatt.retrain_outcome=failed: ...`, alias
untouched); 130 / 143 interrupted (run KILLED).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pipeline.config import Config, SplitConfig
from pipeline.data.files import file_days, resolve_files
from pipeline.errors import InputError, Stopped
from pipeline.metrics_vocab import evaluated_key
from pipeline.modelfile.store import ModelRef, read_model, resolve_model
from pipeline.release.registry import Evidence, Registration, register_run
from pipeline.session import Session, open_session
from pipeline.tracking import tags
from pipeline.training.driver import run_training


@dataclass
class RetrainOutcome:
    """One day of the loop: the challenger's run and what the registry did with it."""

    day: str
    run_id: str
    registration: Registration

    def line(self) -> str:
        r = self.registration
        verdict = (
            f"promoted: @{r.alias} -> {r.version}"
            if r.promoted
            else (f"kept: @{r.alias} stays at version {r.holder}")
        )
        return f"retrain {self.day}: run {self.run_id}, version {r.version} {verdict}"


def parse_alias(model_uri: str) -> tuple[str, str]:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS); InputError otherwise."""
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    if not model_uri.startswith("models:/") or not name or not alias:
        raise InputError(f"--model {model_uri}: expected models:/NAME@ALIAS (e.g. @champion)")
    return name, alias


def in_day(path: str, day: str) -> bool:
    """Whether a file belongs to `day` by its path (`pipeline.data.files.file_days`).

    Example:
        >>> [in_day(p, "2024-01-15") for p in
        ...  ["s3://b/day=2024-01-15/p.parquet", "logs/2024-01-15.parquet", "logs/x-2024-01-15.pq"]]
        [True, True, False]
    """
    return day in file_days(path)


def day_files(config: Config, day: str) -> list[str]:
    """The files under `data.path` of `day` (ISO date, see `in_day`); InputError if none."""
    try:
        dt.date.fromisoformat(day)
    except ValueError:
        raise InputError(f"--day {day}: expected a date as YYYY-MM-DD") from None
    found = [f for f in resolve_files(config.data.path) if in_day(f, day)]
    if not found:
        raise InputError(
            f"--day {day}: no file under {config.data.path} is that day's (a file or folder "
            f"named {day}, or a partition folder such as day={day})"
        )
    return found


def day_config(
    config: Config, files: list[str], day: str, validation: float, holdout: float
) -> Config:
    """`config` on the day's files, split by user (salted with the day) into train /
    validation / holdout."""
    group = config.data.group_column
    if group is None:
        raise InputError(
            f"{config.data.path}: retrain splits a day by user and ranks by GAUC; set "
            "data.group_column (e.g. user_id)"
        )
    split = SplitConfig(
        method="hash",
        column=group,
        salt=f"holdout {day}",
        validation_fraction=validation,
        test_fraction=holdout,
    )
    data = config.data.model_copy(update={"path": files, "split": split})
    tracking = config.tracking.model_copy(update={"run_name": f"retrain {day}"})
    return config.model_copy(update={"data": data, "tracking": tracking})


def _shown(ref: ModelRef) -> str:
    return ref.given if ref.given == ref.uri else f"{ref.given} = {ref.uri}"


def check_champion(ref: ModelRef, session: Session, day: str) -> None:
    """InputError unless the champion loads (its spec reads back) and did not train on
    `day` (its run's days, or its cutoff window)."""
    read_model(ref, session.client, weights=False)
    if ref.run_id is None:
        return
    run_tags = session.client.get_run(ref.run_id).data.tags
    days = run_tags.get(tags.DATA_DAYS, "")
    first, _, last = days.partition("..")
    trained = day in days.split(",") or (last and first <= day <= last)
    window = run_tags.get(tags.DATA_WINDOW, "").split(" ")
    if len(window) >= 2 and ".." in window[1]:  # `<column> <min>..<max> (<n> files)`
        low, _, high = window[1].partition("..")
        trained = trained or low[:10] <= day <= high[:10]
    if trained:
        raise InputError(
            f"--day {day}: the champion {_shown(ref)} (run {ref.run_id}) trained on that day's "
            "logs; its holdout would score it on rows it learnt from. Retrain a later day"
        )


@dataclass(frozen=True)
class DayPlan:
    """One day's retrain, checked: the alias, the pinned champion, the day's config."""

    name: str
    alias: str
    day: str
    champion: ModelRef
    files: list[str]
    config: Config


def plan_day(
    config: Config,
    model_uri: str,
    day: str,
    metric: str,
    session: Session,
    validation: float = 0.1,
    holdout: float = 0.2,
) -> DayPlan:
    """Every check of a day before any work (module docstring); InputError otherwise."""
    name, alias = parse_alias(model_uri)
    evaluated_key(metric, "--metric")
    files = day_files(config, day)
    daily = day_config(config, files, day, validation, holdout)
    champion = resolve_model(model_uri, session.client, "--model")
    check_champion(champion, session, day)
    return DayPlan(name, alias, day, champion, files, daily)


def done_version(session: Session, config: Config, day: str) -> str | None:
    """`NAME/VERSION` a retrain of `day` registered already, if one did."""
    experiment = session.client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return None
    runs = session.client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{tags.RETRAIN_DAY}` = '{day}'",
    )
    done = [r.data.tags.get(tags.REGISTERED_VERSION) for r in runs]
    return next((v for v in done if v), None)


def retrain(
    config: Config,
    model_uri: str,
    day: str,
    metric: str = "mean_gauc",
    min_gain: float = 0.0,
    validation: float = 0.1,
    holdout: float = 0.2,
    bootstrap: int = 200,
    refit_stats: bool = False,
    session: Session | None = None,
) -> RetrainOutcome:
    """Warm-start from `model_uri` on `day`, then register and promote on the day's holdout.

    Args:
        config: the training config; `data.path` holds the logs of many days.
        model_uri: `models:/NAME@ALIAS`: the champion to start from and the alias to move.
        day: the day to train on (YYYY-MM-DD).
        metric: the promotion metric (`adatt evaluate`'s keys, e.g. `mean_gauc`).
        min_gain: the margin the gain's 95 % interval must clear.
        validation, holdout: fractions of the day's users for validation and the holdout.
        bootstrap: replicates of the comparison (at least 20).
        refit_stats: refit the dense statistics on the day (default: the champion's).
        session: the command's session (default: one for `config.tracking`).
    """
    if bootstrap < 20:
        raise InputError(f"--bootstrap {bootstrap}: at least 20 replicates for 95 % intervals")
    session = session or open_session("retrain", config.tracking)
    plan = plan_day(config, model_uri, day, metric, session, validation, holdout)
    warm = plan.champion.uri
    outcome = run_training(plan.config, warm_start=warm, refit_stats=refit_stats, session=session)
    client = session.client
    client.set_tag(outcome.run_id, tags.RETRAIN_DAY, day)
    split = (plan.config.data.split, "test")
    evidence = Evidence(plan.files, min_gain, plan.config.data.group_column, bootstrap, split)
    try:
        registration = register_run(client, outcome.run_id, plan.name, plan.alias, metric, evidence)
    except Exception as err:  # the training stands; say on its run why nothing was registered
        client.set_tag(outcome.run_id, tags.RETRAIN_OUTCOME, f"failed: {err}"[:5000])
        raise RetrainFailed(
            f"run {outcome.run_id} trained on {day}, not registered: {err}"
        ) from err
    client.set_tag(outcome.run_id, tags.REGISTERED_VERSION, f"{plan.name}/{registration.version}")
    decision = "promoted" if registration.promoted else "kept"
    client.set_tag(outcome.run_id, tags.RETRAIN_OUTCOME, decision)
    return RetrainOutcome(day, outcome.run_id, registration)


class RetrainFailed(Stopped):
    """The day's training finished but its registration failed (exit 1, alias untouched)."""


def days_between(since: str, until: str) -> list[str]:
    """Every day from `since` to `until`, both included (ISO dates)."""
    try:
        first, last = dt.date.fromisoformat(since), dt.date.fromisoformat(until)
    except ValueError:
        raise InputError(f"--since {since} / --day {until}: expected dates as YYYY-MM-DD") from None
    if last < first:
        raise InputError(f"--since {since}: after --day {until}")
    return [(first + dt.timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]
