"""A logged model, loaded to score raw interaction-log rows: one score per task.

The model is data (`pipeline.modelfile.format`): the network is built from its spec
and its weights are read with `weights_only=True`; nothing stored with the model is
imported or run. `ScoringModel.predict` applies exactly the training preprocessing
(`Preprocessor.transform`: stable hashing of ids, dense transforms with the stored
statistics), the network, and a sigmoid for binary tasks.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from pipeline.modelfile.format import ModelData, score_frame
from pipeline.modelfile.store import ModelRef, read_model


class ScoringModel:
    """Raw rows in, one column per task out (probabilities for binary tasks, values for
    regression), named by the task; runs on a GPU when the process sees one.

    It is also the object MLflow's pyfunc wrapper holds (`pipeline.serving.loader`), so
    `predict` takes MLflow's `params` argument.

    Args:
        model: the logged model, read as data.
        device: where the network runs (default: a GPU when there is one, else CPU).
    """

    def __init__(self, model: ModelData, device: str | None = None) -> None:
        self.source = model.source
        self.tasks = model.tasks
        self.preprocessor = model.preprocessor()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.network = model.network().to(device)

    def predict(self, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        """Scores of every row of `model_input` (extra columns are ignored)."""
        return score_frame(self.network, self.preprocessor, self.tasks, model_input)


def load_scoring_model(ref: ModelRef, client: MlflowClient) -> ScoringModel:
    """The model `ref` names, ready to score (read from a private download)."""
    return ScoringModel(read_model(ref, client))
