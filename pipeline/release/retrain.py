"""`adatt retrain`: the daily loop as one command.

1. The day's logs: the files under `data.path` of the day (`2024-01-15.parquet`,
   `day=2024-01-15/part-0.parquet`; `in_day`), split by a hash of the user (`data.group_column`) into
   train, validation and a holdout (the test split) that no model trained on.
2. Warm start: a new run from the champion (`--warm-start`), trained on the day.
3. Register the run's model as a new version and move the alias only if its gain over the
   holder, both scored on the day's holdout (`adatt evaluate`), is significant
   (`register --data --min-gain`).

Exit codes for a scheduler: 0 the day is done (promoted or not: the printed line and the
version's `promotion.decision` tag say which); 2 bad input, found before anything is
written (a missing or corrupt day, a changed schema): the registry is untouched; 1 any
other failure (the training run is marked FAILED, the alias does not move); 130 / 143
interrupted.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pipeline.config import Config, SplitConfig
from pipeline.data.files import resolve_files
from pipeline.errors import InputError
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
    """Whether a file belongs to `day`: a folder or the file itself is named exactly the day
    (`2024-01-15/part-0.parquet`, `2024-01-15.parquet`) or is the day's partition
    (`day=2024-01-15/...`, `dt=2024-01-15/...`); a name merely holding the date does not.

    Example:
        >>> [in_day(p, "2024-01-15") for p in
        ...  ["s3://b/day=2024-01-15/p.parquet", "logs/2024-01-15.parquet", "logs/x-2024-01-15.pq"]]
        [True, True, False]
    """
    segments = path.split("/")
    stem = segments[-1].split(".", 1)[0]
    folders = segments[:-1]
    return stem == day or any(s == day or s.partition("=")[2] == day for s in folders)


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
    """`config` on the day's files, split by user into train / validation / holdout."""
    group = config.data.group_column
    if group is None:
        raise InputError(
            f"{config.data.path}: retrain splits a day by user and ranks by GAUC; set "
            "data.group_column (e.g. user_id)"
        )
    split = SplitConfig(
        method="hash", column=group, validation_fraction=validation, test_fraction=holdout
    )
    data = config.data.model_copy(update={"path": files, "split": split})
    tracking = config.tracking.model_copy(update={"run_name": f"retrain {day}"})
    return config.model_copy(update={"data": data, "tracking": tracking})


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
        bootstrap: replicates of the comparison.
        refit_stats: refit the dense statistics on the day (default: the champion's).
        session: the command's session (default: one for `config.tracking`).
    """
    name, alias = parse_alias(model_uri)
    session = session or open_session("retrain", config.tracking)
    files = day_files(config, day)
    daily = day_config(config, files, day, validation, holdout)
    outcome = run_training(daily, warm_start=model_uri, refit_stats=refit_stats, session=session)
    client = session.client
    evidence = Evidence(
        files, min_gain, daily.data.group_column, bootstrap, (daily.data.split, "test")
    )
    registration = register_run(client, outcome.run_id, name, alias, metric, evidence)
    client.set_tag(outcome.run_id, tags.RETRAIN_DAY, day)
    client.set_tag(outcome.run_id, tags.REGISTERED_VERSION, f"{name}/{registration.version}")
    return RetrainOutcome(day, outcome.run_id, registration)
