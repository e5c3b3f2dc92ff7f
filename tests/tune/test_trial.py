"""Trial plumbing that needs Ray but no training: the orphaned placement-group cleanup."""

from __future__ import annotations

import time

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from tune.trial import remove_orphaned_placement_groups


@ray.remote(num_cpus=0)
class GroupMaker:
    """Stands in for a Ray Train controller: creates its workers' placement group."""

    def make(self) -> str:
        group = placement_group([{"CPU": 0.1}])
        ray.get(group.ready())
        return group.id.hex()


def _state(group_id: str) -> str:
    return ray.util.placement_group_table()[group_id]["state"]


@pytest.mark.timeout(120)
def test_only_groups_of_dead_actors_are_removed(ray_cluster) -> None:
    driver_group = placement_group([{"CPU": 0.1}])
    ray.get(driver_group.ready())
    maker = GroupMaker.remote()
    actor_group = ray.get(maker.make.remote())
    try:
        assert remove_orphaned_placement_groups() == 0  # creator alive: a running trial
        ray.kill(maker)
        deadline = time.monotonic() + 30
        while _state(actor_group) != "REMOVED" and time.monotonic() < deadline:
            remove_orphaned_placement_groups()
            time.sleep(0.5)
        assert _state(actor_group) == "REMOVED"
        # A driver's group (like Tune's per-trial groups) is never touched.
        assert _state(driver_group.id.hex()) == "CREATED"
    finally:
        remove_placement_group(driver_group)
