"""`flexi export RUN_DIR`: a finished run's trained adapter in the forms serving stacks load.

    RUN_DIR (a recipe's output_dir after `flexi run`)
        summary.json, recipe.json            which stages ran (name → fingerprint), the recipe as run
        train/<label>-<fp>/artifact/adapter  the nested adapter (A, B, γ up to r_max)
        eval/<label>-<fp>/metrics.json       parameter counts, per-dataset results
        route/<fp>/router/                   the trained router (learned Flexi only)
    ──► OUT (default RUN_DIR/export), written to a temp folder and renamed
        peft/rank-<r>/                       plain PEFT LoRA: PeftModel.from_pretrained(base, folder)
        merged/rank-<r>/                     full weights with rank r folded in (+ tokenizer)
        router/                              request text → rank (router/serving.py)
        export.json, README.md               what was exported; the model card

A Flexi model is one adapter whose rank-r slice serves the inputs routed to r, so serving it is
multi-LoRA serving: one rank-r PEFT adapter per rank, and the router picks the adapter per request.
Every method on the nested adapter exports the same way (LoRA-r at its rank, DyLoRA at any rank of
its range); full fine-tuning's artifact is already a whole model and AdaLoRA's is not nested.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexi_workflows.errors import ConfigError
from flexi_workflows.fsutil import atomic_dir
from flexi_workflows.methods import Method, get_method
from flexi_workflows.pipeline import RECIPE, SUMMARY
from flexi_workflows.router.model import POOLING as TEXT_POOLING
from flexi_workflows.stages.base import MANIFEST
from flexi_workflows.stages.evaluate import METRICS
from flexi_workflows.stages.route import ROUTER_DIR
from flexi_workflows.stages.train import ARTIFACT, REPORT
from flexi_workflows.storage import Storage, is_remote

FORMATS = ("peft", "merged")
EXPORT_JSON = "export.json"
CARD = "README.md"
ADAPTER = "adapter"  # inside the train stage's artifact (methods/lora.py)
NESTED = ("lora", "dylora", "dylora_plus", "flexi")


@dataclass
class RunMethod:
    """One trained method of a finished run, located through its recorded stage folders."""

    run: Storage  # RUN_DIR: summary.json, recipe.json
    storage: Storage  # the stage folders' root: RUN_DIR, or a sweep's shared storage for a trial
    summary: dict
    recipe: dict | None
    method: Method
    train_rel: str
    eval_rel: str
    route_rel: str | None
    base_model: str
    trust_remote_code: bool
    dtype: str
    task: dict  # name, max_prompt_tokens (the route / train stage's recorded task inputs)

    @property
    def label(self) -> str:
        return self.method.label

    @property
    def adapter_dir(self) -> Path:
        return self.storage.local_path(f"{self.train_rel}/{ARTIFACT}") / ADAPTER

    def read(self, rel: str) -> Any:
        return json.loads(self.storage.read_text(rel))

    def export_ranks(self) -> list[int]:
        """The ranks this method was trained to serve: Flexi's class ranks, LoRA's rank, every rank of
        DyLoRA's range (it trains them all)."""
        if self.method.name in ("dylora", "dylora_plus"):
            return list(range(self.method.config.r_min, self.method.config.r_max + 1))
        return list(self.method.ranks)


def _json(storage: Storage, rel: str, what: str) -> dict:
    try:
        return json.loads(storage.read_text(rel))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{storage.display(rel)}: cannot read the {what} ({type(exc).__name__})") from None


def locate(run_dir: str | Path, method: str | None = None, base_model: str | None = None) -> RunMethod:
    """The method to export (`method`: its label; default the run's one Flexi-LoRA method) and where its
    stages' folders are, from the run's summary.json; errors name what is missing and what there is."""
    from flexi_workflows.models.loading import load_config
    from flexi_workflows.recipes.loader import build
    from flexi_workflows.recipes.schema import MethodConfig

    run = Storage(run_dir)
    if not run.exists(SUMMARY):
        raise ConfigError(f"{run.display()}: no {SUMMARY}; RUN_DIR is a recipe's output_dir after "
                          f"`flexi run` finished")
    summary = _json(run, SUMMARY, "run summary")
    stages = summary.get("stages") or {}
    storage = _stage_root(run, stages)
    methods: dict[str, tuple[Method, str]] = {}  # eval label → (method, eval stage folder)
    for name, info in stages.items():
        kind, _, label = name.partition(":")
        if kind != "eval" or not label or label == "base":
            continue
        rel = f"eval/{label}-{info['fingerprint']}"
        recorded = _json(storage, f"{rel}/{MANIFEST}", f"{name} stage manifest")["inputs"]["method"]
        methods[label] = (get_method(build(MethodConfig, recorded, source=f"{rel}/{MANIFEST}")), rel)
    if not methods:
        raise ConfigError(f"{run.display()}: the run has no trained method")
    if method is None:
        flexi = [label for label, (m, _) in methods.items() if m.name == "flexi"]
        if not flexi:
            raise ConfigError(f"{run.display()}: no trained Flexi-LoRA method in this run (it has "
                              f"{', '.join(methods)}); name one with --method")
        learned = [label for label in flexi if methods[label][0].routing == "learned"]
        choice = learned or flexi
        if len(choice) > 1:
            raise ConfigError(f"{run.display()}: the run has several Flexi-LoRA methods ({', '.join(choice)}); "
                              f"name one with --method")
        method = choice[0]
    by_train = {m.train_label: label for label, (m, _) in methods.items()}
    label = method if method in methods else by_train.get(method)
    if label is None:
        raise ConfigError(f"--method {method!r} is not in this run; it has: {', '.join(methods)}")
    chosen, eval_rel = methods[label]
    if chosen.name not in NESTED:
        why = ("its artifact is already the whole model" if chosen.name == "full"
               else "AdaLoRA's adapter has per-layer ranks, not the nested adapter")
        raise ConfigError(f"{label}: only LoRA, DyLoRA, DyLoRA+ and Flexi-LoRA export as rank-r LoRA adapters; {why} "
                          f"({storage.display(f'train/{chosen.train_label}')}-…/{ARTIFACT})")
    train = stages.get(f"train:{chosen.train_label}")
    if train is None:
        raise ConfigError(f"{run.display()}: no train:{chosen.train_label} stage in {SUMMARY}")
    train_rel = f"train/{chosen.train_label}-{train['fingerprint']}"
    if not storage.exists(f"{train_rel}/{ARTIFACT}/{ADAPTER}"):
        raise ConfigError(f"{storage.display(train_rel)}: the trained adapter ({ARTIFACT}/{ADAPTER}) is missing")
    route_rel = None
    if chosen.needs_router:
        if "route" not in stages:
            raise ConfigError(f"{run.display()}: {label} routes with the learned router, but {SUMMARY} lists no route stage")
        route_rel = f"route/{stages['route']['fingerprint']}"
    recipe = _json(run, RECIPE, "recipe") if run.exists(RECIPE) else None
    train_inputs = _json(storage, f"{train_rel}/{MANIFEST}", "train stage manifest")["inputs"]
    model_inputs = train_inputs.get("model", {})
    if base_model is None and recipe is not None:
        base_model = recipe["model"]["name_or_path"]
    if base_model is None and route_rel is not None:
        base_model = _json(storage, f"{route_rel}/{ROUTER_DIR}/router.json", "router config").get("base_model") or None
    if base_model is None and "hub" in model_inputs:
        base_model = model_inputs["hub"]
    if base_model is None:
        raise ConfigError(f"{run.display()}: the run does not record its base model ({RECIPE} is missing); "
                          f"name it with --base-model")
    trust = bool(model_inputs.get("trust_remote_code", False))
    load_config(base_model, trust_remote_code=trust)  # a base model that cannot be found fails before any work
    task = dict(train_inputs.get("task", {}))
    return RunMethod(run, storage, summary, recipe, chosen, train_rel, eval_rel, route_rel, str(base_model), trust,
                     str(model_inputs.get("dtype", "float32")), task)


def _stage_root(run: Storage, stages: dict) -> Storage:
    """Stage folders lie below RUN_DIR, except for a sweep trial: its summary sits in the trial's folder and
    its stages in the sweep's shared storage, where the summary's recorded folders point."""
    for name, info in stages.items():
        kind, _, label = name.partition(":")
        if run.exists(f"{kind}/{label + '-' if label else ''}{info['fingerprint']}/{MANIFEST}"):
            return run
        folder = info.get("folder")
        if folder and not is_remote(folder) and (Path(folder) / MANIFEST).is_file():
            return Storage(Path(folder).parents[1])
    return run


# -- the formats -------------------------------------------------------------------------------------
def adapter_without_weights(base_model: str, adapter_dir: str | Path, *, trust_remote_code: bool = False):
    """The trained adapter on a base built on the meta device: a PEFT export reads only A, B and γ, so
    a 70B base costs no memory here."""
    from flexi_workflows.adapters.checkpoint import load_adapter
    from flexi_workflows.models.loading import build_on_meta, load_config

    base = build_on_meta(load_config(base_model, trust_remote_code=trust_remote_code))
    return load_adapter(base, adapter_dir, assign=True)


def export_peft_ranks(base_model: str, adapter_dir: str | Path, ranks: Sequence[int], out: str | Path, *,
                      trust_remote_code: bool = False) -> dict[int, Path]:
    """One PEFT LoRA folder per rank, `out/rank-<r>` (the scaling policy mapped onto PEFT's: export_peft)."""
    from flexi_workflows.adapters.checkpoint import export_peft

    model = adapter_without_weights(base_model, adapter_dir, trust_remote_code=trust_remote_code)
    return {int(r): export_peft(model, Path(out) / f"rank-{r}", int(r)) for r in ranks}


def export_merged(base_model: str, adapter_dir: str | Path, rank: int, out: str | Path, *, dtype: str | None = None,
                  trust_remote_code: bool = False) -> Path:
    """The base model's weights with rank `rank` folded in (W + γ(r)·B[:, :r]·A[:r]), saved as a plain
    transformers model folder (safetensors + config + the base's tokenizer or processor)."""
    import torch

    from flexi_workflows.adapters.checkpoint import load_adapter
    from flexi_workflows.models.loading import load_model

    base = load_model(base_model, dtype=getattr(torch, dtype) if dtype else None, trust_remote_code=trust_remote_code)
    merged = load_adapter(base, adapter_dir).merge_and_unload(int(rank))
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp))
        save_preprocessor(base_model, tmp, trust_remote_code=trust_remote_code)
    return Path(out)


def save_preprocessor(base_model: str, out: Path, *, trust_remote_code: bool = False) -> None:
    """The base model's own tokenizer (or a speech model's processor) files, unchanged."""
    from transformers import AutoProcessor, AutoTokenizer

    from flexi_workflows.models.loading import load_config, local_ref

    ref = local_ref(base_model)
    speech = load_config(base_model, trust_remote_code=trust_remote_code).model_type == "whisper"
    loader = AutoProcessor if speech else AutoTokenizer
    loader.from_pretrained(str(ref), trust_remote_code=trust_remote_code).save_pretrained(str(out))


def input_template(task_name: str) -> str | None:
    """The task's routed text as a template over `question` / `context`, if it is one (router/serving.py)."""
    from flexi_workflows.tasks import get_task

    task = get_task(task_name)
    template = getattr(task, "plain_template", None)
    if not template:
        return None
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    probe = {"question": "\x00q\x00", "context": "\x00c\x00"}
    if not fields <= set(probe) or task.user_text(dict(probe)) != template.format(**{f: probe[f] for f in fields}):
        return None
    return template


# -- the whole export --------------------------------------------------------------------------------
def export_run(run_dir: str | Path, *, formats: Sequence[str] = ("peft",), ranks: Sequence[int] | None = None,
               out: str | Path | None = None, method: str | None = None, base_model: str | None = None,
               copy_embeddings: bool = False, force: bool = False) -> dict:
    """Export one trained method of a finished run (see the module docstring); returns export.json."""
    from flexi_workflows.router.serving import save_serving_router

    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--format must be one or more of {', '.join(FORMATS)} (comma-separated), got {','.join(formats)}")
    run = locate(run_dir, method, base_model)
    allowed = run.export_ranks()
    ranks = sorted({int(r) for r in ranks}) if ranks else allowed
    bad = [r for r in ranks if r not in allowed]
    if bad:
        raise ConfigError(f"rank {bad[0]} is not one of {run.label}'s ranks {allowed}")
    if out is None:
        if run.run.remote:
            raise ConfigError(f"{run.run.display()} is remote storage: name a local folder with --out")
        out = run.run.local / "export"
    out = Path(out).expanduser().resolve()
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to replace it")
    files: dict[str, Any] = {"ranks": {}}
    with atomic_dir(out) as tmp:
        if "peft" in formats:
            export_peft_ranks(run.base_model, run.adapter_dir, ranks, tmp / "peft", trust_remote_code=run.trust_remote_code)
        if "merged" in formats:
            for r in ranks:
                export_merged(run.base_model, run.adapter_dir, r, tmp / "merged" / f"rank-{r}", dtype=run.dtype,
                              trust_remote_code=run.trust_remote_code)
        for r in ranks:
            files["ranks"][str(r)] = {f: f"{f}/rank-{r}" for f in FORMATS if f in formats}
        router_note = None
        pooling = (_json(run.storage, f"{run.route_rel}/{ROUTER_DIR}/router.json", "router config").get("pooling")
                   if run.route_rel is not None else None)
        if run.route_rel is not None and pooling != TEXT_POOLING:
            router_note = (f"the router pools audio ({pooling}); the serving router covers text only (the run's "
                           f"router is in {run.storage.display(f'{run.route_rel}/{ROUTER_DIR}')})")
        elif run.route_rel is not None:
            template = input_template(run.task["name"])
            save_serving_router(run.storage.local_path(f"{run.route_rel}/{ROUTER_DIR}"), tmp / "router",
                                class_ranks=run.method.ranks, base_model=run.base_model,
                                max_length=run.task.get("max_prompt_tokens", 512), input_template=template,
                                copy_embeddings=copy_embeddings, trust_remote_code=run.trust_remote_code,
                                extra={"method": run.label, "task": run.task["name"],
                                       "adapters": {str(r): {f: f"../{f}/rank-{r}" for f in FORMATS if f in formats}
                                                    for r in ranks}})
            files["router"] = "router"
        elif run.method.name == "flexi":
            router_note = ("oracle routing reads the base model's graded answers to the evaluation items: there "
                           "is no router to ship")
        record = {
            "method": run.label, "method_config": _method_config(run.method), "base_model": run.base_model,
            "run_dir": run.run.display(), "train_stage": run.train_rel, "formats": list(formats),
            "ranks": ranks, "class_ranks": _class_ranks(run), "files": files, "router_note": router_note,
        }
        (tmp / EXPORT_JSON).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / CARD).write_text(model_card(run, record))
    return {**record, "out": str(out)}


def _method_config(method: Method) -> dict:
    import dataclasses

    return dataclasses.asdict(method.config)


def _class_ranks(run: RunMethod) -> dict[str, int] | None:
    if run.method.name != "flexi":
        return None
    names = (run.recipe or {}).get("scoring", {}).get("class_names") or [f"class {k}" for k in range(len(run.method.ranks))]
    return dict(zip(names, run.method.ranks))


# -- the model card ----------------------------------------------------------------------------------
def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.1f} %"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def model_card(run: RunMethod, record: dict) -> str:
    """README.md of the export: what it is, how to load each part, its parameter counts and results."""
    import yaml

    metrics = run.read(f"{run.eval_rel}/{METRICS}")
    params = metrics.get("params", {})
    report = run.read(f"{run.train_rel}/{REPORT}")
    cfg = record["method_config"]
    summary = run.summary
    metric = summary.get("metric", "accuracy")
    name = summary.get("recipe", "run")
    lines = [f"# {name}: {run.label}", ""]
    what = {"flexi": "Flexi-LoRA (a per-input rank chosen by a difficulty router)", "lora": "LoRA",
            "dylora": "DyLoRA", "dylora_plus": "DyLoRA+"}[run.method.name]
    lines += [f"{what} on `{run.base_model}`, exported by `flexi export` from `{record['run_dir']}`.", ""]
    lines += [f"- ranks: {', '.join(map(str, run.method.ranks))}; exported: {', '.join(map(str, record['ranks']))}",
              (f"- scaling: {cfg.get('scaling')} (alpha {cfg.get('alpha')}); targets: "
               f"{', '.join(cfg.get('targets') or []) or 'the model type default'}")]
    if record["class_ranks"]:
        lines.append("- difficulty class → rank: " + ", ".join(f"{k} → {v}" for k, v in record["class_ranks"].items()))
    if summary.get("router_holdout_accuracy") is not None and run.route_rel:
        lines.append(f"- router held-out accuracy: {100 * summary['router_holdout_accuracy']:.1f} %")
    if record.get("router_note"):
        lines.append(f"- no router: {record['router_note']}")
    lines += ["", "## Files", ""]
    for r, where in record["files"]["ranks"].items():
        lines.append(f"- rank {r}: " + ", ".join(f"`{p}/` ({f})" for f, p in where.items()))
    if "router" in record["files"]:
        lines.append("- `router/`: request text → rank (`serving.json`: classes, class → rank, tokenizer, template)")
    lines += ["", "## Use", "", "From this folder:", "", "```python"]
    first = record["ranks"][-1]
    auto = "AutoModelForSpeechSeq2Seq" if run.task.get("name") == "speech" else "AutoModelForCausalLM"
    if record["formats"]:
        lines += [f"from transformers import {auto}"]
    if "peft" in record["formats"]:
        lines += ["from peft import PeftModel", "",
                  f"base = {auto}.from_pretrained({run.base_model!r})",
                  f"model = PeftModel.from_pretrained(base, \"peft/rank-{first}\")   # one adapter per rank"]
    if "merged" in record["formats"]:
        lines += [f"merged = {auto}.from_pretrained(\"merged/rank-{first}\")  # rank {first} folded in"]
    lines.append("")
    if "router" in record["files"]:
        lines += ["from flexi_workflows.router.serving import load_router", "",
                  "router = load_router(\"router\")",
                  "ranks = router.route([\"What is 3 plus 4?\"])   # the adapter (rank) for each request"]
    lines += ["```", ""]
    base_params, per_rank = params.get("base_params"), params.get("params_per_rank")
    lines += ["## Parameters", "", "| what | parameters | % of base |", "|---|---:|---:|"]

    def row(what: str, n: float | None) -> None:
        share = f"{100 * n / base_params:.4f} %" if n is not None and base_params else "-"
        lines.append(f"| {what} | {_fmt(n)} | {share} |")

    row("base model", base_params)
    row(f"trainable (rank {max(run.method.ranks)} adapter)", report.get("trainable_params") or params.get("trainable_params"))
    for r in run.export_ranks():
        row(f"active at rank {r}", per_rank * r if per_rank else None)
    for dataset, result in metrics.get("datasets", {}).items():
        if result.get("mean_active_params") is not None:
            mean_rank = f", mean rank {result['mean_rank']:.2f}" if result.get("mean_rank") is not None else ""
            row(f"mean active on {dataset}{mean_rank}", result["mean_active_params"])
    rows = summary.get("rows", [])
    if rows:
        groups = sorted({k[len(metric) + 1:] for r in rows for k in r
                         if k.startswith(f"{metric}_") and k != f"{metric}_all" and r.get(k) is not None})
        lines += ["", f"## Evaluation ({metric}, from the run's {SUMMARY})", "",
                  "| method | dataset | " + " | ".join(f"{metric} {g}" for g in groups + ["all"])
                  + " | mean active | % of LoRA-8 | → highest rank |",
                  "|---|---|" + "---:|" * (len(groups) + 4)]
        for r in rows:
            method = f"**{r['method']}**" if r["method"] == run.label else r["method"]
            cells = [_fmt(r.get(f"{metric}_{g}"), pct=True) for g in groups + ["all"]]
            share = f"{r['params_pct_of_lora8']:.1f} %" if r.get("params_pct_of_lora8") is not None else "-"
            lines.append(f"| {method} | {r['dataset']} | " + " | ".join(cells)
                         + f" | {_fmt(r.get('mean_active_params'))} | {share} | {_fmt(r.get('high_rank_rate'), pct=True)} |")
    lines += ["", "## Recipe", ""]
    if run.recipe is not None:
        lines += ["The recipe as run (`recipe.json` of the run):", "", "```yaml",
                  yaml.safe_dump(run.recipe, sort_keys=False, default_flow_style=None, width=110).rstrip(), "```"]
    else:
        inputs = run.read(f"{run.train_rel}/{MANIFEST}")["inputs"]
        lines += ["The run predates `recipe.json`; the train stage's recorded inputs:", "", "```json",
                  json.dumps(inputs, indent=2), "```"]
    steps = report.get("steps")
    curve = report.get("loss_curve") or []
    if steps is not None:
        loss = f"; loss {curve[0][1]:.3f} → {curve[-1][1]:.3f}" if curve else ""
        lines += ["", f"Trained {steps} steps on {report.get('rows')} rows{loss}."]
    return "\n".join(lines) + "\n"
