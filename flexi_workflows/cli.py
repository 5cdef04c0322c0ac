"""The `flexi` command line.

Each subcommand is a thin shell over a library function; errors that are the user's input
(FlexiError) print one clear line and exit 2 instead of a stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

from flexi_workflows.errors import ConfigError, FlexiError


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} is empty")
    return values


def _float_list(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None


def cmd_params(args: argparse.Namespace) -> int:
    from flexi_workflows.adapters.accounting import param_report
    from flexi_workflows.adapters.model import resolve_targets
    from flexi_workflows.models.loading import build_on_meta, load_config

    if args.rank is not None:
        if args.mix is not None:
            raise ConfigError("--mix goes with --ranks (a set of rank classes), not with --rank")
        ranks = [args.rank]
    else:
        ranks = _int_list(args.ranks, "--ranks")
    if any(r < 1 for r in ranks):
        raise ConfigError(f"ranks must be ≥ 1, got {ranks}")
    if ranks != sorted(ranks) or len(set(ranks)) != len(ranks):
        raise ConfigError(f"--ranks must be strictly increasing, got {ranks}")
    mix = _float_list(args.mix, "--mix") if args.mix is not None else None

    config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    model = build_on_meta(config)
    targets = resolve_targets(model, _targets(args.targets))
    report = param_report(
        model,
        targets,
        max(ranks),
        ranks=ranks if mix is not None else None,
        mix=mix,
        learned_scaling=args.learned_scaling,
    )
    if mix is None and len(ranks) > 1:
        report.active_params = {r: report.params_per_rank * r for r in ranks}
    out = {"model": args.model, "model_type": config.model_type, "targets": targets, **report.to_dict()}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"model             {args.model} ({config.model_type})")
    print(f"targets           {', '.join(targets)}")
    print(f"base params       {report.base_params:,}")
    print(f"params per rank   {report.params_per_rank:,}")
    for r, n in report.active_params.items():
        print(f"active at r={r:<4}  {n:,}  ({100 * n / report.base_params:.4f} % of base)")
    print(f"LoRA at r_max={report.r_max:<3} {report.lora_params:,}  ({report.lora_pct_of_base:.4f} % of base)")
    if report.scaling_params:
        print(f"learned γ params  {report.scaling_params:,}")
    print(
        f"trainable share   {report.trainable_pct_of_total:.4f} % of base+trainable "
        f"({report.total_params:,}; PEFT's trainable%)"
    )
    if report.mean_active_params is not None:
        print(
            f"mean active       {report.mean_active_params:,.0f}  (mean rank {report.mean_rank:.3f}; "
            f"{100 * report.mean_active_params / report.lora_params:.2f} % of LoRA-{report.r_max}; "
            f"{100 * report.mean_active_params / report.base_params:.4f} % of base; "
            f"{report.active_pct_of_total(report.mean_active_params):.4f} % of base+trainable)"
        )
    return 0


def _targets(text: str | None) -> list[str] | None:
    if text is None:
        return None
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise ConfigError("--targets is empty")
    return targets


def _load_recipe(args: argparse.Namespace):
    """The recipe with every check `flexi check` runs passed: a stage command fails before Ray starts too."""
    from flexi_workflows.pipeline import prepare
    from flexi_workflows.recipes import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    _methods(recipe, getattr(args, "method", None))  # a wrong --method is named before the slower checks
    return prepare(recipe, need_eval=args.command in ("run", "eval", "check"))


def cmd_check(args: argparse.Namespace) -> int:
    """Everything that can be checked before work starts; exit 0 with what the data looks like and what
    would run, or 2 with the error."""
    import os

    from flexi_workflows.pipeline import check_plan
    from flexi_workflows.stages.plan import plan_pipeline
    from flexi_workflows.tasks import get_task

    recipe = _load_recipe(args)  # every check `flexi run` makes first
    task = get_task(recipe.task)
    metric = getattr(task, "metric_spec", task.metric)
    print(f"{recipe.name}: task {recipe.task.name}, metric {metric}"
          + (f" (reported as {task.metric})" if metric != task.metric else ""))

    def shown(path: str | None) -> str | None:
        return os.path.relpath(path) if path and Path(path).resolve().is_relative_to(Path.cwd()) else path

    first = None
    for key, source in recipe.task.keyed_sources():
        rows = task.load(source)
        first = first or rows[0]
        shape = "" if recipe.task.name != "custom" else ", chat" if rows[0].get("context") else ", prompt/completion"
        print(f"{key}: {len(rows)} rows{shape} from {shown(source.path) or source.name}")
    if first is not None and task.modality == "text":
        from flexi_workflows.models.loading import load_tokenizer

        tokenizer = load_tokenizer(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
        print("\nthe first row as the model sees it:\n"
              + task.build_prompt(first, tokenizer, date_string=recipe.task.date_string) + " " + first["target"] + "\n")
    stages = check_plan(plan_pipeline(recipe))
    finished = [s.name for s in stages if s.finished() is not None]
    todo = [s.name for s in stages if s.name not in finished]
    print(f"{args.recipe}: OK — {len(stages)} stages; to run: {', '.join(todo) or 'none'}"
          + (f"; finished (reused): {', '.join(finished)}" if finished else ""))
    return 0


def _methods(recipe, wanted: str | None):
    from flexi_workflows.methods import method_label

    methods = {method_label(m): m for m in recipe.methods}
    if wanted is None:
        return list(methods.values())
    if wanted not in methods:
        raise ConfigError(f"--method {wanted!r} is not in this recipe; it has: {', '.join(methods)}")
    return [methods[wanted]]


def cmd_train(args: argparse.Namespace) -> int:
    from flexi_workflows.stages.train import REPORT, run_train

    recipe = _load_recipe(args)
    for method in _methods(recipe, args.method):
        result = run_train(recipe, method, force=args.force)
        report = result.read_json(REPORT)
        curve = report["loss_curve"]
        loss = f"loss {curve[0][1]:.3f} → {curve[-1][1]:.3f}" if curve else ""
        print(f"trained {report['method']}: {report['steps']} steps, {report['trainable_params']:,} trainable params; "
              f"{loss} → {result.location}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from flexi_workflows.stages.evaluate import METRICS, run_eval

    recipe = _load_recipe(args)
    for method in _methods(recipe, args.method):
        results = run_eval(recipe, method, force=args.force).read_json(METRICS)
        for name, summary in results["datasets"].items():
            shown = {k: round(v, 4) for k, v in summary.items() if isinstance(v, float)}
            print(f"{results['method']} on {name}: {shown}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flexi_workflows.pipeline import run_pipeline
    from flexi_workflows.recipes import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.sweep is not None:
        print(f"note: {args.recipe} has a sweep: section; `flexi run` runs the recipe once as written, "
              f"`flexi sweep {args.recipe}` runs its trials", file=sys.stderr)
    run_pipeline(recipe, recipe_path=args.recipe, force=args.force)
    from flexi_workflows.stages.base import recipe_storage

    print(f"\nsummary → {recipe_storage(recipe).display('summary.json')}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from flexi_workflows.recipes import load_recipe
    from flexi_workflows.sweep import run_sweep

    recipe = load_recipe(args.recipe, args.overrides)
    state = run_sweep(recipe, recipe_path=args.recipe)
    return 0 if state.get("finished") else 1


def cmd_report(args: argparse.Namespace) -> int:
    from flexi_workflows.report import build_report, format_table

    report = build_report(args.sweep_dir)
    print(format_table(report))
    print(f"\nreport → {(Path(args.sweep_dir) / 'report').resolve()}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from flexi_workflows.stages.score import STATS, run_score

    result = run_score(_load_recipe(args), force=args.force)
    stats = result.read_json(STATS)
    shares = ", ".join(f"{c['name']} {c['count']} ({100 * c['share']:.1f} %)" for c in stats["classes"])
    print(f"scored {stats['total']} rows → {result.location}; mean {stats['metric']} {stats['mean_score']:.3f}; {shares}")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from flexi_workflows.stages.route import REPORT, run_route

    result = run_route(_load_recipe(args), force=args.force)
    hold = result.read_json(REPORT)["holdout"]
    recall = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in hold["per_class_recall"].items())
    print(f"router → {result.location}; held-out accuracy {hold['accuracy']:.3f} on {hold['size']} rows; recall: {recall}")
    print(f"confusion (rows true, columns predicted): {hold['confusion_matrix']}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses

    from flexi_workflows.memory import GiB, detect_gpu_memory, format_plan, plan_recipe
    from flexi_workflows.models.pretrain import builtin_spec, resolve_builtin
    from flexi_workflows.recipes import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if builtin_spec(recipe.model.name_or_path) is not None:  # built on first use, as `flexi run` would
        folder = resolve_builtin(recipe.model.name_or_path, recipe.model.cache_dir)
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name_or_path=folder))
    if args.gpu_memory_gib is not None:
        if args.gpu_memory_gib <= 0:
            raise ConfigError(f"--gpu-memory-gib must be > 0, got {args.gpu_memory_gib}")
        memory, source = args.gpu_memory_gib * GiB, "--gpu-memory-gib"
    else:
        memory, source = detect_gpu_memory()
    plan = plan_recipe(recipe, gpu_memory=memory, gpu_memory_source=source, methods=_methods(recipe, args.method))
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan))
    return 1 if plan.warnings() else 0


def cmd_export(args: argparse.Namespace) -> int:
    from flexi_workflows.export import export_run

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    ranks = None if args.all_ranks else [args.rank]
    record = export_run(args.run_dir, formats=formats, ranks=ranks, out=args.out, method=args.method,
                        base_model=args.base_model, copy_embeddings=args.router_embeddings == "copy", force=args.force)
    print(f"exported {record['method']} (base {record['base_model']}) → {record['out']}")
    for rank, where in record["files"]["ranks"].items():
        print(f"  rank {rank}: " + ", ".join(f"{p}/" for p in where.values()))
    if "router" in record["files"]:
        print(f"  router: router/ (class → rank {record['class_ranks']})")
    elif record.get("router_note"):
        print(f"  no router: {record['router_note']}")
    print("  model card: README.md")
    return 0


def _add_stage(sub, name: str, func, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("recipe", metavar="RECIPE", help="YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.add_argument("--force", action="store_true", help="recompute even if the inputs are unchanged")
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexi", description="Flexi-LoRA workflows: input-adaptive LoRA ranks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "params",
        help="parameter accounting for LoRA / Flexi-LoRA on a model (built on the meta device, no weights)",
        description="Count base, per-rank, LoRA and mean active parameters. MODEL is a config.json, "
        "a local model folder or a hub name.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--targets", help="comma-separated target module names (default: the model type's)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="a static LoRA rank")
    group.add_argument("--ranks", help="comma-separated rank classes, e.g. 2,8")
    p.add_argument("--mix", help="share of inputs at each of --ranks, e.g. 0.94,0.06 (sums to 1)")
    p.add_argument("--learned-scaling", action="store_true", help="count the learned per-rank γ scalars too")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("check", help="every check that can run before work starts (recipe, data, model, resources, "
                       "tracking, output folder)",
                       description="Load RECIPE with its overrides and run every check `flexi run` runs before Ray "
                                   "starts: values, data files parsed, tokenizer and target modules on the meta device, "
                                   "resources, tracking store, output folder. Exit 0 and list the stages to run, or "
                                   "exit 2 with an error naming the file, line or key.")
    p.add_argument("recipe", metavar="RECIPE", help="YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.set_defaults(func=cmd_check)
    _add_stage(sub, "score", cmd_score, "score the training set with the base model on Ray Data (difficulty classes)")
    _add_stage(sub, "route", cmd_route, "train the difficulty router on the scored training set")
    _add_stage(sub, "train", cmd_train, "fine-tune the recipe's methods on Ray Train (DeepSpeed ZeRO or DDP)")
    _add_stage(sub, "eval", cmd_eval, "evaluate the trained methods on the recipe's eval sets (Ray Data)")
    _add_stage(sub, "run", cmd_run, "the whole pipeline: score → route → train → evaluate, skipping finished stages")
    p = sub.add_parser(
        "plan", help="per-GPU memory of the recipe's training and generation, estimated before anything runs",
        description="Model states (params / grads / optimizer, partitioned by the ZeRO stage), a rough activation "
                    "estimate and the generation actors' memory, per GPU, for each method of RECIPE; warns (exit "
                    "status 1) when an estimate exceeds the GPU memory. The model needs only its config.json.")
    p.add_argument("recipe", metavar="RECIPE", help="YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU in GiB (default: this machine's CUDA "
                   "device, or FLEXI_GPU_MEMORY_GIB; with neither the fit is not checked)")
    p.add_argument("--method", help="only this method label, e.g. flexi-2-8 or full")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("sweep", help="a Ray Tune sweep over the recipe's `sweep:` search space",
                       description="Run (or resume) the trials of the recipe's `sweep:` section on Ray Tune; stages "
                                   "that trials share run once. Writes <output_dir>/sweep.json, trials/ and report/.")
    p.add_argument("recipe", metavar="RECIPE", help="YAML recipe with a sweep: section")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides (sweep.* too)")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("report", help="aggregate a sweep's trials over seeds: tables and plots",
                       description="Mean ± std over seeds per method × dataset × setting; writes SWEEP_DIR/report/.")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep's output_dir (holds sweep.json and trials/)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser(
        "export", help="a finished run's adapter for serving: PEFT LoRA per rank, merged weights, the router",
        description="Export one trained method of RUN_DIR (a recipe's output_dir after `flexi run`): a PEFT LoRA "
                    "folder per rank and/or full weights with a rank merged in, the router as a standalone artifact "
                    "(request text → rank), and a model card. Written to a temp folder, then renamed.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder (holds summary.json)")
    p.add_argument("--method", help="the method label, e.g. flexi-2-8 or lora-8 (default: the run's Flexi-LoRA method)")
    p.add_argument("--format", default="peft", help="peft, merged or peft,merged (default peft)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="export this rank")
    group.add_argument("--all-ranks", action="store_true", help="export every rank of the method")
    p.add_argument("--out", help="the export folder (default RUN_DIR/export)")
    p.add_argument("--base-model", help="the base model, where the run does not record it or it has moved")
    p.add_argument("--router-embeddings", choices=("reference", "copy"), default="reference",
                   help="the router reads the base model's input embeddings from the base model (reference, "
                        "default) or from its own copy of the table (copy: standalone, one table's size)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export)
    for name in ("train", "eval"):
        sub.choices[name].add_argument("--method", help="only this method label, e.g. flexi-2-8 or lora-8")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow options such as --method; anything else is a real error
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from flexi_workflows.ray_cluster import quiet_console

    quiet_console()  # before anything imports Ray Data
    func: Callable[[argparse.Namespace], int] = args.func
    # SIGTERM (a scheduler, `kill`, `ray job stop`, a container stop) ends a run the way Ctrl-C does: through
    # Python, so Ray is shut down at exit and the one line below says what is kept (ensure_ray puts this
    # handler back after ray.init replaced it)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not getattr(sys.unraisablehook, "flexi_stop", False):  # once per process (tests call main() again)
        previous_hook = sys.unraisablehook

        def hook(unraisable) -> None:
            _raise_swallowed_stop_again(unraisable, previous_hook)

        hook.flexi_stop = True
        sys.unraisablehook = hook
    try:
        return func(args)
    except FlexiError as exc:
        print(f"flexi {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _STOP.handled = True
        if not _STOP.terminated:
            print(f"\nflexi {args.command}: interrupted. {_what_is_kept(args)}", file=sys.stderr)
            return 130
    except SystemExit as exc:
        _STOP.handled = True
        # ray.init's own handler (sys.exit(SIGTERM)) if a SIGTERM came while Ray was starting
        if exc.code != signal.SIGTERM and not _STOP.terminated:
            raise
    print(f"\nflexi {args.command}: terminated. {_what_is_kept(args)}", file=sys.stderr)
    _stop_ray_and_exit(128 + signal.SIGTERM)
    return 128 + signal.SIGTERM  # not reached: _stop_ray_and_exit leaves the process


def _stop_ray_and_exit(code: int) -> None:
    """After SIGTERM: stop Ray now, flush, and leave without the interpreter's teardown of Ray's core worker
    (ensure_ray keeps Ray's C++ handler, and its 3-second abort alarm, away from SIGTERM)."""
    import os

    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _STOP:
    """What the SIGTERM handler saw: `terminated` once a SIGTERM came, `handled` once main() caught the stop."""

    terminated = False
    handled = False


def _on_sigterm(signum, frame) -> None:
    """A SIGTERM stops the run as Ctrl-C does, by raising KeyboardInterrupt, and says it was a SIGTERM.
    Not SystemExit: Ray's ray.get passes a KeyboardInterrupt raised in a handler on unchanged, but turns a
    SystemExit into SystemExit(1), so a run stopped while it waited for its actors ended with exit 1 and
    not one line saying so."""
    _STOP.terminated = True
    if not _STOP.handled:  # a second SIGTERM while the run stops (stopping Ray) leaves that alone
        raise KeyboardInterrupt


def _raise_swallowed_stop_again(unraisable, previous_hook: Callable) -> None:
    """sys.unraisablehook: Python drops an exception raised while it runs a finalizer (a __del__, a weakref
    callback, a generator closed by the garbage collector; Ray's object references have them) after printing
    it. A SIGTERM whose handler ran there would be lost and the run would go on, so it is delivered to the
    main thread again, from another thread once this hook has returned (raised in the hook, it would be
    dropped as well); the next raise lands in ordinary code."""
    if _STOP.terminated and not _STOP.handled and issubclass(unraisable.exc_type, KeyboardInterrupt):
        import _thread
        import threading

        threading.Timer(0.05, _thread.interrupt_main, (signal.SIGTERM,)).start()
        return
    previous_hook(unraisable)


def _what_is_kept(args: argparse.Namespace) -> str:
    """Where a rerun picks up: finished stages are reused and training resumes from its last checkpoint."""
    recipe_file = getattr(args, "recipe", None)
    if not recipe_file:
        return "Rerun the same command to go on."
    try:
        from flexi_workflows.recipes import load_recipe
        from flexi_workflows.stages.base import recipe_storage

        where = recipe_storage(load_recipe(recipe_file, getattr(args, "overrides", []))).display("")
    except (FlexiError, OSError):
        where = "the recipe's output folder"
    return (f"Finished stages are kept in {where}; rerun the same command to go on: they are reused, and an "
            f"interrupted training resumes from its last checkpoint.")


if __name__ == "__main__":
    sys.exit(main())
