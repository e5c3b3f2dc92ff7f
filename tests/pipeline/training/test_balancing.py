"""Gradient-level task balancing (`train.loss_weighting: upgrad|pcgrad|mgda|imtl_g`): the
step writes torchjd's aggregate of the task Jacobian to the shared parameters and each
task's own gradient to its tower, every DDP rank writes the same gradient (that of the
global batch's Jacobian), and the configs it cannot run are refused naming the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchjd.aggregation import IMTLG, MGDA, PCGrad, UPGrad

from bench.harness import tiny_config
from pipeline.config import GRADIENT_METHODS, check_across_sections
from pipeline.data.fit import fit_preprocessor
from pipeline.data.sample import read_split
from pipeline.data.validate import check_schema
from pipeline.errors import ConfigError
from pipeline.training.balancing import AGGREGATORS, GradientBalancer
from pipeline.training.losses import build_training_model
from pipeline.training.optim import make_optimizer
from pipeline.training.step import TrainStep, resolve_step_mode

REFERENCE = {"upgrad": UPGrad, "pcgrad": PCGrad, "mgda": MGDA, "imtl_g": IMTLG}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def setup(tiny_logs: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny config with task weights 1, 2, 0.5, 1 and two batches of 256 rows."""
    workdir = tmp_path_factory.mktemp("balancing")
    config = tiny_config(tiny_logs, workdir, "train.loss_weighting=upgrad")
    raw = config.model_dump(mode="json")
    for task, weight in zip(raw["data"]["tasks"], [1.0, 2.0, 0.5, 1.0], strict=True):
        task["weight"] = weight
    from pipeline.config import parse_config
    from pipeline.data.preprocess import Preprocessor

    config = parse_config(raw)
    files = check_schema(config.data)
    preprocessor = Preprocessor(config.data, fit_preprocessor(config.data, files).dense_stats)
    rows = read_split(config.data, files, "train", config.data.columns(), max_rows=512)
    arrays = preprocessor.transform(rows)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    batches = [{k: v[i * 256 : (i + 1) * 256] for k, v in tensors.items()} for i in range(2)]
    return config, batches


def _jacobian(module, batch, weights) -> torch.Tensor:
    """[T, P]: each weighted task loss's gradient over every parameter, one backward each."""
    _, per_task, _ = module(batch)
    params = [p for p in module.parameters() if p.requires_grad]
    rows = []
    for t in range(per_task.shape[0]):
        grads = torch.autograd.grad(
            weights[t] * per_task[t], params, retain_graph=True, allow_unused=True
        )
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def _expected(module, jacobian: torch.Tensor, method: str) -> torch.Tensor:
    """What the step must write: the towers their own losses' gradients (each task's slice
    is reached by its loss only, so the sum of the rows), the rest the aggregate of its
    columns of the Jacobian."""
    towers = {id(p) for p in module.model.towers.parameters()}
    params = [p for p in module.parameters() if p.requires_grad]
    is_tower = torch.cat([torch.full((p.numel(),), id(p) in towers) for p in params])
    want = torch.empty(jacobian.shape[1])
    want[is_tower] = jacobian[:, is_tower].sum(dim=0)
    torch.manual_seed(0 * 1_000_003 + 0)  # the balancer's seed for its first step (PCGrad)
    want[~is_tower] = REFERENCE[method]()(jacobian[:, ~is_tower])
    return want


def _grad_vector(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.requires_grad])


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_towers_get_their_own_gradient_and_the_rest_the_aggregate(setup, method) -> None:
    config, batches = setup
    weights = [t.weight for t in config.data.tasks]
    torch.manual_seed(0)
    module = build_training_model(config)
    jacobian = _jacobian(module, batches[0], weights)
    assert jacobian.shape[0] == 4 and (jacobian.abs().sum(dim=1) > 0).all()
    balancer = GradientBalancer(method, module, weights)
    _, per_task, _ = module(batches[0])
    balancer.backward(per_task)
    want = _expected(module, jacobian, method)
    torch.testing.assert_close(_grad_vector(module), want, rtol=1e-4, atol=1e-7)
    assert balancer.last_weights is not None and balancer.last_weights.shape == (4,)
    # Not the plain sum of the task gradients, which `fixed` would write.
    assert not torch.allclose(_grad_vector(module), jacobian.sum(dim=0), rtol=1e-3)


def test_the_balancer_leaves_every_rng_as_it_was(setup, monkeypatch) -> None:
    """PCGrad's random task order comes from a seeded fork of the CPU generator: the CPU
    RNG is where it was after each step, no GPU generator is reseeded (b69f646 called
    `torch.manual_seed`, which reseeds every GPU's, so every rank drew the same dropout
    masks), and two balancers of one seed still pick the same order."""
    config, batches = setup
    weights = [t.weight for t in config.data.tasks]
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        module = build_training_model(config)
        balancer = GradientBalancer("pcgrad", module, weights, seed=7)
        torch.manual_seed(123)
        before = torch.random.get_rng_state()
        reseeded.clear()
        for batch in batches:
            _, per_task, _ = module(batch)
            balancer.backward(per_task)
        assert reseeded == []  # no GPU generator touched
        assert torch.equal(torch.random.get_rng_state(), before)
        grads.append(_grad_vector(module))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_upgrad_without_conflict_is_the_mean_of_the_task_gradients() -> None:
    # UPGrad's documented property, the scale docs/models.md warns of: gradients that do
    # not conflict are averaged, not summed.
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(AGGREGATORS["upgrad"]()(orthogonal), torch.tensor([0.5, 0.5]))


def test_the_methods_need_eager_steps_and_dense_tables(setup) -> None:
    config, _ = setup
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_step_mode("auto", gpu, "dense", balancing=True) == "eager"
    assert resolve_step_mode("auto", cpu, "dense", balancing=True) == "eager"
    with pytest.raises(ConfigError, match="train.step_mode: compile"):
        resolve_step_mode("compile", cpu, "dense", balancing=True)
    raw = config.model_dump(mode="json")
    raw["train"]["step_mode"] = "cuda_graph"
    with pytest.raises(ConfigError, match=r"x\.yaml: train\.step_mode: cuda_graph .*upgrad"):
        check_across_sections(type(config).model_validate(raw), "x.yaml")
    raw["train"]["step_mode"] = "auto"
    raw["model"]["embeddings"] = "torchrec"
    with pytest.raises(ConfigError, match="train.loss_weighting: upgrad needs dense id tables"):
        check_across_sections(type(config).model_validate(raw), "x.yaml")
    module = build_training_model(config)
    optimizer = make_optimizer(module.parameters(), config.train)
    balancer = GradientBalancer("upgrad", module, [1.0] * 4)
    with pytest.raises(ValueError, match="eager steps, not compile"):
        TrainStep(module, optimizer, cpu, "compile", rows=1, num_tasks=4, balancer=balancer)


def _rank(rank: int, config_json: dict, batches: list, out: str, method: str) -> None:
    """One DDP rank: the balanced step on its own batch; saves its gradient and weights.
    The ranks meet through a file in `out` (a port found free can be taken before rank 0
    listens on it)."""
    from pipeline.config import parse_config

    rendezvous = f"file://{out}/rendezvous"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    torch.set_num_threads(1)
    config = parse_config(config_json)
    torch.manual_seed(rank)  # different initial weights: DDP broadcasts rank 0's
    module = torch.nn.parallel.DistributedDataParallel(build_training_model(config))
    optimizer = make_optimizer(module.parameters(), config.train)
    weights = [t.weight for t in config.data.tasks]
    balancer = GradientBalancer(method, module, weights)
    step = TrainStep(
        module, optimizer, torch.device("cpu"), "eager", rows=256, num_tasks=4, balancer=balancer
    )
    before = {k: v.clone() for k, v in module.module.state_dict().items()}
    step(batches[rank])
    grad = _grad_vector(module.module)
    after = module.module.state_dict()
    torch.save({"grad": grad, "before": before, "after": after}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


# PCGrad draws a random task order each step; the ranks' global RNGs differ here (seeded by
# rank), so equal gradients show that the balancer seeds the draw alike on every rank.
@pytest.mark.parametrize("method", ["upgrad", "pcgrad"])
def test_two_ddp_ranks_write_the_same_aggregate_of_the_global_jacobian(
    setup, tmp_path, method
) -> None:
    config, batches = setup
    mp.start_processes(
        _rank,
        args=(config.model_dump(mode="json"), batches, str(tmp_path), method),
        nprocs=2,
        start_method="spawn",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["grad"], ranks[1]["grad"])  # bit for bit
    for key, value in ranks[0]["after"].items():
        assert torch.equal(value, ranks[1]["after"][key]), key
    # The aggregate of the mean of the two batches' Jacobians, at rank 0's weights.
    module = build_training_model(config)
    module.load_state_dict(ranks[0]["before"])
    weights = [t.weight for t in config.data.tasks]
    jacobian = (_jacobian(module, batches[0], weights) + _jacobian(module, batches[1], weights)) / 2
    want = _expected(module, jacobian, method)
    torch.testing.assert_close(ranks[0]["grad"], want, rtol=1e-4, atol=1e-7)
    # ... which is not either rank's own: the ranks did exchange their Jacobians.
    alone = _expected(module, _jacobian(module, batches[0], weights), method)
    assert not torch.allclose(ranks[0]["grad"], alone, rtol=1e-3)


@cuda
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_on_a_gpu_the_balanced_step_writes_the_cpus_gradient(setup, method) -> None:
    """The same step on CUDA (fp32) as on CPU; under bf16 autocast it stays finite."""
    config, batches = setup
    weights = [t.weight for t in config.data.tasks]
    grads = {}
    for device in (torch.device("cpu"), torch.device("cuda")):
        torch.manual_seed(0)
        module = build_training_model(config).to(device)
        optimizer = make_optimizer(module.parameters(), config.train)
        balancer = GradientBalancer(method, module, weights)
        step = TrainStep(
            module,
            optimizer,
            device,
            "eager",
            bf16=False,
            rows=256,
            num_tasks=4,
            balancer=balancer,
        )
        step._balanced({k: v.to(device) for k, v in batches[0].items()})
        grads[device.type] = _grad_vector(module).cpu()
    torch.testing.assert_close(grads["cuda"], grads["cpu"], rtol=1e-3, atol=1e-6)
    step.bf16 = True
    step._balanced({k: v.to("cuda") for k, v in batches[1].items()})
    assert torch.isfinite(_grad_vector(module)).all()
