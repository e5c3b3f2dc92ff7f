"""The train step object on CPU (CI has no GPU): eager mode is exactly the loop's step,
a padded batch trains like the unpadded one, the packed batches round-trip, the modes a
CPU cannot run are refused naming the field. The CUDA tests run where there is a GPU
(`bench/gpu_step.py --check` runs them on one)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config import parse_config
from pipeline.data.collate import Layout, Prefetcher, pad, rows_of
from pipeline.data.fit import fit_preprocessor
from pipeline.data.preprocess import Preprocessor
from pipeline.data.sample import read_split
from pipeline.data.validate import check_schema
from pipeline.errors import ConfigError
from pipeline.training.losses import build_training_model
from pipeline.training.optim import base_rates, embedding_tables, make_optimizer, set_epoch_lr
from pipeline.training.step import TrainStep, resolve_step_mode
from tests.conftest import tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def prepared(tiny_logs: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny config (with a multi-hot feature) and 3 batches of 200 rows, + a short one."""
    config = tiny_config(tiny_logs, tmp_path_factory.mktemp("step"), "data.batch_size=200")
    raw = config.model_dump(mode="json")
    files = check_schema(config.data)
    preprocessor = fit_preprocessor(config.data, files)
    rows = read_split(config.data, files, "train", config.data.columns(), max_rows=800)
    # A list column, for a multi-hot feature: each row's item and the next row's.
    items = rows["item_id"].to_pylist()
    recent = pa.array([[a, b] for a, b in zip(items, items[1:] + items[:1], strict=True)])
    rows = rows.append_column("recent", recent)
    raw["data"]["multi_hot"] = [{"column": "recent", "buckets": 50, "max_length": 2}]
    config = parse_config(raw)
    preprocessor = Preprocessor(config.data, preprocessor.dense_stats)
    arrays = preprocessor.transform(rows)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    batches = [{k: v[i * 200 : (i + 1) * 200] for k, v in tensors.items()} for i in range(3)]
    batches.append({k: v[600:677] for k, v in tensors.items()})
    return config, preprocessor, arrays, batches


def _module_and_optimizer(config, seed: int = 0):
    torch.manual_seed(seed)
    module = build_training_model(config)
    optimizer = make_optimizer(module.parameters(), config.train, embedding_tables(module))
    return module, optimizer


def test_eager_step_is_exactly_the_loops_step(prepared) -> None:
    config, _, _, batches = prepared
    # The loop's step as it was written before the step object: forward, zero_grad,
    # backward, optimizer step.
    module, optimizer = _module_and_optimizer(config)
    losses = []
    for batch in batches[:3]:
        total, per_task, _ = module(batch)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(float(total.detach()) * 200)

    mine, my_optimizer = _module_and_optimizer(config)
    step = TrainStep(mine, my_optimizer, torch.device("cpu"), "eager", rows=200, num_tasks=4)
    for batch in batches[:3]:
        step(batch)
    loss_sum, task_sums = step.sums()
    assert loss_sum == pytest.approx(sum(losses), rel=1e-6)
    assert len(task_sums) == 4 and step.sums()[0] == 0.0  # read once, then reset
    for (name, a), b in zip(module.state_dict().items(), mine.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_a_padded_batch_gives_the_loss_and_gradients_of_the_unpadded_one(prepared) -> None:
    config, _, _, batches = prepared
    short = batches[3]  # 77 rows
    padded = pad(short, 200)
    assert rows_of(padded) == 200 and float(padded["weight"][77:].abs().sum()) == 0.0
    assert float(padded["mask"][77:].abs().sum()) == 0.0
    results = []
    for batch in (short, padded):
        module, _ = _module_and_optimizer(config)
        total, per_task, _ = module(batch)
        total.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((float(total.detach()), per_task.detach(), grads))
    (loss, tasks, grads), (loss_p, tasks_p, grads_p) = results
    assert loss_p == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(tasks_p, tasks, rtol=1e-6, atol=1e-7)
    assert grads.keys() == grads_p.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(grads_p[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_packed_batches_round_trip_every_column(prepared) -> None:
    _, preprocessor, arrays, _ = prepared
    layout = Layout.of(preprocessor.empty())  # what `ingest.batch_layout` gives
    assert layout == Layout.of(arrays)  # the config's layout is the batches'
    packed = layout.pack(arrays, pin=torch.cuda.is_available())
    assert sorted(packed) == ["float32", "int64"] and all(
        v.is_contiguous() for v in packed.values()
    )
    assert packed["float32"].dtype == torch.float32 and packed["int64"].dtype == torch.int64
    unpacked = layout.unpack(packed)
    assert sorted(unpacked) == sorted(arrays)
    assert {"categorical", "dense", "multi_hot.recent", "group.user_id"} <= set(unpacked)
    for key, value in arrays.items():
        np.testing.assert_array_equal(unpacked[key].numpy(), value, err_msg=key)
    # On CPU the prefetcher hands the batches through, in order.
    out = list(Prefetcher([packed, packed], torch.device("cpu")))
    assert len(out) == 2 and out[0] is packed


def test_modes_a_cpu_cannot_run_are_config_errors(tiny_logs: Path, tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    assert resolve_step_mode("auto", cpu) == "eager"
    assert resolve_step_mode("auto", torch.device("cuda", 0)) == "cuda_graph"
    assert resolve_step_mode("auto", torch.device("cuda", 0), "torchrec") == "eager"
    with pytest.raises(ConfigError, match="train.step_mode: cuda_graph .* CPU"):
        resolve_step_mode("cuda_graph", cpu)
    # A graph is captured on one GPU worker only (DDP's capture recipe: docs/gpu.md).
    assert resolve_step_mode("auto", torch.device("cuda", 0), workers=2) == "eager"
    with pytest.raises(ConfigError, match="cuda_graph captures one worker's step, and the run"):
        resolve_step_mode("cuda_graph", torch.device("cuda", 0), workers=2)
    from pipeline.config import TrainConfig
    from pipeline.training.resources import plan_workers

    with pytest.raises(ConfigError, match="has 2 GPU workers"):  # before the run exists
        plan_workers(TrainConfig(step_mode="cuda_graph", num_workers=2), {"CPU": 8, "GPU": 2})
    with pytest.raises(ConfigError, match="train.step_mode: cuda_graph .*train.use_gpu is false"):
        tiny_config(tiny_logs, tmp_path, "train.step_mode=cuda_graph", "train.use_gpu=false")
    with pytest.raises(ConfigError, match="train.step_mode: compile does not apply"):
        tiny_config(tiny_logs, tmp_path, "train.step_mode=compile", "model.embeddings=torchrec")


def test_schedule_and_clip_work_on_tensor_learning_rates(prepared) -> None:
    config, _, _, batches = prepared
    module, optimizer = _module_and_optimizer(config)
    base = base_rates(optimizer)
    for group in optimizer.param_groups:  # what a captured step uses
        group["lr"] = torch.tensor(float(group["lr"]))
    cosine = config.train.model_copy(update={"lr_schedule": "cosine", "epochs": 4})
    assert set_epoch_lr(optimizer, base, cosine, 4) == pytest.approx(base[0] * 0.0380602, 1e-5)
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(base[0] * 0.0380602, 1e-5)
    step = TrainStep(
        module, optimizer, torch.device("cpu"), "eager", grad_clip=1e-3, rows=200, num_tasks=4
    )
    step._eager(batches[0])
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None])
    )
    assert float(norm) <= 1e-3 * (1 + 1e-4)


@cuda
@pytest.mark.parametrize("mode", ["cuda_graph", "compile"])
def test_on_a_gpu_every_mode_trains_like_eager(prepared, mode: str) -> None:
    """The graph (and compiled) step against eager, on the same batches, fp32."""
    config, _, _, batches = prepared
    device = torch.device("cuda")
    on_gpu = [{k: v.to(device) for k, v in b.items()} for b in batches]
    results = []
    for run_mode in ("eager", mode):
        module, _ = _module_and_optimizer(config)
        module = module.to(device)
        optimizer = make_optimizer(module.parameters(), config.train, embedding_tables(module))
        step = TrainStep(
            module, optimizer, device, run_mode, bf16=False, rows=200, num_tasks=4, grad_clip=5.0
        )
        for batch in on_gpu:  # the last batch is short: padded in the graph modes
            step(batch)
        results.append((step.sums()[0], copy.deepcopy(module.state_dict())))
    (eager_loss, eager_state), (loss, state) = results
    assert loss == pytest.approx(eager_loss, rel=1e-4)
    for name in eager_state:
        torch.testing.assert_close(state[name], eager_state[name], rtol=2e-4, atol=2e-5, msg=name)
