"""A Ray Train run's placement group left behind by a dead controller is found and removed.

The leak is reproduced as Ray 2.60's abort race leaves it (flexi_workflows/placement_groups.py): a
real TorchTrainer run, launched on a thread of an actor as a Tune trial launches it, has its
PlacementGroupCleaner stopped (here: its process killed) and then its controller killed with the actor
that owns it (`ray.kill`, as Tune stops a trial). The group then stays reserved; the reaper removes it,
and leaves a live run's group, the driver's own group and a dead actor of another class's group alone.

The run is not a task ended with `ray.cancel`: that interrupts the task's main thread first, where
`fit()` registered a SIGINT handler that aborts the run gracefully, and the group goes with it (seen in
CI: the controller's group was REMOVED before the controller died, so there was no leak to reap).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from flexi_workflows.placement_groups import (
    live_train_controllers,
    reaping_orphaned_train_groups,
    remove_orphaned_train_groups,
    train_groups,
)

pytestmark = pytest.mark.slow


def _wait_for(predicate, what: str, within: float = 120.0, every: float = 0.5):
    deadline = time.time() + within
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {within:.0f} s waiting for {what}")


def _alive_actor_pid(class_name: str) -> int:
    """The process of the one live actor of that class (waiting for it to start)."""
    from ray._private.state import state

    def pids():
        rows = state.actor_table(None).values()
        return [r["Pid"] for r in rows if r.get("ActorClassName") == class_name and r.get("State") == "ALIVE"]

    found = _wait_for(pids, f"a live {class_name}")
    assert len(found) == 1, f"expected one live {class_name}, found {len(found)}"
    return found[0]


def test_a_dead_controllers_group_is_removed_and_a_live_ones_is_kept(ray_local, tmp_path):
    ray = ray_local
    release = tmp_path / "release"

    def train_loop(config):
        deadline = time.time() + 180
        while not os.path.exists(config["release"]) and time.time() < deadline:
            time.sleep(0.2)

    @ray.remote(num_cpus=0)
    class Trial:  # as Tune's function trainable: fit() on a thread, so no SIGINT handler is registered
        def start(self):
            self.thread = threading.Thread(target=self.fit, daemon=True)
            self.thread.start()

        def fit(self):
            from ray.train import RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            TorchTrainer(train_loop, train_loop_config={"release": str(release)},
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name="orphan", storage_path=str(tmp_path / "runs"))).fit()

        def join(self):
            self.thread.join()

    @ray.remote(num_cpus=0)
    class Other:  # an actor of another kind that leaves its placement group behind when it dies
        def reserve(self):
            from ray.util.placement_group import placement_group

            group = placement_group([{"memory": 1 << 20}])
            ray.get(group.ready())
            return group.id.hex()

    assert train_groups() == [], "another test left a Ray Train group reserved"
    own = placement_group([{"memory": 1 << 20}])  # the driver's own: not a Ray Train group
    other = Other.remote()
    other_group = ray.get(other.reserve.remote())
    ray.kill(other)
    run = Trial.remote()
    ray.get(run.start.remote())
    try:
        group = _wait_for(lambda: [g for g in train_groups() if g["state"] == "CREATED"], "the run's placement group")
        assert len(group) == 1 and not group[0]["controller_dead"]
        group = group[0]
        _wait_for(lambda: ray.available_resources().get("CPU", 0) <= 1, "the worker's CPU to be reserved")
        assert remove_orphaned_train_groups() == [], "a live controller's group was removed"
        assert live_train_controllers() == [group["controller"]]

        # the abort race's end state: the cleaner already gone, then the controller dies with its owner,
        # as a stopped Tune trial's controller dies with the trial's actor
        os.kill(_alive_actor_pid("PlacementGroupCleaner"), signal.SIGKILL)
        ray.kill(run)
        _wait_for(lambda: [g for g in train_groups() if g["id"] == group["id"] and g["controller_dead"]],
                  "GCS to record the controller dead")
        time.sleep(5)
        assert [g["id"] for g in train_groups()] == [group["id"]], "the group should be left behind (the leak)"
        assert live_train_controllers() == []
        assert ray.available_resources().get("CPU", 0) <= 1, "nothing should have released the worker's CPU"

        with reaping_orphaned_train_groups(interval_s=0.5) as reaper:
            _wait_for(lambda: reaper.removed, "the reaper to remove the group", within=30)
        assert reaper.removed == [group["id"]]
        assert train_groups() == []
        assert placement_group_table(own)["state"] == "CREATED", "the driver's own group was removed"
        others = {g["placement_group_id"]: g["state"] for g in placement_group_table().values()}
        assert others[other_group] == "CREATED", "a dead actor of another class had its group removed"
        _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, "the CPU to come back", within=30)
    finally:
        remove_placement_group(own)
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(other_group))))
        release.touch()
        with contextlib.suppress(ray.exceptions.RayError):  # killed (unless the test failed before)
            ray.get(run.join.remote(), timeout=60)
        ray.kill(run)


ANOTHER_JOB = """
import sys, ray
from ray.util.placement_group import placement_group

ray.init(address=sys.argv[1], log_to_driver=False)


@ray.remote(num_cpus=0)
class TrainController:  # the class name is what the reaper looks at; this one stands in for Ray Train's
    def reserve(self):
        group = placement_group([{"memory": 1 << 20}])
        ray.get(group.ready())
        return group.id.hex()


controller = TrainController.remote()
print(ray.get_runtime_context().get_job_id(), ray.get(controller.reserve.remote()), flush=True)
ray.kill(controller)
sys.stdin.read()  # the job, and with it the group, lives until the test closes stdin
"""


def test_another_jobs_group_is_left_alone(ray_local):
    """A dead TrainController's group belongs to the job that created it: a sweep's reaper never removes
    another driver's groups, even one that would be an orphan in its own job."""
    ray = ray_local
    other = subprocess.Popen([sys.executable, "-c", ANOTHER_JOB, ray.get_runtime_context().gcs_address],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        job, group = other.stdout.readline().split()
        assert job != ray.get_runtime_context().get_job_id()
        _wait_for(lambda: [g for g in train_groups(job) if g["id"] == group and g["controller_dead"]],
                  "GCS to record the other job's controller dead")
        assert remove_orphaned_train_groups() == [] and train_groups() == []
        with reaping_orphaned_train_groups(interval_s=0.2) as reaper:
            time.sleep(1)
        assert reaper.removed == []
        assert placement_group_table(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))["state"] == "CREATED"
        assert remove_orphaned_train_groups(job) == [group], "in its own job it is an orphan"
    finally:
        other.stdin.close()
        other.wait(timeout=60)


class TrainController:
    """Stands in for Ray Train's (the reaper goes by the class's qualified name): a live controller that holds no
    group, as one does between two worker groups."""

    def ping(self):
        return True


def test_the_drain_waits_for_a_live_controller_then_warns(ray_local, caplog):
    """`stop(drain_s)` ends only when the job has no Ray Train group *and* no live controller: a stopped trial's
    controller between two worker groups may still make one. It returns as soon as the controller dies, and
    names one that outlives the wait."""
    ray = ray_local

    def live(controller) -> bool:
        return controller._actor_id.hex() in live_train_controllers()

    caplog.set_level("WARNING", logger="flexi_workflows.placement_groups")
    lingering = ray.remote(num_cpus=0)(TrainController).remote()
    ray.get(lingering.ping.remote())
    try:
        started = time.monotonic()
        with reaping_orphaned_train_groups(interval_s=0.2, drain_s=3.0):
            pass
        assert time.monotonic() - started >= 3.0, "the drain ended while a controller was alive"
        assert f"still alive: ['{lingering._actor_id.hex()}']" in caplog.text

        caplog.clear()
        threading.Timer(1.0, ray.kill, args=(lingering,)).start()  # it dies a second into the drain
        started = time.monotonic()
        with reaping_orphaned_train_groups(interval_s=0.2, drain_s=30.0):
            pass
        waited = time.monotonic() - started
        assert 1.0 <= waited < 15.0, f"the drain took {waited:.1f} s for a controller that died after 1 s"
        assert "still alive" not in caplog.text
    finally:
        ray.kill(lingering)
        _wait_for(lambda: not live(lingering), "the stand-in controller to be recorded dead", within=30)
