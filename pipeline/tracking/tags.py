"""The MLflow tag names the project writes and reads, in one place.

Run tags (`adatt train`, tune trials and searches) and the registry's version tags.
"""

# Every training run (and tune trial run).
GIT_COMMIT = "adatt.git_commit"
MODEL = "adatt.model"  # the model family, e.g. adatt, mmoe
STORAGE = "adatt.storage_path"  # Ray Train storage of the run's checkpoints
RAY_RUN = "adatt.ray_run_name"  # Ray Train run name under STORAGE
RAY_SEGMENT = "adatt.ray_segment"  # a resumed run's current Ray Train run (RAY_RUN-r<n>)

# Lineage of a warm-started run (`adatt train --warm-start`).
WARM_START = "adatt.warm_start"  # the source as given, e.g. models:/adatt@champion
PARENT_MODEL = "adatt.parent_model_uri"  # that model, pinned: models:/NAME/VERSION, runs:/...
PARENT_RUN = "adatt.parent_run_id"  # the run that logged it
PARENT_VERSION = "adatt.parent_model_version"  # NAME/VERSION of a registered source
DATA_WINDOW = "adatt.data_window"  # the split column's range over the run's files
DATA_DAYS = "adatt.data_days"  # the days of the run's files by their paths (see data.files)
RETRAIN_DAY = "adatt.retrain_day"  # `adatt retrain --day`
REGISTERED_VERSION = "adatt.registered_version"  # NAME/VERSION the retrain registered
RETRAIN_OUTCOME = "adatt.retrain_outcome"  # what became of a retrain's run after training

# Tune: trial runs are children of the search's parent run.
PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag
TRIAL = "adatt.trial_id"
STOPPED = "adatt.stopped_early"
SEARCH = "adatt.search"
BEST_RUN = "adatt.best_run_id"
BEST_MODEL = "adatt.best_model_uri"

# Registry: tags of a registered model version.
VERSION_SCHEMA_HASH = "data_schema_hash"
VERSION_GIT_COMMIT = "git_commit"
VERSION_MODEL_FAMILY = "model_family"
VERSION_RUN_ID = "run_id"
# Registry: the evidence of a promotion decided on a holdout (`register --data`).
PROMOTION_METRIC = "promotion.metric"
PROMOTION_COMPARED_WITH = "promotion.compared_with"  # the holder's version
PROMOTION_GAIN = "promotion.gain"
PROMOTION_GAIN_LOW = "promotion.gain_low"
PROMOTION_GAIN_HIGH = "promotion.gain_high"
PROMOTION_MIN_GAIN = "promotion.min_gain"
PROMOTION_EVALUATION = "promotion.evaluation_run"  # the `adatt evaluate` run
# promoted | no holder (the alias moved to the version: written only after the move
# succeeded), kept, pending (the move is under way, or failed and that could not be
# recorded), failed (the move failed: a lost lease or a server error; the alias stayed)
PROMOTION_DECISION = "promotion.decision"
PENDING, FAILED = "pending", "failed"  # decisions that are not a promotion
PROMOTION_FENCE = "promotion.fence"  # the lease's fencing number when the version was decided
