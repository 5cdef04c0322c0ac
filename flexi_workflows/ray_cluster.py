"""Starting or joining Ray the same way from the CLI, from `ray job submit` and from tests."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from flexi_workflows.recipes.schema import RayConfig

log = logging.getLogger(__name__)

# Variables Ray workers need: they are separate processes that import the project.
_WORKER_ENV = ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
               "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_DATA_LOGGING_CONFIG", "MLFLOW_LOGGING_LEVEL",
               "PYTHONWARNINGS",
               "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION", "FLEXI_STORAGE_CACHE")


RAY_DATA_LOGGING = Path(__file__).parent / "assets" / "ray_data_logging.yaml"


def quiet_console() -> None:
    """Ray's and the libraries' routine INFO lines stay in their log files; the console keeps the project's
    own progress lines and the warnings a user can act on. Set before Ray Data is imported (it reads its
    logging config then); workers get the same through the job's environment (_WORKER_ENV). A user's own
    settings of these variables win."""
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its INFO: "Started monitoring system metrics", ...
    # a deprecation inside Ray Data's own DatasetManager, printed by every training run
    os.environ.setdefault("PYTHONWARNINGS", "ignore:`ExecutionOptions.exclude_resources` is deprecated")


def ensure_ray(config: RayConfig | None = None) -> None:
    """Join the cluster named by `ray.address` (or RAY_ADDRESS, as under `ray job submit`), else start
    a local one. Already connected (e.g. a test's local cluster): nothing to do."""
    import ray

    # Ray Train reads these in the driver at each fit() and passes them to its controller and workers, so
    # they are set also when the cluster was joined before (a notebook's or a test's own ray.init).
    # It polls workers every 2 s by default, which makes every report, and the end of every run, cost ~2 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    # Ray Train sends a worker's print() to its logger (stderr) and also to stdout: every progress line
    # reached the console twice. Off, a print is forwarded once, as Ray forwards any worker's output.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    own_handler = _sigterm_handler_set_from_python()  # the CLI's: ray.init replaces it
    quiet_console()
    config = config or RayConfig()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env_vars = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    # no progress bars in workers and actors: transformers' "Loading weights" bar in every one of them (the
    # driver's own bars, e.g. a hub download, stay)
    env_vars.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1"))
    kwargs = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": True}
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # with its dashboard: Ray Train's PlacementGroupCleaner asks the state API (served by the
        # dashboard) whether a controller died — a sweep trial stopped by its scheduler, a killed
        # driver — and without it the dead run's placement group keeps its CPUs forever
        # include_dashboard=None: Ray starts its dashboard (bound to 127.0.0.1) when ray[default] is installed, as
        # the project installs it, and runs without one on a minimal Ray (an image's own packages) instead of failing
        start_watchdog()  # first: a driver killed while ray.init starts the cluster leaves nothing either
        loopback_only()
        # this machine alone: no node of it can be drained (preempted), so Ray Train's preemption watcher,
        # one more actor per training run, has nothing to watch (and it printed a core_worker.cc error line
        # about its constructor arguments on every run). A cluster joined by address keeps it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # the state API the cleaner asks is found by address: in a Ray worker, with none given, Ray looks for
        # *a* cluster on the machine. With another local cluster running (a second `flexi run`, a notebook's)
        # that raised "Found multiple active Ray instances" and ended the cleaner's watch with a traceback on
        # the console; next to a `ray start` head it would ask that cluster, not find the controller, and
        # remove a live run's group. So the dashboard gets a port chosen here, and every process of the
        # cluster (they inherit this environment) is pointed at it (an inherited value names another cluster).
        # A port picked free can be taken before the dashboard binds it; Ray then starts without a dashboard
        # (one logged error) and the cleaner has no state API to ask, so the cluster is started again on
        # another port. A minimal Ray (no dashboard packages) runs without one, as Ray decides.
        dashboard_expected = _dashboard_installed()
        for attempt in range(3):
            dashboard_port = _free_port()
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
            with _token_auth_notice_dropped():
                context = ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=None,
                                   dashboard_host="127.0.0.1", dashboard_port=dashboard_port, **kwargs)
            if context.dashboard_url or not dashboard_expected or attempt == 2:
                break
            log.warning("Ray's dashboard could not take port %d; starting the local cluster again on another",
                        dashboard_port)
            ray.shutdown()
    sigterm_to_python_alone(own_handler)


def _dashboard_installed() -> bool:
    from ray._private.utils import get_dashboard_dependency_error

    return get_dashboard_dependency_error() is None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sigterm_handler_set_from_python():
    """The process's SIGTERM handler if one was set from Python (a function), else None."""
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    return handler if callable(handler) else None


def sigterm_to_python_alone(own_handler=None) -> None:
    """Take SIGTERM back from the handler Ray's core worker installs at ray.init (absl's failure-signal
    handler). That handler prints a stack trace, passes the signal on to Python's handler and arms
    alarm(3), whose SIGALRM aborts the process: a driver that needs more than 3 s to stop cleanly after
    SIGTERM (stop Ray, close its MLflow runs) died of SIGABRT, exit 134, with none of it done. Registering
    a Python handler again puts Python's C-level handler back in place for SIGTERM alone; the crash
    handlers for SIGSEGV, SIGABRT, ... stay.

    The handler registered is `own_handler`, the one the process had before ray.init (the CLI's), which
    ray.init replaced with its sys.exit(SIGTERM); else that one of Ray's."""
    import signal
    import threading

    handler = own_handler or signal.getsignal(signal.SIGTERM)  # None: not set from Python, nothing to put back
    if handler is not None and threading.current_thread() is threading.main_thread():  # main thread only
        signal.signal(signal.SIGTERM, handler)


class _DropTokenAuthNotice:
    """Ray 2.60 warns on every new local cluster that token authentication is on, suggesting
    RAY_AUTH_MODE=disabled to opt out. For the loopback-only cluster a run starts for itself that is the
    safe default and nothing to act on, so the line is left out of the console (every other warning of
    that logger stays). Setting RAY_AUTH_MODE=token instead would silence it too, but Ray caches its
    config at import and then fails to start the cluster."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


@contextmanager
def _token_auth_notice_dropped():
    import logging

    auth_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = _DropTokenAuthNotice()
    auth_logger.addFilter(notice)
    try:
        yield
    finally:
        auth_logger.removeFilter(notice)


# Ray's switch for one-machine clusters (its default on macOS and Windows): the node's address is the loopback one
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> None:
    """A cluster this process starts for itself listens on 127.0.0.1 only.

    On Linux Ray takes the node's address from its route to the internet and its GCS, raylet, agents and
    workers listen on every interface (Ray 2.60; `_node_ip_address="127.0.0.1"` is turned back into the
    routable address). With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 — how Ray runs on a laptop — the node's
    address is 127.0.0.1 and every server binds it; no other machine can join, which a cluster started
    for one run never needs. Set in the environment for the processes Ray starts, and in Ray's constant,
    which it read when this process imported it."""
    from ray._private import ray_constants

    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def start_watchdog() -> None:
    """A process that outlives this driver only to stop the local Ray cluster it started.

    `ray.shutdown()` (at exit, on Ctrl-C) stops the cluster; a SIGKILLed driver runs no exit code, and
    its raylet, GCS, dashboard and agents would run on, listening, holding CPUs and memory. The watchdog
    (its own session, so a Ctrl-C to the driver's terminal does not reach it) notes the driver's
    descendants every second and, once the driver is gone, stops the ones still running."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, "-m", "flexi_workflows.ray_cluster", "--watch", str(os.getpid())],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True)


def watch(driver_pid: int, interval_s: float = 1.0) -> list[int]:
    """Wait for `driver_pid` to end, then stop its descendants seen meanwhile (TERM, then KILL after 5 s);
    returns the pids it stopped. psutil.Process objects remember each process's start time, so a pid
    reused by an unrelated process is never signalled."""
    import time

    import psutil

    me = os.getpid()
    known: dict[int, psutil.Process] = {}
    try:
        driver = psutil.Process(driver_pid)
        while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
            for child in driver.children(recursive=True):
                if child.pid != me:
                    known.setdefault(child.pid, child)
            time.sleep(interval_s)
    except psutil.NoSuchProcess:
        pass
    left = [p for p in known.values() if p.is_running()]
    for process in left:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in left]


def joined_nodes(config: RayConfig | None = None) -> list[str]:
    """The alive nodes of the cluster a run joins (connecting if an address is given); [] when the run
    would start its own one-machine cluster."""
    import ray

    config = config or RayConfig()
    if not ray.is_initialized():
        if not (config.address or os.environ.get("RAY_ADDRESS")):
            return []
        ensure_ray(config)
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


def check_multi_node(config: RayConfig, storage, tracking_uri: str | None) -> None:
    """On a cluster of several nodes, what every worker and actor reads or writes must be reachable from
    all of them: refused before any work when it is not, naming the fix."""
    from flexi_workflows.errors import ConfigError

    nodes = joined_nodes(config)
    if len(nodes) < 2:
        return
    if tracking_uri and tracking_uri.startswith(("sqlite:", "file:")):
        raise ConfigError(
            f"tracking.tracking_uri: {tracking_uri} is a store on this machine's disk, but this cluster has "
            f"{len(nodes)} nodes and training workers on the others log there too; start an MLflow tracking "
            f"server every node can reach (e.g. `mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri "
            f"sqlite:///mlflow.db` on the head, or your team's server) and set tracking.tracking_uri=http://HOST:5000")
    if not storage.remote:
        missing = nodes_missing(storage, nodes)
        if missing:
            raise ConfigError(
                f"storage: {storage.display()} (output_dir, as `storage` is not set) is not visible from "
                f"{len(missing)} of the cluster's {len(nodes)} nodes ({', '.join(n[:12] for n in missing)}); workers "
                f"there write checkpoints and read adapters from it. Set storage=s3://BUCKET/PREFIX (any pyarrow "
                f"filesystem URI) or a folder every node mounts")


def nodes_missing(storage, nodes: list[str]) -> list[str]:
    """The nodes on which a probe file written here under `storage` cannot be read back."""
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    rel = f".flexi-probe-{token}"
    storage.write_bytes(rel, token.encode())
    path = str(storage.local / rel)

    @ray.remote(num_cpus=0)
    def sees(p: str, expected: str) -> bool:
        try:
            with open(p) as handle:
                return handle.read() == expected
        except OSError:
            return False

    try:
        found = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(path, token)
                         for n in nodes], timeout=120)
    finally:
        storage.delete(rel)
    return [n for n, ok in zip(nodes, found) if not ok]



def whole_actor_pools(dataset, seconds: int = 600):
    """The dataset, set so that its actor pools wait until all their actors are up before taking work.

    Ray Data starts an actor pool's work as soon as its first actor is up, so on a busy or multi-node
    cluster `num_actors: 4` can quietly run on one actor (the others are still being placed when the
    data runs out). A pool that cannot be placed within `seconds` (CPUs or GPUs the cluster does not
    have) fails with Ray's error instead of waiting forever."""
    dataset.context.wait_for_min_actors_s = seconds
    return dataset


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--watch"] and len(sys.argv) == 3:
        watch(int(sys.argv[2]))
