"""The MLflow pyfunc loader of adatt models (`loader_module` in their `MLmodel`).

`mlflow.pyfunc.load_model` and `mlflow models serve` import this module from the installed
package and call `_load_pyfunc` with the model's data folder (`data/adatt`); MLflow's own
built-in flavors load the same way. The folder is read as data (`spec.json`,
`weights.pt`); nothing in it is imported or run.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.modelfile.format import (
    SPEC_FILE,
    WEIGHTS_FILE,
    ModelData,
    read_spec_file,
    read_weights,
)
from pipeline.serving.scoring import ScoringModel


def _load_pyfunc(data_path: str) -> ScoringModel:
    """MLflow's entry point: the scoring model stored in `data_path`."""
    folder = Path(data_path)
    model = ModelData(
        read_spec_file(folder / SPEC_FILE), read_weights(folder / WEIGHTS_FILE), str(folder)
    )
    return ScoringModel(model)
