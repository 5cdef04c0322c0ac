"""A SIGKILLed driver leaves no Ray process behind: the watchdog ensure_ray starts stops them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import yaml

from flexi_workflows.ray_cluster import watch
from tests.conftest import REPO_ROOT
from tests.helpers import small_recipe_data


def test_watch_stops_what_the_driver_started_once_it_is_killed():
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    driver = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 20
        while not psutil.Process(driver.pid).children() and time.time() < deadline:
            time.sleep(0.1)
        (grandchild,) = psutil.Process(driver.pid).children()
        stopped = []
        watcher = threading.Thread(target=lambda: stopped.extend(watch(driver.pid, interval_s=0.1)))
        watcher.start()
        time.sleep(0.5)
        driver.kill()
        driver.wait()
        watcher.join(timeout=20)
        assert stopped == [grandchild.pid]
        assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
    finally:
        driver.kill()


@pytest.mark.slow
def test_a_driver_stopped_mid_training_leaves_no_ray_process_and_each_rerun_resumes(tmp_path, tiny_model_dir,
                                                                                     ray_local):
    """The fault drill, three runs of one recipe: `flexi run` Ctrl-C'd while training, rerun and SIGKILLed
    while training, rerun to the end. Neither stopped driver leaves a Ray process it started; each rerun
    resumes from the newest checkpoint (not an earlier one, not step 0); the Ctrl-C'd run says so in one
    line with exit 130 (Ray Train's own handler exited 0 silently); no MLflow run stays RUNNING.

    Each run's own local cluster runs beside another one (this test session's): Ray Train's
    PlacementGroupCleaner asks the state API for its controller with no address, and Ray, finding two
    clusters, raised "Found multiple active Ray instances", which ended the cleaner's watch with a
    traceback on the run's console. A run points its cluster's processes at its own dashboard."""
    import mlflow

    from flexi_workflows.stages.train import REPORT
    from flexi_workflows.training.loop import STATE_FILE

    # 96 steps of about 0.05 s: a stop takes a second or two to reach the worker, during which training goes on
    # (a run Ctrl-C'd once its step-8 checkpoint was seen had reached step 40 of 48 when it stopped, and the
    # rerun then finished before the second stop could come); a checkpoint every 8 steps, 12 in all, as before
    total = 96
    data = small_recipe_data(tmp_path, tiny_model_dir, method={"name": "lora", "rank": 4},
                             training={"epochs": 6, "checkpoint_every": 8}, evaluation={"include_base": False},
                             tracking={"enabled": True})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert ray_local.is_initialized()  # the other cluster
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    flexi = str(REPO_ROOT / ".venv" / "bin" / "flexi")

    def checkpoint_steps() -> list[int]:
        steps = []
        for state in out.glob(f"ray_results/*/checkpoint_*/{STATE_FILE}"):
            try:
                steps.append(json.loads(state.read_text())["step"])
            except (OSError, ValueError):
                pass  # being written
        return sorted(steps) or [0]

    def stop_mid_training(signum: int, after_step: int, run: int) -> int:
        """Start `flexi run`, stop it with `signum` once a checkpoint past `after_step` exists; check that
        nothing it started runs on; return the driver's exit status."""
        log = open(tmp_path / f"run{run}.err", "w")
        driver = subprocess.Popen([flexi, "run", str(path)], cwd=tmp_path, env=env,
                                  stdout=open(tmp_path / f"run{run}.out", "w"), stderr=log)
        try:
            deadline = time.time() + 300
            seen: dict[int, psutil.Process] = {}
            while time.time() < deadline and checkpoint_steps()[-1] <= after_step:
                for child in psutil.Process(driver.pid).children(recursive=True):
                    seen.setdefault(child.pid, child)
                time.sleep(0.1)
            assert checkpoint_steps()[-1] > after_step, f"run {run} wrote no checkpoint past step {after_step}"
            seen.update({c.pid: c for c in psutil.Process(driver.pid).children(recursive=True)})
            assert any(_name(p) == "raylet" for p in seen.values()), "the run started no local Ray cluster"
            os.kill(driver.pid, signum)
            driver.wait(timeout=120)
            deadline = time.time() + 30
            ray_processes = [p for p in seen.values() if "watch" not in " ".join(_cmdline(p))]
            while time.time() < deadline and [p for p in ray_processes if _alive(p)]:
                time.sleep(0.5)
            left = [f"{p.pid} {_name(p)}" for p in ray_processes if _alive(p)]
            assert not left, f"still running after run {run} was stopped: {left}"
        finally:
            driver.kill()
            log.close()
        return driver.returncode

    assert stop_mid_training(signal.SIGINT, 4, 1) == 130
    last = (tmp_path / "run1.err").read_text().strip().splitlines()[-1]
    assert last.startswith("flexi run: interrupted. Finished stages are kept in"), last
    first_stop = checkpoint_steps()[-1]

    assert stop_mid_training(signal.SIGKILL, first_stop + 8, 2) == -signal.SIGKILL
    steps_run2 = [int(line.split("step ")[1].split("/")[0]) for line in (tmp_path / "run2.out").read_text().splitlines()
                  if "[lora-4] step " in line]
    assert steps_run2 and steps_run2[0] == first_stop + 1, (first_stop, steps_run2[:3])  # resumed after Ctrl-C
    second_stop = checkpoint_steps()[-1]
    assert second_stop < total, "the second run had finished training before it was killed"

    rerun = subprocess.run([flexi, "run", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # a cluster of this machine alone: no preemption watcher actor (nor its core_worker.cc error line)
    console = rerun.stdout + rerun.stderr
    assert "PreemptionWatcher" not in console
    # beside the session's cluster, the group cleaner kept watching (no traceback from it)
    assert "PlacementGroupCleaner" not in console and "multiple active Ray instances" not in console, console[-4000:]
    report = json.loads(next(out.glob(f"train/*/{REPORT}")).read_text())
    assert report["resumed_from_step"] == second_stop, (report["resumed_from_step"], second_stop)  # after SIGKILL
    assert report["steps"] == report["total_steps"] == total
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    statuses = sorted(r.info.status for r in runs)
    # run 1 closed its own runs as KILLED; run 2's, left RUNNING by the SIGKILL, were closed by run 3
    assert "RUNNING" not in statuses and statuses.count("KILLED") >= 4, statuses


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(process: psutil.Process) -> str:
    """A seen child's name; "" for one gone since (a short-lived helper process of Ray's or DeepSpeed's)."""
    try:
        return process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


@pytest.mark.slow
def test_sigterm_stops_a_run_with_one_line_saying_what_is_kept(tmp_path, tiny_model_dir):
    import mlflow

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(small_recipe_data(tmp_path, tiny_model_dir, tracking={"enabled": True})))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([str(REPO_ROOT / ".venv" / "bin" / "flexi"), "run", str(path)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (tmp_path / "out" / "score").exists():  # Ray is up, work has started
            time.sleep(0.2)
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 128 + signal.SIGTERM, err[-2000:]
    # SIGTERM reached Python alone: Ray's C++ handler (absl's) would print this, and arm alarm(3), whose SIGALRM
    # aborted a run still stopping 3 s later (exit 134, seen once in a full test run)
    assert "SIGTERM received" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"flexi run: terminated. Finished stages are kept in {tmp_path / 'out'}; rerun the same")
    # stopped by its user, as Ctrl-C: the pipeline's run and the stopped stage's are KILLED, not FAILED or RUNNING
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert statuses["test"] == "KILLED" and set(statuses.values()) <= {"KILLED", "FINISHED"}, statuses


# `flexi main` with one command of the test's own: main()'s stop handling, around what the command does
_ONE_COMMAND = """
import argparse, os, signal, sys, threading, time
from flexi_workflows import cli

def build_parser():
    parser = argparse.ArgumentParser(prog="flexi")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("probe").set_defaults(func=probe)
    return parser

cli.build_parser = build_parser
"""


def _run_probe(body: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    script = _ONE_COMMAND + body + "\nsys.exit(cli.main(['probe']))\n"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT)
    return done, time.time() - started


@pytest.mark.slow
def test_sigterm_while_the_driver_waits_in_ray_get_ends_the_run_as_terminated():
    """Ray's ray.get turns a SystemExit raised by a signal handler into SystemExit(1): a run stopped while it
    waited for its actors (Ray Data's pool starting) exited 1 without a word. The CLI's own handler, which
    ensure_ray puts back after ray.init, raises KeyboardInterrupt, which ray.get passes on."""
    done, _ = _run_probe("""
def probe(args):
    import ray
    from flexi_workflows.ray_cluster import ensure_ray
    ensure_ray()

    @ray.remote(num_cpus=0)
    class Starting:
        def __init__(self):
            time.sleep(120)

        def ready(self):
            return 1

    actor = Starting.remote()
    threading.Timer(3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    ray.get(actor.ready.remote())
    return 0
""", timeout=240)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("flexi probe: terminated."), done.stderr[-2000:]


def test_a_sigterm_whose_handler_ran_inside_a_finalizer_still_stops_the_run():
    """Python drops an exception raised in a __del__ (Ray's object references have finalizers) after printing
    it; the stop is delivered to the main thread again instead of being lost while the run goes on."""
    done, seconds = _run_probe("""
class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        until = time.time() + 0.5
        while time.time() < until:  # the handler runs here, inside __del__
            pass

def probe(args):
    Finalized()  # collected at once: its __del__ runs
    until = time.time() + 60
    while time.time() < until:
        sum(range(1000))
    return 0
""", timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert seconds < 30, "the run went on after its SIGTERM"
    assert done.stderr.strip().splitlines()[-1].startswith("flexi probe: terminated."), done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_the_local_cluster_a_run_starts_listens_on_127_0_0_1_only(tmp_path):
    """Every TCP socket the driver's Ray processes listen on is a loopback one (Ray's default on Linux is
    every interface). Token authentication stays on; only Ray's notice saying so is left off the console."""
    script = (
        "import json, os, psutil, ray\n"
        "from flexi_workflows.ray_cluster import ensure_ray\n"
        "ensure_ray()\n"
        "ray.get([ray.remote(lambda: 1).remote() for _ in range(2)])\n"
        "me = psutil.Process()\n"
        "out = []\n"
        "for p in [me, *me.children(recursive=True)]:\n"
        "    try:\n"
        "        out += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections('inet') if c.status == 'LISTEN']\n"
        "    except psutil.Error:\n"
        "        pass\n"
        "print(json.dumps(out))\n"
        "print(os.environ.get('RAY_AUTH_MODE'))\n"
        "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    done = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "python"), "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "token", "Ray's default token authentication is on"
    assert "Token authentication is enabled" not in done.stderr
    listening = json.loads(done.stdout.strip().splitlines()[-2])
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the servers that listened on every interface before
    exposed = [entry for entry in listening if entry[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"listening beyond the loopback interface: {exposed}"
