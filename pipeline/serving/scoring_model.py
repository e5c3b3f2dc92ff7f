"""The file MLflow runs to build the scoring model (MLflow "models from code").

Logged with `pipeline/serving/scoring.py::log_scoring_model`; nothing is pickled. When the model is
loaded, MLflow first puts the model's `code/` folder (copies of the `models` and `pipeline`
packages) on `sys.path`, then runs this file, so it loads without the project installed.

Reading a model must not change it. From a local artifact store (`file://`, the default
beside `sqlite:///mlflow.db`) MLflow runs this file and imports `code/` in place, where
Python would write bytecode: the packages are imported with bytecode off, and the one file
Python wrote for this module before it ran is removed.
"""

import os
import sys
import time

from mlflow.models import set_model

_writes_bytecode = not sys.dont_write_bytecode
sys.dont_write_bytecode = True
try:
    from pipeline.serving.scoring import MultiTaskScorer
finally:
    sys.dont_write_bytecode = not _writes_bytecode


def _remove_own_bytecode(cached: str | None, written_within_s: float = 30.0) -> None:
    """Remove this module's `.pyc` when Python wrote it just now (an older one is kept)."""
    if not (_writes_bytecode and cached):
        return
    try:
        if time.time() - os.stat(cached).st_mtime < written_within_s:
            os.remove(cached)
            os.rmdir(os.path.dirname(cached))  # only when now empty
    except OSError:
        pass


_remove_own_bytecode(globals().get("__cached__"))
set_model(MultiTaskScorer())
