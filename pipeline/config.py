"""The training config: one YAML file, validated by pydantic, overridable from the CLI.

Every field has a default or a clear "field required" error; unknown keys are errors.
`load_config(path, overrides)` is the one way to get a `Config`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models.config import CategoricalInput, FeatureSchema, ModelConfig
from pipeline.errors import ConfigError
from pipeline.intervals import parse_interval
from pipeline.metrics_vocab import check_mode, check_validation_metric, direction

# The gradient-level task balancing methods of `train.loss_weighting` (torchjd aggregators,
# `pipeline/training/balancing.py`).
GRADIENT_METHODS = ("upgrad", "pcgrad", "mgda", "imtl_g")


class Strict(BaseModel):
    """The base of every config model here and in `tune.space`: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class CategoricalFeature(Strict):
    """A categorical column, hashed into `buckets` ids and embedded in `dim` dimensions."""

    column: str
    buckets: PositiveInt = 10_000
    dim: PositiveInt = 16


class DenseFeature(Strict):
    """A numeric column. NaN/inf is an error unless `impute` gives a replacement value."""

    column: str
    transform: Literal["none", "log1p", "standardize"] = "standardize"
    impute: float | None = None


class MultiHotFeature(Strict):
    """A list column (e.g. recent item ids), hashed, mean-pooled; at most `max_length` kept.
    Id 0 is padding, so `buckets` counts it: at least 2."""

    column: str
    buckets: int = Field(default=10_000, ge=2)
    dim: PositiveInt = 16
    max_length: PositiveInt = 8


class TaskSpec(Strict):
    """One task: its label column, loss type and weight in the summed loss."""

    name: str
    label: str | None = None
    type: Literal["binary", "regression"] = "binary"
    weight: float = Field(default=1.0, ge=0.0)
    oracle: str | None = None  # column with the true probability/expectation, for reports only
    # The column whose values group rows for this task's GAUC (e.g. a user id). Binary
    # tasks only; left out, a binary task takes `data.group_column` (filled in when the
    # data section is validated, so every reader finds the task's group here).
    group_column: str | None = None

    @property
    def label_column(self) -> str:
        return self.label or self.name


class SplitConfig(Strict):
    """How rows are assigned to train / validation / test.

    `hash`: a stable hash of `column` (e.g. a user id) with the given fractions; `salt`
    draws another, independent assignment (`adatt retrain` salts with the day, so the
    holdout users change every day).
    `values`: `column` holds a split name; rows whose value is in `validation_values` or
    `test_values` go there, the rest (or `train_values` when given) to train.
    `cutoff`: `column` is ordered (e.g. a date); rows >= `validation_from` are validation,
    rows >= `test_from` are test.
    """

    method: Literal["hash", "values", "cutoff"] = "hash"
    column: str = "user_id"
    salt: str = ""
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    train_values: list[str | int] | None = None
    validation_values: list[str | int] = Field(default_factory=list)
    test_values: list[str | int] = Field(default_factory=list)
    validation_from: str | int | None = None
    test_from: str | int | None = None

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if self.method == "hash" and self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError("split: validation_fraction + test_fraction must be below 1")
        if self.method == "values" and not self.validation_values:
            raise ValueError("split.validation_values: required when method is 'values'")
        if self.method == "cutoff" and self.validation_from is None:
            raise ValueError("split.validation_from: required when method is 'cutoff'")
        return self


class DataConfig(Strict):
    """Where the logs are and which columns mean what."""

    path: str | list[str] = "data/logs"
    categorical: list[CategoricalFeature] = Field(default_factory=list)
    dense: list[DenseFeature] = Field(default_factory=list)
    multi_hot: list[MultiHotFeature] = Field(default_factory=list)
    tasks: list[TaskSpec] = Field(min_length=1)
    split: SplitConfig = Field(default_factory=SplitConfig)
    weight_column: str | None = None
    # Rows with the same value here form one group (a user) for GAUC, the per-user AUC of
    # each binary task (`pipeline/training/metrics.py`); a task's own `group_column` wins.
    group_column: str | None = None
    passthrough: list[str] = Field(default_factory=list)
    batch_size: PositiveInt = 512
    # Where a worker keeps its preprocessed rows after the first epoch, for the later
    # epochs and validation (`pipeline/data/feed.py`): `auto` (GPU memory on a GPU, else
    # host memory, when they fit the budget; else they stream), `device`, `host`, `off`.
    cache: Literal["auto", "device", "host", "off"] = "auto"
    # GiB of a worker's cache; None: a quarter of its GPU's memory (device), or of the
    # node's memory shared by the node's workers (host).
    cache_budget_gb: float | None = Field(default=None, gt=0.0)

    @field_validator("cache", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not (self.categorical or self.dense or self.multi_hot):
            raise ValueError("data: give at least one feature (categorical, dense or multi_hot)")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"data.tasks: task names must be unique, got {names}")
        features = [f.column for f in (*self.categorical, *self.dense, *self.multi_hot)]
        labels = {t.label_column for t in self.tasks}
        leaked = sorted(labels.intersection(features))
        if leaked:
            raise ValueError(f"data: label column(s) {leaked} are also listed as features")
        for task in self.tasks:
            if task.group_column and task.type != "binary":
                raise ValueError(
                    f"data.tasks: {task.name!r} sets group_column, but GAUC is a metric of "
                    f"binary tasks and {task.name!r} is {task.type}"
                )
            if task.type == "binary" and task.group_column is None:
                task.group_column = self.group_column
        grouped_by_label = sorted(labels.intersection(self.group_columns))
        if grouped_by_label:
            raise ValueError(f"data: label column(s) {grouped_by_label} used as group_column")
        return self

    @property
    def group_columns(self) -> list[str]:
        """The distinct GAUC group columns of the tasks, in task order."""
        return list(dict.fromkeys(t.group_column for t in self.tasks if t.group_column))

    @property
    def feature_columns(self) -> list[str]:
        return [f.column for f in (*self.categorical, *self.dense, *self.multi_hot)]

    def columns(
        self, labels: bool = True, split: bool = False, passthrough: bool = False
    ) -> list[str]:
        """The raw columns a step reads, without duplicates: features; with `labels` the
        label, weight and GAUC group columns; with `split` the split column; with
        `passthrough` those.

        Example:
            >>> data = DataConfig(dense=[{"column": "x"}], tasks=[{"name": "click"}])
            >>> data.columns(), data.columns(labels=False, split=True)
            (['x', 'click'], ['x', 'user_id'])
        """
        out = list(self.feature_columns)
        if labels:
            out += [t.label_column for t in self.tasks]
            if self.weight_column:
                out.append(self.weight_column)
            out += self.group_columns
        if split:
            out.append(self.split.column)
        if passthrough:
            out += self.passthrough
        return list(dict.fromkeys(out))

    def feature_schema(self) -> FeatureSchema:
        """What the network needs to know about the inputs."""
        return FeatureSchema(
            categorical=tuple(
                CategoricalInput(f.column, f.buckets, f.dim) for f in self.categorical
            ),
            num_dense=len(self.dense),
            multi_hot=tuple(CategoricalInput(f.column, f.buckets, f.dim) for f in self.multi_hot),
            tasks=tuple(t.name for t in self.tasks),
        )


class EarlyStopping(Strict):
    """Which validation metric selects the model and stops a run early. Its direction comes
    from `pipeline.metrics_vocab`; `mode`, when given, must agree with it."""

    metric: str = "val/mean_auc"
    mode: Literal["max", "min"] | None = None
    patience: int = Field(default=0, ge=0)  # 0 = off; best epoch is still tracked

    @field_validator("mode")
    @classmethod
    def _check_mode(cls, mode: str | None, info: ValidationInfo) -> str | None:
        if "metric" in info.data:  # else the metric's own error is reported
            check_mode(info.data["metric"], mode)
        return mode


class TrainConfig(Strict):
    """Optimisation and the Ray Train run."""

    epochs: PositiveInt = 3
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0)
    # Learning rate of the embedding tables (None: `lr`). Each id's row gets a gradient only
    # from the few batches that hold that id, so it learns far slower than the dense layers;
    # on the synthetic logs 10x `lr` cut the worst task's gap to the oracle AUC from 0.098
    # to 0.043 (docs/models.md).
    embedding_lr: float | None = Field(default=None, gt=0.0)
    # "cosine": epoch e of E trains at lr x (1 + cos(pi (e - 1/2) / E)) / 2, the cosine at
    # the epoch's midpoint, in every parameter group; it falls to ~0 by the last epoch.
    # Lowering the rate at the end averages out the step noise of a constant rate: on the
    # synthetic logs, after 12 epochs the worst task's gap to the oracle AUC is .0115
    # against .0137 and .0169 for two constant-rate runs (docs/models.md). Depends on the
    # epoch only, so a resumed run continues on the same schedule.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(default=0.0, ge=0.0)
    # How the task losses make one update: `fixed` (the sum of w_t L_t), `uncertainty`
    # (learned weights, Kendall et al. 2018), or a gradient-level method
    # (`GRADIENT_METHODS`, `pipeline/training/balancing.py`): the Jacobian of the w_t L_t
    # aggregated by torchjd. Those need eager steps and dense id tables.
    loss_weighting: Literal["fixed", "uncertainty", "upgrad", "pcgrad", "mgda", "imtl_g"] = "fixed"
    seed: int = 0
    # `auto`: one worker per `gpus_per_worker` share of the cluster's GPUs, or 2 on CPUs
    # (`pipeline/training/resources.py`); resolved when Ray starts, before the run exists.
    num_workers: PositiveInt | Literal["auto"] = "auto"
    # Fractional on purpose: whole CPUs per worker starve Ray Data on small machines.
    cpus_per_worker: float = Field(default=0.5, gt=0.0)
    # The share of a GPU each worker reserves: below 1, workers (and a search's trials)
    # share a GPU; a census-sized model uses a few percent of one.
    gpus_per_worker: float = Field(default=1.0, gt=0.0, le=1.0)
    # How Ray places the workers: PACK fills a node before the next (Ray Train's default,
    # the fewest network hops); SPREAD puts them on as many nodes as it can.
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    # torch threads of a CPU worker; None: its reserved CPUs rounded down, at least 1 (set
    # by the worker: torch sizes its pool from the node's cores before Ray's
    # OMP_NUM_THREADS applies). More threads than CPUs pays off when Ray Data needs little.
    threads_per_worker: PositiveInt | None = None
    # How TorchRec lays the id tables out over the workers (`model.embeddings: torchrec`):
    # `auto` lets its planner choose per table; `row_wise` splits every table's rows among
    # the workers (a worker holds 1/N of each table), `table_wise` puts whole tables on
    # workers, `column_wise` splits the embedding dimensions.
    sharding: Literal["auto", "row_wise", "table_wise", "column_wise"] = "auto"
    use_gpu: bool | Literal["auto"] = "auto"
    bf16: bool = True  # autocast on GPU only
    # How a train step runs (`pipeline/training/step.py`): `eager`; `compile`
    # (`torch.compile`); `cuda_graph`, the whole step (forward, loss, backward, clip,
    # optimizer) replayed as one CUDA graph; `auto`: cuda_graph on a GPU, eager on CPU.
    step_mode: Literal["auto", "eager", "compile", "cuda_graph"] = "auto"
    grad_clip: float | None = Field(default=None, gt=0.0)  # max total gradient norm
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    max_failures: int = Field(default=0, ge=-1)
    # The data's order is always fixed by the seed (`pipeline/data/plan.py`): the same seed,
    # data and workers give the same metrics, across a restart or a resume too. This also
    # asks torch for its deterministic kernels (`torch.use_deterministic_algorithms`),
    # which matters on a GPU.
    deterministic: bool = False
    storage_path: str = "runs"
    checkpoints_to_keep: PositiveInt = 2
    # Inside an epoch (`pipeline/training/schedule.py`): a number of steps (500), a duration
    # (30s, 15m, 1h), `epoch` (at epoch ends only) or `off`. Every epoch still ends with a
    # validation and a checkpoint. `log_every`: step metrics to MLflow (training loss per
    # task, samples/s, learning rate); `validate_every`: the validation pass, reported to
    # Ray Train and Tune, may select the model; `checkpoint_every` bounds the work a failure
    # loses (the checkpoint records each worker's position in the epoch's data).
    log_every: int | str = "30s"
    validate_every: int | str = "epoch"
    checkpoint_every: int | str = "15m"
    # A progress line on the driver's console this often when it is not a terminal (on a
    # terminal: a live bar).
    progress_every: int | str = "30s"

    @field_validator("log_every", "validate_every", "checkpoint_every", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @field_validator("log_every", "validate_every", "checkpoint_every")
    @classmethod
    def _interval(cls, value: int | str) -> int | str:
        parse_interval(value)  # ValueError: pydantic names the field
        return value

    @field_validator("progress_every")
    @classmethod
    def _duration(cls, value: int | str) -> int | str:
        if not parse_interval(value).seconds:
            raise ValueError(f"{value!r}: expected a duration, e.g. 30s or 2m")
        return value


class TrackingConfig(Strict):
    """MLflow tracking: `tracking_uri` falls back to MLFLOW_TRACKING_URI, then local SQLite."""

    tracking_uri: str | None = None
    experiment: str = "adatt"
    run_name: str | None = None
    log_model: bool = True


class Config(Strict):
    """The whole training config."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def check_across_sections(config: Config, source: str) -> None:
    """The rules between sections, which neither section can check alone: the network must
    fit the data (per-task lists against the number of tasks, ...) and the early-stopping
    metric must be one the tasks report. ConfigError naming the field."""
    from models.builder import build_on_meta

    if config.train.step_mode == "cuda_graph" and config.train.use_gpu is False:
        raise ConfigError(
            f"{source}: train.step_mode: cuda_graph captures the train step on a GPU, but "
            "train.use_gpu is false; use eager (or auto)"
        )
    if (
        config.train.step_mode in ("compile", "cuda_graph")
        and config.model.embeddings == "torchrec"
    ):
        raise ConfigError(
            f"{source}: train.step_mode: {config.train.step_mode} does not apply to "
            "model.embeddings: torchrec; use eager (or auto)"
        )
    _check_balancing(config.train, config.model.embeddings, source)
    check_validation_metric(
        config.train.early_stopping.metric,
        config.data.tasks,
        f"{source}: train.early_stopping.metric",
    )
    try:
        if config.model.embeddings == "torchrec":
            # Imported first: its dependencies' import-time setup cannot run on the meta device.
            from models.torchrec_input import require_torchrec

            require_torchrec()
        build_on_meta(config.model, config.data.feature_schema())
    except ValueError as err:  # the builder's messages start with the model field's name
        raise ConfigError(f"{source}: model.{err}") from None


def _check_balancing(train: TrainConfig, embeddings: str, source: str) -> None:
    """A gradient-level method back-propagates T losses, one Jacobian: a step that runs one
    captured or compiled backward cannot, nor can TorchRec's tables (updated inside it)."""
    method = train.loss_weighting
    if method not in GRADIENT_METHODS:
        return
    if train.step_mode in ("compile", "cuda_graph"):
        raise ConfigError(
            f"{source}: train.step_mode: {train.step_mode} runs one backward, but "
            f"train.loss_weighting: {method} needs one per task; use eager (or auto)"
        )
    if embeddings == "torchrec":
        raise ConfigError(
            f"{source}: train.loss_weighting: {method} needs dense id tables, but "
            "model.embeddings is torchrec (its tables update inside the backward pass); "
            "use model.embeddings: dense, or loss_weighting fixed or uncertainty"
        )


def _yaml_problem(err: yaml.YAMLError) -> str:
    """`<line>:<col>: <problem>` of a YAML error (1-based), on one line."""
    mark = getattr(err, "problem_mark", None)
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    return f"{mark.line + 1}:{mark.column + 1}: {problem}" if mark else problem


def set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set the field at dotted `path` (e.g. `train.lr`) of a raw config dict to a copy of
    `value`, creating missing sections; ConfigError when a part is not a section."""
    node = raw
    parts = path.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path!r}: {'.'.join(parts[: i + 1])} is not a section")
    node[parts[-1]] = copy.deepcopy(value)


def get_path(raw: dict[str, Any], path: str) -> Any:
    """The value at dotted `path` of a raw config dict."""
    node: Any = raw
    for part in path.split("."):
        node = node[part]
    return node


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` -> (`key.sub`, value parsed as YAML); ConfigError naming the item."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=5")
    key, value = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: not valid YAML: {_yaml_problem(err)}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (value parsed as YAML) to a copy of a raw config dict."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        try:
            set_path(out, key, value)
        except ConfigError as err:
            raise ConfigError(f"override {err}") from None
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per pydantic error: `<source>: <field.path>: <message>`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{source}: {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw dict, within and across sections; errors become one ConfigError
    naming the source and fields."""
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    check_across_sections(config, source)
    return config


def upgrade_stored_config(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A config an earlier version stored (a checkpoint's), made valid for this one, and a
    line for each change. Earlier versions defaulted `train.early_stopping.mode` to max
    whatever the metric, and so selected the worst epoch on NE or log loss; the direction
    now follows the metric, and such a stored mode is dropped."""
    out, notes = copy.deepcopy(raw), []
    stopping = out.get("train", {}).get("early_stopping", {})
    metric = stopping.get("metric", EarlyStopping().metric)
    mode = stopping.get("mode")
    if mode is not None and mode != direction(metric):
        del stopping["mode"]
        notes.append(
            f"train.early_stopping.mode {mode!r} contradicts {metric} (an earlier version "
            f"selected the worst epoch by it); the run goes on by {direction(metric)!r}"
        )
    return out, notes


def read_yaml_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file's top-level mapping; ConfigError naming the file (and line) otherwise."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}:{_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply CLI overrides and validate it."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    return parse_config(apply_overrides(raw, overrides or []), source=str(path))
