"""The logged model's format: a folder of data, never code.

A model folder (what `pipeline.modelfile.store` logs to MLflow) holds:

| file | what |
| --- | --- |
| `MLmodel` | MLflow's metadata; its pyfunc flavor names the *installed* loader module `pipeline.serving.loader` and no code |
| `data/adatt/spec.json` | format version, package version, model config, feature schema, the preprocessing (data config and dense statistics) |
| `data/adatt/weights.pt` | the network's state dict, read with `torch.load(weights_only=True)` |
| `data/adatt/program.pt2` | the scoring network as a `torch.export` program (preprocessed tensors in, scores out) |
| `requirements.txt`, `input_example.json`, ... | MLflow's own files |

Compatibility: `spec.json` records `format` (this module's `FORMAT`) and the
`package_version` that wrote it. A reader takes its own format and every older one it can
upgrade: format 1 (the first releases: a model from code, whose `artifacts/spec.json` and
`artifacts/weights.pt` sit beside a copy of the package) is read as data from those two
files, and its stored code is never imported. A newer or unknown format is an error naming
both versions. See docs/registry.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from models import build_model
from models.builder import build_on_meta
from models.config import FeatureSchema
from models.multitask import MultiTaskModel
from pipeline.config import DataConfig, TaskSpec
from pipeline.data.preprocess import Preprocessor
from pipeline.errors import InputError

FORMAT = 2
PACKAGE = "adatt-trainer"
LOADER_MODULE = "pipeline.serving.loader"
DATA_FOLDER = "adatt"  # MLflow puts it under `data/`
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.pt"
PROGRAM_FILE = "program.pt2"
MODEL_FILES = (SPEC_FILE, WEIGHTS_FILE)  # what a reader needs
LEGACY_FOLDER = "artifacts"  # format 1: `artifacts/spec.json`, `artifacts/weights.pt`


def package_version() -> str:
    """The installed adatt-trainer's version ("unknown" when run from a plain checkout)."""
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def schema_fields(data: dict) -> dict:
    """What a model needs of the raw rows: the feature sections, and each task's output
    (name, label column, type), not how it is trained or evaluated (loss weight, oracle,
    GAUC group). Warm starts compare it; `schema_hash` hashes it.

    Args:
        data: the `data:` config section (as JSON) the model was trained with.
    """
    schema: dict = {k: data.get(k) for k in ("categorical", "dense", "multi_hot")}
    schema["tasks"] = [
        {"name": t["name"], "label": t.get("label") or t["name"], "type": t.get("type", "binary")}
        for t in data.get("tasks", [])
    ]
    return schema


def schema_hash(data: dict) -> str:
    """A short hash of `schema_fields`: models with one hash read the same raw columns the
    same way."""
    blob = json.dumps(schema_fields(data), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def score_frame(
    network: nn.Module, preprocessor: Preprocessor, tasks: list[TaskSpec], frame: pd.DataFrame
) -> pd.DataFrame:
    """Scores for raw rows: probabilities for binary tasks, values for regression.

    Args:
        network: the multi-task network (on CPU or GPU; inputs follow its device).
        preprocessor: the fitted preprocessing of the training run.
        tasks: the tasks, in the network's output order.
        frame: raw rows holding at least the feature columns.
    """
    device = next(network.parameters()).device
    arrays = preprocessor.transform(frame, with_labels=False)
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}
    network.eval()
    with torch.no_grad():
        outputs = network(batch).float()
    scores = {}
    for i, task in enumerate(tasks):
        column = torch.sigmoid(outputs[:, i]) if task.type == "binary" else outputs[:, i]
        scores[task.name] = column.cpu().numpy().astype(np.float32)
    return pd.DataFrame(scores, index=frame.index)


class ExportedScorer(nn.Module):
    """The network as `torch.export` sees it: a dict of preprocessed tensors (the keys of
    `Preprocessor.transform(..., with_labels=False)`) in, scores [B, T] out (a sigmoid on
    binary tasks), as `score_frame` computes them."""

    def __init__(self, network: nn.Module, tasks: list[TaskSpec]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("binary", torch.tensor([t.type == "binary" for t in tasks]))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = self.network(inputs).float()
        return torch.where(self.binary, torch.sigmoid(outputs), outputs)


def export_program(
    network: nn.Module, preprocessor: Preprocessor, tasks: list[TaskSpec], example: pd.DataFrame
) -> torch.export.ExportedProgram:
    """The scoring network as an exported program with a dynamic batch dimension."""
    arrays = preprocessor.transform(example.head(8), with_labels=False)
    inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    batch = torch.export.Dim("batch")
    shapes = ({key: {0: batch} for key in inputs},)
    return torch.export.export(
        ExportedScorer(network.eval(), tasks), (inputs,), dynamic_shapes=shapes
    )


def write_model_data(
    folder: Path,
    network: nn.Module,
    model_config: dict[str, Any],
    preprocessor: Preprocessor,
    example: pd.DataFrame,
) -> Path:
    """Write the model's data folder (`spec.json`, `weights.pt`, `program.pt2`) under
    `folder`; returns it."""
    target = folder / DATA_FOLDER
    target.mkdir(parents=True)
    schema = preprocessor.data.feature_schema()
    spec = {
        "format": FORMAT,
        "package_version": package_version(),
        "model": model_config,
        "schema": schema.to_dict(),
        "preprocessor": preprocessor.to_dict(),
    }
    (target / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    weights = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    torch.save(weights, target / WEIGHTS_FILE)
    program = export_program(network, preprocessor, preprocessor.data.tasks, example)
    torch.export.save(program, target / PROGRAM_FILE)
    return target


@dataclass
class ModelData:
    """A logged model read as data: its spec (upgraded to `FORMAT`) and its weights.

    Attributes:
        spec: `spec.json`'s content.
        weights: the network's state dict.
        source: where it was read from, for messages.
    """

    spec: dict[str, Any]
    weights: dict[str, torch.Tensor]
    source: str

    @property
    def data(self) -> DataConfig:
        return DataConfig.model_validate(self.spec["preprocessor"]["data"])

    @property
    def tasks(self) -> list[TaskSpec]:
        return self.data.tasks

    def preprocessor(self) -> Preprocessor:
        return Preprocessor.from_dict(self.spec["preprocessor"])

    def network(self) -> MultiTaskModel:
        """The network with its weights, in eval mode, on CPU."""
        network = build_model(self.spec["model"], FeatureSchema.from_dict(self.spec["schema"]))
        network.load_state_dict(self.weights)
        return network.eval()


@dataclass(frozen=True)
class UpgradedWeights:
    """A state dict in this version's layout, and what changed to get there.

    Attributes:
        weights: the state dict as this version's network holds it.
        filled: entries the earlier version did not write, with the value they load with.
        converted: entries whose layout changed (same values, another shape).
        renamed: (old, new) names of entries that moved.
    """

    weights: dict[str, torch.Tensor]
    filled: list[str]
    converted: list[str]
    renamed: list[tuple[str, str]]

    def describe(self) -> str | None:
        """One line saying what changed; None when nothing did."""
        parts = []
        if self.filled:
            values = [f"{k} = {self.weights[k].tolist()}" for k in self.filled]
            parts.append("filled in " + _listed(values))
        if self.converted:
            parts.append("converted " + _listed(self.converted) + " to this version's layout")
        if self.renamed:
            parts.append("renamed " + _listed([f"{a} -> {b}" for a, b in self.renamed]))
        return "; ".join(parts) or None


def _listed(items: list[str], most: int = 4) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def upgrade_weights(
    model_config: dict[str, Any] | Any, schema: FeatureSchema, weights: dict[str, torch.Tensor]
) -> UpgradedWeights:
    """`weights`, written by this or an earlier version, in the layout of the network that
    `model_config` builds now: the networks' own load rules (`_load_from_state_dict`: v = 1
    for one-expert units written before v was learned, the old PLE gate layout) applied on
    the meta device, so nothing is allocated beyond the weights themselves.

    Raises:
        RuntimeError: torch's, when the weights do not fit the network (a missing,
            unexpected or differently shaped entry that no rule accounts for).
    """
    network = build_on_meta(model_config, schema)
    network.load_state_dict(weights, assign=True)  # strict: every entry accounted for
    upgraded = dict(network.state_dict())
    given = {v.data_ptr(): k for k, v in weights.items() if v.numel()}
    filled, renamed = [], []
    for key in (k for k in upgraded if k not in weights):
        old = given.get(upgraded[key].data_ptr()) if upgraded[key].numel() else None
        (renamed.append((old, key)) if old else filled.append(key))
    converted = [k for k in upgraded if k in weights and upgraded[k].shape != weights[k].shape]
    return UpgradedWeights(upgraded, filled, converted, renamed)


def check_mlmodel(mlmodel: Path) -> None:
    """InputError naming the file unless `MLmodel` names the installed loader and no code
    (a model of this format never carries code; anything else was edited)."""
    try:
        flavor = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise InputError(f"{mlmodel}: not an MLflow model file ({err})") from None
    planted = {k: flavor[k] for k in ("code", "python_model") if flavor.get(k)}
    if flavor.get("loader_module") != LOADER_MODULE or planted:
        raise InputError(
            f"{mlmodel}: names loader {flavor.get('loader_module')!r}"
            + (f" and code {planted}" if planted else "")
            + f"; an adatt model of format {FORMAT} is loaded by {LOADER_MODULE} and carries "
            "no code: refusing to load it"
        )


def read_spec_file(path: Path) -> dict[str, Any]:
    """`spec.json`, upgraded to `FORMAT`; InputError naming the file for a newer or unknown
    format."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable model spec ({err})") from None
    found = spec.get("format", 1)  # format 1 wrote no number
    if found == FORMAT:
        return spec
    if found == 1:
        return upgrade_format_1(spec)
    raise InputError(
        f"{path}: model format {found!r} (written by {PACKAGE} "
        f"{spec.get('package_version', 'unknown')}) is not one this {PACKAGE} "
        f"{package_version()} reads (format {FORMAT} and older); upgrade {PACKAGE}"
    )


def upgrade_format_1(spec: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: the same model, spec and preprocessing; its task list, a copy of the
    data config's, is dropped."""
    upgraded = {k: v for k, v in spec.items() if k != "tasks"}
    return {**upgraded, "format": FORMAT, "package_version": "unknown (format 1)"}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict read with `weights_only=True`; InputError naming the file otherwise (a
    pickled object there is refused, never run)."""
    try:
        weights = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, ValueError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: not a weights-only state dict ({first})") from None
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    return weights


def read_model_folder(folder: Path, source: str, weights: bool = True) -> ModelData:
    """Read a downloaded model folder as data (`MLmodel` and the data files only); without
    `weights`, the spec only.

    Format 2 and newer: `data/adatt/`, checked against `MLmodel` (`check_mlmodel`).
    Format 1 (model from code): `artifacts/spec.json` and `artifacts/weights.pt`; the rest of
    the folder (its code) is never read.
    """
    data = folder / "data" / DATA_FOLDER
    if (data / SPEC_FILE).is_file():
        check_mlmodel(folder / "MLmodel")
    else:
        data = folder / LEGACY_FOLDER
        if not (data / SPEC_FILE).is_file():
            raise InputError(f"{source}: not an adatt model (no {SPEC_FILE} in its folder)")
    spec = read_spec_file(data / SPEC_FILE)
    return ModelData(spec, read_weights(data / WEIGHTS_FILE) if weights else {}, source)
