"""Removing the placement groups of Ray Train runs whose controller died without removing them.

A Ray Train run (V2) reserves its workers' resources in a placement group that its TrainController
actor creates. A group created by an actor is not removed when that actor dies, only when its job
ends too, so Ray Train pairs every controller with a detached PlacementGroupCleaner that removes the
group if the controller dies. In Ray 2.60 the abort path stops that cleaner first
(`before_controller_abort`) and removes the group after (`worker_group.abort()`); a controller that
dies between the two leaves its group behind with no one watching it (the race named in a review of
ray-project/ray PR #65447). A Tune trial stopped by ASHA is aborted, and its controller is killed with
the trial's actor, so under load a sweep can lose a trial's CPUs or GPUs until the driver exits: on a
small cluster, enough to keep the next trial from ever being scheduled.

    GCS placement-group table ──► not removed, not detached, created by this job
        ──► creator actor dead (GCS records it) and of class TrainController ──► remove_placement_group

Only groups whose creator is dead are touched, so a starting or running trial's group, another job's
groups and other libraries' groups are left alone. GCS is read directly (the tables `ray list` reads
through the dashboard), because the dashboard's state API is the part that is slow under load.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)

TRAIN_CONTROLLER = "TrainController"


def _gcs():
    """Ray's own GCS table reader (the one behind `ray.util.placement_group_table`) and its protobufs."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    return state, gcs_pb2


def train_groups(job_id: str | None = None) -> list[dict]:
    """This job's placement groups that are not removed and were created by a Ray Train controller.

    Each is {"id", "state", "controller", "controller_dead"}; `job_id` defaults to the current job.
    """
    import ray

    state, gcs_pb2 = _gcs()
    job_id = job_id or ray.get_runtime_context().get_job_id()
    removed = gcs_pb2.PlacementGroupTableData.REMOVED
    groups = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if group.state == removed or group.is_detached or group.creator_job_id.hex() != job_id:
            continue
        creator = group.creator_actor_id.hex()
        if not group.creator_actor_id or state.actor_table(creator).get("ActorClassName") != TRAIN_CONTROLLER:
            continue
        groups.append({"id": group.placement_group_id.hex(),
                       "state": gcs_pb2.PlacementGroupTableData.PlacementGroupState.Name(group.state),
                       "controller": creator, "controller_dead": group.creator_actor_dead})
    return groups


def live_train_controllers(job_id: str | None = None) -> list[str]:
    """The ids of this job's Ray Train controllers that GCS does not record dead (starting, alive, restarting)."""
    import ray

    state, _ = _gcs()
    job_id = job_id or ray.get_runtime_context().get_job_id()
    table = state.actor_table(None, job_id=ray.JobID(bytes.fromhex(job_id)))
    return [actor for actor, row in table.items()
            if row.get("ActorClassName") == TRAIN_CONTROLLER and row.get("State") != "DEAD"]


def remove_orphaned_train_groups(job_id: str | None = None) -> list[str]:
    """Removes this job's Ray Train placement groups whose controller is dead; returns their ids."""
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = []
    for group in train_groups(job_id):
        if group["controller_dead"]:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group["id"]))))
            logger.info("removed placement group %s left by dead Ray Train controller %s",
                        group["id"], group["controller"])
            removed.append(group["id"])
    return removed


class OrphanedTrainGroupReaper:
    """Calls `remove_orphaned_train_groups` every `interval_s` on a daemon thread until stopped.

    `stop(drain_s)` then waits up to `drain_s` for this job's remaining Ray Train groups to go: when
    the work it guarded is over (a sweep's trials all ended), a group still there belongs to a
    controller that is dying, and is removed once GCS records it dead.
    """

    def __init__(self, interval_s: float = 2.0) -> None:
        import ray

        self.interval_s = interval_s
        self.removed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="flexi-train-group-reaper", daemon=True)
        self._failed = self._warned = False
        try:
            self.job_id = ray.get_runtime_context().get_job_id()
        except Exception as error:  # noqa: BLE001 — e.g. a Ray Client driver, which cannot read GCS tables
            logger.warning("not watching for placement groups left by dead Ray Train controllers: %r", error)
            self.job_id, self._failed = None, True

    def start(self) -> OrphanedTrainGroupReaper:
        self._thread.start()
        return self

    def reap(self) -> list[dict]:
        """One pass: removes what dead controllers left; returns this job's Ray Train groups still there."""
        if self._failed:
            return []
        try:
            self.removed += remove_orphaned_train_groups(self.job_id)
            return train_groups(self.job_id)
        except Exception as error:  # noqa: BLE001 — a cleanup aid must never fail the sweep it guards
            (logger.debug if self._warned else logger.warning)(
                "could not check for placement groups left by dead Ray Train controllers: %r", error)
            self._warned = True
            # a private table reader that changed shape will not recover; GCS briefly unreachable will
            self._failed = isinstance(error, (AttributeError, ImportError, TypeError))
            return []

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.reap()

    def live_controllers(self) -> list[str]:
        """This job's Ray Train controllers not yet recorded dead ([] where the tables cannot be read)."""
        if self._failed:
            return []
        try:
            return live_train_controllers(self.job_id)
        except Exception as error:  # noqa: BLE001 — as in reap()
            logger.debug("could not list Ray Train controllers: %r", error)
            return []

    def stop(self, drain_s: float = 30.0) -> list[str]:
        """Stops the thread, then removes what dead controllers left, waiting up to `drain_s` until this
        job has no Ray Train group and no live controller; returns every group id removed.

        A live controller counts even between two worker groups: a stopped trial's controller may still
        be tearing down or restarting its workers, and the group it makes next must not outlive it
        unseen. What outlives the wait is left (logged)."""
        self._stop.set()
        self._thread.join()
        deadline = time.monotonic() + drain_s
        while True:
            left, alive = self.reap(), self.live_controllers()
            if not (left or alive) or time.monotonic() >= deadline:
                break
            time.sleep(min(self.interval_s, 1.0))
        if left or alive:
            logger.warning("after %.0f s, Ray Train placement groups still reserved: %s; Ray Train controllers "
                           "still alive: %s", drain_s, [g["id"] for g in left], alive)
        return self.removed


@contextlib.contextmanager
def reaping_orphaned_train_groups(interval_s: float = 2.0, drain_s: float = 30.0) -> Iterator[OrphanedTrainGroupReaper]:
    """`with reaping_orphaned_train_groups() as reaper: tuner.fit()`; `reaper.removed` lists what went."""
    reaper = OrphanedTrainGroupReaper(interval_s).start()
    try:
        yield reaper
    except BaseException:
        reaper.stop(0.0)  # interrupted or failed: one last pass, no waiting
        raise
    reaper.stop(drain_s)
