"""The MLflow logging callback and its one-line epoch summary, against local SQLite."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from pipeline.training.callbacks import RunLogger, format_epoch


def test_run_logger_logs_each_step_once(tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    inside = {"global_step": 5, "step/loss": 0.6, "validations": 0}
    end = {"epoch": 1, "epoch_end": 1, "global_step": 10, "val/click/auc": 0.7}
    end.update({"val/click/ne": 0.9, "train/loss": 0.5, "validations": 1})
    RunLogger(uri, run_id, ["click"]).after_report(None, [inside, {"global_step": 5}], None)
    RunLogger(uri, run_id, ["click"]).after_report(None, [end], None)
    # A restarted controller (fresh callback) repeats steps after its checkpoint: not logged
    # again.
    again = RunLogger(uri, run_id, ["click"])
    again.after_report(None, [inside], None)
    again.after_report(None, [end], None)
    again.after_report(None, [{**end, "epoch": 2, "global_step": 20}], None)
    assert [m.step for m in client.get_metric_history(run_id, "val/click/auc")] == [10, 20]
    assert [m.step for m in client.get_metric_history(run_id, "step/loss")] == [5]
    assert [m.value for m in client.get_metric_history(run_id, "epoch")] == [1, 2]
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in printed] == ["epoch 1", "epoch 2"]
    assert printed[0].startswith("epoch 1 | click auc=0.7000 ne=0.9000")


def test_format_epoch_regression_task() -> None:
    line = format_epoch({"epoch": 3, "val/watch/mse": 1.25, "train/samples_per_s": 1000}, ["watch"])
    assert line.startswith("epoch 3 | watch mse=1.2500")
    assert "1,000 samples/s" in line
