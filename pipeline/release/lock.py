"""The promotion lock: a fenced lease on a registered model's aliases, held in the MLflow
registry.

The one atomic operation the registry offers is creating a registered model under a name
that is free (a unique key in its database). Each lease is therefore a registered model of
its own, named by its fencing number: `<name>.promotion-lock.<fence>`. The current lease is
the one with the highest fence. Its tags say who holds it and until when: `owner`
(host:pid:random), `expires` (Unix time), and `released` once its holder is done.

- **Acquire**: read the current lease (fence f). When there is none, or it is released, or
  it has expired (its holder died or hung), create `<name>.promotion-lock.<f+1>`. Of all the
  waiters that read fence f, exactly one creates it; the others read again. Nobody deletes
  or overwrites a lease it does not hold, so a waiter acting on a stale read cannot remove
  a live one (the old scheme deleted an expired lock to take it over, and a second waiter
  could delete its successor).
- The new holder then checks that no higher fence appeared meanwhile, records its fence on
  `<name>` (`promotion_fence`: fences keep growing past the old scheme's) and deletes the
  leases below its own, which no one holds any more.
- **Renew**: the holder pushes its own lease's expiry ahead in a background thread, every
  third of the lease. It writes only its own lease, and never revives one that lapsed.
- **Check** (before every alias move): this holder's fence is the highest, its owner tag is
  its own, it is not released, and it expires no sooner than a third of a lease from now.
  The alias move that follows must finish within that margin; see docs/registry.md for
  what MLflow's API can and cannot guarantee.
- **Release**: tag the holder's own lease `released` (kept: it carries the highest fence).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import Stopped

LOCK_SUFFIX = ".promotion-lock"  # a lease is `<name>.promotion-lock.<fence>`
OWNER, EXPIRES, RELEASED = "owner", "expires", "released"
FENCE_TAG = "promotion_fence"  # on the registered model itself: the last fence handed out
LEASE_S = 60.0
WAIT_S = 600.0
# Override the lease and the wait (seconds), e.g. for tests or a slow registry.
LEASE_ENV, WAIT_ENV = "ADATT_PROMOTION_LEASE_S", "ADATT_PROMOTION_WAIT_S"


class LockBusy(Stopped):
    """The lock stayed held by a live holder for longer than the wait."""


class LeaseLost(Stopped):
    """The holder's lease expired, or a later fence took over: it must not move an alias."""


def lock_name(name: str, fence: int) -> str:
    """The registered model that holds lease number `fence` of `name`."""
    return f"{name}{LOCK_SUFFIX}.{fence}"


def leases(client: MlflowClient, name: str) -> dict[int, dict[str, str]]:
    """Every lease of `name` the registry holds: fence -> tags."""
    prefix = f"{name}{LOCK_SUFFIX}."
    pattern = prefix.replace("'", "''")
    found, token = {}, None
    while True:
        page = client.search_registered_models(
            filter_string=f"name LIKE '{pattern}%'", max_results=1000, page_token=token
        )
        for model in page:
            # LIKE's `_` matches any character: keep the exact prefix only.
            suffix = model.name[len(prefix) :] if model.name.startswith(prefix) else ""
            if suffix.isdigit():
                found[int(suffix)] = dict(model.tags)
        token = page.token
        if not token:
            return found


def _expires(tags: dict[str, str]) -> float:
    try:
        return float(tags[EXPIRES])
    except (KeyError, ValueError):
        return float("-inf")


def _recorded_fence(client: MlflowClient, name: str) -> int:
    try:
        return int(client.get_registered_model(name).tags.get(FENCE_TAG, "0"))
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return 0


@dataclass
class Lease:
    """A held lease: the model it guards, this holder's owner id and fencing number."""

    client: MlflowClient
    name: str
    owner: str
    fence: int
    lease_s: float
    lost: bool = False

    @property
    def lock(self) -> str:
        return lock_name(self.name, self.fence)

    def tags(self) -> dict[str, str]:
        """This lease's current tags ({} once it is gone)."""
        try:
            return dict(self.client.get_registered_model(self.lock).tags)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise

    def problem(self) -> str | None:
        """Why this holder may not move an alias now, or None."""
        tags = self.tags()
        newest = max(leases(self.client, self.name), default=self.fence)
        if self.lost:
            return "it was lost earlier"
        if newest > self.fence:
            return f"fence {newest} took over from fence {self.fence}"
        if tags.get(OWNER) != self.owner or RELEASED in tags:
            return f"{self.lock} is no longer held by {self.owner}"
        left = _expires(tags) - time.time()
        if left < self.lease_s / 3:
            return f"it expires in {left:.1f} s, too soon to move an alias safely"
        return None

    def check(self) -> None:
        """Raise `LeaseLost` unless this holder may move an alias now (module docstring)."""
        problem = self.problem()
        if problem is not None:
            self.lost = True
            raise LeaseLost(f"{self.lock}: lease lost ({problem}); the alias was not moved")

    def renew(self) -> bool:
        """Push this lease's expiry one lease ahead while it is still the current one;
        whether it was."""
        tags = self.tags()
        newest = max(leases(self.client, self.name), default=self.fence)
        # A lease that lapsed may have been taken over already: it is never revived.
        lapsed = _expires(tags) < time.time()
        if tags.get(OWNER) != self.owner or RELEASED in tags or newest > self.fence or lapsed:
            self.lost = True
            return False
        expires = f"{time.time() + self.lease_s:.3f}"
        self.client.set_registered_model_tag(self.lock, EXPIRES, expires)
        return True


def new_owner() -> str:
    """An owner id unique to this process and call."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _try_create(client: MlflowClient, lock: str, owner: str, lease_s: float) -> bool:
    tags = {OWNER: owner, EXPIRES: f"{time.time() + lease_s:.3f}"}
    try:
        client.create_registered_model(lock, tags=tags, description="adatt promotion lease")
        return True
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False


def _free(
    name: str, fence: int, tags: dict[str, str] | None, bare_since: list[float], lease_s: float
) -> bool:
    """Whether the current lease (`fence`, `tags`; None: no such lease) can be followed by
    the next fence: none, released, expired, or seen without owner and expiry for a whole
    lease (`bare_since` holds when this waiter first saw it so)."""
    if tags is None or RELEASED in tags:
        return True
    if OWNER in tags and EXPIRES in tags:
        bare_since.clear()
        if _expires(tags) >= time.time():
            return False
        holder = tags[OWNER]
    else:
        bare_since[:] = bare_since or [time.monotonic()]
        if time.monotonic() - bare_since[0] < lease_s:
            return False
        holder = "an unknown holder (no owner tag)"
    print(
        f"{lock_name(name, fence)}: lease of {holder} expired; taking over with fence {fence + 1}",
        file=sys.stderr,
        flush=True,
    )
    return True


def _settle(client: MlflowClient, name: str, fence: int, found: dict[int, dict]) -> None:
    """After winning `fence`: record it on `name` and delete the leases below it."""
    try:
        client.set_registered_model_tag(name, FENCE_TAG, str(fence))
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, tags={FENCE_TAG: str(fence)})
    for old in (f for f in found if f < fence):
        with contextlib.suppress(MlflowException):  # another holder may have deleted it
            client.delete_registered_model(lock_name(name, old))


def acquire(
    client: MlflowClient, name: str, lease_s: float = LEASE_S, wait_s: float = WAIT_S
) -> Lease:
    """Take the promotion lease of `name`, waiting up to `wait_s` (`LockBusy` after)."""
    owner = new_owner()
    deadline = time.monotonic() + wait_s
    bare_since: list[float] = []
    while True:
        # The recorded fence first: any lease at or above it existed before it was recorded,
        # so the read that follows sees one. Without leases (none yet, or only the old
        # scheme's), fences go on from the recorded one.
        recorded = _recorded_fence(client, name)
        found = leases(client, name)
        current = max(found) if found else recorded
        if _free(name, current, found.get(current), bare_since, lease_s):
            mine = current + 1
            if _try_create(client, lock_name(name, mine), owner, lease_s):
                found = leases(client, name)
                if max(found) == mine:
                    _settle(client, name, mine, found)
                    return Lease(client, name, owner, mine, lease_s)
                # A higher fence exists: this one was created from a stale read.
                client.set_registered_model_tag(lock_name(name, mine), RELEASED, "stale")
        if time.monotonic() > deadline:
            raise LockBusy(
                f"--name {name}: {lock_name(name, current)} has been held for over "
                f"{wait_s:.0f} s by a live holder that keeps renewing it; wait for it, or "
                "stop that registration"
            )
        time.sleep(min(0.5, lease_s / 4))


def release(lease: Lease) -> None:
    """Mark this holder's own lease released (it stays: it carries the highest fence).
    Another holder's lease is never touched."""
    with contextlib.suppress(MlflowException):
        if lease.tags().get(OWNER) == lease.owner:
            lease.client.set_registered_model_tag(lease.lock, RELEASED, f"{time.time():.3f}")


@contextlib.contextmanager
def promotion_lock(
    client: MlflowClient, name: str, lease_s: float | None = None, wait_s: float | None = None
) -> Iterator[Lease]:
    """Hold the promotion lease of `name` while inside, renewed in the background; call
    `lease.check()` right before each alias move. The lease and the wait default to
    `ADATT_PROMOTION_LEASE_S` / `ADATT_PROMOTION_WAIT_S`, else 60 s and 600 s."""
    lease_s = lease_s or float(os.environ.get(LEASE_ENV, LEASE_S))
    wait_s = wait_s or float(os.environ.get(WAIT_ENV, WAIT_S))
    lease = acquire(client, name, lease_s, wait_s)
    stop = threading.Event()

    def keep_renewing() -> None:
        while not stop.wait(lease_s / 3):
            try:
                if not lease.renew():
                    return
            except MlflowException:  # a flaky server: try again at the next beat
                continue

    renewer = threading.Thread(target=keep_renewing, name="promotion-lease", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        release(lease)
