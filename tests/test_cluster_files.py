"""cluster/ files parse and agree with the project: Ray's own schemas, the recipes their jobs run (which must
load, fit the cluster's resources and find their data), the pinned Ray, the image, the commands, and no
dashboard or server open on every interface without a reason. Fast: nothing is started."""

from __future__ import annotations

import copy
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
import yaml

from flexi_workflows.recipes import load_recipe
from tests.conftest import REPO_ROOT

CLUSTER = REPO_ROOT / "cluster"
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
DOCKERFILE = CLUSTER / "Dockerfile"
RUN_COMMANDS = {"run", "sweep", "report", "score", "route", "train", "eval"}  # jobs/run.py's first argument
UPLOADED = "<uploaded working dir>"  # the job's cwd under `ray job submit --working-dir`


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def launchers() -> list[Path]:
    return [p for p in YAML_FILES if "provider" in docs(p)[0]]


def kube_objects(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in docs(p) if d.get("kind") == kind]


def pinned_ray() -> str:
    match = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml pins no ray version"
    return match.group(1)


def dockerfile() -> dict:
    text = DOCKERFILE.read_text()
    return {"from": re.search(r"^FROM (\S+)", text, re.MULTILINE).group(1),
            "workdir": re.search(r"^WORKDIR (\S+)", text, re.MULTILINE).group(1),
            "path": re.search(r"^ENV PATH=(\S+)", text, re.MULTILINE).group(1),
            "runs": re.findall(r"^RUN (.+)$", text, re.MULTILINE)}


# ---------------------------------------------------------------------------------------------- parsing


def test_every_cluster_file_parses_and_is_known():
    assert YAML_FILES and launchers() and kube_objects("RayCluster") and kube_objects("RayJob")
    for path in YAML_FILES:
        for d in docs(path):
            assert "provider" in d or ("apiVersion" in d and "kind" in d), f"{path}: neither a launcher file nor a manifest"


def test_the_pinned_ray_is_the_installed_one():
    """Everything below compares against the pin; the pin must be what the tests run with."""
    assert pinned_ray() == ray.__version__


# ----------------------------------------------------------------------------------- launcher (ray up)


@pytest.mark.parametrize("path", launchers(), ids=lambda p: p.name)
def test_launcher_file_validates_against_rays_own_schema(path):
    """What `ray up` does before it contacts any machine: fill in the provider's defaults, then check the
    result against ray/autoscaler/ray-schema.json (and Ray's own cross-field checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(docs(path)[0])))


def test_schema_check_catches_a_broken_field():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = copy.deepcopy(docs(CLUSTER / "aws-gpu.yaml")[0])
    config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "four"
    with pytest.raises(Exception, match="four"):
        validate_config(prepare_config(config))


def project_dir(config: dict) -> str:
    """Where the project's environment lives on a node: the image's checkout, or the folder setup_commands
    run scripts/setup.sh in."""
    if config.get("docker"):
        return dockerfile()["workdir"]
    for command in config.get("setup_commands", []):
        match = re.search(r"cd (\S+) && .*bash scripts/setup\.sh", command)
        if match:
            return match.group(1)
    raise AssertionError("setup_commands never run `bash scripts/setup.sh` in the project's folder")


def start_commands(config: dict) -> list[tuple[str, str]]:
    return [(kind, c) for kind in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[kind]]


def launcher_problems(config: dict) -> list[str]:
    """Commands that would not run the project's Ray, the way the job path needs it."""
    problems = []
    home = project_dir(config)
    venv_bin = posixpath.join(home, ".venv/bin")
    for kind, command in start_commands(config):
        if "ray start" not in command:
            if re.search(r"(^|[;&|]\s*)ray\b", command) and not command.startswith(f"{venv_bin}/ray "):
                problems.append(f"{kind}: {command!r} runs a `ray` that is not {venv_bin}/ray")
            continue
        before = command.split("ray start")[0]
        cwd = re.search(r"cd (\S+)", before)
        activated = re.search(r"source (\S+)/bin/activate", before) or re.search(r"PATH=(\S+)/bin:\$PATH", before)
        venv = posixpath.join(cwd.group(1) if cwd else "~", activated.group(1)) if activated else None
        # a job's `python` is the first on the PATH of the process that ran `ray start`, and its cwd the folder
        # `ray start` ran in (measured with Ray 2.60): both must be the project's
        if venv is None or posixpath.normpath(venv) != posixpath.normpath(posixpath.join(home, ".venv")):
            problems.append(f"{kind}: `ray start` does not run with {venv_bin} first on PATH: {command!r}")
        if not cwd or posixpath.normpath(cwd.group(1)) != posixpath.normpath(home):
            problems.append(f"{kind}: `ray start` does not run in {home} (jobs without --working-dir run there)")
        if "RAY_AUTH_MODE=token" not in before:
            problems.append(f"{kind}: `ray start` without RAY_AUTH_MODE=token")
        if kind == "head_start_ray_commands" and not re.search(r"RAY_JOB_STOP_WAIT_TIME_S=[1-9]\d", before):
            # `ray job stop` SIGKILLs a driver 3 s after its SIGTERM by default; under load a stopping driver
            # overran that (README, Reliability), and the job supervisors on the head inherit this
            problems.append(f"{kind}: `ray start` without RAY_JOB_STOP_WAIT_TIME_S of 10 s or more")
        if kind == "head_start_ray_commands" and "--dashboard-host=127.0.0.1" not in command:
            problems.append(f"{kind}: the dashboard is not bound to 127.0.0.1 (reach it with `ray dashboard`)")
    if "~/.ray/auth_token" not in config.get("file_mounts", {}):
        problems.append("file_mounts: ~/.ray/auth_token (the cluster's token) is not copied to the nodes")
    return problems


@pytest.mark.parametrize("path", launchers(), ids=lambda p: p.name)
def test_launcher_starts_ray_from_the_projects_environment(path):
    problems = launcher_problems(docs(path)[0])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("break_it, complaint", [
    (lambda c: c["head_start_ray_commands"].__setitem__(1, c["head_start_ray_commands"][1].replace(
        "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")), "127.0.0.1"),
    (lambda c: c["worker_start_ray_commands"].__setitem__(1, "ray start --address=$RAY_HEAD_IP:6379"), "PATH"),
    (lambda c: c["head_start_ray_commands"].__setitem__(0, "ray stop"), "is not"),
    (lambda c: c["file_mounts"].pop("~/.ray/auth_token"), "token"),
    (lambda c: c.__setitem__("setup_commands", ["cd ~/flexi-workflows && pip install -e ."]), "setup.sh"),
    (lambda c: c["head_start_ray_commands"].__setitem__(1, c["head_start_ray_commands"][1].replace(
        " RAY_JOB_STOP_WAIT_TIME_S=30", "")), "RAY_JOB_STOP_WAIT_TIME_S"),
], ids=["dashboard-open", "system-ray-start", "system-ray-stop", "no-token", "no-setup-sh", "3-s-job-stop"])
def test_launcher_check_catches_broken_commands(break_it, complaint):
    config = copy.deepcopy(docs(CLUSTER / "on-prem.yaml")[0])
    break_it(config)
    try:
        problems = launcher_problems(config)
    except AssertionError as exc:
        problems = [str(exc)]
    assert any(complaint in p for p in problems), problems


# --------------------------------------------------------------------------------- images and versions


def test_dockerfile_builds_on_the_pinned_ray_and_installs_with_setup_sh():
    d = dockerfile()
    assert d["from"].startswith(f"rayproject/ray:{pinned_ray()}-"), d["from"]
    assert "bash scripts/setup.sh" in d["runs"]
    # KubeRay runs a bare `ray start`: the project's environment must come first on the image's PATH
    assert d["path"].startswith(f"{d['workdir']}/.venv/bin:"), d["path"]


def images() -> list[tuple[str, str]]:
    found = [(path.name, image) for path in YAML_FILES
             for image in re.findall(r"^[ -]*(?:head_|worker_)?image:\s*(\S+)", path.read_text(), re.MULTILINE)]
    found += [("Dockerfile (build tag)", tag) for tag in re.findall(r"docker build .*-t (\S+)", DOCKERFILE.read_text())]
    return found


def test_every_image_is_the_projects_image_at_the_pinned_ray():
    """One image everywhere (cluster/Dockerfile), its tag naming the Ray it was built on."""
    found = images()
    assert found
    assert len({image for _, image in found}) == 1, found
    for where, image in found:
        assert f"ray{pinned_ray()}" in image.rsplit(":", 1)[-1], f"{where}: image {image} is not tagged ray{pinned_ray()}"


def ray_cluster_specs() -> list[tuple[str, dict]]:
    return ([(f"{p.name}:{d['metadata']['name']}", d["spec"]) for p, d in kube_objects("RayCluster")]
            + [(f"{p.name}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for p, d in kube_objects("RayJob")])


@pytest.mark.parametrize("where, spec", ray_cluster_specs(), ids=[w for w, _ in ray_cluster_specs()])
def test_kuberay_cluster_spec_agrees_with_the_pinned_ray(where, spec):
    assert spec["rayVersion"] == pinned_ray()
    assert spec.get("authOptions", {}).get("mode") == "token", "token auth (Ray 2.60) is off"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["template"]["spec"]["containers"][0]["image"].endswith(f"ray{pinned_ray()}-py311-gpu")
    head_env = {e["name"]: e.get("value") for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert int(head_env.get("RAY_JOB_STOP_WAIT_TIME_S") or 0) >= 10, "`ray job stop` would SIGKILL a driver after 3 s"


def test_rayjob_brings_up_the_same_cluster_as_raycluster():
    (_, cluster), = kube_objects("RayCluster")
    for path, job in kube_objects("RayJob"):
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], f"{path.name} drifted from raycluster.yaml"


# -------------------------------------------------------------------------------------------- exposure


def open_bindings(text: str) -> list[str]:
    """Lines that bind 0.0.0.0 without saying why: a comment with "because" on the line or in the comment
    block right above it."""
    lines = text.splitlines()
    bad = []
    for i, line in enumerate(lines):
        if "0.0.0.0" not in line or line.lstrip().startswith("#"):
            continue
        block, j = [line.partition("#")[2]], i - 1
        while j >= 0 and lines[j].lstrip().startswith("#"):
            block.append(lines[j])
            j -= 1
        if not any("because" in b for b in block):
            bad.append(line.strip())
    return bad


@pytest.mark.parametrize("path", [*YAML_FILES, DOCKERFILE], ids=lambda p: p.name)
def test_nothing_binds_every_interface_without_a_reason(path):
    assert open_bindings(path.read_text()) == []


def test_open_binding_check_catches_an_unexplained_one():
    text = (CLUSTER / "kuberay" / "raycluster.yaml").read_text().replace("# because the dashboard", "# the dashboard")
    assert open_bindings(text) == ['dashboard-host: "0.0.0.0"']
    assert open_bindings(docs_text := (CLUSTER / "on-prem.yaml").read_text()) == []
    assert open_bindings(docs_text.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"))


def test_kubernetes_services_stay_inside_the_cluster():
    for where, spec in ray_cluster_specs():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", where
        assert not spec["headGroupSpec"].get("enableIngress"), where
    for path, service in kube_objects("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", path.name
    assert not kube_objects("Ingress")


# ------------------------------------------------------------------------------------ jobs and recipes


@dataclass
class Node:
    cpu: float | None  # None: not declared (the machine's own count)
    gpu: float


@dataclass
class Cluster:
    nodes: list[Node]
    job_cwd: str  # where a job submitted without --working-dir runs: where `ray start` ran on the head
    head_mounts: dict[str, str] = field(default_factory=dict)  # path on the head → where its files come from


@dataclass
class Job:
    where: str
    argv: list[str]  # jobs/run.py's arguments
    cluster: Cluster | None
    working_dir_uploaded: bool = False


def launcher_cluster(config: dict) -> Cluster:
    home = project_dir(config)
    if config["provider"]["type"] == "local":
        def declared(command: str) -> Node:
            cpu = re.search(r"--num-cpus=(\d+)", command)
            gpu = re.search(r"--num-gpus=(\d+)", command)
            return Node(float(cpu.group(1)) if cpu else None, float(gpu.group(1)) if gpu else 0.0)
        head = declared(" ".join(config["head_start_ray_commands"]))
        worker = declared(" ".join(config["worker_start_ray_commands"]))
        nodes = [head] + [worker] * len(config["provider"]["worker_ips"])
    else:
        types = config["available_node_types"]
        nodes = []
        for name, t in types.items():
            count = 1 if name == config["head_node_type"] else t.get("max_workers", 0)
            nodes += [Node(float(t["resources"].get("CPU", 0)), float(t["resources"].get("GPU", 0)))] * count
    mounts = {posixpath.normpath(remote): local for remote, local in config.get("file_mounts", {}).items()}
    return Cluster(nodes, home, mounts)


def kuberay_cluster(spec: dict) -> Cluster:
    """Ray's own reading of a RayCluster spec (the KubeRay autoscaler's): CPUs and GPUs per group."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    config = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "check", "namespace": "default"},
                                                      "spec": copy.deepcopy(spec)})
    nodes = []
    for group, node_type in config["available_node_types"].items():
        if group == "headgroup":
            count = 1
        else:
            (worker,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == group]
            count = worker["maxReplicas"] if spec.get("enableInTreeAutoscaling") else worker["replicas"]
        nodes += [Node(float(node_type["resources"]["CPU"]), float(node_type["resources"].get("GPU", 0)))] * count
    head = spec["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    mounts = {}
    for mount in head["containers"][0].get("volumeMounts", []):
        source = volumes[mount["name"]]
        mounts[posixpath.normpath(mount["mountPath"])] = (
            f"configmap:{source['configMap']['name']}" if "configMap" in source else mount["name"])
    # KubeRay runs `ray start` in the container's working folder: the image's checkout unless the pod says otherwise
    return Cluster(nodes, head["containers"][0].get("workingDir", dockerfile()["workdir"]), mounts)


def run_py_argv(command: str) -> list[str]:
    words = shlex.split(command)
    i = words.index("jobs/run.py")
    assert words[i - 1] in ("python", "python3"), f"{command!r}: jobs/run.py not run by the cluster's `python`"
    return words[i + 1:]


def shown_commands(text: str, needle: str) -> list[str]:
    """Command lines shown in comments or a README that contain `needle` (`\\` continuations joined)."""
    joined, pending = [], ""
    for line in text.splitlines():
        line = re.sub(r"^\s*#\s?", "", line).strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [line for line in joined if needle in line]


def commented_commands(text: str) -> list[str]:
    return [line for line in shown_commands(text, "jobs/run.py") if re.search(r"\bpython3? jobs/run\.py", line)]


def code_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL))


def jobs() -> list[Job]:
    found = [Job(f"{p.name}:{d['metadata']['name']}", run_py_argv(d["spec"]["entrypoint"]),
                 kuberay_cluster(d["spec"]["rayClusterSpec"])) for p, d in kube_objects("RayJob")]
    for path in launchers():
        cluster = launcher_cluster(docs(path)[0])
        for command in commented_commands(path.read_text()):
            found.append(Job(path.name, run_py_argv(command), cluster, "--working-dir" in command))
    (_, raycluster), = kube_objects("RayCluster")
    for command in commented_commands((CLUSTER / "kuberay" / "raycluster.yaml").read_text()):
        found.append(Job("raycluster.yaml", run_py_argv(command), kuberay_cluster(raycluster["spec"]),
                         "--working-dir" in command))
    for command in commented_commands(code_blocks((CLUSTER / "README.md").read_text())):
        found.append(Job("README.md", run_py_argv(command), None, "--working-dir" in command))
    return found


JOBS = jobs()


def split_argv(argv: list[str]) -> tuple[str, str, list[str]]:
    command = argv[0] if argv and argv[0] in RUN_COMMANDS else "run"
    rest = argv[1:] if argv and argv[0] in RUN_COMMANDS else argv
    recipe, overrides = rest[0], rest[1:]
    assert all("=" in o and not o.startswith("-") for o in overrides), f"not key=value overrides: {overrides}"
    return command, recipe, overrides


def test_every_cluster_file_shows_a_job():
    assert {j.where.split(":")[0] for j in JOBS} >= {"rayjob.yaml", "aws-gpu.yaml", "on-prem.yaml", "README.md"}


@pytest.mark.parametrize("job", JOBS, ids=[f"{j.where}-{i}" for i, j in enumerate(JOBS)])
def test_job_runs_a_recipe_that_loads_with_its_overrides_for_a_cluster(job, monkeypatch):
    """The recipe exists in the checkout (the job's cwd) and loads, with the command's overrides, through the
    loader jobs/run.py uses; on a cluster its results go to storage every node sees, and it tracks to a server."""
    monkeypatch.chdir(REPO_ROOT)
    command, path, overrides = split_argv(job.argv)
    assert (REPO_ROOT / path).is_file(), f"{job.where}: no recipe {path}"
    recipe = load_recipe(path, overrides)
    assert recipe.storage and (recipe.storage.startswith("s3://") or recipe.storage.startswith("/")), (
        f"{job.where}: storage={recipe.storage!r}: the driver's own folder is not visible to workers on other nodes")
    assert (recipe.tracking.tracking_uri or "").startswith(("http://", "https://")), (
        f"{job.where}: a multi-node run tracks to an MLflow server, not {recipe.tracking.tracking_uri!r}")
    if command == "sweep":
        assert recipe.sweep is not None, f"{job.where}: `sweep` of a recipe without a sweep section"


def stage_bundles(recipe) -> dict[str, list[tuple[float, float]]]:
    """(CPU, GPU) of every worker / actor each stage asks Ray for. The pipeline runs its stages one after
    another (pipeline.run_stages), so each must fit the cluster on its own; a sweep runs
    max_concurrent_trials trials (and their stages) at once."""
    d, s, e = recipe.distribution, recipe.scoring, recipe.evaluation
    stages = {"training": [(d.cpus_per_worker, d.gpus_per_worker)] * d.num_workers,
              "scoring": [(s.cpus_per_actor, s.gpus_per_actor)] * s.num_actors,
              "evaluation": [(e.cpus_per_actor, e.gpus_per_actor)] * e.num_actors}
    if recipe.sweep is not None:
        n = recipe.sweep.max_concurrent_trials
        stages = {k: v * n + [(recipe.sweep.trial_cpus, 0.0)] * n for k, v in stages.items()}
    return stages


def unplaced(bundles: list[tuple[float, float]], nodes: list[Node]) -> list[tuple[float, float]]:
    """Bundles that do not fit (first fit, largest first): one worker or actor never spans two nodes."""
    free = [[n.cpu if n.cpu is not None else float("inf"), n.gpu] for n in nodes]
    left = []
    for cpu, gpu in sorted(bundles, key=lambda b: (b[1], b[0]), reverse=True):
        node = next((f for f in free if f[0] >= cpu and f[1] >= gpu), None)
        if node is None:
            left.append((cpu, gpu))
        else:
            node[0] -= cpu
            node[1] -= gpu
    return left


@pytest.mark.parametrize("job", [j for j in JOBS if j.cluster], ids=lambda j: j.where)
def test_job_fits_its_clusters_workers(job, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    _, path, overrides = split_argv(job.argv)
    recipe = load_recipe(path, overrides)
    for stage, bundles in stage_bundles(recipe).items():
        left = unplaced(bundles, job.cluster.nodes)
        assert not left, (f"{job.where}: {stage} asks for {len(bundles)} × (CPU, GPU) {bundles[0]}; {len(left)} do not "
                          f"fit the nodes {job.cluster.nodes}")


def test_fit_check_catches_a_recipe_too_big_for_the_cluster():
    nodes = kuberay_cluster(kube_objects("RayJob")[0][1]["spec"]["rayClusterSpec"]).nodes
    assert sum(n.gpu for n in nodes) == 4
    assert unplaced([(4.0, 1.0)] * 4, nodes) == []
    assert unplaced([(4.0, 1.0)] * 5, nodes) == [(4.0, 1.0)]
    assert unplaced([(40.0, 1.0)], nodes) == [(40.0, 1.0)]  # more CPUs than any one pod holds


def data_paths(recipe) -> list[str]:
    sources = [recipe.task.train, *recipe.task.eval]
    return [s.path for s in sources if s is not None and s.path]


def data_problems(job: Job) -> list[str]:
    """The driver (on the head) reads a recipe's local data files, relative to the job's cwd: each must be in
    the checkout there or under a path mounted on the head — and what is mounted must hold it."""
    _, path, overrides = split_argv(job.argv)
    recipe = load_recipe(REPO_ROOT / path, overrides)
    cwd = UPLOADED if job.working_dir_uploaded else job.cluster.job_cwd
    problems = []
    for data in data_paths(recipe):
        where = posixpath.normpath(posixpath.join(cwd, data))
        if where.startswith(cwd + "/"):
            if not (REPO_ROOT / posixpath.relpath(where, cwd)).exists():
                problems.append(f"{data} is not in the checkout")
            continue
        mount = next((m for m in job.cluster.head_mounts if where.startswith(m + "/")), None)
        if mount is None:
            problems.append(f"{data} is {where} on the head, which nothing mounts ({sorted(job.cluster.head_mounts)})")
            continue
        source, rest = job.cluster.head_mounts[mount], posixpath.relpath(where, mount)
        if source.startswith("configmap:"):
            files = configmap_files(source.removeprefix("configmap:"))
            if rest not in files:
                problems.append(f"{data}: the documented {source} holds {sorted(files)}, not {rest}")
        elif (REPO_ROOT / source).is_dir() and not (REPO_ROOT / source / rest).exists():  # (absent here: not checked)
            problems.append(f"{data}: file_mounts source {source}/{rest} does not exist")
    return problems


@pytest.mark.parametrize("job", [j for j in JOBS if j.cluster], ids=lambda j: j.where)
def test_jobs_data_files_are_on_the_head(job, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    problems = data_problems(job)
    assert not problems, f"{job.where}: " + "; ".join(problems)


def configmap_files(name: str) -> set[str]:
    """The files the documented `kubectl create configmap NAME --from-file=...` command puts in it."""
    found = set()
    for path in YAML_FILES + [CLUSTER / "README.md"]:
        for line in shown_commands(path.read_text(), f"kubectl create configmap {name} "):
            found |= {posixpath.basename(w.split("=", 1)[1]) for w in shlex.split(line) if w.startswith("--from-file=")}
    assert found, f"no `kubectl create configmap {name} --from-file=...` shown in cluster/"
    return found


def test_data_check_catches_an_uploaded_working_dir_and_a_missing_mount(monkeypatch):
    """`--working-dir .` runs the job in an uploaded copy of the checkout, where ../shared/data is not; and a
    head without the data volume has nothing there either."""
    monkeypatch.chdir(REPO_ROOT)
    (job,) = [j for j in JOBS if j.where == "aws-gpu.yaml"]
    problems = data_problems(Job(job.where, job.argv, job.cluster, working_dir_uploaded=True))
    assert len(problems) == 3 and all("nothing mounts" in p for p in problems)
    (rayjob,) = [j for j in JOBS if j.where.startswith("rayjob.yaml")]
    unmounted = Cluster(rayjob.cluster.nodes, rayjob.cluster.job_cwd, {})
    assert len(data_problems(Job(rayjob.where, rayjob.argv, unmounted))) == 3
