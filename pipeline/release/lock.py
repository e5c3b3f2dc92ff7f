"""The promotion lock: a lease on a registered model's aliases, held in the MLflow registry.

The lock is a registered model named `<name>.promotion-lock` that the registry lets only
one process create (a unique key in its database). Its tags say who holds it and until
when: `owner` (host:pid:random), `expires` (Unix time) and `fence`, a counter that grows by
one with every acquisition and is kept on the registered model `<name>` itself
(`promotion_fence`), so it outlives each lock.

- The holder renews its lease in a background thread while it works (every third of the
  lease).
- A lease that has expired (its holder died or hung), or a lock seen without `owner` or
  `expires` tags for a whole lease, is taken over: deleted and created anew.
- Only the owner releases: the owner tag is compared before the lock is deleted.
- A holder that lost its lease (taken over after it expired) finds out in `check()`, which
  every alias move calls first, and aborts (`LeaseLost`) instead of moving the alias.

The registry offers no compare-and-delete, so a takeover and a release can still race
in the moment between reading the owner and deleting; the check before every move is what
keeps a lost holder from moving an alias.
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

LOCK_SUFFIX = ".promotion-lock"
OWNER, EXPIRES, FENCE = "owner", "expires", "fence"
FENCE_TAG = "promotion_fence"  # on the registered model itself
LEASE_S = 60.0
WAIT_S = 600.0
# Override the lease and the wait (seconds), e.g. for tests or a slow registry.
LEASE_ENV, WAIT_ENV = "ADATT_PROMOTION_LEASE_S", "ADATT_PROMOTION_WAIT_S"


class LockBusy(Stopped):
    """The lock stayed held by a live holder for longer than the wait."""


class LeaseLost(Stopped):
    """The holder's lease expired and another process took the lock over."""


@dataclass
class Lease:
    """A held lock: its name, this holder's owner id and fencing number."""

    client: MlflowClient
    lock: str
    owner: str
    fence: int
    lease_s: float
    lost: bool = False

    def tags(self) -> dict[str, str]:
        """The lock's current tags ({} once it is gone)."""
        try:
            return dict(self.client.get_registered_model(self.lock).tags)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise

    def check(self) -> None:
        """Raise `LeaseLost` unless this holder still owns an unexpired lease."""
        tags = self.tags()
        if self.lost or tags.get(OWNER) != self.owner or _expires(tags) < time.time():
            self.lost = True
            raise LeaseLost(
                f"{self.lock}: lease of {self.owner} lost (now held by "
                f"{tags.get(OWNER, 'nobody')}); the alias was not moved"
            )

    def renew(self) -> bool:
        """Push the expiry one lease ahead, if still the owner; whether it was."""
        if self.tags().get(OWNER) != self.owner:
            self.lost = True
            return False
        expires = f"{time.time() + self.lease_s:.3f}"
        self.client.set_registered_model_tag(self.lock, EXPIRES, expires)
        return True


def _expires(tags: dict[str, str]) -> float:
    try:
        return float(tags[EXPIRES])
    except (KeyError, ValueError):
        return float("-inf")


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


def _take_over_if_expired(
    client: MlflowClient, lock: str, lease_s: float, bare_since: list[float]
) -> None:
    """Delete the lock when its lease has expired, naming the holder it removes. A lock
    without `owner` and `expires` tags (left by a crash, or being created right now) is
    taken over once this process has seen it bare for a whole lease (`bare_since` holds
    when it first saw it so)."""
    try:
        tags = dict(client.get_registered_model(lock).tags)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise
    if OWNER in tags and EXPIRES in tags:
        bare_since.clear()
        if _expires(tags) >= time.time():
            return
    else:
        bare_since[:] = bare_since or [time.monotonic()]
        if time.monotonic() - bare_since[0] < lease_s:
            return
    holder = tags.get(OWNER, "an unknown holder (no owner tag)")
    print(f"{lock}: lease of {holder} expired; taking it over", file=sys.stderr, flush=True)
    with contextlib.suppress(MlflowException):
        client.delete_registered_model(lock)


def _next_fence(client: MlflowClient, name: str, lock: str) -> int:
    try:
        current = int(client.get_registered_model(name).tags.get(FENCE_TAG, "0"))
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name)
        current = 0
    fence = current + 1
    client.set_registered_model_tag(name, FENCE_TAG, str(fence))
    client.set_registered_model_tag(lock, FENCE, str(fence))
    return fence


def acquire(
    client: MlflowClient, name: str, lease_s: float = LEASE_S, wait_s: float = WAIT_S
) -> Lease:
    """Take the promotion lease of `name`, waiting up to `wait_s` (`LockBusy` after)."""
    lock, owner = f"{name}{LOCK_SUFFIX}", new_owner()
    deadline = time.monotonic() + wait_s
    bare_since: list[float] = []
    while not _try_create(client, lock, owner, lease_s):
        _take_over_if_expired(client, lock, lease_s, bare_since)
        if time.monotonic() > deadline:
            raise LockBusy(
                f"--name {name}: {lock} has been held for over {wait_s:.0f} s by a live "
                "holder that keeps renewing it; wait for it, or stop that registration"
            )
        time.sleep(min(0.5, lease_s / 4))
    return Lease(client, lock, owner, _next_fence(client, name, lock), lease_s)


def release(lease: Lease) -> None:
    """Delete the lock if this holder still owns it (another's lock is left alone)."""
    with contextlib.suppress(MlflowException):
        if lease.tags().get(OWNER) == lease.owner:
            lease.client.delete_registered_model(lease.lock)


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
