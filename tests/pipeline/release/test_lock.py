"""The promotion lease against a real `mlflow server`, with real processes: racing holders
take turns (fencing numbers in order, no lost update), a holder SIGKILLed mid-promotion
blocks the next one only until its lease expires, a holder renews its lease for as long as
it works, a lock without tags is taken over, a waiter acting on a stale read never removes
the live lease, a holder that lost its lease cannot move an alias, and only the owner
releases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.release import lock as lock_module
from pipeline.release.lock import (
    RELEASED,
    LeaseLost,
    LockBusy,
    acquire,
    leases,
    lock_name,
    promotion_lock,
    release,
)
from tests.conftest import REPO_ROOT, registry_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# One holder: take the lease, bump a counter tag on the model (read, pause, write: a lost
# update would show), write what it saw, then hold on for `hold` seconds.
HOLDER = """
import json, sys, time
from pipeline.release.lock import promotion_lock
from tests.conftest import registry_client
uri, name, out, hold = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
client = registry_client(uri)
with promotion_lock(client, name, lease_s=2.0, wait_s=120) as lease:
    count = int(client.get_registered_model(name).tags.get("count", "0"))
    time.sleep(0.3)
    client.set_registered_model_tag(name, "count", str(count + 1))
    open(out, "w").write(json.dumps({"fence": lease.fence, "count": count + 1, "t": time.time()}))
    print("holding", flush=True)
    time.sleep(hold)
"""


def _holder(uri: str, name: str, out: Path, hold: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, uri, name, str(out), str(hold)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _held(client, name: str) -> dict[int, str]:
    """The leases of `name` not released: fence -> owner."""
    return {f: t.get("owner", "") for f, t in leases(client, name).items() if RELEASED not in t}


def test_three_racing_holders_take_turns(mlflow_server, tmp_path) -> None:
    client = registry_client(mlflow_server)
    client.create_registered_model("lock-race")
    outs = [tmp_path / f"holder{i}.json" for i in range(3)]
    procs = [_holder(mlflow_server, "lock-race", out) for out in outs]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    seen = sorted((json.loads(out.read_text()) for out in outs), key=lambda r: r["t"])
    assert [r["count"] for r in seen] == [1, 2, 3]  # one after the other: no lost update
    assert [r["fence"] for r in seen] == sorted(r["fence"] for r in seen)
    assert len({r["fence"] for r in seen}) == 3
    assert client.get_registered_model("lock-race").tags["count"] == "3"
    assert not _held(client, "lock-race")
    assert list(leases(client, "lock-race")) == [max(r["fence"] for r in seen)]  # the rest gone


def test_a_killed_holder_blocks_only_until_its_lease_expires(mlflow_server, tmp_path) -> None:
    client = registry_client(mlflow_server)
    client.create_registered_model("lock-kill")
    first = _holder(mlflow_server, "lock-kill", tmp_path / "first.json", hold=600)
    assert first.stdout.readline().strip() == "holding"
    first.send_signal(signal.SIGKILL)  # mid-promotion: no release, no more renewals
    first.wait(timeout=30)
    killed_at = time.monotonic()
    second = _holder(mlflow_server, "lock-kill", tmp_path / "second.json")
    assert second.wait(timeout=120) == 0, second.stderr.read()[-3000:]
    waited = time.monotonic() - killed_at
    assert waited < 30  # the lease (2 s) expired: the day's run went on
    stderr = second.stderr.read()
    assert "lock-kill.promotion-lock.1: lease of " in stderr
    assert "expired; taking over with fence 2" in stderr
    fences = [
        json.loads((tmp_path / f).read_text())["fence"] for f in ("first.json", "second.json")
    ]
    assert fences[1] == fences[0] + 1
    assert not _held(client, "lock-kill")


def test_a_holder_renews_its_lease_for_as_long_as_it_works(mlflow_server, tmp_path) -> None:
    """A holder that works for several leases (2 s lease, 7 s of work) keeps it: a waiter
    gives up after its wait instead of taking it over, and the holder may still move an
    alias at the end."""
    client = registry_client(mlflow_server)
    holder = _holder(mlflow_server, "lock-renew", tmp_path / "holder.json", hold=7.0)
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(LockBusy, match="lock-renew.promotion-lock.1 has been held for over 4 s"):
        acquire(client, "lock-renew", lease_s=2.0, wait_s=4.0)
    assert holder.wait(timeout=60) == 0, holder.stderr.read()[-3000:]
    assert "taking over" not in holder.stderr.read()
    assert json.loads((tmp_path / "holder.json").read_text())["fence"] == 1
    with promotion_lock(client, "lock-renew", lease_s=2.0, wait_s=10) as lease:
        time.sleep(5.0)  # two and a half leases
        lease.check()  # still the holder: renewed in the background
        assert lease.fence == 2


def test_a_lock_without_tags_is_taken_over_after_one_lease(mlflow_server, capsys) -> None:
    client = registry_client(mlflow_server)
    client.create_registered_model(lock_name("lock-bare", 1))  # made by hand, no tags
    started = time.monotonic()
    with promotion_lock(client, "lock-bare", lease_s=1.0, wait_s=60) as lease:
        assert lease.fence == 2
    assert time.monotonic() - started >= 0.5  # not before it was one lease old
    assert "an unknown holder (no owner tag)" in capsys.readouterr().err
    assert not _held(client, "lock-bare")


def test_a_waiter_acting_on_a_stale_read_never_removes_the_live_lease(
    mlflow_server, monkeypatch
) -> None:
    """Two waiters see the same expired lease; one takes over. The other, acting on what it
    read before, must leave the new lease alone and wait (b69f646 deleted it, and the live
    holder then aborted with LeaseLost)."""
    client = registry_client(mlflow_server)
    expired = acquire(client, "lock-stale", lease_s=1.0, wait_s=30)  # no renewals
    time.sleep(1.2)
    stale_read = leases(client, "lock-stale")  # what the second waiter saw: fence 1, expired
    live = acquire(client, "lock-stale", lease_s=30.0, wait_s=30)  # the first waiter won
    reads = iter([stale_read])
    fresh_read = leases
    monkeypatch.setattr(lock_module, "leases", lambda c, n: next(reads, None) or fresh_read(c, n))
    with pytest.raises(LockBusy):
        acquire(client, "lock-stale", lease_s=30.0, wait_s=1.0)
    live.check()  # untouched: still the holder, still allowed to move an alias
    assert _held(client, "lock-stale") == {2: live.owner}
    with pytest.raises(LeaseLost, match="fence 2 took over from fence 1"):
        expired.check()
    release(live)


def test_a_lost_lease_cannot_move_an_alias_and_only_the_owner_releases(mlflow_server) -> None:
    client = registry_client(mlflow_server)
    stale = acquire(client, "lock-lost", lease_s=1.0, wait_s=30)  # no renewals: it expires
    time.sleep(1.2)
    fresh = acquire(client, "lock-lost", lease_s=30.0, wait_s=30)  # takes it over
    with pytest.raises(LeaseLost, match="lease lost .* the alias was not moved"):
        stale.check()
    release(stale)  # not the holder any more: the new holder's lease stays
    assert _held(client, "lock-lost") == {fresh.fence: fresh.owner}
    fresh.check()
    release(fresh)
    assert not _held(client, "lock-lost")
    assert fresh.fence == stale.fence + 1


def test_fences_go_on_from_the_number_the_old_lock_recorded(mlflow_server) -> None:
    """Leases taken before this scheme recorded their fence on the model
    (`promotion_fence`); the first lease now continues from it."""
    client = registry_client(mlflow_server)
    client.create_registered_model("lock-upgrade", tags={"promotion_fence": "41"})
    with promotion_lock(client, "lock-upgrade", lease_s=5.0) as lease:
        assert lease.fence == 42
    assert client.get_registered_model("lock-upgrade").tags["promotion_fence"] == "42"


def test_every_alias_move_waits_for_the_lease(mlflow_server, untrained_run, monkeypatch) -> None:
    """Plain `register --alias` takes the lease too: while another holds it, it waits."""
    from pipeline.release.registry import register_run

    client = registry_client(mlflow_server)
    monkeypatch.setenv("ADATT_PROMOTION_WAIT_S", "2")
    with (
        promotion_lock(client, "lock-plain", lease_s=30.0),
        pytest.raises(LockBusy, match="lock-plain.promotion-lock.1 has been held for over 2 s"),
    ):
        register_run(client, untrained_run.run_id, "lock-plain", "champion")
    assert [v.version for v in client.search_model_versions("name='lock-plain'")] == []
    done = register_run(client, untrained_run.run_id, "lock-plain", "champion")
    assert done.promoted and done.version == "1"
