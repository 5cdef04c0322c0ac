"""Every bad input is refused up front: `flexi run` exits 2 within seconds with one message naming the file,
line, key or path (and what to do), prints no traceback, and writes nothing — no output folder, no file
beside the recipe, nothing half-written.

Each case starts from a small good recipe (tiny LLaMA, math task, Flexi (2,8)) written to `r.yaml` and
breaks one thing: an override, a recipe line, a data file, the model folder or the output folder. The
cases cover those an unlucky user met (issue 12) and one out-of-range value for each kind of number.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from flexi_workflows.cli import main
from tests.helpers import small_recipe_data

QA_ROWS = Path(__file__).parent / "assets" / "mrqa_tiny.jsonl"


# -- ways to break a recipe: each takes the recipe's folder and its data (a dict), edits either ------------------

def _set(key: str, value):
    """Set a recipe key in the file itself (so the message can name the file's line)."""
    def edit(folder: Path, data: dict) -> None:
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[last] = value
    return edit


def _write_train(text: bytes):
    def edit(folder: Path, data: dict) -> None:
        Path(data["task"]["train"]["path"]).write_bytes(text)
    return edit


def _append_train(text: bytes):
    def edit(folder: Path, data: dict) -> None:
        with open(data["task"]["train"]["path"], "ab") as handle:
            handle.write(text)
    return edit


def _append_eval(text: bytes):
    def edit(folder: Path, data: dict) -> None:
        with open(data["task"]["eval"][0]["path"], "ab") as handle:
            handle.write(text)
    return edit


def _qa_eval(duplicate: bool):
    """The QA task with an MRQA eval file; with `duplicate`, one question id appears twice."""
    def edit(folder: Path, data: dict) -> None:
        lines = QA_ROWS.read_text().splitlines()
        if duplicate:
            record = json.loads(lines[1])
            record["qas"].append(dict(record["qas"][0], question="Which city again?"))
            lines[1] = json.dumps(record)
        (folder / "qa.jsonl").write_text("\n".join(lines) + "\n")
        (folder / "qa-train.jsonl").write_text("\n".join(QA_ROWS.read_text().splitlines()) + "\n")
        data["task"].update(name="qa", train={"path": str(folder / "qa-train.jsonl")},
                            eval=[{"name": "mini", "path": str(folder / "qa.jsonl")}])
    return edit


def _model(damage: str):
    """A copy of the tiny model folder with one thing wrong."""
    def edit(folder: Path, data: dict) -> None:
        model = folder / "model"
        shutil.copytree(data["model"]["name_or_path"], model)
        data["model"]["name_or_path"] = str(model)
        if damage == "truncated":
            weights = model / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif damage == "no-tokenizer":
            for file in model.glob("tokenizer*"):
                file.unlink()
        elif damage == "no-weights":
            (model / "model.safetensors").unlink()
        elif damage == "bad-config":
            (model / "config.json").write_text("{not json")
        elif damage == "header":
            (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xxx")
    return edit


def _output(kind: str):
    def edit(folder: Path, data: dict) -> None:
        out = Path(data["output_dir"])
        if kind == "file":
            out.write_text("not a folder\n")
        elif kind == "read-only":  # root writes through permission bits: for root, a folder on a read-only mount
            if os.geteuid() == 0:
                data["output_dir"] = "/sys/flexi-out"
            else:
                out.mkdir()
                out.chmod(0o555)
        elif kind == "under-a-file":
            (folder / "blocker").write_text("x\n")
            data["output_dir"] = str(folder / "blocker" / "out")
    return edit


def _recipe_text(text: str):
    """Replace the whole recipe file."""
    def edit(folder: Path, data: dict) -> None:
        data.clear()
        data["__text__"] = text
    return edit


def _deepspeed_file(content: str | None):
    def edit(folder: Path, data: dict) -> None:
        path = folder / "ds.json"
        if content is not None:
            path.write_text(content)
        data["distribution"]["deepspeed_config"] = str(path)
    return edit


def _custom_task(columns: dict | None = None, metric: str | None = None):
    """Task `custom` over a prompt/completion JSONL, with a column mapping or a metric."""
    def edit(folder: Path, data: dict) -> None:
        rows = [{"q": f"{i} plus 1?", "a": str(i + 1), "key": f"k{i}"} for i in range(24)]
        path = folder / "own.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        source = {"path": str(path), "columns": columns or {"prompt": "q", "completion": "a", "id": "key"}}
        data["task"].update(name="custom", train=dict(source), eval=[dict(source, name="own")])
        if metric:
            data["task"]["metric"] = metric
    return edit


CASES = [
    # -- numbers out of range, given as overrides: the message names the override -------------------------------
    ("evaluation.batch_size=0", None, "evaluation.batch_size must be ≥ 1, got 0"),
    ("scoring.batch_size=-4", None, "scoring.batch_size must be ≥ 1, got -4"),
    ("seed=-1", None, "seed must be ≥ 0, got -1"),
    ("method.dropout=1.5", None, "method.dropout must be ≥ 0 and < 1, got 1.5"),
    ("method.dropout=1", None, "method.dropout must be ≥ 0 and < 1, got 1"),
    ("method.alpha=0", None, "method.alpha must be > 0, got 0"),
    ("training.lr=.nan", None, "training.lr must be a finite number, got nan"),
    ("training.lr=.inf", None, "training.lr must be a finite number, got inf"),
    ("training.lr=0", None, "training.lr must be > 0, got 0"),
    ("method.lr=-1e-3", None, "method.lr must be > 0, got -0.001"),
    ("task.max_prompt_tokens=0", None, "task.max_prompt_tokens must be ≥ 1, got 0"),
    ("task.max_target_tokens=0", None, "task.max_target_tokens must be ≥ 1, got 0"),
    ("ray.num_cpus=0", None, "ray.num_cpus must be ≥ 1, got 0"),
    ("method.ranks=[0, 8]", None, "method.ranks.0 must be ≥ 1, got 0"),
    ("method.ranks=[8, 2]", None, "strictly increasing"),
    ("compare=[{name: lora, rank: 0}]", None, "compare.0.rank must be ≥ 1, got 0"),
    ("training.warmup_ratio=1", None, "training.warmup_ratio must be ≥ 0 and < 1, got 1"),
    ("training.epochs=0", None, "training.epochs must be ≥ 1, got 0"),
    ("training.max_steps=0", None, "training.max_steps must be ≥ 1, got 0"),
    ("training.micro_batch_size=0", None, "training.micro_batch_size must be ≥ 1, got 0"),
    ("training.gradient_accumulation_steps=0", None, "training.gradient_accumulation_steps must be ≥ 1, got 0"),
    ("training.max_grad_norm=0", None, "training.max_grad_norm must be > 0, got 0"),
    ("training.log_every=0", None, "training.log_every must be ≥ 1, got 0"),
    ("training.checkpoint_every=-1", None, "training.checkpoint_every must be ≥ 0, got -1"),
    ("training.weight_decay=-0.1", None, "training.weight_decay must be ≥ 0, got -0.1"),
    ("distribution.cpus_per_worker=0", None, "distribution.cpus_per_worker must be > 0, got 0"),
    ("distribution.num_workers=0", None, "distribution.num_workers must be ≥ 1, got 0"),
    ("distribution.torch_threads=0", None, "distribution.torch_threads must be ≥ 1, got 0"),
    ("scoring.top_p=0", None, "scoring.top_p must be > 0 and ≤ 1, got 0"),
    ("scoring.temperature=-1", None, "scoring.temperature must be ≥ 0, got -1"),
    ("scoring.num_samples=0", None, "scoring.num_samples must be ≥ 1, got 0"),
    ("scoring.max_new_tokens=0", None, "scoring.max_new_tokens must be ≥ 1, got 0"),
    ("scoring.num_actors=0", None, "scoring.num_actors must be ≥ 1, got 0"),
    ("scoring.num_classes=1", None, "scoring.num_classes must be ≥ 2, got 1"),
    ("scoring.thresholds=[.nan]", None, "scoring.thresholds.0 must be a finite number"),
    ("router.noise_std=-0.1", None, "router.noise_std must be ≥ 0, got -0.1"),
    ("router.epochs=0", None, "router.epochs must be ≥ 1, got 0"),
    ("router.holdout=1", None, "router.holdout must be > 0 and < 1, got 1"),
    ("evaluation.max_new_tokens=0", None, "evaluation.max_new_tokens must be ≥ 1, got 0"),
    ("evaluation.num_actors=0", None, "evaluation.num_actors must be ≥ 1, got 0"),
    ("evaluation.cpus_per_actor=-1", None, "evaluation.cpus_per_actor must be > 0, got -1"),
    ("task.train.limit=0", None, "task.train.limit must be ≥ 1, got 0"),
    ("tracking.system_metrics_interval=-5", None, "tracking.system_metrics_interval must be ≥ 0, got -5"),
    ("sweep={space: {training.lr: {grid: [1e-4]}}, scheduler: {reduction_factor: 1}}", None,
     "sweep.scheduler.reduction_factor must be > 1, got 1.0"),
    # -- a number out of range in the file: the message names the file and line ------------------------------------
    ("file:evaluation.batch_size", _set("evaluation.batch_size", 0), r"r.yaml:\d+: evaluation.batch_size must be ≥ 1"),
    ("file:seed", _set("seed", -1), r"r.yaml:\d+: seed must be ≥ 0, got -1"),
    ("file:lr-nan", _set("training.lr", float("nan")), r"r.yaml:\d+: training.lr must be a finite number"),
    # -- other values, names and types ---------------------------------------------------------------------------
    ("distribution.zero_stage=4", None, "zero_stage must be 0, 1, 2 or 3"),
    ("distribution.strategy=fsdp", None, "distribution.strategy"),
    ("distribution.precision=fp8", None, "distribution.precision"),
    ("training.schedule=step", None, "training.schedule"),
    ("training.final_artifact=middle", None, "training.final_artifact"),
    ("training.final_artifact=best", None, "training.final_artifact=best measures the held-out loss: set training.validation_rows"),
    ("training.epochs=two", None, "training.epochs must be an integer"),
    ("traning.epochs=2", None, "did you mean 'training'"),
    ("method.name=nope", None, "method.name"),
    ("task.name=nope", None, "task.name: unknown task 'nope'; registered tasks: arith, custom, math, qa, speech"),
    ("method.targets=[foo_proj]", None, r"targets: target modules \['foo_proj'\] match no linear layer"),
    ("evaluation.merged=yes-please", None, "evaluation.merged"),
    # -- overrides into lists and values -------------------------------------------------------------------------
    ("compare.3.ranks=[1,8]", None, r"override 'compare\.3\.ranks=\[1,8\]': index 3 is out of range"),
    ("method.ranks.0.x=1", None, r"method\.ranks\.0 is a value \(2\), not a section"),
    ("method.ranks.5=4", None, r"index 5 is out of range \(the list has 2 items"),
    ("method.ranks.two=4", None, r"'two' must be a list index"),
    ("training.lr.x=1", None, r"training\.lr is a value \(0\.01\), not a section"),
    ("no-equals-sign", None, "no-equals-sign"),
    # -- resources asked for but absent: an error, not a wait ---------------------------------------------------
    ("distribution.num_workers=8", None, "needs 8 CPUs but only"),
    ("distribution.gpus_per_worker=1", None, "GPUs but 0 are available"),
    ("scoring.gpus_per_actor=1", None, "scoring.num_actors=1 × gpus_per_actor=1 needs 1 GPUs but 0 are available"),
    ("evaluation.gpus_per_actor=1", None, "needs 1 GPUs but 0 are available"),
    ("evaluation.num_actors=3", None, "evaluation.num_actors=3 × cpus_per_actor=1 needs 3 CPUs but only 2"),
    ("ray.num_cpus=1.5", None, "ray.num_cpus must be"),
    ("distribution.offload_optimizer=disk", None, "distribution.offload_optimizer"),
    ("task.train.selection=random", None, "task.train.selection"),
    # -- tracking ------------------------------------------------------------------------------------------------
    ("tracking.tracking_uri=http://127.0.0.1:9", None, "cannot be reached"),
    ("tracking.tracking_uri=sqlite:////proc/nope/x.db", None, "/proc is not writable"),
    ("tracking.tracking_uri=ftp://x", None, "tracking.tracking_uri ftp://x: MLflow cannot store runs at a ftp:// URI"),
    # -- data files ----------------------------------------------------------------------------------------------
    ("task.train.path=/no/such/train.jsonl", None, "/no/such/train.jsonl: no such file"),
    ("task.eval.0.path=/no/such/eval.jsonl", None, "/no/such/eval.jsonl: no such file"),
    ("task.eval=[]", None, "task.eval lists no evaluation sets"),
    ("eval-name-escapes", _set("task.eval.0.name", "../../../x"), "'../../../x' is not a dataset name"),
    ("eval-labels-clash", _set("task.eval", [{"path": "a/test.jsonl"}, {"path": "b/test.jsonl"}]),
     "task.eval.1 and task.eval.0 are both labelled 'test'"),
    ("non-utf8-train", _append_train(b'{"question": "caf\xe9?", "answer": "#### 1"}\n'),
     r"train.jsonl:65: not UTF-8 \(byte 0xe9 at column 18\); save the file as UTF-8"),
    ("non-utf8-eval", _append_eval(b'\xff\xfe{"question": "x"}\n'), r"eval.jsonl:13: not UTF-8 \(byte 0xff at column 1\)"),
    ("over-long-line", _append_train(b'{"question": "' + b"1 + " * (9 << 18) + b'1?", "answer": "#### 1"}\n'),
     r"train.jsonl:65: .*longer than"),
    ("bad-json-line", _append_train(b'{"question": "unclosed\n'), r"train.jsonl:65"),
    ("missing-answer", _append_train(b'{"question": "1 plus 1?"}\n'), r"train.jsonl:65"),
    ("empty-train", _write_train(b""), r"train.jsonl"),
    ("duplicate-qa-ids", _qa_eval(duplicate=True), r"task.eval.0: rows 0 and 2 have the same id 'mini:q1'"),
    ("custom-missing-column", _custom_task(columns={"prompt": "question", "completion": "a"}), "'question'"),
    ("custom-missing-metric", _custom_task(metric="no_such_module.scoring:score"), "no_such_module"),
    ("custom-bad-metric-name", _custom_task(metric="rouge"), "task.metric"),
    # -- the model folder ----------------------------------------------------------------------------------------
    ("model.name_or_path=/no/such/model", None, "/no/such/model"),
    ("model-truncated", _model("truncated"), r"model\.safetensors is not a whole safetensors file"),
    ("model-no-tokenizer", _model("no-tokenizer"), r"tokenizer for .* could not be loaded"),
    ("model-no-weights", _model("no-weights"), r"model/? has no \*\.safetensors weights"),
    ("model-bad-config", _model("bad-config"), r"config\.json: not valid JSON \(line 1"),
    ("model-bad-header", _model("header"), r"model\.safetensors"),
    # -- the output folder ---------------------------------------------------------------------------------------
    ("output-is-a-file", _output("file"), "output_dir: .*cannot write there"),
    ("output-read-only", _output("read-only"), "output_dir: .*cannot write there"),
    ("output-under-a-file", _output("under-a-file"), "output_dir: .*cannot write there"),
    # -- DeepSpeed config files ----------------------------------------------------------------------------------
    ("deepspeed-config-missing", _deepspeed_file(None), r"ds\.json"),
    ("deepspeed-config-not-json", _deepspeed_file("{oops"), r"ds\.json"),
    ("deepspeed-config-conflict", _deepspeed_file('{"zero_optimization": {"stage": 3}}'), r"ds\.json.*stage"),
    # -- the recipe file itself ----------------------------------------------------------------------------------
    ("yaml-syntax", _recipe_text("name: x\nmodel: {name_or_path: [\n"), r"r\.yaml:\d+"),
    ("yaml-not-a-mapping", _recipe_text("- a\n- b\n"), r"r\.yaml"),
    ("yaml-unknown-nested", _set("training.lr_schedule", "cosine"), r"r\.yaml:\d+: .*lr_schedule"),
    ("yaml-tab-indent", _recipe_text("name: x\ntraining:\n\tlr: 1\n"), r"r\.yaml:\d+"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("override,edit,message", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_refused_up_front(tmp_path, tiny_model_dir, capsys, override, edit, message):
    data = small_recipe_data(tmp_path, tiny_model_dir)
    data["tracking"] = {"enabled": True}  # a sqlite store under output_dir: created only when work starts
    if edit is not None:
        edit(tmp_path, data)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(data["__text__"] if "__text__" in data else yaml.safe_dump(data, sort_keys=False))
    before = _listing(tmp_path)
    try:
        code = main(["run", str(recipe)] + ([override] if edit is None else []))
    finally:
        if (tmp_path / "out").is_dir():
            (tmp_path / "out").chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert _matches(message, err), f"expected {message!r} in:\n{err[-2000:]}"
    assert _listing(tmp_path) == before, "a refused run wrote something"


def test_the_suite_covers_at_least_seventy_bad_inputs():
    assert len(CASES) >= 70


def test_a_recipe_path_that_is_a_folder_or_missing_is_named(tmp_path, capsys):
    assert main(["run", str(tmp_path)]) == 2
    assert "a folder, not a recipe file" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "Traceback" not in err


def _matches(pattern: str, text: str) -> bool:
    import re

    return pattern in text or re.search(pattern, text) is not None


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.lstat()
            out[str(path.relative_to(root))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return out
