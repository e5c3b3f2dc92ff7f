"""Sharded id tables (`model.embeddings: torchrec`) under Ray Train, 2 CPU workers, gloo.

The sharded model must be the dense model, computed another way: the same loss and the same
gradients on the same batches and initial weights; and a run with a table whose rows are
split across the two workers must train, checkpoint, restart after a worker dies, and log a
model that scores as the trainer evaluated it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from pipeline.data.fit import fit_preprocessor
from pipeline.data.sample import read_split
from pipeline.data.validate import check_schema
from pipeline.modelfile.store import read_model, resolve_model
from pipeline.tracking.runs import client_for
from pipeline.training.driver import run_training
from tests.conftest import by_epoch, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SHARDED = ["model.embeddings=torchrec", "train.sharding=row_wise"]


@pytest.fixture(scope="module")
def by_value(ray_cluster):
    """The session's Ray; workers get this module's loop by value (not importable there)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _equivalence_loop(loop_config: dict) -> None:
    """On each worker: one step of the dense model under DDP and of the sharded model, from
    the same weights on this worker's batch; write the differences to a JSON file."""
    import ray.train
    from torch.nn.parallel import DistributedDataParallel

    from models.torchrec_input import dense_names
    from pipeline.config import parse_config
    from pipeline.data.preprocess import Preprocessor
    from pipeline.training.losses import build_training_model
    from pipeline.training.sharding import Sharded, load_full_weights

    config = parse_config(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    batch = {k: torch.from_numpy(v) for k, v in loop_config["batches"][rank].items()}

    torch.manual_seed(0)
    dense_model = config.model.model_copy(update={"embeddings": "dense"})
    dense = build_training_model(config.model_copy(update={"model": dense_model}))
    full = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    replicated = DistributedDataParallel(dense)  # kept alive: its hooks average the gradients
    dense_loss, dense_per_task, _ = replicated(batch)
    dense_loss.backward()
    dense_grads = {k: p.grad for k, p in dense.named_parameters()}

    # Fused SGD at learning rate 1 on the tables: the update is minus the gradient.
    replicas = Sharded(
        build_training_model(config),
        config.train,
        torch.device("cpu"),
        Preprocessor.from_dict(loop_config["preprocessor"]),
        table_optimizer=torch.optim.SGD,
    )
    module = replicas.module
    names = {
        f"model.inputs.{k}": f"model.inputs.{v}"
        for k, v in dense_names(config.data.feature_schema()).items()
    }
    sharded_keys = module.state_dict().keys()
    load_full_weights(module, {k: full[names.get(k, k)] for k in sharded_keys})
    before = _local_rows(module)
    loss, per_task, _ = module(batch)
    loss.backward()
    after = _local_rows(module)

    out = {
        "loss": [float(dense_loss), float(loss)],
        "per_task": float((dense_per_task - per_task).abs().max()),
        "dense_grads": 0.0,
        "table_grads": 0.0,
        "tables": {},
        "rows_on_this_worker": {},
    }
    compared = 0
    for name, param in module.named_parameters():
        if name in dense_grads and param.grad is not None:
            compared += 1
            out["dense_grads"] = max(
                out["dense_grads"], float((param.grad - dense_grads[name]).abs().max())
            )
    out["dense_params_compared"] = compared
    for key, (offset, rows) in before.items():
        grad = dense_grads[names[key]][offset : offset + len(rows)]
        change = before[key][1] - after[key][1]
        out["table_grads"] = max(out["table_grads"], float((change - grad).abs().max()))
        out["tables"][key] = float(grad.abs().max())
        out["rows_on_this_worker"][key] = [offset, len(rows)]
    Path(loop_config["out"], f"rank{rank}.json").write_text(json.dumps(out))


def _local_rows(module) -> dict[str, tuple[int, torch.Tensor]]:
    """Each table's first row offset on this worker and a copy of its rows."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for key, value in module.state_dict().items():
        if isinstance(value, ShardedTensor):
            (shard,) = value.local_shards()
            out[key] = (shard.metadata.shard_offsets[0], shard.tensor.detach().clone())
    return out


def test_sharded_loss_and_gradients_equal_the_dense_models(
    by_value, tiny_logs, tmp_path: Path
) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    config = tiny_config(tiny_logs, tmp_path, *SHARDED, "train.embedding_lr=1.0")
    files = check_schema(config.data)
    preprocessor = fit_preprocessor(config.data, files)
    rows = read_split(config.data, files, "train", config.data.columns(), max_rows=400)
    arrays = preprocessor.transform(rows)
    batches = [{k: v[i * 200 : (i + 1) * 200] for k, v in arrays.items()} for i in (0, 1)]
    TorchTrainer(
        _equivalence_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "batches": batches,
            "preprocessor": preprocessor.to_dict(),
            "out": str(tmp_path),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs")),
    ).fit()

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, result in enumerate(results):
        dense_loss, sharded_loss = result["loss"]
        assert sharded_loss == pytest.approx(dense_loss, rel=1e-5), rank
        assert result["per_task"] < 1e-5
        assert result["dense_grads"] < 1e-5
        assert result["dense_params_compared"] >= 20  # the backbone's and towers' parameters
        # The tables' updates are the DDP-averaged gradients of the dense model's tables,
        # which are not all zero (the comparison would be empty otherwise).
        assert result["table_grads"] < 1e-6
        assert max(result["tables"].values()) > 1e-4
    # Row-wise: every table's rows are split between the two workers.
    user = "model.inputs.tables.embedding_bags.t_user_id.weight"
    (first, n0), (second, n1) = (r["rows_on_this_worker"][user] for r in results)
    assert (first, second) == (0, n0) and n0 + n1 == config.data.categorical[0].buckets


@pytest.mark.long
def test_row_wise_table_trains_checkpoints_restarts_and_scores_as_trained(
    ray_cluster, tiny_logs, tmp_path: Path
) -> None:
    config = tiny_config(
        tiny_logs,
        tmp_path,
        *SHARDED,
        "train.epochs=3",
        "train.max_failures=1",
        "train.embedding_lr=0.05",
    )
    os.environ["ADATT_FAULT"] = "exit@2.5@1"  # rank 1 dies halfway through epoch 2
    try:
        outcome = run_training(config)
    finally:
        del os.environ["ADATT_FAULT"]
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    restarts = by_epoch(client, outcome.run_id, "train/restarts")
    assert restarts == {1: 0, 2: 1, 3: 1}  # epoch 2 re-ran from epoch 1's sharded checkpoint

    # The final checkpoint holds each worker's shards; the rows of user_id are split.
    import torch.distributed.checkpoint as dcp

    sharded = Path(outcome.checkpoint_path) / "sharded"
    assert {p.name for p in sharded.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    metadata = dcp.FileSystemReader(str(sharded)).read_metadata().state_dict_metadata
    user = metadata["model.model.inputs.tables.embedding_bags.t_user_id.weight"]
    half = config.data.categorical[0].buckets // 2  # user_id: 100,000 buckets
    assert sorted(tuple(c.offsets) for c in user.chunks) == [(0, 0), (half, 0)]

    # The logged model is dense (no TorchRec needed to score) and scores the validation rows
    # as the trainer evaluated its selected epoch.
    mlflow.set_tracking_uri(outcome.tracking_uri)
    model = mlflow.pyfunc.load_model(outcome.model_uri)
    files = check_schema(config.data)
    rows = read_split(config.data, files, "validation", config.data.columns()).to_pandas()
    scores = model.predict(rows[config.data.feature_columns])
    for task in ("click", "like"):
        seen = rows[task].notna().to_numpy()
        auc = roc_auc_score(rows[task][seen], scores[task][seen])
        assert auc == pytest.approx(outcome.metrics[f"best/val/{task}/auc"], abs=1e-5), task
    store = client_for(outcome.tracking_uri)
    spec = read_model(resolve_model(outcome.model_uri, store), store, weights=False).spec
    assert spec["model"]["embeddings"] == "dense"
    assert np.isfinite(scores.to_numpy()).all()
