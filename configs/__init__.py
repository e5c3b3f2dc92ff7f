"""The default configs, shipped with the package so that `adatt demo` runs from any install."""

from importlib.resources import files
from pathlib import Path


def path(name: str) -> Path:
    """The installed path of a default config, e.g. `path("synthetic.yaml")`."""
    found = Path(str(files(__name__) / name))
    if not found.is_file():
        raise FileNotFoundError(f"{found}: no such default config")
    return found
