"""The logged MLflow model: raw interaction-log rows in, one score per task out.

A pyfunc model whose artifacts are a JSON spec (model config, feature schema, task types,
preprocessing statistics) and a state dict loaded with `weights_only=True`; no pickled
classes. It scores raw rows exactly as training saw them: the same hashing and dense
transforms (`Preprocessor.transform`), the network, then a sigmoid for binary tasks.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature

import models
import pipeline
from models import build_model
from models.config import FeatureSchema
from pipeline.preprocess import Preprocessor

MODEL_NAME = "model"


def score_frame(
    network: torch.nn.Module,
    preprocessor: Preprocessor,
    task_types: list[tuple[str, str]],
    frame: pd.DataFrame,
) -> pd.DataFrame:
    """Scores for raw rows: probabilities for binary tasks, values for regression."""
    arrays = preprocessor.transform(frame, with_labels=False)
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    network.eval()
    with torch.no_grad():
        outputs = network(batch).float()
    scores = {}
    for i, (name, kind) in enumerate(task_types):
        column = torch.sigmoid(outputs[:, i]) if kind == "binary" else outputs[:, i]
        scores[name] = column.numpy().astype(np.float32)
    return pd.DataFrame(scores, index=frame.index)


class MultiTaskScorer(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: `predict(DataFrame of raw rows) -> DataFrame of task scores`."""

    def load_context(self, context: Any) -> None:
        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.task_types = [tuple(t) for t in spec["tasks"]]
        self.preprocessor = Preprocessor.from_dict(spec["preprocessor"])
        self.network = build_model(spec["model"], FeatureSchema.from_dict(spec["schema"]))
        weights = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.network.load_state_dict(weights)
        self.network.eval()

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        return score_frame(self.network, self.preprocessor, self.task_types, model_input)


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ["torch", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml", "mlflow"]
    return [f"{n}=={version(n)}".replace("+cpu", "") for n in names]


def log_scoring_model(
    run_id: str,
    network: torch.nn.Module,
    model_config: dict[str, Any],
    schema: FeatureSchema,
    task_types: list[tuple[str, str]],
    preprocessor: Preprocessor,
    example: pd.DataFrame,
) -> str:
    """Log the scoring model (with signature and input example) to `run_id`; return its URI."""
    spec = {
        "model": model_config,
        "schema": schema.to_dict(),
        "tasks": [list(t) for t in task_types],
        "preprocessor": preprocessor.to_dict(),
    }
    predictions = score_frame(network, preprocessor, task_types, example)
    with tempfile.TemporaryDirectory() as folder:
        spec_path = Path(folder) / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        weights_path = Path(folder) / "weights.pt"
        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, weights_path)
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=MultiTaskScorer(),
                artifacts={"spec": str(spec_path), "weights": str(weights_path)},
                # The packages' own source travels with the model: it loads without this
                # project installed.
                code_paths=[str(Path(models.__file__).parent), str(Path(pipeline.__file__).parent)],
                signature=infer_signature(example, predictions),
                input_example=example,
                pip_requirements=_requirements(),
            )
    return info.model_uri
