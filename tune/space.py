"""The search space: one YAML file, validated by pydantic before any trial starts.

```yaml
base: synthetic.yaml            # a training config (path relative to this file) or a mapping
set:                            # optional: fields of the base fixed for the whole search
  train.epochs: 4
search:                         # dotted config field -> one distribution
  model.expert_dims: {choice: [[64, 32], [64, 32, 16]]}   # depth = fusion levels
  model.shared_experts: {grid: [0, 1]}                     # 0 = AdaTT-sp
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}
tune:
  searcher: random              # grid | random | optuna
  num_samples: 8
  scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
```

Distributions: `choice` (sampled), `grid` (every value), `uniform` / `loguniform` [low, high],
`randint` [low, high) (upper bound excluded, as in Ray Tune). Every searched value is checked
against the base config with `pipeline.config.parse_config` and the model builder here, so
a broken space fails before the first trial.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.config import (
    Config,
    Strict,
    apply_overrides,
    format_validation_error,
    get_path,
    parse_config,
    parse_override,
    read_yaml_mapping,
    set_path,
)
from pipeline.errors import ConfigError
from pipeline.metrics_vocab import check_mode, check_validation_metric, direction

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
# Fixed for a whole search: the preprocessing is fitted once and shared by every trial, the
# resources decide the trial concurrency, and ASHA's horizon is the epoch count.
FIXED_FIELDS = (
    "data.",
    "tracking.",
    "train.epochs",
    "train.num_workers",
    "train.cpus_per_worker",
    "train.gpus_per_worker",
    "train.use_gpu",
    "train.storage_path",
    "train.early_stopping",
)
SEARCHABLE_DATA_FIELDS = ("data.batch_size",)


class Distribution(Strict):
    """Exactly one of the fields: where one config field's values come from."""

    choice: list[Any] | None = Field(default=None, min_length=1)
    grid: list[Any] | None = Field(default=None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(DISTRIBUTIONS)}; got {given or 'none'}"
            )
        low_high = self.uniform or self.loguniform or self.randint
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"{self.kind}: low must be below high, got {list(low_high)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: bounds must be positive, got {list(self.loguniform)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any] | None:
        """The listed values of a `choice` or `grid`; None for ranges."""
        return self.choice if self.choice is not None else self.grid

    def edge_values(self) -> list[Any]:
        """Values that stand for the distribution when checking it against a config."""
        if self.values is not None:
            return list(self.values)
        low, high = self.uniform or self.loguniform or self.randint
        return [low, high - 1] if self.randint is not None else [low, high]

    def describe(self) -> str:
        """Short text for MLflow params, e.g. `loguniform(0.0001, 0.01)`."""
        value = getattr(self, self.kind)
        return f"{self.kind}({json.dumps(list(value))[1:-1]})"


class SchedulerSpec(Strict):
    """Early stopping of bad trials. ASHA compares trials at epochs grace_period * rf^k."""

    type: Literal["asha", "none"] = "asha"
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(default=2.0, gt=1.0)


class TuneSettings(Strict):
    """How the space is searched."""

    name: str | None = None  # Ray Tune experiment name; default: the spec file's stem
    searcher: Literal["grid", "random", "optuna"] = "random"
    num_samples: PositiveInt = 1
    metric: str = "val/mean_auc"
    # Optional: the direction follows the metric (`pipeline.metrics_vocab`); a stated mode
    # must agree with it.
    mode: Literal["max", "min"] | None = None
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    max_concurrent: PositiveInt | None = None  # default: what the cluster's CPUs/GPUs allow
    seed: int = 0
    top: PositiveInt = 5  # rows of the summary table
    # Run the base config's own values as the first trial (random/optuna searchers): the
    # search then reports how much it beats the default, measured the same way.
    include_default: bool = False

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, metric: str) -> str:
        if not metric.startswith("val/"):
            raise ValueError(
                f"trials report validation metrics per epoch (val/...), got {metric!r}"
            )
        return metric

    @field_validator("mode")
    @classmethod
    def _check_mode(cls, mode: str | None, info: ValidationInfo) -> str | None:
        if "metric" in info.data:  # else the metric's own error is reported
            check_mode(info.data["metric"], mode)
        return mode

    @property
    def direction(self) -> str:
        """`"max"` or `"min"`: which way the search's metric improves."""
        return direction(self.metric)


class SpecFile(Strict):
    """The raw file: validated field by field, then checked against the base config."""

    base: str | dict[str, Any]
    set: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Distribution] = Field(min_length=1)
    tune: TuneSettings = Field(default_factory=TuneSettings)


class SearchSpec:
    """A validated search: the base training config, the space and the search settings.

    Example:
        >>> spec = load_search_spec("configs/tune-synthetic.yaml")  # doctest: +SKIP
        >>> spec.trial_config({"train.lr": 0.003}).train.lr  # doctest: +SKIP
        0.003
    """

    def __init__(
        self,
        base: Config,
        space: dict[str, Distribution],
        settings: TuneSettings,
        name: str,
        source: str = "search spec",
    ) -> None:
        self.base = base
        self.space = space
        self.settings = settings
        self.name = name
        self.source = source
        self._check()

    # -- trial configs ---------------------------------------------------------------------
    def trial_config(self, values: dict[str, Any]) -> Config:
        """The training config of one trial: the base with `values` (dotted fields) set."""
        raw = self.base.model_dump(mode="json")
        for path, value in values.items():
            set_path(raw, path, value)
        return parse_config(raw, source=f"{self.source}: trial {_short(values)}")

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Tune's sampled config -> config values (lists travel as JSON text, see
        `param_space`)."""
        out = {}
        for path, dist in self.space.items():
            value = sample[path]
            if dist.values is not None and _needs_encoding(dist.values):
                value = json.loads(value)
            out[path] = value
        return out

    def param_space(self) -> dict[str, Any]:
        """Ray Tune domains, one per searched field.

        Choice values that are lists (expert dims, per-task experts) are passed as JSON text:
        Optuna's categorical distribution takes scalars only, and the text reads well in
        trial names and tables.
        """
        from ray import tune

        out: dict[str, Any] = {}
        for path, dist in self.space.items():
            if dist.values is not None:
                values = (
                    [json.dumps(v) for v in dist.values]
                    if _needs_encoding(dist.values)
                    else list(dist.values)
                )
                grid = dist.grid is not None or self.settings.searcher == "grid"
                out[path] = tune.grid_search(values) if grid else tune.choice(values)
            elif dist.uniform is not None:
                out[path] = tune.uniform(*dist.uniform)
            elif dist.loguniform is not None:
                out[path] = tune.loguniform(*dist.loguniform)
            else:
                out[path] = tune.randint(*dist.randint)
        return out

    def default_values(self) -> dict[str, Any]:
        """The base config's value of every searched field (the "default config")."""
        raw = self.base.model_dump(mode="json")
        return {path: get_path(raw, path) for path in self.space}

    def default_point(self) -> dict[str, Any]:
        """`default_values` as Tune sees them (list values as JSON text), for
        `points_to_evaluate`."""
        out = {}
        for path, value in self.default_values().items():
            values = self.space[path].values
            out[path] = json.dumps(value) if values and _needs_encoding(values) else value
        return out

    def describe(self) -> dict[str, str]:
        """Flat text description for MLflow params of the parent run."""
        out = {f"search.{p}": d.describe() for p, d in self.space.items()}
        settings = self.settings.model_dump(mode="json")
        scheduler = settings.pop("scheduler")
        out.update({f"tune.{k}": str(v) for k, v in settings.items()})
        out.update({f"tune.scheduler.{k}": str(v) for k, v in scheduler.items()})
        return out

    def fingerprint(self) -> str:
        """A stable text of what must not change when a search is resumed."""
        return json.dumps(
            {
                "base": self.base.model_dump(mode="json"),
                "space": {p: d.model_dump(mode="json") for p, d in self.space.items()},
                "tune": self.settings.model_dump(mode="json", exclude={"top", "max_concurrent"}),
            },
            sort_keys=True,
        )

    # -- checks ----------------------------------------------------------------------------
    def _check(self) -> None:
        check_validation_metric(
            self.settings.metric, self.base.data.tasks, f"{self.source}: tune.metric"
        )
        for path, dist in self.space.items():
            _check_field(path, self.source)
            if self.settings.searcher == "grid" and dist.values is None:
                raise ConfigError(
                    f"{self.source}: search.{path}: the grid searcher takes choice or grid "
                    f"values, not {dist.kind}"
                )
            if self.settings.searcher == "optuna" and dist.grid is not None:
                raise ConfigError(
                    f"{self.source}: search.{path}: the optuna searcher cannot take a grid; "
                    "use choice"
                )
            if self.settings.include_default:
                self._check_default(path, dist)
            for value in dist.edge_values():
                try:
                    self.trial_config({path: value})  # builds the network too (parse_config)
                except ConfigError as err:
                    raise ConfigError(
                        f"{self.source}: search.{path}: value {json.dumps(value)} gives an "
                        f"invalid training config: {err}"
                    ) from None

    def _check_default(self, path: str, dist: Distribution) -> None:
        if self.settings.searcher == "grid" or dist.grid is not None:
            raise ConfigError(
                f"{self.source}: tune.include_default: takes the random or optuna searcher "
                f"without grid values (search.{path})"
            )
        value = self.default_values()[path]
        low_high = dist.uniform or dist.loguniform or dist.randint
        inside = (
            value in dist.values if dist.values is not None else low_high[0] <= value <= low_high[1]
        )
        if not inside:
            raise ConfigError(
                f"{self.source}: tune.include_default: the base config's {path} = "
                f"{json.dumps(value)} is outside search.{path} ({dist.describe()})"
            )


def _needs_encoding(values: list[Any]) -> bool:
    return any(isinstance(v, list | dict) for v in values)


def _short(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def _check_field(path: str, source: str) -> None:
    """`path` must name a leaf field of the training config that may vary between trials."""
    if path.startswith(FIXED_FIELDS) and path not in SEARCHABLE_DATA_FIELDS:
        raise ConfigError(
            f"{source}: search.{path}: this field is fixed for a whole search (set it in the "
            f"base config); of data.*, only {', '.join(SEARCHABLE_DATA_FIELDS)} can be searched"
        )
    model: type[BaseModel] = Config
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(
                f"{source}: search.{path}: {where} has no field {part!r} "
                f"(fields: {', '.join(fields)})"
            )
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i < len(parts) - 1 and not is_section:
            raise ConfigError(
                f"{source}: search.{path}: {'.'.join(parts[: i + 1])} is not a section"
            )
        if i == len(parts) - 1 and is_section:
            raise ConfigError(f"{source}: search.{path}: is a section; name one of its fields")
        if is_section:
            model = annotation


def parse_search_spec(raw: dict[str, Any], source: str, folder: Path, name: str) -> SearchSpec:
    """Validate a raw spec dict (see the module docstring); `folder` resolves `base` paths."""
    try:
        spec = SpecFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    if isinstance(spec.base, str):
        base_path = Path(spec.base)
        base_path = base_path if base_path.is_absolute() else folder / base_path
        if not base_path.is_file():
            raise ConfigError(f"{source}: base: training config {base_path} not found")
        base_raw = read_yaml_mapping(base_path, "training config")
        base_source = f"{source}: base {base_path}"
    else:
        base_raw, base_source = spec.base, f"{source}: base"
    base_raw = copy.deepcopy(base_raw)
    for path, value in spec.set.items():
        set_path(base_raw, path, value)
    if "model.expert_dims" in spec.search and "model.fusion_levels" not in spec.search:
        # The depth is searched through expert_dims: the level count follows from it.
        base_raw.setdefault("model", {})["fusion_levels"] = None
    base = parse_config(base_raw, source=base_source)
    settings = spec.tune
    return SearchSpec(base, spec.search, settings, settings.name or name, source)


def load_search_spec(path: str | Path, overrides: list[str] | None = None) -> SearchSpec:
    """Read a search-space YAML file and validate it against its base training config.

    Args:
        path: the spec file.
        overrides: `key=value` overrides; keys under `tune.` or `search.` change the spec,
            any other key (e.g. `train.epochs=2`) a field of the base config.
    """
    path = Path(path)
    raw = read_yaml_mapping(path, "search spec")
    spec_overrides, base_overrides = [], []
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        (spec_overrides if key.startswith(("tune.", "search.")) else base_overrides).append(item)
    raw = _apply_spec_overrides(raw, spec_overrides)
    raw_set = dict(raw.get("set") or {})
    for item in base_overrides:
        key, value = parse_override(item)
        raw_set[key] = value
    if raw_set:
        raw["set"] = raw_set
    return parse_search_spec(raw, str(path), path.parent, path.stem)


def _apply_spec_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`search.<dotted field>=<YAML>` replaces one distribution; `tune.x.y=v` a setting."""
    out = copy.deepcopy(raw)
    plain = []
    for item in overrides:
        key = item.partition("=")[0]
        if key.startswith("search."):
            field, value = parse_override(item)
            out.setdefault("search", {})[field[len("search.") :]] = value
        else:
            plain.append(item)
    return apply_overrides(out, plain) if plain else out
