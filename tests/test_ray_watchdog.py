"""A SIGKILLed driver leaves no Ray process behind: the watchdog ensure_ray starts stops them."""

from __future__ import annotations

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
def test_a_sigkilled_flexi_run_leaves_no_ray_process(tmp_path, tiny_model_dir):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(small_recipe_data(tmp_path, tiny_model_dir)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([str(REPO_ROOT / ".venv" / "bin" / "flexi"), "run", str(path)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        seen: dict[int, psutil.Process] = {}
        while time.time() < deadline:  # until the local cluster's raylet is up, and a little longer
            for child in psutil.Process(driver.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
            if any(p.name() == "raylet" for p in seen.values() if p.is_running()):
                break
            time.sleep(0.2)
        assert any(p.name() == "raylet" for p in seen.values()), "the run started no local Ray cluster"
        time.sleep(3)
        seen.update({c.pid: c for c in psutil.Process(driver.pid).children(recursive=True)})
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 30
        ray_processes = [p for p in seen.values() if "watch" not in " ".join(_cmdline(p))]
        while time.time() < deadline and [p for p in ray_processes if _alive(p)]:
            time.sleep(0.5)
        left = [f"{p.pid} {p.name()}" for p in ray_processes if _alive(p)]
        assert not left, f"still running after the driver was killed: {left}"
    finally:
        driver.kill()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


@pytest.mark.slow
def test_sigterm_stops_a_run_with_one_line_saying_what_is_kept(tmp_path, tiny_model_dir):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(small_recipe_data(tmp_path, tiny_model_dir)))
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
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"flexi run: terminated. Finished stages are kept in {tmp_path / 'out'}; rerun the same")
