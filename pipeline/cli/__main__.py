"""`python -m pipeline.cli`: the `adatt` command where no console script is installed (a Ray
job's working directory)."""

from pipeline.cli import app

app()
