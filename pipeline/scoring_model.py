"""The file MLflow runs to build the scoring model (MLflow "models from code").

Logged with `pipeline/serving.py::log_scoring_model`; nothing is pickled. When the model is
loaded, MLflow first puts the model's `code/` folder (copies of the `models` and `pipeline`
packages) on `sys.path`, then runs this file, so it loads without the project installed.
"""

from mlflow.models import set_model

from pipeline.serving import MultiTaskScorer

set_model(MultiTaskScorer())
