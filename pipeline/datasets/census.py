"""Census-Income (KDD) -> Parquet logs and a training config for the AdaTT paper's tasks.

The raw UCI files (`census-income.data[.gz]`, `census-income.test[.gz]`) have no header:
42 ", "-separated fields per row, in the order of `COLUMNS` (from census-income.names;
field 25 is `instance_weight`, a sample weight, not a feature). "NA" is a real value of
`hispanic_origin`, so it is read literally; "?" (not in universe / unknown) is also kept
as a category of its own.

Tasks (as in the AdaTT and MMoE papers): `income` (> 50K), `never_married` (marital status
"Never married"), `college` (education Bachelors, Masters, Prof school or Doctorate). Their
source columns (`income_label`, `marital_stat`, `education`) are dropped from the output so
they cannot leak into the features. Split: the train file is `train`; the test file is
halved at random (fixed seed) into `validation` and `test` (column `split`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.errors import InputError

COLUMNS = [
    "age",
    "class_of_worker",
    "detailed_industry_recode",
    "detailed_occupation_recode",
    "education",
    "wage_per_hour",
    "enroll_in_edu_inst_last_wk",
    "marital_stat",
    "major_industry_code",
    "major_occupation_code",
    "race",
    "hispanic_origin",
    "sex",
    "member_of_a_labor_union",
    "reason_for_unemployment",
    "full_or_part_time_employment_stat",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "tax_filer_stat",
    "region_of_previous_residence",
    "state_of_previous_residence",
    "detailed_household_and_family_stat",
    "detailed_household_summary_in_household",
    "instance_weight",
    "migration_code_change_in_msa",
    "migration_code_change_in_reg",
    "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt",
    "num_persons_worked_for_employer",
    "family_members_under_18",
    "country_of_birth_father",
    "country_of_birth_mother",
    "country_of_birth_self",
    "citizenship",
    "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits",
    "weeks_worked_in_year",
    "year",
    "income_label",
]
# Numeric columns used as dense features, and their transforms.
DENSE = {
    "age": "standardize",
    "wage_per_hour": "log1p",
    "capital_gains": "log1p",
    "capital_losses": "log1p",
    "dividends_from_stocks": "log1p",
    "num_persons_worked_for_employer": "standardize",
    "weeks_worked_in_year": "standardize",
}
COLLEGE = {
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
}
LABEL_SOURCES = ["income_label", "marital_stat", "education"]
TASKS = ["income", "never_married", "college"]
NOT_FEATURES = {"instance_weight", "split", *TASKS}


def _find(raw_dir: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (raw_dir / name).is_file():
            return raw_dir / name
    raise InputError(f"{raw_dir}: neither {stem} nor {stem}.gz found")


def read_raw(path: Path) -> pd.DataFrame:
    """One raw UCI file as a DataFrame with `COLUMNS`; strings stripped, "NA" kept as is."""
    frame = pd.read_csv(
        path,
        header=None,
        sep=",",
        skipinitialspace=True,  # the separator is ", "; this keeps the fast C parser
        keep_default_na=False,
        na_values=[],
        dtype=str,
        compression="infer",
    )
    if frame.shape[1] != len(COLUMNS):
        raise InputError(f"{path}: expected {len(COLUMNS)} fields per row, got {frame.shape[1]}")
    frame.columns = COLUMNS
    for column in COLUMNS:
        frame[column] = frame[column].str.strip()
    return frame


def _labels(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    income = frame["income_label"]
    unknown = ~income.isin(["- 50000.", "50000+."])
    if unknown.any():
        raise InputError(
            f"{path}: column 'income_label' has values other than '- 50000.' / '50000+.', "
            f"e.g. {income[unknown].iloc[0]!r}"
        )
    out = frame.drop(columns=LABEL_SOURCES)
    for column in (*DENSE, "instance_weight"):
        try:
            out[column] = pd.to_numeric(out[column]).astype(np.float32)
        except ValueError as err:
            raise InputError(f"{path}: column {column!r} is not numeric: {err}") from None
    out["income"] = (income == "50000+.").astype(np.int8)
    out["never_married"] = (frame["marital_stat"] == "Never married").astype(np.int8)
    out["college"] = frame["education"].isin(COLLEGE).astype(np.int8)
    return out


def _config(data_path: str, categorical: dict[str, int]) -> dict:
    """The training config for the converted data (buckets ~32x each column's cardinality)."""
    return {
        "data": {
            "path": data_path,
            "categorical": [
                {"column": c, "buckets": int(max(64, 32 * n)), "dim": 8}
                for c, n in categorical.items()
            ],
            "dense": [{"column": c, "transform": t} for c, t in DENSE.items()],
            "tasks": [{"name": t, "label": t, "type": "binary"} for t in TASKS],
            "split": {
                "method": "values",
                "column": "split",
                "train_values": ["train"],
                "validation_values": ["validation"],
                "test_values": ["test"],
            },
            "batch_size": 1024,
        },
        "model": {
            "name": "adatt",
            "experts_per_task": 2,
            "shared_experts": 0,
            "expert_dims": [128, 64],
            "tower_dims": [32],
            # torch's N(0, 1): every run in docs/results/census.md was trained with it.
            "embedding_init_std": 1.0,
        },
    }


def convert_census(raw_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Convert the raw UCI files to Parquet and write `census.yaml` next to them.

    Args:
        raw_dir: folder holding census-income.data[.gz] and census-income.test[.gz].
        out_dir: output folder: `train.parquet`, `test.parquet` (rows of the test file,
            `split` = validation or test) and `census.yaml`.
        seed: seed of the random halving of the test file.

    Returns:
        The path of the written config.

    Example:
        >>> convert_census("../shared/data/census-income", "data/census")  # doctest: +SKIP
        PosixPath('data/census/census.yaml')
    """
    raw, out = Path(raw_dir), Path(out_dir)
    train_path, test_path = _find(raw, "census-income.data"), _find(raw, "census-income.test")
    train = _labels(read_raw(train_path), train_path)
    test = _labels(read_raw(test_path), test_path)
    train["split"] = "train"
    split = np.empty(len(test), dtype=object)
    order = np.random.default_rng(seed).permutation(len(test))
    split[order] = np.where(np.arange(len(test)) < len(test) // 2, "validation", "test")
    test["split"] = split
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in (("train", train), ("test", test)):
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), out / f"{name}.parquet")
    categorical = {
        c: int(pd.concat([train[c], test[c]]).nunique())
        for c in train.columns
        if c not in DENSE and c not in NOT_FEATURES
    }
    config_path = out / "census.yaml"
    config_path.write_text(yaml.safe_dump(_config(str(out), categorical), sort_keys=False))
    return config_path
