"""Paths and URIs of storage: what Ray reports within a filesystem, given back as a URI."""

from __future__ import annotations

from pipeline.data.files import as_uri, join


def test_ray_paths_within_object_storage_get_their_scheme_back() -> None:
    # Ray reports s3:// checkpoints as `bucket/key`: without the scheme nothing can open them.
    assert as_uri("bucket/runs/r/checkpoint_1", "s3://bucket/runs") == (
        "s3://bucket/runs/r/checkpoint_1"
    )
    assert as_uri("gs://b/runs/c", "gs://b/runs") == "gs://b/runs/c"  # already a URI
    assert as_uri("/tmp/runs/r/c", "/tmp/runs") == "/tmp/runs/r/c"  # local: unchanged
    assert join("s3://bucket/runs/", "/r/", "c") == "s3://bucket/runs/r/c"
