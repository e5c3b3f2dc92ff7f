"""Synthetic interaction logs with a known truth (an oracle), for tests and benchmarks.

Each row is one impression of an item to a user. A small "world" (per user, item, category
and segment latent factors and biases) is drawn once from the seed; rows are then drawn in
fixed-size chunks, each from its own seed, so the output is identical for a seed whatever
the number of threads, and memory stays bounded for any row count.

Tasks and how they relate (`relatedness` and `conflict` tune them):
- click (binary, every row): user-item interest + user/item biases + clickbait + context
  (device, hour) + position and item age.
- like (binary, observed only when clicked, null otherwise): `relatedness` of the same
  interest as click, the rest an independent interest; item quality; clickbait hurts it.
- share (binary, rare, null without a click): the like interest, the user's share
  propensity, quality, user tenure.
- watch_time (regression, minutes, > 0, null without a click): log-normal around interest,
  quality and video length; clickbait lowers it: the task that conflicts with click.

The oracle columns hold each row's truth: `p_click` = P(click), `p_like` = P(like | click),
`p_share` = P(share | click), `e_watch_time` = E[watch_time | click]. They are not features.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.progress import progress

DEVICES = np.array(["android", "ios", "web"])
TABLE_SIZE = 1 << 16
DEVICE_TABLE = np.repeat(np.arange(3, dtype=np.int8), [32_768, 22_938, 9_830])  # 50/35/15 %
SEGMENTS = 8
CATEGORIES = 24
LATENT_DIM = 4
WATCH_SIGMA = 0.5  # log-normal noise of watch_time around its expectation
CHUNK_ROWS = 131_072


@dataclass
class World:
    """Everything drawn once per seed; rows are drawn from it."""

    user_segment: np.ndarray
    user_interest: np.ndarray  # [users, K] factors of the interest shared by click and like
    user_own: np.ndarray  # [users, K] factors of like's own interest
    user_bias: np.ndarray
    user_share: np.ndarray
    user_tenure_mu: np.ndarray
    item_category: np.ndarray
    item_interest: np.ndarray
    item_own: np.ndarray
    item_bias: np.ndarray
    item_quality: np.ndarray
    item_clickbait: np.ndarray
    item_length_mu: np.ndarray
    item_table: np.ndarray  # item ids in proportion to popularity, to draw impressions
    hour_table: np.ndarray
    device_effect: np.ndarray  # [3, 4 tasks]
    hour_effect: np.ndarray  # [24, 4 tasks]
    _pairs: dict[int, np.ndarray] = field(default_factory=dict)

    def interest(
        self, user: np.ndarray, item: np.ndarray, user_f: np.ndarray, item_f: np.ndarray
    ) -> np.ndarray:
        """<user factors, item factors>, scaled to unit variance (1.25 per dimension).

        A users x items table is cached when small: one gather beats a [rows, K] product.
        """
        scale = np.float32(1.0 / (1.25 * np.sqrt(LATENT_DIM)))
        if len(user_f) * len(item_f) > 20_000_000:
            return np.einsum("nk,nk->n", user_f[user], item_f[item]) * scale
        key = id(user_f)
        if key not in self._pairs:
            self._pairs[key] = (user_f @ item_f.T * scale).astype(np.float32)
        return self._pairs[key][user, item]


def _factors(rng: np.random.Generator, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Low-rank factors: a group centroid (segment/category) plus individual noise."""
    centroids = rng.normal(size=(n_groups, LATENT_DIM))
    return (centroids[groups] + 0.5 * rng.normal(size=(len(groups), LATENT_DIM))).astype(np.float32)


def _table(weights: np.ndarray) -> np.ndarray:
    """A lookup table: a uniform index into it draws i with probability ~ weights[i]."""
    cdf = np.cumsum(weights) / np.sum(weights)
    return np.searchsorted(cdf, (np.arange(TABLE_SIZE) + 0.5) / TABLE_SIZE).astype(np.int32)


def make_world(seed: int, users: int, items: int) -> World:
    """Draw the latent world for a seed."""
    rng = np.random.default_rng([seed, 0])
    user_segment = rng.integers(0, SEGMENTS, users)
    item_category = rng.integers(0, CATEGORIES, items)
    popularity = rng.normal(0, 0.5, items)
    hours = np.arange(24)
    hour_p = 1.0 + 0.6 * np.sin((hours - 14) / 24 * 2 * np.pi)
    return World(
        user_segment=user_segment,
        user_interest=_factors(rng, user_segment, SEGMENTS),
        user_own=_factors(rng, user_segment, SEGMENTS),
        user_bias=rng.normal(0, 0.4, users).astype(np.float32),
        user_share=rng.normal(0, 0.7, users).astype(np.float32),
        user_tenure_mu=rng.normal(4.0, 1.0, users).astype(np.float32),
        item_category=item_category,
        item_interest=_factors(rng, item_category, CATEGORIES),
        item_own=_factors(rng, item_category, CATEGORIES),
        item_bias=(0.5 * popularity + rng.normal(0, 0.2, items)).astype(np.float32),
        item_quality=rng.normal(0, 0.6, items).astype(np.float32),
        item_clickbait=rng.normal(0, 0.6, items).astype(np.float32),
        item_length_mu=rng.normal(1.0, 0.6, items).astype(np.float32),
        item_table=_table(np.exp(popularity)),
        hour_table=_table(hour_p),
        device_effect=rng.normal(0, 0.3, (3, 4)).astype(np.float32),
        hour_effect=(
            0.3 * np.sin((hours[:, None] - rng.uniform(0, 24, 4)) / 24 * 2 * np.pi)
        ).astype(np.float32),
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _masked(values: np.ndarray, observed: np.ndarray) -> pa.Array:
    return pa.array(values, mask=~observed)


@dataclass
class _Draws:
    """One chunk's drawn ids and features (the columns users see)."""

    user: np.ndarray
    item: np.ndarray
    device: np.ndarray
    hour: np.ndarray
    position: np.ndarray
    item_age: np.ndarray
    tenure: np.ndarray
    length: np.ndarray


def _draw(world: World, rng: np.random.Generator, rows: int) -> _Draws:
    """Draw `rows` impressions' ids and features (the first draws of a chunk, in order)."""
    # Table lookups instead of Generator.choice(p=...), which rebuilds the CDF per call.
    user = rng.integers(0, len(world.user_bias), rows)
    item = world.item_table[rng.integers(0, TABLE_SIZE, rows)]
    device = DEVICE_TABLE[rng.integers(0, TABLE_SIZE, rows)]
    hour = world.hour_table[rng.integers(0, TABLE_SIZE, rows)]
    position = rng.integers(0, 20, rows, dtype=np.int16)
    item_age = np.exp(3.0 + 1.2 * rng.standard_normal(rows, np.float32))  # hours, log-normal
    tenure = np.exp(world.user_tenure_mu[user] + 0.3 * rng.standard_normal(rows, np.float32))
    length = np.exp(world.item_length_mu[item] + 0.2 * rng.standard_normal(rows, np.float32))
    return _Draws(user, item, device, hour, position, item_age, tenure, length)


def _logits(world: World, d: _Draws, rho: float, conflict: float) -> list[np.ndarray]:
    """The oracle's click, like and share logits and watch time's log-mean."""
    interest = world.interest(d.user, d.item, world.user_interest, world.item_interest)
    own = world.interest(d.user, d.item, world.user_own, world.item_own)
    like_interest = rho * interest + np.sqrt(1.0 - rho**2) * own
    context = world.device_effect[d.device] + world.hour_effect[d.hour]  # [rows, 4]
    quality, bait = world.item_quality[d.item], world.item_clickbait[d.item]
    log_age = (np.log1p(d.item_age) - 3.0) / np.float32(1.2)
    click = (
        -1.0
        + 0.9 * interest
        + world.user_bias[d.user]
        + world.item_bias[d.item]
        + 0.8 * conflict * bait
        + context[:, 0]
        - 0.05 * (d.position.astype(np.float32) - 10)
        - 0.25 * log_age
    )
    like = -0.9 + 1.0 * like_interest + 0.8 * quality - 0.5 * conflict * bait + context[:, 1]
    share = (
        -3.6
        + 0.7 * like_interest
        + world.user_share[d.user]
        + 0.5 * quality
        + 0.3 * (np.log(d.tenure) - 4.0)
        + context[:, 2]
    )
    watch = (
        0.3 * interest
        + 0.3 * quality
        - 0.6 * conflict * bait
        + 0.5 * np.log(d.length)
        + context[:, 3]
        - 0.4
    )
    return [click, like, share, watch]


def _chunk(
    world: World,
    rng: np.random.Generator,
    rows: int,
    day: str,
    first_id: int,
    rho: float,
    conflict: float,
) -> pa.Table:
    """Draw `rows` impressions of one day."""
    d = _draw(world, rng, rows)
    click_logit, like_logit, share_logit, watch_log_mean = _logits(world, d, rho, conflict)
    p_click, p_like, p_share = _sigmoid(click_logit), _sigmoid(like_logit), _sigmoid(share_logit)
    e_watch = np.exp(watch_log_mean)
    noise = rng.standard_normal(rows, np.float32)
    watch = e_watch * np.exp(np.float32(-(WATCH_SIGMA**2) / 2) + WATCH_SIGMA * noise)
    click, like, share = rng.random((3, rows), np.float32) < np.stack([p_click, p_like, p_share])
    return pa.table(
        {
            "event_id": np.arange(first_id, first_id + rows, dtype=np.int64),
            "day": pa.repeat(pa.scalar(day, pa.string()), rows),
            "user_id": d.user.astype(np.int64),
            "user_segment": world.user_segment[d.user].astype(np.int8),
            "item_id": d.item.astype(np.int64),
            "item_category": world.item_category[d.item].astype(np.int32),
            "device": pa.DictionaryArray.from_arrays(
                d.device, DEVICES.tolist()
            ).dictionary_decode(),
            "hour": d.hour.astype(np.int16),
            "position": d.position,
            "item_age_hours": d.item_age,
            "user_tenure_days": d.tenure.astype(np.float32),
            "video_length_min": d.length.astype(np.float32),
            "click": click.astype(np.int8),
            "like": _masked(like.astype(np.int8), click),
            "share": _masked(share.astype(np.int8), click),
            "watch_time": _masked(watch.astype(np.float32), click),
            "p_click": p_click.astype(np.float32),
            "p_like": p_like.astype(np.float32),
            "p_share": p_share.astype(np.float32),
            "e_watch_time": e_watch.astype(np.float32),
        }
    )


@dataclass
class GenerateSummary:
    """What `generate_logs` wrote."""

    out_dir: Path
    rows: int
    files: list[Path]
    seconds: float
    rates: dict[str, float] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)

    def line(self) -> str:
        rates = " ".join(f"{k}={v:.4f}" for k, v in self.rates.items())
        return (
            f"wrote {self.rows:,} rows in {len(self.files)} files to {self.out_dir} in "
            f"{self.seconds:.2f} s ({self.rows_per_s:,.0f} rows/s); {rates}"
        )


def generate_logs(
    out_dir: str | Path,
    rows: int,
    seed: int = 0,
    *,
    days: int = 14,
    users: int = 2_000,
    items: int = 1_000,
    relatedness: float = 0.7,
    conflict: float = 1.0,
    start_day: str = "2024-01-01",
    threads: int | None = None,
) -> GenerateSummary:
    """Write `rows` synthetic impressions as one Parquet file per day under `out_dir`.

    Args:
        out_dir: output folder; one file a day, `YYYY-MM-DD.parquet`, with a `day` column.
        rows: total rows, spread evenly over the days.
        seed: the same seed gives the same world (users, items, interests) and, for the same
            calendar day, the same rows.
        days: number of days (files).
        users, items: id cardinalities; each id gets about rows/users (rows/items) rows.
        relatedness: in [0, 1], how much of like's (and share's) interest is click's.
        conflict: strength of the clickbait factor that raises click but lowers like and
            watch_time (0 = no conflicting task).
        start_day: the first day, ISO format.
        threads: writer threads (default: CPU count, at most `days`).

    Example:
        >>> generate_logs("data/logs", 100_000, seed=1).rows  # doctest: +SKIP
        100000
    """
    if rows < 1 or days < 1:
        raise ValueError("rows and days must be positive")
    if not 0.0 <= relatedness <= 1.0:
        raise ValueError("relatedness must be in [0, 1]")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _DayPlan(make_world(seed, users, items), seed, relatedness, conflict)
    # Rows depend on the calendar day, not on the file's position: logs generated one day
    # at a time (a daily retraining) are new rows of the same world, and the default start
    # keeps the rows of every earlier version.
    jobs = _day_jobs(out, dt.date.fromisoformat(start_day), rows, days)
    results = []
    workers = max(1, min(threads or os.cpu_count() or 1, days))
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        progress(rows, "generating", "row", scale=True) as bar,
    ):
        for job, result in zip(jobs, pool.map(lambda job: plan.write(*job), jobs), strict=True):
            results.append(result)
            bar.update(job[3])
    rates = _rates({k: sum(s[k] for _, s in results) for k in results[0][1]}, rows)
    return GenerateSummary(out, rows, [p for p, _ in results], time.perf_counter() - started, rates)


def _day_jobs(out: Path, first_day: dt.date, rows: int, days: int) -> list[tuple]:
    """(folder, day, day number since 2024-01-01, rows, first event id) of each file."""
    offset = (first_day - dt.date(2024, 1, 1)).days
    per_day = [rows // days + (1 if d < rows % days else 0) for d in range(days)]
    starts = np.concatenate([[0], np.cumsum(per_day)[:-1]])
    return [
        (
            out,
            (first_day + dt.timedelta(days=d)).isoformat(),
            offset + d,
            per_day[d],
            int(starts[d]),
        )
        for d in range(days)
        if per_day[d] > 0
    ]


@dataclass(frozen=True)
class _DayPlan:
    """What every day's file is drawn from."""

    world: World
    seed: int
    relatedness: float
    conflict: float

    def write(
        self, out: Path, day: str, day_number: int, rows: int, first_id: int
    ) -> tuple[Path, dict[str, float]]:
        """Write one day's file in chunks; its path and label sums."""
        path = out / f"{day}.parquet"
        sums = {"click": 0.0, "like": 0.0, "share": 0.0, "watch_time": 0.0}
        writer = None
        for c, chunk_start in enumerate(range(0, rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - chunk_start)
            rng = np.random.default_rng([self.seed, 1, day_number % 2**32, c])
            table = _chunk(
                self.world, rng, n, day, first_id + chunk_start, self.relatedness, self.conflict
            )
            for k in sums:
                sums[k] += float(pc.sum(table[k]).as_py() or 0.0)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="snappy")
            writer.write_table(table, row_group_size=CHUNK_ROWS)
        if writer is not None:
            writer.close()
        return path, sums


def _rates(totals: dict[str, float], rows: int) -> dict[str, float]:
    clicks = max(totals["click"], 1.0)
    return {
        "click": totals["click"] / rows,
        "like_given_click": totals["like"] / clicks,
        "share": totals["share"] / rows,
        "mean_watch_time": totals["watch_time"] / clicks,
    }
