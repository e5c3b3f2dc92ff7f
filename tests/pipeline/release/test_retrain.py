"""`adatt retrain`: the daily loop over three days against a real MLflow server and local
Ray: versions appear day by day, the alias moves only on a significant gain, and a bad day
leaves everything as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bench.harness import FaultyProxy
from pipeline.cli import app
from pipeline.errors import InputError
from pipeline.release.registry import register_run
from pipeline.release.retrain import day_files, parse_alias
from pipeline.tracking import tags
from tests.conftest import registry_client, tiny_config

NAME = "daily"


def test_arguments_are_checked_before_anything_runs(tmp_path: Path) -> None:
    assert parse_alias("models:/adatt@champion") == ("adatt", "champion")
    for bad in ("models:/adatt/3", "runs:/abc/model", "adatt@champion"):
        with pytest.raises(InputError, match="expected models:/NAME@ALIAS"):
            parse_alias(bad)
    layouts = [
        "2024-01-15.parquet",  # a file named the day
        "day=2024-01-15/part-0.parquet",  # a partition folder
        "2024-01-15/part-1.parquet",  # a folder named the day
        "not-2024-01-15.parquet",  # merely holds the date: not the day's
        "day=2024-01-150/part-0.parquet",
        "_temporary/2024-01-15.parquet",  # a writer's leftovers: never data
        "day=2024-01-16/2024-01-15x.parquet",
    ]
    for name in layouts:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    config = tiny_config(tmp_path, tmp_path)
    with pytest.raises(InputError, match="--day 2024-1-15: expected a date"):
        day_files(config, "2024-1-15")
    with pytest.raises(InputError, match="--day 2024-01-17: no file under .* is that day's"):
        day_files(config, "2024-01-17")
    assert day_files(config, "2024-01-15") == [str(tmp_path / n) for n in sorted(layouts[:3])]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_check_comes_before_any_work(
    served_training, mlflow_server, tiny_logs, tmp_path
) -> None:
    """A metric typo, an alias with no holder, a day with no logs and a champion that
    trained on the day are each exit 2 before Ray runs anything: no run, no version."""
    _, first = served_training
    client = registry_client(mlflow_server)
    register_run(client, first.run_id, "checked", "champion")
    config = tiny_config(tiny_logs, tmp_path, f"tracking.tracking_uri={mlflow_server}")
    path = tmp_path / "checked.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    def runs() -> int:
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        return len(client.search_runs([experiment.experiment_id])) if experiment else 0

    before = runs()
    day = "2024-01-05"  # a day of tiny_logs, which the champion trained on
    cases = {
        ("--metric", "mean_gacu"): "--metric mean_gacu: ",
        ("--model", "models:/checked@nobody"): "--model models:/checked@nobody: ",
        ("--day", "2024-02-01"): "--day 2024-02-01: no file under ",
        ("--day", day): f"--day {day}: the champion models:/checked@champion",
    }
    for (option, value), message in cases.items():
        args = {"--model": "models:/checked@champion", "--day": day, option: value}
        command = ["retrain", "--config", str(path), *(x for kv in args.items() for x in kv)]
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert runs() == before
    assert [v.version for v in client.search_model_versions("name='checked'")] == ["1"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_days_of_the_loop(served_training, mlflow_server, s3, tmp_path_factory) -> None:
    """Two days and a bad one, the logs in S3 as day partitions (`day=YYYY-MM-DD/`), the
    checkpoints in S3, the MLflow artifacts in S3. Day 2's first try trains, then fails to
    register (the server answers 500); a backfill then skips day 1 and does day 2."""
    from pipeline.datasets.synthetic import generate_logs
    from tests.conftest import s3_fs

    _, first = served_training
    client = registry_client(mlflow_server)
    register_run(client, first.run_id, NAME, "champion")  # version 1: the first day's model
    local = tmp_path_factory.mktemp("days")
    for day in ("2024-01-15", "2024-01-16"):
        generate_logs(local / f"day={day}", rows=3000, days=1, start_day=day, seed=0)
    s3.upload(local, "daily")
    logs = s3.uri("daily")
    bad_file = f"{logs}/day=2024-01-17/part-0.parquet"
    with s3_fs().open_output_stream(bad_file.removeprefix("s3://")) as stream:
        stream.write(b"PAR1 a truncated upload")  # a bad day
    workdir = tmp_path_factory.mktemp("retrain")
    config = tiny_config(
        logs,
        workdir,
        f"tracking.tracking_uri={mlflow_server}",
        f"train.storage_path={s3.uri('daily-runs')}",
        "train.epochs=1",
    )
    path = workdir / "daily.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    def retrain(day: str, *more: str, config_path: Path = path):
        command = ["retrain", "--config", str(config_path), "--model", f"models:/{NAME}@champion"]
        return CliRunner().invoke(app, [*command, "--day", day, "--bootstrap", "50", *more])

    def check_day(day: str, version: str, before: str, stdout: str) -> None:
        registered = client.get_model_version(NAME, version)
        run = client.get_run(registered.run_id)
        assert run.data.tags[tags.RETRAIN_DAY] == day
        assert run.data.tags[tags.PARENT_VERSION] == f"{NAME}/{before}"  # warm from the champion
        assert run.data.tags[tags.REGISTERED_VERSION] == f"{NAME}/{version}"
        assert run.data.tags[tags.DATA_WINDOW] == f"files {day}.parquet (1)"
        # The alias moved exactly when the gain's interval lies above 0.
        low = float(registered.tags[tags.PROMOTION_GAIN_LOW])
        promoted = registered.tags[tags.PROMOTION_DECISION] == "promoted"
        assert promoted == (low > 0), registered.tags
        assert registered.tags[tags.PROMOTION_COMPARED_WITH] == before
        holder = client.get_model_version_by_alias(NAME, "champion").version
        assert holder == (version if promoted else before)
        assert f"retrain {day}: run {registered.run_id}, version {version}" in stdout

    before = client.get_model_version_by_alias(NAME, "champion").version
    result = retrain("2024-01-15")
    assert result.exit_code == 0, result.output
    check_day("2024-01-15", "2", before, result.stdout)

    # Day 2 trains, then every model-version create fails (500): exit 1, the run FINISHED and
    # tagged why nothing was registered, no version, the alias where it was.
    flaky = FaultyProxy(mlflow_server)
    flaky.inject(500, -1, path="/model-versions/create")
    broken = workdir / "flaky.yaml"
    broken.write_text(yaml.safe_dump(tiny_config(
        logs, workdir, f"tracking.tracking_uri={flaky.url}",
        f"train.storage_path={s3.uri('daily-runs')}", "train.epochs=1",
    ).model_dump(mode="json")))  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        env.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        before = client.get_model_version_by_alias(NAME, "champion").version
        failed = retrain("2024-01-16", config_path=broken)
    flaky.close()
    assert failed.exit_code == 1, failed.output
    assert flaky.injected > 0
    (line,) = [x for x in failed.stderr.splitlines() if x.startswith("error:")]
    assert " trained on 2024-01-16, not registered: " in line, line
    failed_run = client.get_run(line.split("error: run ", 1)[1].split()[0])
    assert failed_run.info.status == "FINISHED"
    assert failed_run.data.tags[tags.RETRAIN_OUTCOME].startswith("failed: ")
    assert tags.REGISTERED_VERSION not in failed_run.data.tags
    assert [v.version for v in client.search_model_versions(f"name='{NAME}'")] == ["2", "1"]
    assert client.get_model_version_by_alias(NAME, "champion").version == before

    # The backfill skips day 1 (registered) and retrains day 2 (not registered).
    result = retrain("2024-01-16", "--since", "2024-01-15")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"retrain 2024-01-15: done already (version {NAME}/2)")
    check_day("2024-01-16", "3", before, result.stdout)
    assert [v.version for v in client.search_model_versions(f"name='{NAME}'")] == ["3", "2", "1"]
    # A backfill over days already done skips them, saying so, and changes nothing.
    again = retrain("2024-01-16", "--since", "2024-01-15")
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines() == [
        f"retrain {day}: done already (version {NAME}/{version}); skipped"
        for day, version in (("2024-01-15", 2), ("2024-01-16", 3))
    ]
    assert len(client.search_model_versions(f"name='{NAME}'")) == 3

    holder = client.get_model_version_by_alias(NAME, "champion").version
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    runs = len(client.search_runs([experiment]))
    bad = retrain("2024-01-17")
    assert bad.exit_code == 2, bad.output
    assert bad.stderr.startswith(f"error: {bad_file}: not a Parquet file")
    assert client.get_model_version_by_alias(NAME, "champion").version == holder
    assert len(client.search_model_versions(f"name='{NAME}'")) == 3
    assert len(client.search_runs([experiment])) == runs


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_sharded_days_warm_start_on_another_world_size(
    served_training, mlflow_server, s3, tmp_path_factory
) -> None:
    """The loop with sharded tables (`model.embeddings: torchrec`, row-wise): day 1 on one
    worker warm-starts from the dense champion, day 2 on two workers from day 1's model
    (promoted whatever its gain: `--min-gain -1`). The logged model holds full tables,
    which each run cuts into its own shards."""
    from pipeline.datasets.synthetic import generate_logs

    _, first = served_training
    client = registry_client(mlflow_server)
    register_run(client, first.run_id, "sharded-daily", "champion")
    logs = tmp_path_factory.mktemp("sharded-days")
    for day in ("2024-01-20", "2024-01-21"):
        generate_logs(logs, rows=2000, days=1, start_day=day, seed=1)
    workdir = tmp_path_factory.mktemp("sharded-retrain")
    for day, workers in (("2024-01-20", 1), ("2024-01-21", 2)):
        config = tiny_config(
            logs,
            workdir,
            f"tracking.tracking_uri={mlflow_server}",
            "train.epochs=1",
            "model.embeddings=torchrec",
            "train.sharding=row_wise",
            f"train.num_workers={workers}",
        )
        path = workdir / f"{day}.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        command = ["retrain", "--config", str(path), "--model", "models:/sharded-daily@champion"]
        champion = client.get_model_version_by_alias("sharded-daily", "champion").version
        rule = ["--bootstrap", "20", "--min-gain", "-1"]
        result = CliRunner().invoke(app, [*command, "--day", day, *rule])
        assert result.exit_code == 0, result.output
        run = client.get_run(result.stdout.split(": run ", 1)[1].split(",")[0])
        assert run.data.params["model.embeddings"] == "torchrec"
        assert run.data.params["train.num_workers"] == str(workers)
        # Day 1 from the dense champion (version 1), day 2 from day 1's model (version 2).
        assert champion == {"2024-01-20": "1", "2024-01-21": "2"}[day]
        assert run.data.tags[tags.PARENT_VERSION] == f"sharded-daily/{champion}"
        assert run.data.tags[tags.PARENT_MODEL] == f"models:/sharded-daily/{champion}"
        assert run.data.tags[tags.REGISTERED_VERSION] == f"sharded-daily/{int(champion) + 1}"
        assert "promoted" in result.stdout
    versions = client.search_model_versions("name='sharded-daily'")
    assert sorted(v.version for v in versions) == ["1", "2", "3"]
