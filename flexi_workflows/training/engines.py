"""The two ways a worker drives its model: a DeepSpeed engine (ZeRO 0-3) or DDP.

Both offer the same four things the loop needs — `backward_step` (returns True at an optimizer
step), `save` / `load` (the full training state through a Ray Train checkpoint folder) and `export`
(the method's artifact, written by rank 0) — so the loop in loop.py never asks which one it has.

The DeepSpeed config is built here from the recipe (deepspeed_config_for) on the driver, merged under
distribution.deepspeed_config's file; under ZeRO-3 the model is loaded already partitioned
(partitioned_build) and exported by gathering only what the artifact holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import torch

from flexi_workflows.errors import ConfigError
from flexi_workflows.methods import Method, Trainable
from flexi_workflows.recipes.schema import Recipe

# where each key the recipe sets in the DeepSpeed config comes from (the conflict messages name it)
RECIPE_KEYS = {
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "train_batch_size": "training.micro_batch_size × gradient_accumulation_steps × distribution.num_workers",
    "gradient_clipping": "training.max_grad_norm",
    "zero_optimization.stage": "distribution.zero_stage",
    "zero_optimization.offload_optimizer.device": "distribution.offload_optimizer",
    "zero_optimization.offload_param.device": "distribution.offload_params",
    "bf16.enabled": "distribution.precision",
    "fp16.enabled": "distribution.precision (auto, fp32 or bf16; no fp16)",
    # a torch AdamW: DeepSpeed's own CPU/fused Adam compile C++ ops at first use (minutes on CPU); ZeRO-Offload
    # runs the torch optimizer on the CPU copy (measured: same losses as without offload)
    "zero_allow_untested_optimizer": "flexi-workflows (it passes DeepSpeed a torch AdamW)",
    "zero_force_ds_cpu_optimizer": "flexi-workflows (it passes DeepSpeed a torch AdamW)",
}
# what a deepspeed_config file may change without conflict: logging only
DEFAULTS = {"steps_per_print": 1 << 30, "wall_clock_breakdown": False}
# sections the recipe owns as a whole: the optimizer and schedule are built from training.*
OWNED = {"optimizer": "training.lr, training.weight_decay (a torch AdamW)",
         "scheduler": "training.schedule, training.warmup_ratio"}


def deepspeed_config(*, micro_batch_size: int, accumulation: int, max_grad_norm: float, zero_stage: int,
                     bf16: bool, num_workers: int = 1, offload_optimizer: str = "none",
                     offload_params: str = "none") -> dict[str, Any]:
    """The DeepSpeed config the recipe's own values make (every key of it is in RECIPE_KEYS or DEFAULTS)."""
    zero: dict[str, Any] = {"stage": zero_stage, "offload_optimizer": {"device": offload_optimizer}}
    if zero_stage == 3:
        zero["offload_param"] = {"device": offload_params}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * num_workers,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        **DEFAULTS,
    }


DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size, in elements


def reduce_bucket_elements(config: dict[str, Any], trainable_elements: int) -> int | None:
    """The gradient-reduction bucket a worker's ZeRO 1-3 engine gets (None below ZeRO-1, which has none):
    the config's own `zero_optimization.reduce_bucket_size` where it sets one, else DeepSpeed's 5e8
    capped at the trainable parameter count.

    Why the cap: DeepSpeed allocates that bucket at its full size whatever is trained (ZeRO-3 once at setup,
    ZeRO-1/2 with every backward, twice with overlap_comm), 5e8 elements = 0.93 GiB in bf16, while an
    adapter's gradients are a few million elements. A bucket of the trainable count still holds every
    gradient, so the reductions are the ones the default makes; for full fine-tuning of a model over 5e8
    parameters nothing changes. memory.py counts the same bucket."""
    zero = config.get("zero_optimization") or {}
    if int(zero.get("stage", 0)) < 1:
        return None
    if "reduce_bucket_size" in zero:
        return int(zero["reduce_bucket_size"])
    return max(1, min(DEEPSPEED_REDUCE_BUCKET, int(trainable_elements)))


def with_reduce_bucket(config: dict[str, Any], trainable_elements: int) -> dict[str, Any]:
    """`config` with reduce_bucket_elements' value written in (a copy; the config is left as it is when it
    sets the bucket itself or is below ZeRO-1)."""
    zero = config.get("zero_optimization") or {}
    bucket = reduce_bucket_elements(config, trainable_elements)
    if bucket is None or "reduce_bucket_size" in zero:
        return config
    return {**config, "zero_optimization": {**zero, "reduce_bucket_size": bucket}}


def read_deepspeed_file(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON config file; a missing file or invalid JSON is a ConfigError naming it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"distribution.deepspeed_config: {file} is not a file")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"distribution.deepspeed_config: {file} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"distribution.deepspeed_config: {file} cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"distribution.deepspeed_config: {file} must hold a JSON object, got {type(data).__name__}")
    return data


def merge_deepspeed_config(file_config: dict[str, Any], own: dict[str, Any], *, source: str) -> dict[str, Any]:
    """`own` (the recipe's config) over the file's: keys only in the file pass through, a key both set
    to different values is a ConfigError naming the file, the key, both values and the recipe key.
    "auto" (the Hugging Face Trainer's placeholder) takes the recipe's value where the recipe sets one;
    `zero_optimization.reduce_bucket_size: "auto"` is dropped, so the worker sizes it (reduce_bucket_elements)."""
    for section, owner in OWNED.items():
        if section in file_config:
            raise ConfigError(f"{source}: `{section}` is set by the recipe ({owner}); remove it from the file")

    def merge(file_part: dict, own_part: dict, prefix: str) -> dict:
        out = dict(file_part)
        for key, value in own_part.items():
            dotted = prefix + key
            if key not in file_part:
                out[key] = value
            elif isinstance(value, dict):
                if not isinstance(file_part[key], dict):
                    raise ConfigError(f"{source}: `{dotted}` must be an object (the recipe sets {dotted}.*), "
                                      f"got {file_part[key]!r}")
                out[key] = merge(file_part[key], value, dotted + ".")
            elif file_part[key] == "auto" or dotted in DEFAULTS:
                out[key] = file_part[key] if dotted in DEFAULTS else value
            elif file_part[key] != value or isinstance(file_part[key], bool) != isinstance(value, bool):
                raise ConfigError(f"{source}: `{dotted}` is {file_part[key]!r} in the file but {value!r} from the "
                                  f"recipe ({RECIPE_KEYS.get(dotted, 'flexi-workflows')}); remove it from the file "
                                  f"or set the recipe key to match")
        return out

    merged = merge(file_config, own, "")
    zero = merged.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("reduce_bucket_size") == "auto":
        # the worker sizes it from what is trained (reduce_bucket_elements), as if the file did not set it
        merged["zero_optimization"] = {k: v for k, v in zero.items() if k != "reduce_bucket_size"}
    auto = [k for k, v in _leaves(merged) if v == "auto"]
    if auto:
        raise ConfigError(f"{source}: {', '.join(auto)} = \"auto\": flexi-workflows fills \"auto\" only for the keys "
                          f"the recipe sets ({', '.join(sorted(RECIPE_KEYS))}) and "
                          f"zero_optimization.reduce_bucket_size; give a value")
    return merged


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def deepspeed_config_for(recipe: Recipe) -> dict[str, Any]:
    """The DeepSpeed config of a recipe: its own values merged over distribution.deepspeed_config's file.
    Built on the driver; workers get the result, so the file need not exist on their nodes."""
    train, dist = recipe.training, recipe.distribution
    own = deepspeed_config(micro_batch_size=train.micro_batch_size, accumulation=train.gradient_accumulation_steps,
                           max_grad_norm=train.max_grad_norm, zero_stage=dist.zero_stage, bf16=dist.bf16,
                           num_workers=dist.num_workers, offload_optimizer=dist.offload_optimizer,
                           offload_params=dist.offload_params)
    if not dist.deepspeed_config:
        return own
    return merge_deepspeed_config(read_deepspeed_file(dist.deepspeed_config), own,
                                  source=f"distribution.deepspeed_config {dist.deepspeed_config}")


OP_BUILT = re.compile(r"DeepSpeed \S+ built successfully")  # deepspeed/comm/torch.py, on every load of its op
SHM_COMM_OP = "deepspeed_shm_comm"  # deepspeed/ops/op_builder/cpu/comm.py: ShareMemCommBuilder.NAME


def skip_cpu_inference_comm_op() -> None:
    """On a CPU accelerator, DeepSpeed's comm layer starts without its shared-memory all-reduce op (see
    one_op_build); elsewhere nothing changes (no other accelerator builds that op)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


@contextmanager
def one_op_build() -> Iterator[None]:
    """Around DeepSpeed's start. On CPU its comm layer compiles a C++ op (shared-memory all-reduce, 25–32 s
    on 2 cores, and a C++ compiler needed) that only `inference_all_reduce` uses, DeepSpeed's tensor-parallel
    inference: training reduces through torch.distributed (gloo) with or without it. So on a CPU
    accelerator the op is marked incompatible (`deepspeed.ops.__compatible_ops__`, the dict DeepSpeed
    probes once and keeps for edits) and DeepSpeed starts without it: no build on a fresh machine, and
    `inference_all_reduce` falls back to torch.distributed, as DeepSpeed does on a CPU without AVX2.
    An op DeepSpeed compiles on demand later still builds, with torch's cpp_extension, which runs the
    first `ninja` on PATH and keeps the build in one folder per Python version
    (~/.cache/torch_extensions/py311_cpu). Two things made such a build (the shared-memory op's, before)
    run again and again:
    - the ninja: a Ray job's PATH starts with the virtualenv's bin (ninja 1.13), `.venv/bin/flexi` from a
      plain shell finds the system's (1.11), and ninja 1.12 changed how its log hashes a command, so each
      found the other's build out of date;
    - the folder: two checkouts (two virtualenvs) compile against their own torch, in the one folder.
    So this environment's own ninja, when it has one, and a folder of its own (a TORCH_EXTENSIONS_DIR the
    user set wins): one build, found again by every process of the environment. PATH is restored after; it
    is changed for the block only, in which the worker starts DeepSpeed before its training steps (a
    subprocess another thread starts meanwhile would see this environment's bin first, nothing worse).
    On CUDA, DeepSpeed builds no such op at start; only the folder is set, for ops it compiles later.
    DeepSpeed prints "DeepSpeed <op> built successfully" each time it loads an op; the block's stdout is
    held and given back without that line (and given back on failure too)."""
    skip_cpu_inference_comm_op()
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH")
    own_ninja = os.path.isfile(os.path.join(bin_dir, "ninja"))
    if own_ninja:
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        # what torch's own folder name says (Python, CUDA), plus this environment and its torch
        environment = f"{os.path.realpath(sys.prefix)}\0{torch.__version__}\0{torch.version.cuda}"
        key = hashlib.sha256(environment.encode()).hexdigest()[:12]
        version = f"py{sys.version_info.major}{sys.version_info.minor}"
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                                                          f"flexi-{version}-{key}")
    held = io.StringIO()
    try:
        with redirect_stdout(held):
            yield
    finally:
        kept = [line for line in held.getvalue().splitlines(keepends=True) if not OP_BUILT.fullmatch(line.rstrip("\n"))]
        sys.stdout.write("".join(kept))
        if own_ninja:  # as it was, unset included
            if path is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = path


@contextmanager
def partitioned_build(ds_config: dict[str, Any]) -> Iterator[None]:
    """ZeRO-3: models built or loaded inside come out already partitioned (transformers' DeepSpeed integration:
    from_pretrained runs under deepspeed.zero.Init and rank 0 alone copies the checkpoint's values in,
    one module at a time), so no worker ever holds the whole model as parameters, on CPU or GPU. What remains
    (transformers 5.24): rank 0 reads the checkpoint's tensors into CPU memory while it copies them in (the
    other ranks read shapes only), freed when loading ends. The global HF DeepSpeed config lives only for
    the block: later calls (save_pretrained, generate) must not think they run under ZeRO-3."""
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # zero.Init reads the world size from DeepSpeed's comm layer when it parses the config, before it starts
    # that layer itself: start it first (it adopts Ray Train's process group, as deepspeed.initialize does)
    with one_op_build():
        deepspeed.init_distributed()
    handle = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference: hold it for the block
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del handle


def param_elements(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this worker holds, elements of the whole model): under ZeRO-3 a parameter's local
    storage is its partition `ds_tensor` and `ds_numel` its full size."""
    held = total = 0
    for p in model.parameters():
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        total += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return held, total


def gathered_state_dict(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (None elsewhere), gathered one module at a time as DeepSpeed's own
    consolidation does: a rank holds one module's full weights at a time, and rank 0 keeps a CPU copy of
    each (writing the whole model needs it once). Every rank calls it."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}  # tied weights: one ZeRO parameter under two names

    def visit(module: torch.nn.Module, prefix: str) -> None:
        own = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            if rank == 0:
                for name, p in module.named_parameters(recurse=False):
                    key = id(p)
                    state[prefix + name] = state[seen[key]] if key in seen else p.detach().cpu().clone()
                    seen.setdefault(key, prefix + name)
                for name, buf in module.named_buffers(recurse=False):
                    if buf is not None and name not in module._non_persistent_buffers_set:
                        state[prefix + name] = buf.detach().cpu().clone()
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(model, "")
    return state if rank == 0 else None


# What a DeepSpeed checkpoint legitimately holds besides tensors and plain containers (read off
# torch.serialization.get_unsafe_globals_in_checkpoint for ZeRO 0-3, fp32 and bf16, DeepSpeed 0.19.8)
DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file holds objects that only unpickling arbitrary code could restore."""


def load_weights_only(path: str | Path, map_location: Any = None, allowed: tuple[str, ...] = ()) -> Any:
    """torch.load that restores tensors, plain containers and the named classes, and nothing else.

    Checkpoints live under the run's output folder (ray_results), which anyone who can write there
    could replace; torch's full unpickler would run whatever such a file names. Refusing is cheap: the
    files this project writes load under these rules, so a refusal means the file is not ours."""
    import importlib
    import pickle

    classes = []
    for dotted in allowed:
        module, _, name = dotted.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    try:
        with torch.serialization.safe_globals(classes):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path) if Path(path).is_file() else []
        raise UnsafeCheckpointError(
            f"checkpoint file {path} holds objects beyond tensors ({', '.join(found) or exc}); it is not a "
            f"checkpoint flexi-workflows wrote, and loading it would run code. Delete the checkpoint folder "
            f"(or rerun with --force) to train from the start.") from None


def weights_only_checkpoints(engine) -> None:
    """Route every DeepSpeed checkpoint read of this engine (model, optimizer and scheduler states, all
    through engine.checkpoint_engine.load) through load_weights_only."""
    def load(path: str, map_location: Any = None) -> Any:
        return load_weights_only(path, map_location, DEEPSPEED_CHECKPOINT_GLOBALS)

    engine.checkpoint_engine.load = load


def frozen_aware_zero3_linear() -> bool:
    """Under ZeRO-3, DeepSpeed (zero_optimization.memory_efficient_linear, on by default) replaces
    torch.nn.functional.linear, for the whole process, with an autograd function that saves the weight
    parameter itself rather than a view of its gathered data, so the gathered copy can be freed after
    the forward and gathered again for the backward (torch's own linear would keep every gathered weight
    alive until its backward). But it also saves every linear's input, where torch saves the input only
    when the weight is trained. Under an adapter that is the input of every frozen projection: measured
    on an H200 (LLaMA-3.2-1B width, 16 layers, micro batch 8 x 512, bench/zero_memory.py), 1.27 GiB
    more than ZeRO-2 after each forward = 16 layers x 4096 tokens x (2048 + 8192) bf16 values (the
    inputs of gate/up and down) plus the LM head's input.

    So where DeepSpeed's linear is installed, this puts in its place the same function saving the input
    only when the weight needs a gradient (the only use its backward has for it). Returns whether the
    process's F.linear is now that function; with memory_efficient_linear off (a deepspeed_config file)
    torch's own stays."""
    global _ZERO3_LINEAR
    from deepspeed.runtime.zero import linear as ds_linear

    if torch.nn.functional.linear is _zero3_linear:
        return True
    if torch.nn.functional.linear is not ds_linear.zero3_linear_wrap:
        return False
    if _ZERO3_LINEAR is None:
        _ZERO3_LINEAR = _frozen_aware(ds_linear)
    torch.nn.functional.linear = _zero3_linear
    return True


_ZERO3_LINEAR = None  # the autograd function below, made when first installed (DeepSpeed is imported then)


def _zero3_linear(input, weight, bias=None):
    return _ZERO3_LINEAR.apply(input, weight, bias)


def _frozen_aware(ds_linear):
    from deepspeed.accelerator import get_accelerator

    class Zero3Linear(ds_linear.LinearFunctionForZeroStage3):
        """DeepSpeed's ZeRO-3 linear (its forward, backward and autocast handling) except that a frozen
        weight's input is not saved."""

        @staticmethod
        def setup_context(ctx, inputs, output):
            device_type = get_accelerator().device_name()
            ctx._dtype = ds_linear._get_autocast_dtype(device_type)
            ctx._fwd_used_autocast = ds_linear._is_autocast_enabled(device_type)
            input, weight = inputs[0], inputs[1]
            bias = inputs[2] if len(inputs) > 2 else None
            ctx.save_for_backward(input if weight.requires_grad else None, weight, bias)

    return Zero3Linear


class DeepSpeedEngine:
    def __init__(self, trainable: Trainable, optimizer, scheduler, config: dict[str, Any]) -> None:
        import deepspeed

        self.trainable = trainable
        params = list(trainable.model.parameters())
        if config.get("bf16", {}).get("enabled") and any(hasattr(p, "ds_id") for p in params):
            # DeepSpeed casts a model's parameters to bf16 unless it was built under zero.Init, whose
            # parameters already are; those created after the build (the adapters) are cast here, so a
            # partitioned ZeRO-3 build trains what ZeRO-2 and an unpartitioned ZeRO-3 build train
            for p in params:
                if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != torch.bfloat16:
                    p.data = p.data.to(torch.bfloat16)
        # a partitioned (ZeRO-3) parameter's numel() is its empty placeholder; ds_numel is its size
        trained = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
        config = with_reduce_bucket(config, trained)
        with one_op_build():
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=trainable.model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        weights_only_checkpoints(self.engine)
        frozen_aware_zero3_linear()  # ZeRO-3: DeepSpeed installed its F.linear in initialize (or zero.Init)
        self.model = self.engine

    def backward_step(self, loss: torch.Tensor, step: int) -> bool:
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and self.trainable.after_backward is not None:
            self.trainable.after_backward(step)  # before engine.step(), which clears the gradients
        self.engine.step()
        return boundary

    def save(self, path: Path, step: int, rank: int) -> None:
        # every rank writes its own ZeRO partition; Ray Train merges the workers' folders
        self.engine.save_checkpoint(str(path / "deepspeed"), tag="state", client_state={"step": step},
                                    exclude_frozen_parameters=True)

    def load(self, path: Path) -> int:
        _, client = self.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        return int(client["step"])

    def export(self, path: Path, method: Method, rank: int) -> None:
        """Rank 0 writes the trained artifact. Under ZeRO-3 every rank joins the gather of what the export
        reads: the trained parameters (an adapter), or, for a method that exports the whole model, a state
        dict gathered module by module onto rank 0 — never the whole model on every rank at once."""
        import deepspeed

        model = self.trainable.model
        if not any(hasattr(p, "ds_id") for p in model.parameters()):
            if rank == 0:
                method.export(model, path)
            return
        if method.exports_whole_model:
            state = gathered_state_dict(model, rank)
            if rank == 0:
                method.export(model, path, state_dict=state)
            return
        params = [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                method.export(model, path)


class DDPEngine:
    def __init__(self, trainable: Trainable, optimizer, scheduler, *, accumulation: int, max_grad_norm: float,
                 device: torch.device) -> None:
        import ray.train.torch

        self.trainable = trainable
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.params = [p for p in trainable.model.parameters() if p.requires_grad]
        self.model = ray.train.torch.prepare_model(trainable.model, move_to_device=device)
        self.micro = 0

    def backward_step(self, loss: torch.Tensor, step: int) -> bool:
        (loss / self.accumulation).backward()
        self.micro += 1
        if self.micro % self.accumulation:
            return False
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        if self.trainable.after_backward is not None:
            self.trainable.after_backward(step)  # AdaLoRA reads the gradients: before zero_grad
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save(self, path: Path, step: int, rank: int) -> None:
        if rank != 0:
            return
        state = {n: p.detach().cpu() for n, p in self.trainable.model.named_parameters() if p.requires_grad}
        torch.save({"model": state, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "step": step}, path / "ddp_state.pt")

    def load(self, path: Path) -> int:
        state = load_weights_only(path / "ddp_state.pt", map_location="cpu")
        named = dict(self.trainable.model.named_parameters())
        with torch.no_grad():
            for name, value in state["model"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])

    def export(self, path: Path, method: Method, rank: int) -> None:
        if rank == 0:
            method.export(self.trainable.model, path)
