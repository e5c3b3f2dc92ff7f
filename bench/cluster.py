"""Training where users run it: one node against two, local disk against S3 (prints figures).

The synthetic config trains for `--epochs` epochs (2 workers, 0.5 CPU each) three ways,
each on a fresh Ray cluster of Ray's multi-node harness (`ray.cluster_utils.Cluster`) with
the same 2 CPUs in all:

1. one node (2 CPUs), logs and checkpoints on local disk;
2. two nodes (1 CPU each), logs and checkpoints on local disk (shared: one machine);
3. two nodes, logs and checkpoints in S3 (moto's server on 127.0.0.1, started here).

It prints each way's samples/s (the last epoch's, as `adatt train` logs it) and the
epoch's wall time, then `two_node_vs_one_node=` and `s3_vs_local=` (ratios of samples/s
measured in this one run), and writes `docs/results/cluster.md` (`--out`).

    python bench/cluster.py [--rows 400000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

import mlflow  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from bench.harness import free_port  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.datasets.synthetic import generate_logs  # noqa: E402
from pipeline.session import start_ray  # noqa: E402
from pipeline.training.driver import run_training  # noqa: E402

BUCKET = "adatt-bench"


def start_s3(work: Path) -> subprocess.Popen:
    """moto's S3 server on 127.0.0.1; the standard AWS variables point every client at it."""
    import boto3

    port = free_port()
    log = (work / "moto.log").open("w")
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return server


def train_on(nodes: int, data: str, storage: str, work: Path, args) -> dict[str, float]:
    """One training on a fresh cluster of `nodes` nodes (2 CPUs in all)."""
    port = free_port()
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    per_node = {"num_cpus": 2 // nodes, "object_store_memory": 600 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**per_node, "gcs_server_port": port})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**per_node)
        cluster.wait_for_nodes()
        start_ray()
        config = load_config(
            REPO / "configs" / "synthetic.yaml",
            [
                f"data.path={data}",
                f"train.storage_path={storage}",
                f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
                f"train.epochs={args.epochs}",
                "tracking.log_model=false",
                *args.set,
            ],
        )
        started = time.perf_counter()
        outcome = run_training(config)
        seconds = time.perf_counter() - started
        # The final report holds the test metrics only: the epochs' figures are in MLflow.
        client = mlflow.MlflowClient(outcome.tracking_uri)
        history = client.get_metric_history(outcome.run_id, "train/samples_per_s")
        last = max(history, key=lambda m: m.step)
        return {"samples_per_s": last.value, "seconds": seconds}
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "cluster.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adatt-cluster-bench-"))
    logs = work / "logs"
    generate_logs(logs, args.rows, seed=0)
    server = start_s3(work)
    try:
        s3, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")  # reads AWS_ENDPOINT_URL
        pafs.copy_files(str(logs), f"{BUCKET}/logs", destination_filesystem=s3)
        os.environ["ADATT_SHARED_STORAGE"] = "1"  # the nodes share this machine's disk
        ways = {
            "one node, local disk": (1, str(logs), str(work / "runs-1")),
            "two nodes, local disk": (2, str(logs), str(work / "runs-2")),
            "two nodes, S3": (2, f"s3://{BUCKET}/logs", f"s3://{BUCKET}/runs"),
        }
        results = {}
        for name, (nodes, data, storage) in ways.items():
            results[name] = train_on(nodes, data, storage, work, args)
            print(
                f"{name:24s} {results[name]['samples_per_s']:10,.0f} samples/s "
                f"(last epoch), {results[name]['seconds']:6.1f} s in all",
                flush=True,
            )
    finally:
        server.terminate()
    one, two, s3 = (results[k]["samples_per_s"] for k in ways)
    lines = [
        "# Training on one node, two nodes and S3",
        "",
        f"`python bench/cluster.py --rows {args.rows} --epochs {args.epochs}` (synthetic config,"
        " 2 workers x 0.5 CPU; 2 CPUs in all on each cluster; this machine).",
        "",
        "| way | samples/s (last epoch) | whole run, s |",
        "| --- | --- | --- |",
        *(f"| {k} | {v['samples_per_s']:,.0f} | {v['seconds']:.1f} |" for k, v in results.items()),
        "",
        f"two_node_vs_one_node={two / one:.3f}",
        f"s3_vs_local={s3 / two:.3f}",
        "",
        "Targets: two nodes >= 0.8 of one node, S3 >= 0.7 of local disk. One run of each"
        " way: on a 2-CPU machine an epoch's samples/s moves by several percent from run to"
        " run, so a ratio near or above 1 means no cost this run could measure.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"two_node_vs_one_node={two / one:.3f}")
    print(f"s3_vs_local={s3 / two:.3f}")


if __name__ == "__main__":
    main()
