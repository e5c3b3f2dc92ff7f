"""A literal, slow AdaTT written with loops over units, experts and gates: the paper's
section 3 as code, for reading and as the tests' oracle.

It follows the paper's eqs. 4-10 one by one, the way the authors' reference code computes
each expert and each gate in a Python loop, and copies its weights from the batched
`models.adatt.AdaTT`, so the two must agree to float precision (tests/models/test_adatt.py).
The benchmark (bench/model_speed.py) uses `loop_model_from` as its "loop implementation"
baseline. Never used for training.

Example:
    >>> from models import FeatureSchema, build_model
    >>> model = build_model({"expert_dims": [8, 4]}, FeatureSchema(num_dense=6, tasks=("a", "b")))
    >>> x = {"dense": torch.randn(3, 6)}
    >>> torch.allclose(loop_model_from(model)(x), model(x), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.adatt import AdaTT
from models.experts import ACTIVATIONS
from models.multitask import MultiTaskModel
from models.towers import Towers

_ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _mlp(widths: Sequence[int], activation: str, final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if final_activation or index < len(widths) - 2:
            layers.append(_ACTIVATION_MODULES[activation]())
    return nn.Sequential(*layers)


class LoopAdaTT(nn.Module):
    """AdaTT with one `nn.Sequential` per expert and one `nn.Linear` per gate."""

    def __init__(
        self,
        input_dim: int,
        experts_per_task: Sequence[int],
        shared_experts: int,
        level_dims: Sequence[Sequence[int]],
        activation: str = "relu",
    ) -> None:
        super().__init__()
        assert activation in ACTIVATIONS
        self.num_tasks = len(experts_per_task)
        self.units = list(experts_per_task) + ([shared_experts] if shared_experts else [])
        total = sum(self.units)
        self.experts = nn.ModuleList()  # [level][unit][expert]
        self.gates = nn.ModuleList()  # [level][fusing unit]
        self.native = nn.ParameterList()  # v_u^l in order (level, unit), when learned
        self.native_index: dict[tuple[int, int], int] = {}
        # s. 3.1: v is fixed to 1 only "when m_1 = m_2 = ... = m_T = 1" (every unit).
        learned = any(m != 1 for m in self.units)
        width = input_dim
        for level, dims in enumerate(level_dims):
            fusing = self.num_tasks if level == len(level_dims) - 1 else len(self.units)
            self.experts.append(
                nn.ModuleList(
                    nn.ModuleList(_mlp([width, *dims], activation, True) for _ in range(m))
                    for m in self.units
                )
            )
            self.gates.append(nn.ModuleList(nn.Linear(width, total) for _ in range(fusing)))
            for unit in range(fusing):
                if learned:
                    self.native_index[(level, unit)] = len(self.native)
                    self.native.append(nn.Parameter(torch.randn(self.units[unit])))
            width = dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        inputs = [x] * len(self.units)  # every unit of level 1 reads the input embedding
        for level, (unit_experts, gates) in enumerate(zip(self.experts, self.gates, strict=True)):
            # eq. 4-5: E_{u,i} = e_{u,i}(f_u^{l-1}), the unit's own experts
            own = [
                [expert(inputs[u]) for expert in experts] for u, experts in enumerate(unit_experts)
            ]
            # eq. 7: all experts of the level, unit by unit
            every = [out for unit_out in own for out in unit_out]
            outputs = []
            for unit, gate in enumerate(gates):
                g = torch.softmax(gate(inputs[unit]), dim=-1)  # eq. 9
                all_expert_gf = sum(g[:, j : j + 1] * every[j] for j in range(len(every)))  # eq. 8
                if (level, unit) not in self.native_index:
                    native_lf = own[unit][0]  # every m = 1: the expert itself, weight 1
                else:
                    v = self.native[self.native_index[(level, unit)]]
                    native_lf = sum(v[i] * own[unit][i] for i in range(self.units[unit]))  # eq. 10
                outputs.append(all_expert_gf + native_lf)  # eq. 6
            inputs = outputs
        return torch.stack(inputs[: self.num_tasks], dim=1)

    @torch.no_grad()
    def load_from(self, batched: AdaTT) -> LoopAdaTT:
        """Copy every weight of the batched model into the loops."""
        for level, (unit_experts, gates) in enumerate(zip(self.experts, self.gates, strict=True)):
            source = batched.levels[level]
            experts = [expert for unit in unit_experts for expert in unit]
            for e, expert in enumerate(experts):
                linears = [m for m in expert if isinstance(m, nn.Linear)]
                for linear, stacked in zip(linears, source.experts.layers, strict=True):
                    linear.weight.copy_(stacked.weight[:, e].t())
                    linear.bias.copy_(stacked.bias[e])
            for r, gate in enumerate(gates):
                gate.weight.copy_(source.gates.weight[:, r].t())
                gate.bias.copy_(source.gates.bias[r])
            for (lvl, unit), index in self.native_index.items():
                if lvl == level:
                    self.native[index].copy_(source.native_weights[str(unit)])
        return self


class LoopTowers(nn.Module):
    """One `nn.Sequential` tower per task, looped."""

    def __init__(self, input_dim: int, num_tasks: int, hidden_dims: Sequence[int], activation: str):
        super().__init__()
        self.towers = nn.ModuleList(
            _mlp([input_dim, *hidden_dims, 1], activation, False) for _ in range(num_tasks)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([tower(x[:, t]) for t, tower in enumerate(self.towers)], dim=1)

    @torch.no_grad()
    def load_from(self, batched: Towers) -> LoopTowers:
        stacked = [*batched.hidden, batched.head]
        for t, tower in enumerate(self.towers):
            linears = [m for m in tower if isinstance(m, nn.Linear)]
            for linear, layer in zip(linears, stacked, strict=True):
                linear.weight.copy_(layer.weight[:, t].t())
                linear.bias.copy_(layer.bias[t])
        return self


class LoopMultiTaskModel(nn.Module):
    """The same input layer as a batched model, then `LoopAdaTT` and `LoopTowers`."""

    def __init__(self, inputs: nn.Module, backbone: LoopAdaTT, towers: LoopTowers) -> None:
        super().__init__()
        self.inputs, self.backbone, self.towers = inputs, backbone, towers

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.towers(self.backbone(self.inputs(features)))


def loop_model_from(model: MultiTaskModel) -> LoopMultiTaskModel:
    """A loop copy of a batched AdaTT `MultiTaskModel` with identical weights."""
    config, backbone = model.model_config, model.backbone
    assert isinstance(backbone, AdaTT), "the loop reference covers AdaTT only"
    num_tasks = backbone.num_tasks
    units = backbone.experts_per_unit
    loop = LoopAdaTT(
        model.inputs.output_dim,
        units[:num_tasks],
        units[num_tasks] if len(units) > num_tasks else 0,
        config.level_dims(),
        config.activation,
    ).load_from(backbone)
    towers = LoopTowers(
        backbone.output_dim, num_tasks, list(config.tower_dims), config.activation
    ).load_from(model.towers)
    return LoopMultiTaskModel(copy.deepcopy(model.inputs), loop, towers)
