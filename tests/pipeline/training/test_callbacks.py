"""The per-epoch MLflow logging callback and its one-line summary, against local SQLite."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from pipeline.training.callbacks import EpochLogger, format_epoch


def test_epoch_logger_logs_each_epoch_once(tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    report = {"epoch": 1, "val/click/auc": 0.7, "val/click/ne": 0.9, "train/loss": 0.5}
    EpochLogger(uri, run_id, ["click"]).after_report(None, [report, {"epoch": 1}], None)
    # A restarted controller (fresh callback) must not log epoch 1 again.
    again = EpochLogger(uri, run_id, ["click"])
    again.after_report(None, [report], None)
    again.after_report(None, [{**report, "epoch": 2}], None)
    assert [m.step for m in client.get_metric_history(run_id, "val/click/auc")] == [1, 2]
    assert "epoch 1 | click auc=0.7000 ne=0.9000" in capsys.readouterr().out


def test_format_epoch_regression_task() -> None:
    line = format_epoch({"epoch": 3, "val/watch/mse": 1.25, "train/samples_per_s": 1000}, ["watch"])
    assert line.startswith("epoch 3 | watch mse=1.2500")
    assert "1,000 samples/s" in line
