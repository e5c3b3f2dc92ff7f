"""`--warm-start`: a new run initialised from a logged model's weights and preprocessing.

The source is a registered version (`models:/NAME@ALIAS`, `models:/NAME/VERSION`), a run's
model (`runs:/RUN_ID/model`) or a run id. Everything is checked on the driver before Ray
starts: the model must read the same raw columns the same way (the registry's
`data_schema_hash`) and its weights must fit the configured network; a mismatch is a
one-line error naming the field that changed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, DataConfig
from pipeline.data.files import InputFiles
from pipeline.data.preprocess import DenseStats, Preprocessor
from pipeline.errors import InputError
from pipeline.modelfile.format import schema_fields, upgrade_weights
from pipeline.modelfile.store import read_model, resolve_model
from pipeline.tracking import tags


@dataclass
class WarmStart:
    """A resolved warm-start source.

    Attributes:
        source: as given on the command line.
        model_uri: the model it names, pinned (`models:/NAME/VERSION` for an alias).
        parent_run: the run that logged the model.
        parent_version: `NAME/VERSION` when the source is a registered version.
        weights: the network's state dict.
        dense_stats: the model's dense statistics, kept unless `--refit-stats`.
    """

    source: str
    model_uri: str
    parent_run: str | None
    parent_version: str | None
    weights: dict[str, torch.Tensor]
    dense_stats: dict[str, DenseStats]

    def lineage_tags(self, files: InputFiles, config: Config) -> dict[str, str]:
        """The run tags that say where the run came from."""
        out = {
            tags.WARM_START: self.source,
            tags.PARENT_MODEL: self.model_uri,
            tags.DATA_WINDOW: data_window(files, config.data),
        }
        if self.parent_run:
            out[tags.PARENT_RUN] = self.parent_run
        if self.parent_version:
            out[tags.PARENT_VERSION] = self.parent_version
        return out

    def preprocessor(self, config: Config, fitted: Preprocessor, refit: bool) -> Preprocessor:
        """The run's preprocessing: the model's dense statistics, or `fitted`'s with `refit`."""
        return fitted if refit else Preprocessor(config.data, self.dense_stats)


def _first_difference(path: str, model: Any, config: Any) -> str | None:
    """The dotted path of the first value that differs between two JSON values."""
    if isinstance(model, dict) and isinstance(config, dict):
        for key in sorted(set(model) | set(config)):
            found = _first_difference(f"{path}.{key}", model.get(key), config.get(key))
            if found:
                return found
        return None
    if isinstance(model, list) and isinstance(config, list) and len(model) == len(config):
        for i, (a, b) in enumerate(zip(model, config, strict=True)):
            found = _first_difference(f"{path}[{i}]", a, b)
            if found:
                return found
        return None
    if model != config:
        return f"{path} is {model!r} in the model, {config!r} in the config"
    return None


def check_schema_matches(spec: dict[str, Any], config: Config, source: str) -> None:
    """InputError naming the first changed field unless the model reads the configured raw
    columns the same way (the same `data_schema_hash`)."""
    trained = schema_fields(spec["preprocessor"]["data"])
    found = _first_difference("data", trained, schema_fields(config.data.model_dump(mode="json")))
    if found is None:
        return
    raise InputError(
        f"--warm-start {source}: the data schema changed: {found}; a warm start needs the "
        "model's feature columns, buckets, transforms and tasks"
    )


def fit_weights(
    weights: dict[str, torch.Tensor], spec: dict, config: Config, source: str
) -> dict[str, torch.Tensor]:
    """`weights` in the layout of the configured network, upgraded when an earlier version
    wrote them (one line on stderr says what was filled in or converted); InputError naming
    the changed model field when they do not fit. A logged model's tables are dense whatever
    trained it, so the network is compared with dense tables too: sharded tables
    (`model.embeddings: torchrec`) take the same weights, cut into this run's shards."""
    dense = config.model.model_copy(update={"embeddings": "dense"})
    try:
        upgraded = upgrade_weights(dense, config.data.feature_schema(), weights)
    except RuntimeError as err:
        changed = _first_difference("model", spec["model"], config.model.model_dump(mode="json"))
        detail = next(
            (line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err)
        )
        raise InputError(
            f"--warm-start {source}: the model's weights do not fit the configured network: "
            f"{changed or detail}"
        ) from None
    changes = upgraded.describe()
    if changes:
        print(
            f"note: --warm-start {source}: weights in an earlier version's layout, "
            f"upgraded: {changes}",
            file=sys.stderr,
            flush=True,
        )
    return upgraded.weights


def resolve_warm_start(source: str, client: Any, config: Config) -> WarmStart:
    """Find the model, check it against `config`, and read its weights (driver side)."""
    ref = resolve_model(source, client, flag="--warm-start")
    model = read_model(ref, client)
    check_schema_matches(model.spec, config, source)
    weights = fit_weights(model.weights, model.spec, config, source)
    stats = model.preprocessor().dense_stats
    version = f"{ref.name}/{ref.version}" if ref.version else None
    return WarmStart(source, ref.uri, ref.run_id, version, weights, stats)


def data_window(files: InputFiles, data: DataConfig) -> str:
    """The data a run saw: with a cutoff split, `<column> <min>..<max> (<n> files)` from the
    footers' statistics; otherwise (or without statistics) the first and last file names."""
    names = sorted(Path(p).name for p in files.paths)
    fallback = f"files {names[0]}" + (f"..{names[-1]}" if len(names) > 1 else "")
    fallback += f" ({len(names)})"
    if data.split.method != "cutoff":
        return fallback
    lows, highs = [], []
    for footer in files.footers:
        for stats in footer.row_group_stats(data.split.column) or [None]:
            if stats is None or not stats.has_min_max:
                return fallback
            lows.append(stats.min)
            highs.append(stats.max)
    return f"{data.split.column} {min(lows)}..{max(highs)} ({len(names)} files)"
