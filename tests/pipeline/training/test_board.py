"""The training's progress on the driver's console (`pipeline.training.board`): rank 0's
posts to a real Ray actor, read by the driver's thread, printed in a log every interval."""

from __future__ import annotations

import time

import pytest
import ray

from pipeline.training.board import ProgressBoard, duration, progress_shown

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_a_log_gets_one_line_per_interval_with_rows_rate_and_etas(ray_cluster) -> None:
    board = ProgressBoard.remote()
    ray.get(board.read.remote())  # the actor is up: its start-up is not the board's interval
    lines: list[tuple[float, str]] = []
    per_epoch = 1_000_000
    with progress_shown(board, 2, 2.0, lambda line: lines.append((time.monotonic(), line))):
        started = time.monotonic()
        # 8 s of posts at 100,000 rows/s, counted by the clock so a slow sleep does not
        # change the rate the board should report
        while (elapsed := time.monotonic() - started) < 8.0:
            board.update.remote(epoch=1, rows=int(elapsed * 100_000), rows_per_epoch=per_epoch)
            time.sleep(0.25)
    assert 3 <= len(lines) <= 5, lines  # every 2 s, from the thread's start
    gaps = [b[0] - a[0] for a, b in zip(lines, lines[1:], strict=False)]
    assert all(1.9 <= gap <= 3.1 for gap in gaps), gaps
    assert lines[0][0] - started >= 1.9
    last = lines[-1][1]
    assert last.startswith("epoch 1/2: ") and " of 1,000,000 rows (" in last
    rate = int(last.split(", ")[1].split()[0].replace(",", ""))
    assert 70_000 <= rate <= 130_000, last  # samples/s over the last interval
    assert "epoch ETA " in last and "run ETA " in last


def test_durations_read_as_a_person_would_say_them() -> None:
    assert duration(0.4) == "0 s"
    assert duration(59) == "59 s"
    assert duration(61) == "1 min 01 s"
    assert duration(7260) == "2 h 01 min"
