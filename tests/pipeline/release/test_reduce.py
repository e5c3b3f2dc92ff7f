"""The two reductions of `adatt evaluate`'s scored rows: small holdouts in one Ray task,
large ones with Ray Data (a sort per task and model, a groupby per task). On the same
blocks both give the same sums, AUC and GAUC vectors per replicate, and group count."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import TaskSpec
from pipeline.data.hashing import group_keys
from pipeline.release import evaluate as module

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_distributed_reduction_equals_the_one_task_one() -> None:
    import pandas as pd
    import ray.data

    from pipeline.session import start_ray

    start_ray()
    rows, rng = 3000, np.random.default_rng(0)
    users = pd.Series(rng.integers(0, 300, rows).astype(float)).where(rng.random(rows) > 0.05)
    label = (rng.random(rows) < 0.3).astype(np.float64)
    label[rng.random(rows) < 0.1] = np.nan  # unobserved labels
    frame = pd.DataFrame({
        "key.user_id": group_keys(users),
        "null.user_id": users.isna().to_numpy(),
        "label.click": label,
        "score.0.click": rng.random(rows),
        "score.1.click": np.clip(np.nan_to_num(label) + rng.normal(0, 0.8, rows), 0, 1),
    })  # fmt: skip
    blocks = [frame.iloc[i : i + rows // 4] for i in range(0, rows, rows // 4)]
    scored = ray.data.from_pandas(blocks).materialize()  # several blocks, as a read gives
    plan = module._Plan((TaskSpec(name="click", group_column="user_id"),), "user_id", None)

    assert module.one_task_fits(scored.size_bytes(), module.smallest_node_memory())
    one_task = module._reduce(scored, plan, models=2, seed=3, replicates=20)
    with pytest.MonkeyPatch.context() as patch:  # as if the rows outgrew the budget
        patch.setattr(module, "smallest_node_memory", lambda: 0.0)
        distributed = module._reduce(scored, plan, models=2, seed=3, replicates=20)

    (total_a, aucs_a, gaucs_a, groups_a), (total_b, aucs_b, gaucs_b, groups_b) = (
        one_task,
        distributed,
    )
    assert groups_a == groups_b == users.nunique(dropna=False)
    assert total_a.keys() == total_b.keys()
    for key in total_a:
        np.testing.assert_allclose(np.asarray(total_b[key]), np.asarray(total_a[key]), rtol=1e-12)
    assert int(total_a["nulls.click"]) == int((users.isna() & ~np.isnan(label)).sum())
    for key in aucs_a:
        np.testing.assert_allclose(aucs_b[key], aucs_a[key], rtol=1e-12)
    np.testing.assert_allclose(gaucs_b["click"], gaucs_a["click"], rtol=1e-12)
    # Replicate 0 is the plain value: scikit-learn's AUC of the observed rows.
    from sklearn.metrics import roc_auc_score

    seen = ~np.isnan(label)
    assert aucs_a["click", 1][0] == pytest.approx(
        roc_auc_score(label[seen], frame["score.1.click"][seen]), abs=1e-12
    )
