"""`flexi plan`: per-GPU memory of a recipe's training and generation, estimated before anything runs.

A training worker holds two kinds of memory:

model states — parameters, gradients and optimizer states, counted in bytes per parameter the way
  DeepSpeed's own estimators count them (`estimate_zero2_model_states_mem_needs`,
  `estimate_zero3_model_states_mem_needs`). Their assumption is full fine-tuning with 16-bit
  parameters and Adam, so 2 bytes of parameter plus, per trainable parameter, 2 (16-bit gradient)
  + 4 (fp32 gradient) + 4 (fp32 master weight) + 8 (Adam's two moments) = 18 bytes that ZeRO
  partitions over the N data-parallel workers:

      ZeRO-0  everything replicated (bf16: DeepSpeed's BF16_Optimizer keeps the fp32 copies too)
      ZeRO-1  optimizer states and fp32 gradients partitioned
      ZeRO-2  16-bit gradients partitioned too                      → 2 P + 18 P / N   (DeepSpeed's formula)
      ZeRO-3  parameters partitioned too, one layer gathered at a time → 20 P / N + gathered layer

  Under ZeRO-3 DeepSpeed's formula says 18 P / N + 4 × largest layer: it leaves out the 2 P / N of each
  worker's own 16-bit parameter partition (its offload variant, 2 P / N + 4 × largest layer once the
  18 bytes leave the GPU, shows that partition is there). Here it is counted, so for full fine-tuning
  this estimate is DeepSpeed's + 2 P / N under ZeRO-3 and equal to it elsewhere (tests/test_memory.py).

  Adapters change the split: the frozen base still costs its 2 bytes per parameter (bf16; 4 in fp32),
  replicated below ZeRO-3 and partitioned under it, but only the adapter's parameters — from building
  the method on the meta device, as `flexi params` counts them — carry gradients, master weights and
  Adam states. That is why a LoRA on a 1B model needs about 2.5 GB of model states and full
  fine-tuning about 20 GB on one GPU.

  CPU offload (`offload_optimizer`: fp32 gradients, master weights and Adam states — and under ZeRO-2/3
  the 16-bit gradient partition — live in CPU memory; `offload_params`, ZeRO-3: the 16-bit parameter
  partition too) moves bytes from the GPU columns to `cpu_offload`, as DeepSpeed's offload estimates do.

  DDP (strategy ddp) keeps fp32 weights (4 bytes), fp32 gradients plus the reducer's bucket copy of them
  (4 + 4) and Adam (8), nothing partitioned; under bf16 autocast, the bf16 copies of the weights that
  autocast caches during the forward add 2 bytes per parameter.

activations — a rough estimate, what the backward pass needs kept from the forward, per worker:

      micro_batch × seq × layers × (10 × hidden + c × ffn + 2 × kv_width) × bytes per activation
      + micro_batch × seq × vocab × logit bytes

  10 × hidden counts the block's hidden-size tensors (two RMSNorm inputs, held in fp32, count twice;
  the attention input, query, attention output and MLP input); c × ffn the MLP's (a gated MLP as LLaMA's
  keeps gate, up, act(gate) and their product: c = 4; a plain one c = 2); 2 × kv_width the keys and
  values. Attention scores are not kept (transformers' SDPA / flash attention recompute them). The
  logits at the loss: bf16 logits, their fp32 upcast and the fp32 log-softmax the loss keeps
  (2 + 4 + 4 bytes; 8 in fp32). With gradient checkpointing only each block's input stays
  (seq × hidden per layer) plus one block recomputed at a time. seq is task.max_prompt_tokens +
  task.max_target_tokens, the longest a training row can be; batches are padded to their longest row,
  so this is an upper bound for the batch shape. Whisper: the encoder's 1500 positions over its layers
  plus the decoder's max_target_tokens.

DeepSpeed's buffers — what its engine allocates beside the model states, from the recipe's DeepSpeed config
  (distribution.deepspeed_config merged in, DeepSpeed's defaults otherwise):

      reduce bucket     ZeRO 1-3 (contiguous_gradients, which CPU offload forces on): reduce_bucket_size
                        elements, allocated whole whatever is trained, in the parameters' dtype (ZeRO-3:
                        communication_data_type where the config sets one); ZeRO-3 allocates it once at
                        setup, ZeRO-1/2 at every backward (freed after it), twice with overlap_comm. The
                        training worker caps DeepSpeed's 5e8 at the trainable count
                        (training/engines.reduce_bucket_elements), so for an adapter it is a few MiB.
      resident params   ZeRO-3 over several workers: gathered parameters that DeepSpeed keeps on the GPU
                        because they are used again within stage3_max_reuse_distance (1e9) elements, at
                        the end of the forward the last layers, about to run backward. Estimated as up to
                        that many elements in the parameters' dtype, less the gathered layer the model
                        states already count; not measured with more than one worker. With one worker
                        ZeRO-3 gathers nothing (the partition is the whole parameter; DeepSpeed's
                        no-gather path), so this is 0, unless parameters are offloaded to the CPU.

  Measured on an H200 (bench/gpu_check.sh, LLaMA-3.2-1B width, 16 layers, Flexi ranks (2, 8), micro
  batch 8 × 512, bf16, one worker): ZeRO-3's peak fell from 15.35 to 14.42 GiB when the worker capped the
  bucket (5e8 → 1.7 M elements), then to 13.15 GiB, ZeRO-2's, when the worker stopped DeepSpeed's ZeRO-3
  F.linear from saving the input of every frozen linear for backward, 1.27 GiB after the forward here
  (training/engines.frozen_aware_zero3_linear, bench/zero_memory.py). ZeRO-2's peak
  stayed at 13.15 GiB, since the ZeRO-2 bucket comes with the backward, after the forward's peak. The
  ZeRO-3 plan, 14.34 GiB, is now 9 % over that peak: with one worker the gathered layer the model states
  count (0.49 GiB, after DeepSpeed's formula) is never allocated. It is kept, as DeepSpeed's estimator
  keeps it, since with several workers it is.

What is not counted: the CUDA context (~0.5-1 GiB per process, outside torch's allocator), allocator
fragmentation, temporary buffers. The warning fires when the estimate exceeds the GPU's memory; within
10 % of it, plan says the fit is tight.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexi_workflows.errors import ConfigError

log = logging.getLogger(__name__)

GiB = 1024**3
GPU_MEMORY_ENV = "FLEXI_GPU_MEMORY_GIB"  # the memory of the cluster's GPUs, for a driver without one
TIGHT = 0.9  # above this share of a GPU's memory, the fit is called tight (context, fragmentation)
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "assets" / "model_configs"
# hub names whose published config.json ships with the package (dimensions only): plan works offline
SHIPPED = {
    "meta-llama/llama-3.2-1b": "llama-3.2-1b-instruct.json",
    "meta-llama/llama-3.2-1b-instruct": "llama-3.2-1b-instruct.json",
    "meta-llama/llama-3.2-3b": "llama-3.2-3b-instruct.json",
    "meta-llama/llama-3.2-3b-instruct": "llama-3.2-3b-instruct.json",
    **{f"openai/whisper-{size}": f"whisper-{size}.json" for size in (
        "tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en", "large-v2", "large-v3",
        "large-v3-turbo")},
}


# -- the model: dimensions from its config, built on the meta device ----------------------------------

def find_config(ref: str, *, trust_remote_code: bool = False):
    """(config, where it came from) for a model reference without its weights: a config.json or local
    folder; a hub name from the local Hugging Face cache, else the published config shipped for it
    (LLaMA-3.2 1B/3B, Whisper), else the hub itself."""
    from flexi_workflows.models.loading import _looks_like_path, load_config

    ref = str(ref)
    if _looks_like_path(ref):
        return load_config(ref, trust_remote_code=trust_remote_code), ref
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code, local_files_only=True), \
            f"{ref} (Hugging Face cache)"
    except (OSError, ValueError):
        pass
    shipped = SHIPPED.get(ref.lower())
    if shipped is not None:
        return load_config(SHIPPED_CONFIGS / shipped), f"{SHIPPED_CONFIGS / shipped} (shipped config of {ref})"
    return load_config(ref, trust_remote_code=trust_remote_code), ref


@dataclass(frozen=True)
class ModelDims:
    """What the estimates read from a model: parameter counts (tied weights once) and layer shapes."""

    model_type: str
    total_params: int
    largest_layer_params: int  # the most parameters any one module holds directly (DeepSpeed's definition)
    hidden_size: int
    num_layers: int
    ffn_size: int
    gated_mlp: bool
    vocab_size: int
    kv_width: int  # key (= value) width per layer: kv heads × head dim
    encoder_layers: int = 0  # encoder-decoder (Whisper): the encoder's layers and positions
    encoder_positions: int = 0
    encoder_ffn_size: int = 0


def model_dims(config, model=None) -> ModelDims:
    """Dimensions of `config`'s model; `model` (meta or real) is built on the meta device if not given."""
    from flexi_workflows.adapters.accounting import count_base_params
    from flexi_workflows.models.loading import build_on_meta

    model = model if model is not None else build_on_meta(config)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    if getattr(config, "is_encoder_decoder", False) and hasattr(config, "encoder_layers"):  # Whisper
        return ModelDims(config.model_type, count_base_params(model), largest, config.d_model, config.decoder_layers,
                         config.decoder_ffn_dim, False, config.vocab_size, config.d_model,
                         config.encoder_layers, config.max_source_positions, config.encoder_ffn_dim)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    gated = getattr(config, "intermediate_size", None) is not None and config.model_type not in ("gpt2", "bert")
    ffn = getattr(config, "intermediate_size", None) or 4 * hidden
    return ModelDims(config.model_type, count_base_params(model), largest, hidden, config.num_hidden_layers, ffn,
                     gated, config.vocab_size, kv_heads * head_dim)


def _context_length(config) -> int:
    """The most tokens the model takes (its position table), for token limits of null."""
    for key in ("max_position_embeddings", "max_target_positions", "n_positions"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 2048


def trainable_params(config, method_config) -> tuple[int, int]:
    """(trainable, total) parameters once the method is applied, counted on a meta-device build: the
    method's own build decides (targets, r_max, learned γ, AdaLoRA's initial budget), as in training."""
    from flexi_workflows.methods import get_method
    from flexi_workflows.models.loading import build_on_meta

    model = get_method(method_config).build(build_on_meta(config), seed=0, total_steps=2).model
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# -- model states --------------------------------------------------------------------------------------

@dataclass
class ModelStates:
    """Bytes per GPU (per worker) of parameters, gradients and optimizer states; `cpu_offload` per worker."""

    params: float
    grads: float
    optimizer: float
    cpu_offload: float = 0.0
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_states(total_params: int, trainable_params: int, largest_layer_params: int, *, num_gpus: int,
                 zero_stage: int = 2, strategy: str = "deepspeed", bf16: bool = True,
                 offload_optimizer: bool = False, offload_params: bool = False) -> ModelStates:
    """Model-state bytes on one of `num_gpus` data-parallel workers (see the module docstring for the
    byte counts). `offload_optimizer` / `offload_params` follow DeepSpeed's `offload_optimizer` and
    `offload_param` (the latter ZeRO-3 only)."""
    if num_gpus < 1:
        raise ConfigError(f"num_gpus must be ≥ 1, got {num_gpus}")
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_params and (strategy != "deepspeed" or zero_stage != 3):
        raise ConfigError("offload_params needs DeepSpeed ZeRO stage 3 (only ZeRO-3 partitions parameters)")
    if offload_optimizer and (strategy != "deepspeed" or zero_stage == 0):
        raise ConfigError("offload_optimizer needs DeepSpeed ZeRO stage 1, 2 or 3")
    P, T, n = float(total_params), float(trainable_params), float(num_gpus)
    if strategy == "ddp":
        autocast = 2 * P if bf16 else 0.0
        return ModelStates(4 * P + autocast, 8 * T, 8 * T,
                           detail={"weights_fp32": 4 * P, "autocast_bf16_copies": autocast, "grads_fp32": 4 * T,
                                   "ddp_buckets": 4 * T, "adam": 8 * T})
    if strategy != "deepspeed":
        raise ConfigError(f"strategy must be 'deepspeed' or 'ddp', got {strategy!r}")
    w = 2.0 if bf16 else 4.0  # DeepSpeed's bf16 engine casts every parameter, frozen ones too
    g16 = w  # gradients in the parameters' dtype
    g32 = 4.0 if bf16 else 0.0  # fp32 gradients beside 16-bit ones (none when training in fp32)
    master = 4.0 if (bf16 or zero_stage >= 1) else 0.0  # ZeRO 1-3 keep an fp32 partition copy even in fp32
    adam = 8.0
    part_params = n if zero_stage == 3 else 1.0
    part_g16 = n if zero_stage >= 2 else 1.0
    part_opt = n if zero_stage >= 1 else 1.0
    params = P * w / part_params
    full_ft = trainable_params >= total_params
    gathered = largest_layer_params * (w + (g16 if full_ft else 0.0)) if zero_stage == 3 else 0.0
    grads16, grads32 = T * g16 / part_g16, T * g32 / part_opt
    optimizer = T * (master + adam) / part_opt
    cpu = 0.0
    detail = {"params": params, "gathered_layer": gathered, "grads_16bit": grads16, "grads_fp32": grads32,
              "master_fp32": T * master / part_opt, "adam": T * adam / part_opt}
    if offload_optimizer:
        moved_g16 = grads16 if zero_stage >= 2 else 0.0
        cpu += grads32 + optimizer + moved_g16
        grads16 -= moved_g16
        grads32 = optimizer = 0.0
    if offload_params:
        cpu += params
        params = 0.0
    return ModelStates(params + gathered, grads16 + grads32, optimizer, cpu, detail)


def deepspeed_estimate(total_params: int, largest_layer_params: int, *, num_gpus: int, zero_stage: int,
                       offload_optimizer: bool = False, offload_params: bool = False) -> int | None:
    """DeepSpeed's own GPU figure for full fine-tuning (its estimators exist for ZeRO-2 and 3 only);
    None for other stages or without DeepSpeed."""
    try:
        if zero_stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            return estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node=num_gpus, num_nodes=1,
                                                         cpu_offload=offload_optimizer)[1]
        if zero_stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            return estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, num_gpus_per_node=num_gpus,
                                                         num_nodes=1, cpu_offload=offload_optimizer,
                                                         cpu_offload_params=offload_params, zero_init=True)[1]
    except ImportError:
        return None
    return None


def deepspeed_buffers(ds_config: dict[str, Any], *, total_params: int, trainable_params: int,
                      largest_layer_params: int, bf16: bool, num_workers: int = 1) -> dict[str, float]:
    """Bytes of DeepSpeed's buffers on one worker's GPU (the module docstring's table), by name."""
    from flexi_workflows.training.engines import reduce_bucket_elements

    zero = ds_config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    w = 2.0 if bf16 else 4.0
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    offload_params = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)

    def setting(name: str, default: float) -> float:  # DeepSpeed takes stage3_x or x
        return float(zero.get(f"stage3_{name}", zero.get(name, default)))

    out: dict[str, float] = {}
    bucket = reduce_bucket_elements(ds_config, trainable_params)
    if bucket is not None and (zero.get("contiguous_gradients", True) or offload_optimizer):
        staged = w
        if stage == 3:
            staged = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0}.get(str(ds_config.get("communication_data_type")), w)
        copies = 2 if stage in (1, 2) and zero.get("overlap_comm") else 1
        out["reduce_bucket"] = bucket * staged * copies
    if stage == 3 and (num_workers > 1 or offload_params):
        reused = min(int(setting("max_reuse_distance", 1e9)), total_params)
        out["resident_params"] = max(0, reused - largest_layer_params) * w
    return out


# -- activations and generation ------------------------------------------------------------------------

def activation_bytes(dims: ModelDims, *, micro_batch: int, seq_len: int, bf16: bool = True,
                     gradient_checkpointing: bool = False) -> float:
    """The rough activation estimate of the module docstring, per worker."""
    b = 2.0 if bf16 else 4.0
    logits = micro_batch * seq_len * dims.vocab_size * ((2 + 4 + 4) if bf16 else (4 + 4))

    def stack(tokens: int, layers: int, ffn: int, gated: bool) -> float:
        per_layer = tokens * (10 * dims.hidden_size + (4 if gated else 2) * ffn + 2 * dims.kv_width) * b
        if not gradient_checkpointing:
            return layers * per_layer
        return layers * tokens * dims.hidden_size * b + per_layer  # block inputs + one block recomputed

    total = stack(micro_batch * seq_len, dims.num_layers, dims.ffn_size, dims.gated_mlp)
    if dims.encoder_layers:
        total += stack(micro_batch * dims.encoder_positions, dims.encoder_layers, dims.encoder_ffn_size, False)
    return total + logits


def generation_bytes(dims: ModelDims, *, batch_size: int, prompt_tokens: int, new_tokens: int,
                     dtype: str = "float32") -> dict[str, float]:
    """An inference actor: the weights in `dtype`, the KV cache of a full batch at its longest, the last
    step's fp32 logits. (Whisper: the cached cross-attention keys/values over the encoder's positions too.)"""
    b = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}[dtype]
    positions = prompt_tokens + new_tokens
    kv = 2 * dims.num_layers * dims.kv_width * batch_size * positions * b
    if dims.encoder_layers:
        kv += 2 * dims.num_layers * dims.kv_width * batch_size * dims.encoder_positions * b
    return {"weights": dims.total_params * b, "kv_cache": kv, "logits": batch_size * dims.vocab_size * 4.0}


# -- a recipe's plan -------------------------------------------------------------------------------------

@dataclass
class MethodPlan:
    label: str
    trainable_params: int
    total_params: int
    states: ModelStates
    activations: float
    deepspeed_gpu_bytes: int | None = None  # DeepSpeed's estimator, full fine-tuning only
    buffers: dict[str, float] = field(default_factory=dict)  # DeepSpeed's (deepspeed_buffers)

    @property
    def total(self) -> float:
        return self.states.total + sum(self.buffers.values()) + self.activations


@dataclass
class ActorPlan:
    stage: str  # scoring / evaluation
    num_actors: int
    gpus_per_actor: float
    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Plan:
    model: str
    config_source: str
    dims: ModelDims
    strategy: str
    zero_stage: int
    num_workers: int
    gpus_per_worker: float
    bf16: bool
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    offload_optimizer: bool
    offload_params: bool
    methods: list[MethodPlan]
    actors: list[ActorPlan]
    gpu_memory: float | None = None
    gpu_memory_source: str | None = None

    def worker_budget(self) -> float | None:
        """A worker's share of a GPU: a fraction of one (gpus_per_worker < 1 puts several on it), else one GPU
        (DeepSpeed / DDP drive one device per worker)."""
        return self.gpu_memory * min(1.0, self.gpus_per_worker) if self.gpu_memory else None

    def warnings(self) -> list[str]:
        """One line per method or actor stage whose estimate exceeds what its GPU share holds."""
        if not self.gpu_memory:
            return []
        out = []
        budget = self.worker_budget()
        share = f" ({self.gpus_per_worker:g} of a GPU)" if self.gpus_per_worker < 1 else ""
        if self.gpus_per_worker > 0:
            for m in self.methods:
                if m.total > budget:
                    out.append(f"{m.label} needs ~{gib(m.total)} per training worker, more than the {gib(budget)} of "
                               f"its GPU{share}; try {hint(self, m)}")
        for a in self.actors:
            if a.gpus_per_actor > 0 and a.total > self.gpu_memory * min(1.0, a.gpus_per_actor):
                out.append(f"{a.stage} needs ~{gib(a.total)} per actor, more than the "
                           f"{gib(self.gpu_memory * min(1.0, a.gpus_per_actor))} of its GPU share; try a smaller "
                           f"{a.stage}.batch_size or model.dtype=bfloat16")
        return out

    def tight(self) -> list[str]:
        if not self.gpu_memory or self.gpus_per_worker <= 0:
            return []
        budget = self.worker_budget()
        return [m.label for m in self.methods if TIGHT * budget < m.total <= budget]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for m, md in zip(self.methods, d["methods"]):
            md["model_states"] = m.states.total
            md["total"] = m.total
        for a, ad in zip(self.actors, d["actors"]):
            ad["total"] = a.total
        d["warnings"] = self.warnings()
        return d


def hint(plan: Plan, method: MethodPlan) -> str:
    ideas = []
    if plan.strategy == "deepspeed" and plan.zero_stage < 3 and method.states.total > method.activations:
        ideas.append("distribution.zero_stage=3")
    if not plan.gradient_checkpointing and method.activations > method.states.total / 2:
        ideas.append("training.gradient_checkpointing=true")
    if method.activations > method.states.total / 2 and plan.micro_batch > 1:
        ideas.append("a smaller training.micro_batch_size (with more gradient_accumulation_steps)")
    optimizer_side = method.states.grads + method.states.optimizer
    if plan.strategy == "deepspeed" and not plan.offload_optimizer and plan.zero_stage > 0 and optimizer_side > method.total / 4:
        ideas.append("CPU offload of the optimizer")
    return ", ".join(ideas) or "more GPUs (distribution.num_workers)"


def gib(n: float) -> str:
    """Bytes in GiB, or MiB below one GiB (an adapter's optimizer states are a few MiB)."""
    return f"{n / GiB:,.2f} GiB" if n >= GiB or n == 0 else f"{n / 2**20:,.1f} MiB"


def detect_gpu_memory() -> tuple[float | None, str | None]:
    """(bytes, where the figure comes from): FLEXI_GPU_MEMORY_GIB, else this machine's first CUDA device."""
    if os.environ.get(GPU_MEMORY_ENV):
        try:
            return float(os.environ[GPU_MEMORY_ENV]) * GiB, GPU_MEMORY_ENV
        except ValueError:
            raise ConfigError(f"{GPU_MEMORY_ENV} must be a number of GiB, got {os.environ[GPU_MEMORY_ENV]!r}") from None
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), f"torch.cuda: {props.name}"
    return None, None


def plan_recipe(recipe, *, gpu_memory: float | None = None, gpu_memory_source: str | None = None,
                methods=None, offload_optimizer: bool | None = None, offload_params: bool | None = None) -> Plan:
    """The memory plan of `recipe` (its model resolved to something with a config: see find_config).
    Offload comes from `distribution.offload_optimizer` / `offload_params` where the recipe has those
    keys, unless given here."""
    dist, train, task = recipe.distribution, recipe.training, recipe.task
    if offload_optimizer is None:
        offload_optimizer = getattr(dist, "offload_optimizer", "none") == "cpu"
    if offload_params is None:
        offload_params = getattr(dist, "offload_params", "none") == "cpu"
    config, source = find_config(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    dims = model_dims(config)
    bf16 = dist.bf16
    # a limit of null keeps every token: a row can then be as long as the model's context
    context = _context_length(config)
    prompt_limit = task.max_prompt_tokens if task.max_prompt_tokens is not None else context
    target_limit = task.max_target_tokens if task.max_target_tokens is not None else context
    seq = prompt_limit + target_limit if not dims.encoder_layers else target_limit
    if task.max_prompt_tokens is None or task.max_target_tokens is None:
        seq = min(seq, context)
    activations = activation_bytes(dims, micro_batch=train.micro_batch_size, seq_len=seq, bf16=bf16,
                                   gradient_checkpointing=train.gradient_checkpointing)
    from flexi_workflows.methods import get_method

    ds_config = {}
    if dist.strategy == "deepspeed":  # the config the workers get (the recipe's deepspeed_config file merged in)
        from flexi_workflows.training.engines import deepspeed_config_for

        ds_config = deepspeed_config_for(recipe)
    plans, seen = [], set()
    for method_config in (methods if methods is not None else recipe.methods):
        label = get_method(method_config).train_label  # methods that differ only at inference train once
        if label in seen:
            continue
        seen.add(label)
        trainable, total = trainable_params(config, method_config)
        states = model_states(total, trainable, dims.largest_layer_params, num_gpus=dist.num_workers,
                              zero_stage=dist.zero_stage if dist.strategy == "deepspeed" else 0,
                              strategy=dist.strategy, bf16=bf16, offload_optimizer=offload_optimizer,
                              offload_params=offload_params)
        ds = None
        if trainable >= total and dist.strategy == "deepspeed" and bf16:
            ds = deepspeed_estimate(total, dims.largest_layer_params, num_gpus=dist.num_workers,
                                    zero_stage=dist.zero_stage, offload_optimizer=offload_optimizer,
                                    offload_params=offload_params)
        buffers = {}
        if dist.strategy == "deepspeed":
            buffers = deepspeed_buffers(ds_config, total_params=total, trainable_params=trainable,
                                        largest_layer_params=dims.largest_layer_params, bf16=bf16,
                                        num_workers=dist.num_workers)
        plans.append(MethodPlan(label, trainable, total, states, activations, ds, buffers))
    actors = []
    for name, cfg, samples in (("scoring", recipe.scoring, recipe.scoring.num_samples), ("evaluation", recipe.evaluation, 1)):
        prompt = prompt_limit if not dims.encoder_layers else 4  # speech: a few decoder prefix tokens
        parts = generation_bytes(dims, batch_size=cfg.batch_size * samples, prompt_tokens=prompt,
                                 new_tokens=cfg.max_new_tokens, dtype=recipe.model.dtype)
        actors.append(ActorPlan(name, cfg.num_actors, cfg.gpus_per_actor, parts))
    return Plan(recipe.model.name_or_path, source, dims, dist.strategy, dist.zero_stage, dist.num_workers,
                dist.gpus_per_worker, bf16, train.micro_batch_size, seq, train.gradient_checkpointing,
                offload_optimizer, offload_params, plans, actors, gpu_memory, gpu_memory_source)


def format_plan(plan: Plan) -> str:
    """The table `flexi plan` prints."""
    d = plan.dims
    lines = [(f"model        {plan.model} ({d.model_type}, {d.total_params:,} params; largest layer "
              f"{d.largest_layer_params:,})")]
    if plan.config_source != plan.model:
        lines.append(f"config       {plan.config_source}")
    engine = (f"DeepSpeed ZeRO-{plan.zero_stage}" if plan.strategy == "deepspeed" else "DDP")
    offload = [k for k, on in (("optimizer", plan.offload_optimizer), ("params", plan.offload_params)) if on]
    lines.append(f"training     {engine} over {plan.num_workers} worker{'s' if plan.num_workers > 1 else ''}, "
                 f"{'bf16' if plan.bf16 else 'fp32'}, micro batch {plan.micro_batch} × {plan.seq_len} tokens, "
                 f"gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}"
                 + (f", CPU offload of {' and '.join(offload)}" if offload else ""))
    width = max(14, *(len(m.label) + 2 for m in plan.methods))
    where = "per GPU (training worker)" if plan.gpus_per_worker > 0 else "per training worker (on CPU)"
    head = f"{where:<34}" + "".join(f"{m.label:>{width}}" for m in plan.methods)
    lines += ["", head, "-" * len(head)]

    def row(name: str, values) -> None:
        lines.append(f"{name:<34}" + "".join(f"{v:>{width}}" for v in values))

    row("trainable params", [f"{m.trainable_params:,}" for m in plan.methods])
    row("  params (+ gathered layer)", [gib(m.states.params) for m in plan.methods])
    row("  grads", [gib(m.states.grads) for m in plan.methods])
    row("  optimizer (master + Adam)", [gib(m.states.optimizer) for m in plan.methods])
    row("model states", [gib(m.states.total) for m in plan.methods])
    if any(m.buffers for m in plan.methods):
        row("DeepSpeed buffers", [gib(sum(m.buffers.values())) for m in plan.methods])
    row("activations (rough)", [gib(m.activations) for m in plan.methods])
    row("total per GPU" if plan.gpus_per_worker > 0 else "total per worker", [gib(m.total) for m in plan.methods])
    if any(m.states.cpu_offload for m in plan.methods):
        row("offloaded to CPU, per worker", [gib(m.states.cpu_offload) for m in plan.methods])
    if any(m.deepspeed_gpu_bytes is not None for m in plan.methods):
        row("DeepSpeed's estimator (states)",
            [gib(m.deepspeed_gpu_bytes) if m.deepspeed_gpu_bytes is not None else "-" for m in plan.methods])
    lines.append("")
    gpus = [f"training {plan.num_workers} × {plan.gpus_per_worker:g} GPU"]
    for a in plan.actors:
        gpus.append(f"{a.stage} {a.num_actors} × {a.gpus_per_actor:g} GPU (~{gib(a.total)} per actor: weights "
                    f"{gib(a.parts['weights'])}, KV cache {gib(a.parts['kv_cache'])})")
    lines.append("GPUs         " + "; ".join(gpus))
    if plan.gpus_per_worker <= 0 and all(a.gpus_per_actor <= 0 for a in plan.actors):
        lines.append("GPU memory   not needed: the recipe asks for no GPUs (the figures are CPU memory)")
    elif plan.gpu_memory:
        lines.append(f"GPU memory   {gib(plan.gpu_memory)} ({plan.gpu_memory_source})")
        tight = plan.tight()
        if tight:
            lines.append(f"note: {', '.join(tight)} within {100 * (1 - TIGHT):.0f} % of a GPU's memory; the CUDA context "
                         f"and fragmentation are not counted")
        for w in plan.warnings():
            lines.append(f"WARNING: {w}")
        if not plan.warnings():
            lines.append("fits         every method and actor fits its GPU share")
    else:
        lines.append("GPU memory   unknown (no CUDA device here; pass --gpu-memory-gib N or set "
                     f"{GPU_MEMORY_ENV}): cannot check the fit")
    return "\n".join(lines)


def warn_if_over(recipe) -> list[str]:
    """Before `flexi run` launches: warnings when the recipe will not fit its GPUs, if their memory is known
    (this machine's CUDA device or FLEXI_GPU_MEMORY_GIB) and the recipe asks for GPUs; never an error."""
    uses_gpu = (recipe.distribution.gpus_per_worker > 0 or recipe.evaluation.gpus_per_actor > 0
                or recipe.scoring.gpus_per_actor > 0)
    if not uses_gpu:
        return []
    memory, source = detect_gpu_memory()
    if memory is None:
        log.debug("plan: GPU memory unknown, fit not checked")
        return []
    try:
        plan = plan_recipe(recipe, gpu_memory=memory, gpu_memory_source=source)
    except Exception as exc:  # noqa: BLE001 — an estimate must never stop a run
        log.warning("plan: could not estimate GPU memory (%s: %s)", type(exc).__name__, exc)
        return []
    warnings = plan.warnings()
    for w in warnings:
        log.warning("plan: %s (GPU memory %s from %s; `flexi plan` shows the estimate)", w, gib(memory), source)
    return warnings
