"""The recipe: one YAML file per experiment, loaded into these dataclasses.

Relative paths in a recipe (model, datasets, output_dir) are resolved against the working directory
the command runs in — the project root locally, the job's working_dir under `ray job submit`.

Checks that involve several keys (thresholds vs classes, ranks vs classes, order of ranks) live in
`__post_init__`, so an invalid recipe fails when it is loaded, before Ray starts anything.
"""

from __future__ import annotations

import datetime
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from flexi_workflows.errors import ConfigError, DataError

COLUMN_FIELDS = ("messages", "prompt", "completion", "id")  # what a custom task's `columns` can map
BUILTIN_METRICS = ("exact_match", "numeric", "f1")
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def check_columns(columns: dict) -> None:
    unknown = sorted(set(columns) - set(COLUMN_FIELDS))
    if unknown:
        raise ConfigError(f"columns: unknown field(s) {unknown}; map any of {', '.join(COLUMN_FIELDS)} to a column name")
    bad = [k for k, v in columns.items() if not isinstance(v, str) or not v]
    if bad:
        raise ConfigError(f"columns.{bad[0]} must name a column (a non-empty string), got {columns[bad[0]]!r}")
    if "messages" in columns and ({"prompt", "completion"} & set(columns)):
        raise ConfigError("columns: map either `messages` (chat data) or `prompt` / `completion`, not both")


@dataclass
class DataSource:
    """A dataset: a local file or folder (`path`) or a hub dataset (`name`), one split, optionally `limit` rows.

    Rows may come from several subsets (MRQA's six training sets, MetaMathQA's question types): each
    row carries its `subset`, and `selection` decides which rows `limit` keeps and in what order:

      auto        per_subset when the rows name more than one subset, else first (the default)
      first       the first `limit` rows in file / split order
      shuffle     a seeded shuffle of every row, then the first `limit`
      per_subset  `limit` shared equally by the subsets (one with fewer rows leaves its unused share to
                  the others), each subset's rows drawn with `seed`; the result is shuffled with `seed`
                  so that subsets interleave (training reads rows in this order)

    seed: the seed of those draws — data selection only, so `recipe.seed` (a sweep's seeds) never
    changes which rows are used. subsets: keep only rows of these subsets (MRQA dataset names,
    MetaMathQA types); unset keeps every subset, except MetaMathQA, whose default is its GSM8K part.
    note: a remark on the data (which copy, which split) carried into summary rows and report tables;
    known copies that differ from the paper's splits get one automatically (tasks/math.py).
    columns (task `custom` only): which of the file's columns hold the task's fields, e.g.
    {prompt: question, completion: answer, id: qid} or {messages: conversation}; per source, because a
    training file and an evaluation file often come from different places (tasks/custom.py).
    """

    name: str | None = None
    path: str | None = None
    split: str = "train"
    limit: int | None = None
    selection: Literal["auto", "first", "shuffle", "per_subset"] = "auto"
    seed: int = 0
    subsets: list[str] | None = None
    note: str | None = None
    columns: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.name and not self.path:
            raise DataError("a data source needs a `name` (hub dataset) or a `path` (local file)")
        if self.limit is not None and self.limit < 1:
            raise DataError(f"data source limit must be ≥ 1, got {self.limit}")
        if self.seed < 0:
            raise ConfigError(f"data source seed must be ≥ 0, got {self.seed}")
        if self.subsets is not None and (not self.subsets or len(set(self.subsets)) != len(self.subsets)):
            raise ConfigError(f"data source subsets must list distinct subset names, got {self.subsets}")
        if self.name and (self.name.startswith("/") or {".", ".."} & set(self.name.split("/"))):
            raise ConfigError(f"data source name {self.name!r} is not a dataset name (a hub id like org/name or "
                              f"builtin:...); a local file goes in `path`")
        if self.columns is not None:
            check_columns(self.columns)

    @property
    def label(self) -> str:
        """The name results are filed under (a predictions file, a summary column): one safe file name,
        so a hub id's `/` becomes `__` and nothing in it can reach outside the stage folder."""
        raw = self.name.removeprefix("builtin:").replace("/", "__") if self.name else Path(self.path).stem.removesuffix(".jsonl")
        return re.sub(r"[^A-Za-z0-9._+-]", "_", raw).lstrip(".") or "data"

    @property
    def stops_at_limit(self) -> bool:
        """Whether a loader may stop reading once it has `limit` rows (only when the first rows are wanted)."""
        return self.selection == "first" and self.limit is not None and self.subsets is None


@dataclass
class ModelConfig:
    """The base model: a hub name (needs internet), a local folder with config.json + safetensors, or
    `builtin:arith-tiny` (the quickstart's tiny LLaMA, trained here on first use and cached in cache_dir)."""

    name_or_path: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    cache_dir: str = "~/.cache/flexi-workflows"


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def parse_date_string(text: str) -> datetime.date:
    """A date written as Llama 3.x chat templates write it, "26 Jul 2024" (English month, any locale)."""
    parts = text.split()
    if len(parts) != 3 or parts[1] not in _MONTHS or not parts[0].isdigit() or not parts[2].isdigit():
        raise ValueError(f"expected a date like '26 Jul 2024', got {text!r}")
    return datetime.date(int(parts[2]), _MONTHS.index(parts[1]) + 1, int(parts[0]))


@dataclass
class TaskConfig:
    """max_prompt_tokens / max_target_tokens: token budgets of the prompt and the training target
    (a prompt keeps its last tokens, a target its first); `null` for none (every token is kept, and
    `flexi plan` counts the model's whole context).

    date_string: the date chat templates see. Llama 3.x templates write "Today Date: <date>" into the
    system prompt — `strftime_now` (today) unless `date_string` is given — so a prompt would change with
    the calendar and, with it, every fingerprint and result. Prompts pass this fixed date as
    `date_string`, and templates that call `strftime_now` directly see the same day. The default is
    the Llama 3.x templates' own fallback date.

    Task `custom` (users' own files, tasks/custom.py) also reads:
      system_prompt  the system message of every prompt whose conversation has none of its own
      chat_template  a Jinja chat template used instead of the tokenizer's (or where it has none)
      metric         exact_match (default), numeric (the last numbers agree), f1 (token F1 as the QA
                     task's), or a Python function `module.path:function` called as f(prediction,
                     reference) → a float in [0, 1]
    """

    name: str = "math"
    train: DataSource | None = None
    eval: list[DataSource] = field(default_factory=list)
    max_prompt_tokens: int | None = 512
    max_target_tokens: int | None = 256
    date_string: str = "26 Jul 2024"
    system_prompt: str | None = None
    chat_template: str | None = None
    metric: str | None = None

    def __post_init__(self) -> None:
        try:
            parse_date_string(self.date_string)
        except ValueError as exc:
            raise ConfigError(f"task.date_string: {exc} (day, English month abbreviation, year)") from None
        seen: dict[str, int] = {}
        for i, source in enumerate(self.eval):  # results are filed by label: a repeated one would drop a set
            if source.label in seen:
                raise ConfigError(f"task.eval.{i} and task.eval.{seen[source.label]} are both labelled "
                                  f"{source.label!r}, and results are filed by label: evaluate each set once, "
                                  f"or give one file another name")
            seen[source.label] = i
        if self.name != CUSTOM_TASK:
            keys = [f"task.{k}" for k in ("system_prompt", "chat_template", "metric") if getattr(self, k) is not None]
            keys += [f"{key}.columns" for key, source in self.keyed_sources() if source.columns is not None]
            if keys:
                raise ConfigError(f"{', '.join(keys)}: read by task {CUSTOM_TASK!r} only (task.name is {self.name!r})")
        if self.metric is not None and self.metric not in BUILTIN_METRICS and not _IMPORT_PATH.match(self.metric):
            raise ConfigError(f"task.metric must be one of {', '.join(BUILTIN_METRICS)} or a Python function as "
                              f"module.path:function, got {self.metric!r}")
        if self.chat_template is not None and not self.chat_template.strip():
            raise ConfigError("task.chat_template is empty (leave it unset to use the tokenizer's own)")

    def keyed_sources(self) -> list[tuple[str, DataSource]]:
        """Each data source with its recipe key (task.train, task.eval.0, ...), for messages that name it."""
        train = [("task.train", self.train)] if self.train is not None else []
        return train + [(f"task.eval.{i}", s) for i, s in enumerate(self.eval)]

    @property
    def binary_grades(self) -> bool:
        """Whether one answer's grade is 0 or 1, so a row's score is a pass rate j / scoring.num_samples."""
        return self.name in BINARY_GRADE_TASKS or (
            self.name == CUSTOM_TASK and (self.metric or "exact_match") in ("exact_match", "numeric"))


@dataclass
class ScoringConfig:
    """Difficulty scoring: the base model answers each training sample, the task metric grades it.

    thresholds: K-1 cut points on the metric, easiest class first. For a metric where higher is better
    they descend: a score ≥ thresholds[0] is class 0 (the easiest), below thresholds[-1] is class K-1
    (the hardest). Math: [0.5] (correct = easy); QA: e.g. [0.5] for F1 ≥ 0.5 = easy. For an error rate
    (speech: the utterance's WER) they ascend: a WER ≤ thresholds[0] is class 0, e.g. [0.1] for easy
    = at most one word in ten wrong.

    num_samples: answers per training row. 1 (the paper's setup) = one greedy answer, graded; k > 1 =
    k answers sampled with `temperature` and nucleus `top_p` (no top-k), seeded from `seed` and the
    batch's row ids, and the score is their mean grade — for math the pass rate (correct / k), which
    takes k+1 values, so three classes (e.g. thresholds [0.75, 0.25] with k = 4) become possible.
    temperature, top_p and seed matter only when sampling (num_samples > 1).
    """

    batch_size: int = 16
    max_new_tokens: int = 256
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    num_classes: int = 2
    thresholds: list[float] = field(default_factory=lambda: [0.5])
    class_names: list[str] | None = None
    num_samples: int = 1
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int = 0

    @property
    def sampling(self) -> bool:
        return self.num_samples > 1

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"scoring.num_classes must be ≥ 2, got {self.num_classes}")
        if len(self.thresholds) != self.num_classes - 1:
            raise ConfigError(
                f"scoring.thresholds has {len(self.thresholds)} values but scoring.num_classes = "
                f"{self.num_classes} needs {self.num_classes - 1} (K classes take K-1 cut points)"
            )
        if len(set(self.thresholds)) != len(self.thresholds):
            raise ConfigError(f"scoring.thresholds must be distinct (easiest class first), got {self.thresholds}")
        if self.class_names is None:
            self.class_names = ["easy", "hard"] if self.num_classes == 2 else [f"class{k}" for k in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ConfigError(f"scoring.class_names needs {self.num_classes} names, got {self.class_names}")
        for key in ("batch_size", "max_new_tokens", "num_actors", "num_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"scoring.{key} must be ≥ 1, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ConfigError(f"scoring.temperature must be > 0 (num_samples: 1 is the greedy answer), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"scoring.top_p must be in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise ConfigError(f"scoring.seed must be ≥ 0, got {self.seed}")

    def unreachable_classes(self) -> list[int]:
        """Classes that no score in {0, 1/k, ..., 1} falls into — for tasks whose per-answer grade is 0 or 1."""
        k = self.num_samples
        rates = [j / k for j in range(k + 1)]
        bounds = [float("inf"), *self.thresholds, float("-inf")]
        return [c for c in range(self.num_classes) if not any(bounds[c + 1] <= r < bounds[c] for r in rates)]


@dataclass
class RouterConfig:
    """The difficulty router: masked mean-pooled input embeddings → classifier → class logits.

    Noise (noise-added cross-entropy, paper §3) is applied in training only:
      noise_on=logits, noise_type=multiplicative:  l' = l ⊙ (1 + ε)   (default, as in PT-MoE)
      noise_on=logits, noise_type=additive:        l' = l + ε
      noise_on=pooled: the same applied to the pooled embedding before the classifier
    with ε ~ N(0, noise_std²) drawn per element; noise_std = 0 turns it off.
    """

    classifier: Literal["linear", "mlp"] = "linear"
    hidden_size: int = 256
    noise_std: float = 0.1
    noise_type: Literal["multiplicative", "additive"] = "multiplicative"
    noise_on: Literal["logits", "pooled"] = "logits"
    epochs: int = 50
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 64
    holdout: float = 0.2
    balance: Literal["downsample", "reweight", "none"] = "downsample"

    def __post_init__(self) -> None:
        if self.noise_std < 0:
            raise ConfigError(f"router.noise_std must be ≥ 0, got {self.noise_std}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"router.holdout must be in (0, 1), got {self.holdout}")
        for key in ("epochs", "batch_size", "hidden_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"router.{key} must be ≥ 1, got {getattr(self, key)}")


@dataclass
class MethodConfig:
    """What is fine-tuned. One config class per method, chosen by `name`, each with its own typed
    rank fields (the loader rejects another method's keys, e.g. `rank` on flexi):

    | name          | rank fields                      | label              |
    |---------------|----------------------------------|--------------------|
    | full          | -                                | full               |
    | lora          | rank                             | lora-8             |
    | adalora       | rank (the final budget)          | adalora-8          |
    | dylora        | r_min, r_max, eval_rank          | dylora-1-8(-at4)   |
    | dylora_plus   | r_min, r_max                     | dyloraplus-1-8     |
    | flexi         | ranks (one per difficulty class) | flexi-2-8          |

    `lr` overrides training.lr for this method only (full fine-tuning wants a smaller rate than LoRA).
    """

    VARIANTS: ClassVar[dict[str, type["MethodConfig"]]] = {}
    name: str = ""
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    @classmethod
    def variant(cls, name: Any) -> type["MethodConfig"]:
        """The config class for a method name (the loader's discriminator); no name means flexi."""
        name = "flexi" if name is None else name
        if name not in cls.VARIANTS:
            hint = difflib.get_close_matches(str(name), list(cls.VARIANTS), n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"name must be one of {list(cls.VARIANTS)}, got {name!r}{more}")
        return cls.VARIANTS[name]

    @property
    def rank_list(self) -> list[int]:
        """Every rank the method can use (for labels and reports); [] for full fine-tuning."""
        return []


@dataclass
class AdapterFields(MethodConfig):
    """Fields shared by the adapter methods (γ scaling, dropout, which linear layers get an adapter)."""

    alpha: float = 16.0
    scaling: Literal["alpha_over_r", "alpha_over_sqrt_r", "learned", "constant"] = "alpha_over_r"
    dropout: float = 0.05
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        bad = [r for r in self.rank_list if r < 1]
        if bad:
            raise ConfigError(f"ranks must be ≥ 1, got {self.rank_list}")


@dataclass
class FullConfig(MethodConfig):
    name: Literal["full"] = "full"


@dataclass
class LoraConfig(AdapterFields):
    name: Literal["lora"] = "lora"
    rank: int = 8

    @property
    def rank_list(self) -> list[int]:
        return [self.rank]


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA (PEFT): starts at init_rank (default 1.5 × rank) and prunes to `rank` on a schedule."""

    name: Literal["adalora"] = "adalora"
    init_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_rank is not None and self.init_rank < self.rank:
            raise ConfigError(f"init_rank must be ≥ rank ({self.rank}), got {self.init_rank}")


@dataclass
class RankRangeFields(AdapterFields):
    """DyLoRA and DyLoRA+: a rank drawn from [r_min, r_max] per training step."""

    r_min: int = 1
    r_max: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r_min >= self.r_max:
            raise ConfigError(f"r_min must be < r_max, got r_min={self.r_min}, r_max={self.r_max}")

    @property
    def rank_list(self) -> list[int]:
        return [self.r_min, self.r_max]


@dataclass
class DyLoraConfig(RankRangeFields):
    """DyLoRA: evaluated at eval_rank (default r_max)."""

    name: Literal["dylora"] = "dylora"
    eval_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_rank is not None and not self.r_min <= self.eval_rank <= self.r_max:
            raise ConfigError(f"eval_rank must be in [{self.r_min}, {self.r_max}], got {self.eval_rank}")


@dataclass
class DyLoraPlusConfig(RankRangeFields):
    """DyLoRA+: a rank drawn per evaluation batch too."""

    name: Literal["dylora_plus"] = "dylora_plus"


@dataclass
class FlexiConfig(AdapterFields):
    """Flexi-LoRA: the router's difficulty class picks the rank, ranks[k] for class k (easiest first).

    router: "learned" (the paper's: the trained router classifies each input) or "oracle" (the scored
    classes themselves: a training row's class from the score stage, an evaluation item's class from
    the base model's own graded answer with the same thresholds). The oracle is the routing upper
    bound: what Flexi-LoRA would reach with a perfect router. It reads evaluation outcomes, so it is a
    diagnostic row, never a method to deploy.
    """

    name: Literal["flexi"] = "flexi"
    ranks: list[int] = field(default_factory=lambda: [2, 8])
    router: Literal["learned", "oracle"] = "learned"

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.ranks) < 2:
            raise ConfigError(f"ranks needs one rank per difficulty class (≥ 2), got {self.ranks}")
        if any(a >= b for a, b in zip(self.ranks, self.ranks[1:])):
            raise ConfigError(f"ranks must be strictly increasing (easiest class first), got {self.ranks}")
        if self.router not in ("learned", "oracle"):
            raise ConfigError(f"router must be 'learned' or 'oracle', got {self.router!r}")

    @property
    def rank_list(self) -> list[int]:
        return list(self.ranks)


MethodConfig.VARIANTS.update({c.__dataclass_fields__["name"].default: c for c in (FullConfig, LoraConfig, AdaLoraConfig, DyLoraConfig,
                                                   DyLoraPlusConfig, FlexiConfig)})


@dataclass
class TrainingConfig:
    """Optimisation, identical for every method so comparisons are fair. `micro_batch_size` is per worker.

    validation_rows: hold out this many training rows (a seeded draw, never evaluation items) and
    report their mean loss after every epoch as `val_loss` — the per-epoch metric a sweep's ASHA
    scheduler stops weak trials on.

    gradient_checkpointing: keep only each transformer block's inputs in the forward pass and recompute
    the rest during backward (transformers' non-reentrant checkpointing): activation memory falls from
    every layer's intermediates to one block's, for about a third more compute; the loss and gradients
    are the same (tests/training checks it).

    eval_every: also measure the held-out loss every N optimizer steps (and at the last step), not only
    at epoch ends: a finer `val_loss` curve, and each measurement's checkpoint is a candidate for
    final_artifact: best. Needs validation_rows.

    final_artifact: `last` hands on the weights of the last step; `best` those of the step with the
    lowest held-out loss among the measured ones (Ray Train keeps that checkpoint by val_loss), so an
    overfitting or diverging run still yields its best adapter. `best` needs validation_rows.
    """

    epochs: int = 1
    max_steps: int | None = None
    lr: float = 2e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0
    log_every: int = 10
    max_failures: int = 1
    resume: str | None = None
    validation_rows: int = 0
    gradient_checkpointing: bool = False
    eval_every: int = 0
    final_artifact: Literal["last", "best"] = "last"

    def __post_init__(self) -> None:
        if self.validation_rows < 0:
            raise ConfigError(f"training.validation_rows must be ≥ 0, got {self.validation_rows}")
        if self.eval_every < 0:
            raise ConfigError(f"training.eval_every must be ≥ 0 (0 = only at the end of each epoch), got {self.eval_every}")
        for key, on in (("eval_every", self.eval_every > 0), ("final_artifact", self.final_artifact == "best")):
            if on and self.validation_rows == 0:
                raise ConfigError(f"training.{key}={getattr(self, key)} measures the held-out loss: set "
                                  f"training.validation_rows (e.g. 32) to hold out rows for it")
        for key in ("epochs", "micro_batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"training.{key} must be ≥ 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"training.max_steps must be ≥ 1, got {self.max_steps}")
        if self.lr <= 0:
            raise ConfigError(f"training.lr must be > 0, got {self.lr}")
        if self.checkpoint_every < 0:
            raise ConfigError("training.checkpoint_every must be ≥ 0 (0 = only at the end of each epoch)")


@dataclass
class DistributionConfig:
    """How Ray Train runs the fine-tuning: DeepSpeed ZeRO (stage 0-3) or plain DDP.

    offload_optimizer / offload_params: ZeRO-Offload of the optimizer state (stage ≥ 1) / of the
    parameters (stage 3) to CPU memory. deepspeed_config: a DeepSpeed JSON file merged under the values
    the recipe sets (training/engines.py); a key both set differently is an error, not a silent choice.
    """

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    torch_threads: int | None = None
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    deepspeed_config: str | None = None

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"distribution.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.num_workers < 1:
            raise ConfigError(f"distribution.num_workers must be ≥ 1, got {self.num_workers}")
        for key in ("offload_optimizer", "offload_params", "deepspeed_config"):
            value = getattr(self, key)
            if self.strategy == "ddp" and value not in (None, "none"):
                raise ConfigError(f"distribution.{key}={value} is a DeepSpeed setting; distribution.strategy is ddp "
                                  f"(use strategy: deepspeed)")
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ConfigError(f"distribution.offload_params={self.offload_params} needs distribution.zero_stage=3 "
                              f"(only ZeRO-3 partitions the parameters), got zero_stage={self.zero_stage}")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ConfigError(f"distribution.offload_optimizer={self.offload_optimizer} needs distribution.zero_stage "
                              f"1, 2 or 3 (ZeRO-Offload moves the partitioned optimizer state), got zero_stage=0")
        if self.strategy == "deepspeed" and self.zero_stage == 0 and self.bf16:
            # measured with DeepSpeed 0.19.8: without ZeRO, bf16 wraps the torch AdamW in FP16_UnfusedOptimizer,
            # whose constructor runs one optimizer step on zero gradients: AdamW's step count starts at 1 (the
            # first update is 0.74 × lr, bias correction off for the first steps) and weight decay is applied
            # once before training. ZeRO 1-3 and DDP's autocast do not do this.
            why = "precision=bf16" if self.precision == "bf16" else "precision=auto (bf16 on GPU)"
            raise ConfigError(
                f"distribution.zero_stage=0 with {why}: DeepSpeed's bf16 path without ZeRO runs a dummy AdamW step "
                f"at start (wrong bias correction, one extra weight decay), so it would not train as bf16 does "
                f"elsewhere; use zero_stage 1-3, strategy: ddp (bf16 autocast) or precision: fp32")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)


@dataclass
class EvalConfig:
    """include_base: also evaluate the untouched base model (the reference row of the summary).
    merged: methods on the nested adapter (lora, dylora, dylora_plus, flexi) generate each batch one rank
    at a time on the base weights with that rank merged in (adapters/merged.py), routed rows sorted by rank
    into batches first: the bare base model's speed.
    """

    include_base: bool = True
    batch_size: int = 16
    max_new_tokens: int = 256
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    merged: bool = False


@dataclass
class TrackingConfig:
    """MLflow: tracking_uri None means a sqlite store at <output_dir>/mlflow.db.

    Every train stage's run logs its trained artifact as an MLflow logged model. register_as: register
    the main method's (`method`) in the model registry under this name, a version per distinct artifact.
    system_metrics_interval: seconds between the CPU / memory / disk / network (and GPU, where pynvml sees
    one) samples each node's first training worker logs as `system/*`; 0 = off.
    """

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "flexi-workflows"
    register_as: str | None = None
    system_metrics_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.system_metrics_interval < 0:
            raise ConfigError(f"tracking.system_metrics_interval must be ≥ 0 (0 = off), got {self.system_metrics_interval}")
        if self.register_as is not None and not self.register_as.strip():
            raise ConfigError("tracking.register_as must be a model name, got an empty string")


@dataclass
class RayConfig:
    """address: None starts (or joins) a cluster on this machine; "auto" or ray://... join a running one."""

    address: str | None = None
    num_cpus: int | None = None


@dataclass
class SchedulerConfig:
    """Early stopping of weak trials: ASHA on the per-epoch `val_loss` of the trial's main method
    (needs training.validation_rows > 0). A trial reaching rung r (grace_period × reduction_factor^k
    epochs) goes on only if its val_loss is in the best 1/reduction_factor of the trials there so far."""

    type: Literal["asha"] = "asha"
    metric: Literal["val_loss"] = "val_loss"
    mode: Literal["min", "max"] = "min"
    grace_period: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            raise ConfigError(f"sweep.scheduler.grace_period must be ≥ 1, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"sweep.scheduler.reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass
class SweepConfig:
    """`flexi sweep`: trials over a search space, each a run of this recipe with some keys overridden.

    space: recipe key → values, in one of these forms
        [a, b, c]                  a grid (every value is tried; grids multiply)
        {grid: [a, b, c]}          the same, spelled out
        {choice: [a, b, c]}        one value drawn per sample
        {uniform: [low, high]}     a float drawn per sample
        {loguniform: [low, high]}  a float drawn per sample on a log scale
    e.g. `method.ranks: [[1, 8], [2, 8]]`, `router.noise_std: [0.0, 0.1, 0.3]`, `seed: [0, 1, 2]`.
    Draws are made from `sample_seed`, so the same sweep always means the same trials (which is what
    lets an interrupted sweep resume). num_samples repeats the grid, drawing the other keys anew.

    metric: a column of a run's summary row for the recipe's main `method` (e.g. accuracy_all,
    accuracy_hard, f1_all, wer_all, mean_active_params) on `dataset` (default: the first eval set);
    mode defaults to min for error rates (wer, cer) and max otherwise.
    trial_cpus: CPUs reserved for each trial's driver (its training workers and eval actors take
    `distribution.*` and `evaluation.*` resources on top); max_concurrent_trials: trials at once.
    scheduler: optional early stopping (ASHA, see SchedulerConfig); stopped trials are recorded as such.
    """

    space: dict = field(default_factory=dict)
    metric: str = ""
    mode: Literal["max", "min"] | None = None
    dataset: str | None = None
    num_samples: int = 1
    sample_seed: int = 0
    max_concurrent_trials: int = 2
    trial_cpus: float = 0.0
    scheduler: SchedulerConfig | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"sweep.num_samples must be ≥ 1, got {self.num_samples}")
        if self.max_concurrent_trials < 1:
            raise ConfigError(f"sweep.max_concurrent_trials must be ≥ 1, got {self.max_concurrent_trials}")
        if self.trial_cpus < 0:
            raise ConfigError(f"sweep.trial_cpus must be ≥ 0, got {self.trial_cpus}")


# tasks whose per-answer grade is 0 or 1 (accuracy): their scores are pass rates j / num_samples
BINARY_GRADE_TASKS = ("math", "arith")
CUSTOM_TASK = "custom"  # users' own files (tasks/custom.py): the one task configured by recipe keys
LOWER_IS_BETTER_TASKS = ("speech",)  # tasks scored by an error rate: thresholds ascend (tasks/speech.py)


@dataclass
class Recipe:
    name: str = "experiment"
    output_dir: str = "outputs/experiment"
    # where stage results, Ray Train checkpoints and the summary are kept: None = output_dir; a folder
    # (e.g. a network mount every node sees) or an s3:// URI (storage.py). output_dir then holds only logs.
    storage: str | None = None
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=FlexiConfig)
    compare: list[MethodConfig] = field(default_factory=list)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distribution: DistributionConfig = field(default_factory=DistributionConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    sweep: SweepConfig | None = None

    def __post_init__(self) -> None:
        t = self.scoring.thresholds
        if self.task.name in LOWER_IS_BETTER_TASKS and any(a >= b for a, b in zip(t, t[1:])):
            raise ConfigError(f"scoring.thresholds must be strictly increasing for task {self.task.name} (its metric is an "
                              f"error rate; easiest class first), got {t}")
        if self.task.name not in LOWER_IS_BETTER_TASKS and any(a <= b for a, b in zip(t, t[1:])):
            raise ConfigError(f"scoring.thresholds must be strictly decreasing (easiest class first), got {t}")
        if self.task.binary_grades:
            empty = self.scoring.unreachable_classes()
            if empty:
                k = self.scoring.num_samples
                raise ConfigError(
                    f"scoring.thresholds {self.scoring.thresholds} leave classes {empty} empty: a {self.task.name} answer "
                    f"is right or wrong, so with scoring.num_samples={k} a row's score is one of "
                    f"{', '.join(f'{j}/{k}' for j in range(k + 1))}"
                    + ("; more classes need sampled answers (scoring.num_samples > 1, the pass rate over k samples)"
                       if k == 1 else "")
                )
        for key, method in self.keyed_methods():
            if isinstance(method, FlexiConfig) and len(method.ranks) != self.scoring.num_classes:
                raise ConfigError(
                    f"{key}.ranks {method.ranks} gives {len(method.ranks)} ranks but scoring.num_classes "
                    f"is {self.scoring.num_classes}: flexi maps each difficulty class to one rank"
                )
            if isinstance(method, AdaLoraConfig) and self.distribution.strategy == "deepspeed" and self.distribution.zero_stage > 0:
                raise ConfigError(
                    f"{key}: AdaLoRA's update_and_allocate reads every parameter's gradient after backward, which "
                    f"DeepSpeed ZeRO stage {self.distribution.zero_stage} partitions away; use "
                    f"distribution.strategy=ddp or distribution.zero_stage=0"
                )

    def keyed_methods(self) -> list[tuple[str, MethodConfig]]:
        return [("method", self.method)] + [(f"compare.{i}", m) for i, m in enumerate(self.compare)]

    @property
    def methods(self) -> list[MethodConfig]:
        return [m for _, m in self.keyed_methods()]
