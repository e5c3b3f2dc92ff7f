"""Long-epoch benchmark: one epoch over 10M rows on this machine, a kill in the middle.

Three `adatt train` runs of the synthetic logs (one epoch, the tiny network, 2 workers), each
a fresh driver process on a fresh local Ray:

1. uninterrupted, checkpoints at the epoch's end only (`train.checkpoint_every: epoch`);
2. uninterrupted, step checkpoints every `--checkpoint-every` (a duration);
3. the same, its rank 0 stopped at half the epoch (`ADATT_FAULT=hang@1.5`), the driver
   SIGKILLed there, then `adatt train --resume`: the run continues from its newest
   checkpoint, inside the epoch.

Prints `checkpoint_overhead=` (run 2's samples/s over run 1's: what step checkpoints cost)
and `lost_work_s=` (training time redone after the restart: the steps between run 3's last
checkpoint and the kill, at run 3's step time), against `checkpoint_every_s=`.

    python bench/long_epoch.py [--rows 10000000] [--checkpoint-every 60s] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import TINY_OVERRIDES  # noqa: E402

CONFIG = ROOT / "configs" / "synthetic.yaml"


def _command(logs: Path, work: Path, storage: str, *sets: str) -> list[str]:
    overrides = [
        f"data.path={logs}",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
        f"train.storage_path={storage}",
        *[o for o in TINY_OVERRIDES if not o.startswith("data.batch_size")],
        "data.batch_size=2048",
        "train.epochs=1",
        "train.log_every=30s",
        *sets,
    ]
    args = [sys.executable, "-m", "pipeline.cli", "train", "-c", str(CONFIG)]
    return args + [arg for item in overrides for arg in ("--set", item)]


def _run(command: list[str], log: Path, env: dict | None = None) -> str:
    """Run `adatt train` to its end; its MLflow run id."""
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text()
    if done.returncode:
        sys.exit(f"{' '.join(command[:6])} ... failed:\n{text[-3000:]}")
    return re.search(r"MLflow run: (\w+)", text).group(1)


def _samples_per_s(client, run_id: str) -> float:
    return client.get_run(run_id).data.metrics["train/samples_per_s"]


def _killed_and_resumed(command: list[str], work: Path, storage: str, client) -> dict:
    """Run 3: hang at half the epoch, SIGKILL the driver, resume; what was lost."""
    from pipeline.tracking import tags
    from pipeline.training.resume import checkpoint_folders, read_state

    log = work / "killed.log"
    env = {**os.environ, "ADATT_FAULT": "hang@1.5"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    while "hangs at epoch 1, step" not in log.read_text():
        if proc.poll() is not None:
            sys.exit(f"the run ended before its fault:\n{log.read_text()[-3000:]}")
        time.sleep(1.0)
    hang_step = int(re.search(r"hangs at epoch 1, step (\d+)", log.read_text()).group(1))
    time.sleep(5.0)  # a checkpoint reported just before the hang is registered
    run_id = re.search(r"run (\w{32})", log.read_text()).group(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True
    )
    name = client.get_run(run_id).data.tags[tags.RAY_RUN]
    state = read_state(checkpoint_folders(storage, name)[0])
    resumed = _run([*command, "--resume", run_id], work / "resumed.log")
    assert resumed == run_id
    per_epoch = client.get_run(run_id).data.metrics["train/steps_per_worker"]
    step_s = client.get_run(run_id).data.metrics["train/seconds"] / per_epoch
    return {
        "hang_step": hang_step,
        "checkpoint_step": state.step_in_epoch,
        "steps": int(per_epoch),
        "step_s": step_s,
        "lost_work_s": (hang_step - state.step_in_epoch) * step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--checkpoint-every", default="60s")
    parser.add_argument("--keep", type=Path, help="work here (logs are reused)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    from pipeline.datasets.synthetic import generate_logs
    from pipeline.intervals import parse_interval
    from pipeline.tracking.runs import client_for

    work = args.keep or Path(tempfile.mkdtemp(prefix="adatt-long-epoch-"))
    logs = work / "logs"
    if not any(logs.glob("*.parquet")):
        generate_logs(logs, rows=args.rows, seed=0)
    client = client_for(f"sqlite:///{work}/mlflow.db")
    every = f"train.checkpoint_every={args.checkpoint_every}"
    plain = _run(
        _command(logs, work, str(work / "runs-1"), "train.checkpoint_every=epoch"),
        work / "plain.log",
    )
    stepped = _run(_command(logs, work, str(work / "runs-2"), every), work / "stepped.log")
    overhead = _samples_per_s(client, stepped) / _samples_per_s(client, plain)
    storage = str(work / "runs-3")
    lost = _killed_and_resumed(_command(logs, work, storage, every), work, storage, client)
    seconds = parse_interval(args.checkpoint_every).seconds
    print(
        f"rows={args.rows:,} steps_per_worker={lost['steps']} step_s={lost['step_s']:.4f} "
        f"samples_per_s_plain={_samples_per_s(client, plain):,.0f} "
        f"samples_per_s_step_checkpoints={_samples_per_s(client, stepped):,.0f}"
    )
    print(
        f"killed after step {lost['hang_step']}, newest checkpoint at step "
        f"{lost['checkpoint_step']}; resumed there (commands and output under {work})"
    )
    print(f"checkpoint_every_s={seconds:g} lost_work_s={lost['lost_work_s']:.1f}")
    print(f"checkpoint_overhead={overhead:.3f}")


if __name__ == "__main__":
    main()
