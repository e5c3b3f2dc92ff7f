"""The GPU code path, checked on CPU (CI has no GPU): the use_gpu decision, the bf16
autocast of training steps, and the model's and loss's numerics under bf16 autocast."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.fit import fit_preprocessor
from pipeline.data.sample import read_split
from pipeline.data.validate import check_schema
from pipeline.training.losses import build_training_model
from pipeline.training.metrics import MultiTaskMetrics
from pipeline.training.resources import resolve_use_gpu
from pipeline.training.step import autocast
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    ("use_gpu", "cluster", "expected"),
    [
        ("auto", {"CPU": 2.0}, False),
        ("auto", {"CPU": 16.0, "GPU": 1.0}, True),
        ("auto", {"CPU": 16.0, "GPU": 0.5}, False),  # no whole GPU for a worker
        (False, {"CPU": 16.0, "GPU": 8.0}, False),
        (True, {"CPU": 2.0}, True),  # asked for: an autoscaler may add GPU nodes
    ],
)
def test_use_gpu_auto_follows_the_cluster(
    tiny_logs: Path, tmp_path: Path, use_gpu: object, cluster: dict, expected: bool
) -> None:
    config = tiny_config(tiny_logs, tmp_path, f"train.use_gpu={str(use_gpu).lower()}")
    assert resolve_use_gpu(config.train, cluster) is expected


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
def test_training_steps_autocast_to_bf16_on_gpu_only(tiny_logs: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_logs, tmp_path)
    on_gpu = autocast(torch.device("cuda", 0), config.train.bf16)
    assert isinstance(on_gpu, torch.autocast)
    assert (on_gpu.device, on_gpu.fast_dtype) == ("cuda", torch.bfloat16)
    assert isinstance(autocast(torch.device("cpu"), config.train.bf16), nullcontext)
    no_bf16 = tiny_config(tiny_logs, tmp_path, "train.bf16=false")
    assert isinstance(autocast(torch.device("cuda", 0), no_bf16.train.bf16), nullcontext)


def test_model_and_loss_train_under_bf16_autocast(tiny_logs: Path, tmp_path: Path) -> None:
    """The same step as on a GPU (bf16 matmuls, float32 loss), with CPU autocast."""
    config = tiny_config(tiny_logs, tmp_path)
    files = check_schema(config.data)
    preprocessor = fit_preprocessor(config.data, files)
    columns = config.data.columns(labels=True)
    arrays = preprocessor.transform(read_split(config.data, files, "train", columns))
    batch = {k: torch.from_numpy(np.ascontiguousarray(v[:512])) for k, v in arrays.items()}
    torch.manual_seed(0)
    module = build_training_model(config)

    full, full_tasks, _ = module(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, per_task, outputs = module(batch)
    assert outputs.dtype == torch.bfloat16  # the network ran in bf16 ...
    assert total.dtype == torch.float32  # ... and the masked losses in float32
    # bf16 keeps ~3 significant digits: the loss agrees with float32 to about 1 %.
    assert float(total.detach()) == pytest.approx(float(full.detach()), rel=0.02)
    assert torch.allclose(per_task, full_tasks, rtol=0.03, atol=1e-3)
    total.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.dtype == torch.float32 for g in grads.values())  # master weights stay fp32

    # Metrics take bf16 outputs too (they compute in float32).
    metrics = MultiTaskMetrics(
        [t.model_copy(update={"group_column": None}) for t in config.data.tasks], "cpu"
    )
    metrics.update(outputs.detach(), batch["labels"], batch["mask"])
    values = metrics.compute("val")
    assert 0.0 <= values["val/click/auc"] <= 1.0
