"""Ray token authentication for the job client.

Ray (2.52+) protects the dashboard's job API with a static bearer token when the cluster
runs with `RAY_AUTH_MODE=token`; Ray 2.59+ turns it on by default for local clusters. The
token comes from, in Ray's own order: `RAY_AUTH_TOKEN`, the file named by
`RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token` (`ray get-auth-token` prints it).

Ray's job SDK only sends the token when the *client* also has `RAY_AUTH_MODE=token` set;
without it a protected cluster answers 401 and the user sees a bare "Authentication
required". This module finds the token itself and passes it as an `Authorization` header
(a public `JobSubmissionClient` argument), with one safety rule: the implicit default file
is only sent to a local cluster or when `RAY_AUTH_MODE=token` asks for it, so a local dev
token never travels to some other machine by accident. An explicitly set `RAY_AUTH_TOKEN`
or `RAY_AUTH_TOKEN_PATH` is always sent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TOKEN_DOCS = "https://docs.ray.io/en/latest/ray-security/token-auth.html"


class ClusterAuthError(InputError):
    """The cluster rejected the job client's credentials (or the token is unreadable)."""


@dataclass(frozen=True)
class AuthToken:
    """A Ray auth token and where it came from (shown in errors; the value never is)."""

    value: str
    source: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def default_token_path(home: Path | None = None) -> Path:
    return (home or Path.home()) / ".ray" / "auth_token"


def find_auth_token(
    local_cluster: bool, env: Mapping[str, str] | None = None, home: Path | None = None
) -> AuthToken | None:
    """The token to send to the cluster, or None.

    Args:
        local_cluster: the job server runs on this machine.
        env: environment to read (default: os.environ).
        home: home directory holding `.ray/auth_token` (default: the user's).

    Example:
        >>> find_auth_token(False, {"RAY_AUTH_TOKEN": "abc"}).source
        'RAY_AUTH_TOKEN'
    """
    env = os.environ if env is None else env
    mode = env.get(AUTH_MODE_ENV, "").strip().lower()
    if mode == "disabled":
        return None
    if env.get(TOKEN_ENV, "").strip():
        return AuthToken(env[TOKEN_ENV].strip(), TOKEN_ENV)
    if env.get(TOKEN_PATH_ENV):
        path = Path(env[TOKEN_PATH_ENV]).expanduser()
        # Ray treats an unreadable RAY_AUTH_TOKEN_PATH as fatal rather than falling back.
        try:
            value = path.read_text().strip()
        except OSError as err:
            raise ClusterAuthError(
                f"{TOKEN_PATH_ENV}={path}: cannot read the Ray auth token file ({err.strerror})"
            ) from None
        if not value:
            raise ClusterAuthError(f"{TOKEN_PATH_ENV}={path}: the Ray auth token file is empty")
        return AuthToken(value, f"{TOKEN_PATH_ENV}={path}")
    path = default_token_path(home)
    if (local_cluster or mode == "token") and path.is_file():
        value = path.read_text().strip()
        if value:
            return AuthToken(value, str(path))
    return None


def explain_auth_failure(
    address: str, status: int, token: AuthToken | None, env: Mapping[str, str] | None = None
) -> str:
    """A message telling the user how to fix a 401/403 from the cluster's job server."""
    env = os.environ if env is None else env
    if status == 401 or token is None:
        what = f"the Ray cluster at {address} requires token authentication and no token was sent"
        if env.get(AUTH_MODE_ENV, "").lower() == "disabled":
            what += f" ({AUTH_MODE_ENV}=disabled is set in this shell)"
        elif default_token_path().is_file():
            what += f" ({default_token_path()} is only sent to a local cluster or with {AUTH_MODE_ENV}=token)"
        what += "."
    else:
        what = f"the Ray cluster at {address} rejected the auth token from {token.source}."
    return (
        f"{what}\n"
        "Fix: get the cluster's token on the head node with `ray get-auth-token` (KubeRay: "
        "the `auth_token` key of the cluster's Secret), then either\n"
        f"  export {TOKEN_ENV}=<token>            # or\n"
        f"  export {TOKEN_PATH_ENV}=<file holding the token>\n"
        "and retry. `adatt submit` sends the token by itself; the `ray job` CLI also needs "
        f"`export {AUTH_MODE_ENV}=token`. See {TOKEN_DOCS}"
    )
