"""The daily release loop under faults: five days of `adatt retrain`, one fault a day.

A first model is trained cold on `--history-days` days of synthetic logs and registered as
`@champion`. Then each new day runs `adatt retrain` as the CronJob does (a fresh process,
its own local Ray), against a real `mlflow server` on 127.0.0.1 reached through a small
proxy that can inject server errors:

1. server 500s during promotion: the registry answers the version's creation with 500
   twice (MLflow's client retries with backoff);
2. a holder killed: the day's retrain is SIGKILLed while it holds the promotion lease,
   then run again (the CronJob's retry), which takes the lease over once it expires;
3. a corrupt day: the day's Parquet file is a truncated upload;
4. a NaN day: the training loss turns NaN (`ADATT_FAULT=nan@1`);
5. a missed day: the schedule skipped it; the next run backfills with `--since` from
   day 1: days done are skipped, the corrupt day fails again, the NaN day (its fault gone)
   and the missed day run.

Prints one row per attempt: the day, the fault, the champion version it started from,
the challenger's mean-GAUC gain with its 95 % interval, promoted or not, and the exit
code; then `champion=<version> promotions=<n>`. Promotions are counted from the alias's
moves, watched while each command runs (every new `@champion` holder seen), never from the
`promotion.decision` tag: a row says `promoted` only for a version that held the alias.

    python bench/retrain_days.py [--history-rows 200000] [--day-rows 30000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import FaultyProxy, mlflow_server  # noqa: E402
from pipeline.release.lock import RELEASED, leases  # noqa: E402

NAME = "bench-daily"
FIRST_DAY = dt.date(2024, 1, 1)
LEASE_S = 20  # the promotion lease: a killed holder blocks the next run this long


def adatt(args: list[str], env: dict[str, str], log: Path, kill_when=None, watch=None) -> int:
    """Run `adatt ARGS` in a fresh process (its own session); its exit code. With
    `kill_when`, SIGKILL the whole process group as soon as `kill_when()` is true; `watch()`
    is called every half second while it runs, and once after."""
    with log.open("a") as out:
        out.write(f"\n$ adatt {' '.join(args)}\n")
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        while proc.poll() is None:
            if watch is not None:
                watch()
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                stop = [sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"]
                subprocess.run(stop, capture_output=True)  # its local Ray
                return -signal.SIGKILL
            time.sleep(0.5)
        if watch is not None:
            watch()
        return proc.returncode


def day_rows(
    client, experiment: str, day: str, since: float, held: list[str]
) -> list[dict[str, str]]:
    """What the registry holds for runs of `day` started after `since` (ms); a version is
    `promoted` when it is among `held`, the versions seen holding `@champion`."""
    from pipeline.tracking import tags

    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{tags.RETRAIN_DAY}` = '{day}' and attributes.start_time > {since}",
    )
    out = []
    for run in runs:
        registered = run.data.tags.get(tags.REGISTERED_VERSION)
        row = {"status": run.info.status, "champion": "", "gain": "", "decision": ""}
        if registered:
            version = client.get_model_version(NAME, registered.split("/")[1])
            t = version.tags
            row["champion"] = t.get(tags.PROMOTION_COMPARED_WITH, "")
            row["gain"] = (
                f"{float(t[tags.PROMOTION_GAIN]):+.4f} "
                f"[{float(t[tags.PROMOTION_GAIN_LOW]):+.4f}, "
                f"{float(t[tags.PROMOTION_GAIN_HIGH]):+.4f}]"
            )
            moved = version.version in held
            row["decision"] = f"{'promoted' if moved else 'kept'} (v{version.version})"
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history-rows", type=int, default=200_000)
    parser.add_argument("--history-days", type=int, default=14)
    parser.add_argument("--day-rows", type=int, default=30_000)
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--keep", type=Path, help="work here instead of a temp dir")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    from pipeline.datasets.synthetic import generate_logs
    from pipeline.tracking.runs import client_for

    work = args.keep or Path(tempfile.mkdtemp(prefix="retrain-days-"))
    (work / "server").mkdir(parents=True, exist_ok=True)
    logs, log = work / "logs", work / "commands.log"
    days = [(FIRST_DAY + dt.timedelta(args.history_days + i)).isoformat() for i in range(5)]
    generate_logs(logs, args.history_rows, seed=0, days=args.history_days)
    history = sorted(str(p) for p in logs.glob("*.parquet"))
    for day in days:
        generate_logs(logs, args.day_rows, seed=1, days=1, start_day=day)
    (logs / f"{days[2]}.parquet").write_bytes(b"PAR1 a truncated upload")  # fault 3

    with mlflow_server(work / "server", str(work / "server" / "artifacts")) as upstream:
        proxy = FaultyProxy(upstream)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "ADATT_PROMOTION_LEASE_S": str(LEASE_S),
        }
        sets = [
            *("--set", f"tracking.tracking_uri={proxy.url}"),
            *("--set", "tracking.experiment=retrain-days"),
            *("--set", f"train.storage_path={work / 'runs'}"),
            *("--set", "train.num_workers=1"),  # one worker: the 2 CPUs also run Ray Data
        ]
        config = ["--config", str(ROOT / "configs" / "synthetic.yaml")]
        cold = ["train", *config, *sets, "--set", f"data.path={history}"]
        assert adatt([*cold, "--set", "train.epochs=2"], env, log) == 0, log.read_text()[-3000:]
        client = client_for(upstream)
        experiment = client.get_experiment_by_name("retrain-days").experiment_id
        first = client.search_runs([experiment])[0].info.run_id
        register = ["register", "--run", first, "--name", NAME, "--tracking-uri", proxy.url]
        assert adatt(register, env, log) == 0, log.read_text()[-3000:]
        print(f"day 0: {args.history_days} days, {args.history_rows:,} rows -> v1 @champion")
        print(f"{'day':<11} {'fault':<28} {'champion':>8}  {'gain [95 % interval]':<27} "
              f"{'decision':<15} exit")  # fmt: skip

        daily = ["retrain", *config, *sets, "--set", f"data.path={logs}", "--set", "train.epochs=1"]
        daily += ["--model", f"models:/{NAME}@champion", "--bootstrap", str(args.bootstrap)]
        held = [champion_of(client)]  # every @champion holder seen, in order

        def watch() -> None:
            if (now := champion_of(client)) != held[-1]:
                held.append(now)

        def holding() -> bool:
            return any(RELEASED not in t for t in leases(client, NAME).values())

        attempts = [
            (days[0], "500s during promotion", {}, None, "/model-versions/create"),
            (days[1], "holder killed (SIGKILL)", {}, holding, None),
            (days[1], "  rerun after the kill", {}, None, None),
            (days[2], "corrupt day", {}, None, None),
            (days[3], "NaN loss", {"ADATT_FAULT": "nan@1"}, None, None),
        ]
        for day, fault, extra, kill_when, inject in attempts:
            if inject:
                proxy.inject(500, 2, path=inject)
            since, holder = time.time() * 1000, champion_of(client)
            code = adatt([*daily, "--day", day], {**env, **extra}, log, kill_when, watch)
            _print(day, fault, client, since, code, holder, log, held)
        # Day 5's run was missed; the next one backfills from day 1.
        since, holder = time.time() * 1000, champion_of(client)
        code = adatt([*daily, "--day", days[4], "--since", days[0]], env, log, watch=watch)
        for day in days:
            label = "missed: backfilled" if day == days[4] else "  backfill --since"
            _print(day, label, client, since, code, holder, log, held)
        proxy.close()
    promotions = len(held) - 1  # the alias's moves after the first model's
    print(
        f"champion={held[-1]} promotions={promotions} (counted from alias moves: "
        f"@champion held by {' -> '.join(held)}; commands and output: {log})"
    )


def champion_of(client) -> str:
    """The version `@champion` points at now."""
    return client.get_model_version_by_alias(NAME, "champion").version


def _said(log: Path, day: str) -> str:
    """What the last command printed about `day` when the registry has no new version."""
    text = log.read_text().rpartition("\n$ adatt ")[2]
    if f"retrain {day}: done already" in text:
        return "skipped: done"
    if "training loss is nan" in text and f"--day {day}" in text.splitlines()[0]:
        return "failed: NaN"
    if f"{day}.parquet: not a Parquet file" in text:
        return "failed: input"
    return "no run"


def _print(
    day: str, fault: str, client, since: float, code: int, holder: str, log: Path, held: list
) -> None:
    rows = day_rows(client, "retrain-days", day, since, held) or [
        {"status": _said(log, day), "champion": "", "gain": "", "decision": ""}
    ]
    for row in rows:
        row["champion"] = row["champion"] or holder
        decision = row["decision"] or row["status"]
        print(
            f"{day:<11} {fault:<28} {row['champion']:>8}  {row['gain']:<27} {decision:<15} {code}",
            flush=True,
        )


if __name__ == "__main__":
    main()
