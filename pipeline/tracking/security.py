"""Keep credentials out of what a run records.

Every config field becomes an MLflow param, and the config is logged as an artifact and
stored in each checkpoint. A credential written into a URI field (`s3://KEY:SECRET@bucket`,
`http://user:password@mlflow`, `...?sig=...`) would therefore be copied to places anyone
with read access to the experiment can see, so such URIs are refused before anything is
written. Credentials belong in the environment (AWS_*, MLFLOW_TRACKING_TOKEN, ...), which
is never logged.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pipeline.config import Config
from pipeline.errors import ConfigError

# Query parameters that carry a secret in common storage and tracking URIs (pyarrow S3
# `access_key`/`secret_key`, Azure SAS `sig`, presigned URLs, tokens).
_SECRET_QUERY = re.compile(
    r"(secret|token|password|passwd|access_key|accesskey|credential|signature|^sig$)", re.I
)

_HINTS = {
    "tracking.tracking_uri": "use MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or "
    "MLFLOW_TRACKING_TOKEN",
    "train.storage_path": "use the cloud SDK's environment (AWS_ACCESS_KEY_ID, ...) or an "
    "instance role",
    "data.path": "use the cloud SDK's environment (AWS_ACCESS_KEY_ID, ...) or an instance role",
}


def has_credentials(uri: str) -> bool:
    """True when `uri` carries a user/password or a secret query parameter.

    Example:
        >>> has_credentials("s3://AKIA:abc@bucket/logs"), has_credentials("s3://bucket/logs")
        (True, False)
    """
    if "://" not in uri:
        return False
    try:
        parts = urlsplit(uri)
        userinfo = parts.password is not None or (parts.username or "") != ""
    except ValueError:  # a malformed netloc: do not guess, the filesystem will complain
        return False
    query = parse_qsl(parts.query, keep_blank_values=True)
    return userinfo or any(_SECRET_QUERY.search(key) for key, _ in query)


def check_no_credentials(config: Config) -> None:
    """Raise ConfigError, naming the field, if a URI in the config holds credentials."""
    paths = [config.data.path] if isinstance(config.data.path, str) else config.data.path
    fields = [("data.path", p) for p in paths]
    fields.append(("train.storage_path", config.train.storage_path))
    if config.tracking.tracking_uri:
        fields.append(("tracking.tracking_uri", config.tracking.tracking_uri))
    for name, value in fields:
        if has_credentials(value):
            raise ConfigError(
                f"{name}: the URI holds credentials, which would be logged with the run's "
                f"params; remove them and {_HINTS[name]}"
            )


def redact(uri: str) -> str:
    """`uri` with any user, password and secret query value replaced by `***`, for printing
    and logging (a URI given by the environment may carry them).

    Example:
        >>> redact("https://alice:s3cret@mlflow.example.com/?token=abc&x=1")
        'https://***:***@mlflow.example.com/?token=***&x=1'
    """
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
    except ValueError:
        return uri
    netloc = parts.netloc
    if parts.username is not None or parts.password is not None:
        user = "***" if parts.username else ""
        password = ":***" if parts.password is not None else ""
        port = f":{parts.port}" if parts.port else ""
        netloc = f"{user}{password}@{host}{port}"
    query = "&".join(
        f"{k}={'***' if _SECRET_QUERY.search(k) else v}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_text(text: str) -> str:
    """`text` with every URI in it redacted (`redact`): for messages and log lines that
    quote a URI, e.g. an error from the tracking server.

    Example:
        >>> redact_text("error: MLflow server http://bob:pw@host:5000 is unreachable")
        'error: MLflow server http://***:***@host:5000 is unreachable'
    """
    return _URI.sub(lambda match: redact(match.group(0)), text)
