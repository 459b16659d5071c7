"""Typed config schemas behind the YAML files in ``conf/``.

Registered in Hydra's ConfigStore, so a key that does not exist, a value of the wrong type or a
choice outside its :class:`Choice` Enum fails at compose time and names the key (and the allowed
values). These dataclasses own every default: the YAML files in ``conf/`` only select presets and
override (tests/test_config.py holds them to it), so the command line and the Python API
(:func:`load_train_config`) start from the same values. Range checks live in ``__post_init__`` and
run when an entrypoint turns the composed config into these dataclasses (:func:`to_train_config`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from soft_prompting.errors import ConfigError


class Choice(str, Enum):
    """A config value picked from a fixed set: Hydra refuses any other value at compose time,
    naming the allowed ones. It compares, prints and serialises as its plain string, so member
    names are the values users type (``training.divergence=js``)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Divergence(Choice):
    """What the soft prompt maximises (the names of ``soft_prompting.maths.divergence.DIVERGENCES``)."""

    kl = "kl"
    reverse_kl = "reverse_kl"
    js = "js"


class PromptInit(Choice):
    """How the soft prompt starts."""

    random = "random"
    text = "text"


class TorchDtype(Choice):
    """The frozen pair's weights dtype."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class DeviceMap(Choice):
    """How each model of the pair is placed across GPUs (null: each model whole)."""

    split = "split"


DEFAULT_STRATEGIES = (
    {"_target_": "soft_prompting.hard_prompts.strategies.CategoryTextRanking"},
    {"_target_": "soft_prompting.hard_prompts.strategies.SoftPromptExploration"},
    {"_target_": "soft_prompting.hard_prompts.strategies.ContrastiveExploration"},
    {"_target_": "soft_prompting.hard_prompts.strategies.ProjectionSearch"},
    {"_target_": "soft_prompting.hard_prompts.strategies.WhiteBoxPrior"},
)
"""Where candidate hard prompts come from; their candidates are merged, near-duplicates dropped,
and ``generation.num_prompts`` of them scored without the soft prompt."""


def plain(value: Any) -> Any:
    """``value`` with every :class:`Choice` replaced by its string, inside dicts and lists too:
    what checkpoints, logs and records hold (never an Enum, which only unpickling could read)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(item) for item in value)
    return value


def _choice(enum: type[Choice], value: Any, key: str) -> Choice | None:
    """``value`` as a member of ``enum`` (None stays None): the Python API passes plain strings."""
    if value is None or isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        raise ConfigError(
            f"{key}={value!r}: use one of {', '.join(m.value for m in enum)}"
        ) from None


def _auto_or_bool(value: Any, key: str) -> bool | str:
    """``auto``, or a boolean as the command line (true/false) or a YAML file (True) spells it."""
    spelled = str(value).strip().lower()
    if spelled in ("auto", "true", "false"):
        return {"true": True, "false": False}.get(spelled, "auto")
    raise ConfigError(f"{key}={value!r}: use auto, true or false")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _check_categories(categories: list[str] | None, data: DataConfig, key: str) -> None:
    """Unknown categories fail at compose time, before any model loads: the built-in ones are
    known, and so are the files of an existing ``data.text_dir`` (a missing folder is reported
    when the run starts; a Hugging Face dataset's categories are known only once it loads)."""
    if not categories or data.hf_dataset:
        return
    if data.text_dir:
        folder = Path(data.text_dir).expanduser()
        if not folder.is_dir():
            return
        known = sorted({p.stem for p in folder.iterdir() if p.suffix in (".txt", ".jsonl")})
        where = f"files in {folder}"
    else:
        from soft_prompting.organisms.corpus import BUILTIN_CATEGORIES

        known, where = list(BUILTIN_CATEGORIES), "built-in categories"
    unknown = [name for name in categories if name not in known]
    _require(
        not unknown,
        f"{key}={unknown} not found: the {where} are {known}; fix {key}, or give your own "
        "texts with data.text_dir=FOLDER (one NAME.txt a category)",
    )


@dataclass
class ModelPairConfig:
    """The two models to compare. They must share a tokenizer vocabulary and a hidden size."""

    model_1_name: str = MISSING
    """Reference model: a hub id, a local ``save_pretrained`` folder, or ``organism:NAME``."""
    model_2_name: str = MISSING
    """The model compared against model_1 (fine-tuned, unlearned, sandbagging, backdoored…)."""
    description: str = ""
    """One line on what differs between the two, for reports."""
    revision_1: str | None = None
    """Pinned hub revision (branch, tag or commit) of model_1."""
    revision_2: str | None = None
    """Pinned hub revision of model_2."""
    torch_dtype: TorchDtype = TorchDtype.auto
    """Weights dtype: auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16."""
    load_in_8bit: bool = False
    """Quantise both frozen models to 8 bits with bitsandbytes (CUDA only)."""
    load_in_4bit: bool = False
    """Quantise both frozen models to 4 bits (NF4) with bitsandbytes (CUDA only)."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub repository. Off unless you trust its authors."""
    device_map: DeviceMap | None = None
    """``split``: spread each model's decoder layers over all visible GPUs of this process, the
    embeddings and heads on the first (for a pair too large for one GPU); null: each model whole."""

    def __post_init__(self) -> None:
        self.torch_dtype = _choice(TorchDtype, self.torch_dtype, "model_pair.torch_dtype")
        self.device_map = _choice(DeviceMap, self.device_map, "model_pair.device_map")
        _require(
            not (self.load_in_8bit and self.load_in_4bit),
            "model_pair.load_in_8bit and model_pair.load_in_4bit are both true: pick one",
        )


@dataclass
class TrainingConfig:
    """Soft-prompt optimisation."""

    num_soft_prompt_tokens: int = 8
    """Virtual tokens in the soft prompt."""
    learning_rate: float = 0.03
    """Adam learning rate of the soft prompt (prompt tuning wants far more than fine-tuning)."""
    batch_size: int = 16
    """Texts per optimisation step."""
    num_epochs: int = 4
    """Passes over the training texts."""
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: run ``num_epochs``)."""
    divergence: Divergence = Divergence.kl
    """What to maximise: kl (KL(p1||p2)), reverse_kl (KL(p2||p1)) or js (Jensen-Shannon)."""
    init: PromptInit = PromptInit.random
    """Soft-prompt initialisation: random (scaled like real embeddings) or text (``init_text``)."""
    init_text: str = ""
    """Text whose token embeddings initialise the prompt when ``init=text``."""
    norm_constraint: bool = True
    """Keep each virtual token's norm within the range of real token embeddings of model_1."""
    weight_decay: float = 0.0
    """Adam weight decay on the soft prompt."""
    gradient_clip_val: float = 1.0
    """Clip the soft prompt's gradient norm (0 disables; with num_prompts > 1, each prompt's norm
    on its own)."""
    mixed_precision: Any = "auto"
    """Autocast the frozen pair's forward: auto (bf16 on a GPU with bf16 and on a CPU with native
    bf16, AVX512-BF16 or AMX; fp32 elsewhere), true (bf16, or fp16 on a GPU without bf16) or false
    (fp32). The divergence is computed in fp32 either way."""
    gradient_checkpointing: bool = False
    """Recompute the frozen models' activations in backward: less memory, ~30% more compute."""
    compile: bool = False
    """``torch.compile`` the frozen models' forward; the first steps pay the compile time."""
    accumulate_grad_batches: int = 1
    """Batches whose gradients are summed before a step."""
    val_check_interval: float = 1.0
    """Validate every this fraction of an epoch (float ≤ 1) or this many steps (int > 1)."""
    log_every_n_steps: int = 5
    """How often training metrics are logged."""
    checkpoint_every_n_steps: int = 20
    """Write ``checkpoints/last.ckpt`` this often, so a killed run loses little (resume: ckpt_path=last)."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu, …"""
    devices: int = 1
    """Devices per node for data-parallel training."""
    num_nodes: int = 1
    """Machines taking part (multi-node DDP or FSDP; SLURM or torchrun start the processes)."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp (each rank holds the whole pair), or fsdp (the pair's decoder
    layers sharded over the ranks, see docs/SCALING.md); other Lightning strategy names pass through."""
    on_policy_weight: float = 0.0
    """Weight of the divergence on model_1's own soft-prompted samples (score-function; 0: off)."""
    on_policy_tokens: int = 8
    """Tokens sampled per text for the on-policy term."""
    num_prompts: int = 1
    """Soft prompts trained together, in one batched pass over the pair (each finds its own difference)."""
    diversity_weight: float = 1.0
    """With num_prompts > 1: weight, relative to the mean divergence, of the penalty on prompts that
    peak on the same texts (soft_prompting/maths/diversity.py; 0: none)."""

    def __post_init__(self) -> None:
        self.mixed_precision = _auto_or_bool(self.mixed_precision, "training.mixed_precision")
        _require(
            self.num_soft_prompt_tokens >= 1,
            f"training.num_soft_prompt_tokens={self.num_soft_prompt_tokens}: needs at least 1 "
            "virtual token (4-16 is typical)",
        )
        _require(
            self.learning_rate > 0 and _finite(self.learning_rate),
            f"training.learning_rate={self.learning_rate}: must be a finite number > 0 (try 0.03)",
        )
        _require(
            self.weight_decay >= 0 and _finite(self.weight_decay),
            f"training.weight_decay={self.weight_decay}: must be a finite number >= 0",
        )
        _require(
            self.gradient_clip_val >= 0 and _finite(self.gradient_clip_val),
            f"training.gradient_clip_val={self.gradient_clip_val}: must be a finite number >= 0 "
            "(0 disables clipping)",
        )
        _require(
            self.val_check_interval > 0 and _finite(self.val_check_interval),
            f"training.val_check_interval={self.val_check_interval}: use a fraction of an epoch "
            "in (0, 1] or a step count > 1",
        )
        _require(
            self.accelerator not in ("gpu", "cuda") or _cuda_available(),
            f"training.accelerator={self.accelerator} but this machine has no CUDA GPU: use "
            "training.accelerator=auto or cpu",
        )
        _require(self.batch_size >= 1, f"training.batch_size={self.batch_size}: must be >= 1")
        _require(self.num_epochs >= 1, f"training.num_epochs={self.num_epochs}: must be >= 1")
        _require(
            self.max_steps == -1 or self.max_steps >= 1,
            f"training.max_steps={self.max_steps}: use -1 (no limit) or a positive count",
        )
        self.divergence = _choice(Divergence, self.divergence, "training.divergence")
        self.init = _choice(PromptInit, self.init, "training.init")
        _require(
            self.init != PromptInit.text or bool(self.init_text.strip()),
            "training.init=text needs training.init_text='some words'",
        )
        _require(
            self.accumulate_grad_batches >= 1,
            f"training.accumulate_grad_batches={self.accumulate_grad_batches}: must be >= 1",
        )
        _require(self.devices >= 1, f"training.devices={self.devices}: must be >= 1")
        _require(self.num_nodes >= 1, f"training.num_nodes={self.num_nodes}: must be >= 1")
        _require(
            self.strategy == "fsdp" or not self.strategy.startswith("fsdp"),
            f"training.strategy={self.strategy}: Lightning's FSDP variants would shard only the "
            "soft prompt (the frozen pair is not a child module); use training.strategy=fsdp, "
            "which shards the pair's layers",
        )
        _require(
            self.on_policy_weight >= 0
            and _finite(self.on_policy_weight)
            and self.on_policy_tokens >= 1,
            "training.on_policy_weight must be >= 0 and training.on_policy_tokens >= 1",
        )
        _require(
            self.num_prompts >= 1,
            f"training.num_prompts={self.num_prompts}: must be >= 1 (1: a single soft prompt)",
        )
        _require(
            self.diversity_weight >= 0 and _finite(self.diversity_weight),
            f"training.diversity_weight={self.diversity_weight}: must be a finite number >= 0 "
            "(0: no diversity term)",
        )
        _require(
            self.num_prompts == 1 or self.on_policy_weight == 0,
            f"training.on_policy_weight={self.on_policy_weight} works with one prompt only: set "
            "training.num_prompts=1 or training.on_policy_weight=0",
        )
        _require(
            self.checkpoint_every_n_steps >= 1,
            f"training.checkpoint_every_n_steps={self.checkpoint_every_n_steps}: must be >= 1",
        )


@dataclass
class GenerationConfig:
    """How the divergent dataset's continuations are sampled and scored."""

    max_length: int = 24
    """New tokens per continuation."""
    num_generations_per_prompt: int = 4
    """Sampled continuation pairs per prompt (metrics are averaged over them)."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    num_prompts: int = 64
    """Candidate prompts scored into the divergent dataset."""
    batch_size: int = 16
    """Prompts generated in one batch."""
    strategies: list[Any] = field(default_factory=lambda: [dict(s) for s in DEFAULT_STRATEGIES])
    """Hard-prompt strategies: ``{_target_: ..., arg: value}`` dicts (soft_prompting/hard_prompts/strategies.py)."""
    max_prompt_nll_ratio: float | None = 1.5
    """Keep proposed prompts whose model_1 NLL/token is at most this multiple of the texts' median (null: no cap)."""
    localise_top: int = 20
    """Top records (by divergence) that get a ``trigger`` and per-word ``attributions`` (0: none)."""
    rounds: int = 1
    """Proposal rounds; each later one starts from the best prompts so far and where the pair parted ways after them."""

    def __post_init__(self) -> None:
        _require(
            all(isinstance(s, Mapping) and "_target_" in s for s in self.strategies),
            "generation.strategies: each entry needs a _target_, e.g. "
            "{_target_: soft_prompting.hard_prompts.strategies.CategoryTextRanking}",
        )
        _require(self.max_length >= 1, f"generation.max_length={self.max_length}: must be >= 1")
        _require(
            self.num_generations_per_prompt >= 1,
            f"generation.num_generations_per_prompt={self.num_generations_per_prompt}: must be >= 1",
        )
        _require(
            self.temperature >= 0 and _finite(self.temperature),
            f"generation.temperature={self.temperature}: must be a finite number >= 0 (0 means "
            "greedy)",
        )
        _require(
            0 < self.top_p <= 1,
            f"generation.top_p={self.top_p}: must be in (0, 1]",
        )
        _require(self.num_prompts >= 1, f"generation.num_prompts={self.num_prompts}: must be >= 1")
        _require(self.batch_size >= 1, f"generation.batch_size={self.batch_size}: must be >= 1")
        _require(
            self.max_prompt_nll_ratio is None
            or (self.max_prompt_nll_ratio > 0 and _finite(self.max_prompt_nll_ratio)),
            f"generation.max_prompt_nll_ratio={self.max_prompt_nll_ratio}: must be a finite "
            "number > 0 (e.g. 1.5), or null for no fluency cap",
        )
        _require(self.rounds >= 1, f"generation.rounds={self.rounds}: must be >= 1")
        _require(
            self.localise_top >= 0,
            f"generation.localise_top={self.localise_top}: must be >= 0 (0: no localisation)",
        )


@dataclass
class DataConfig:
    """Where the category texts come from and how they are cut."""

    categories: list[str] | None = None
    """Categories to use; null means all (the built-in ones, or every file of ``text_dir``)."""
    text_dir: str | None = None
    """Folder with one file per category: NAME.txt (a text a line) or NAME.jsonl ({"text": ...})."""
    hf_dataset: str | None = None
    """A Hugging Face dataset id (needs the ``datasets`` extra and a reachable hub)."""
    hf_text_field: str = "text"
    """Column of ``hf_dataset`` holding the texts."""
    hf_category_field: str | None = None
    """Column of ``hf_dataset`` naming each text's category (null: one category, the dataset)."""
    max_texts_per_category: int = 1000
    """Texts kept per category, after a seeded shuffle."""
    val_fraction: float = 0.15
    """Held-out share of each category's texts."""
    max_length: int = 64
    """Tokens per text; longer texts are truncated (the run says so once)."""
    num_workers: int = 0
    """DataLoader workers."""

    def __post_init__(self) -> None:
        _require(
            self.max_texts_per_category >= 2,
            f"data.max_texts_per_category={self.max_texts_per_category}: needs >= 2 "
            "(one for training, one held out)",
        )
        _require(
            0 < self.val_fraction < 1,
            f"data.val_fraction={self.val_fraction}: must be strictly between 0 and 1",
        )
        _require(self.max_length >= 2, f"data.max_length={self.max_length}: must be >= 2")
        _require(
            self.categories is None or len(self.categories) > 0,
            "data.categories is an empty list: name at least one category or set it to null",
        )
        _check_categories(self.categories, self, "data.categories")


@dataclass
class WandbConfig:
    """Weights & Biases tracking (Lightning's CSV logger is always on)."""

    enabled: bool = False
    """Log to W&B. Without WANDB_API_KEY the run is logged offline (sync later)."""
    project: str = "soft-prompting"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    mode: str | None = None
    """online, offline or disabled; null picks offline unless an API key is set."""


@dataclass
class TrainConfig:
    """Root config of ``python -m soft_prompting.train``."""

    model_pair: ModelPairConfig = field(default_factory=ModelPairConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    name: str = "soft_prompting"
    """Run name (W&B run, reports)."""
    seed: int = 0
    """Seed of everything: data split and order, prompt init, sampling."""
    ckpt_path: str | None = None
    """Resume training: a checkpoint path, or ``last`` for this run directory's last.ckpt."""
    overwrite: bool = False
    """Allow writing into a run directory that already holds results."""
    write_dataset: bool = True
    """Finish the run by writing the divergent dataset."""

    def __post_init__(self) -> None:
        pair = self.model_pair
        _require(
            self.training.strategy != "fsdp"
            or not (pair.device_map or pair.load_in_8bit or pair.load_in_4bit),
            "training.strategy=fsdp shards the pair's layers itself: drop model_pair.device_map "
            "and 8/4-bit loading, or keep them and use training.strategy=auto/ddp",
        )


@dataclass
class CompareConfig:
    """Root config of ``python -m soft_prompting.compare``: one train run per category, then a table."""

    model_pair: ModelPairConfig = field(default_factory=ModelPairConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    name: str = "comparison"
    """Comparison name (each category's run is NAME-CATEGORY)."""
    seed: int = 0
    """Seed of every category's run and of the bootstrap."""
    categories: list[str] | None = None
    """Categories compared, one run each; null: data.categories, else every category of the source."""
    runs: list[str] | None = None
    """Aggregate these finished train run directories (e.g. a multirun's jobs) instead of training."""
    evaluate: bool = True
    """Run ``soft_prompting.evaluate`` on each category's dataset when that module is installed."""
    top_k: int = 5
    """Top examples (highest KL) listed per category."""
    confidence: float = 0.95
    """Confidence level of the bootstrap intervals."""
    bootstrap_samples: int = 2000
    """Bootstrap resamples per interval."""
    overwrite: bool = False
    """Retrain categories whose run already finished (otherwise they are reused)."""

    def __post_init__(self) -> None:
        _require(
            self.categories is None or len(self.categories) > 0,
            "categories is an empty list: name at least one, e.g. categories=[sandbagging,unlearning]",
        )
        _check_categories(self.categories, self.data, "categories")
        _require(self.top_k >= 1, f"top_k={self.top_k}: must be >= 1")
        _require(0 < self.confidence < 1, f"confidence={self.confidence}: must be in (0, 1)")
        _require(
            self.bootstrap_samples >= 100,
            f"bootstrap_samples={self.bootstrap_samples}: use at least 100 (2000 is typical)",
        )
        _require(
            self.training.strategy != "fsdp" or self.runs is not None,
            "compare writes each category's dataset in the process that trained it, which "
            "training.strategy=fsdp cannot (no rank holds the pair): train the categories with "
            "python -m soft_prompting.train and aggregate them with runs=[...], or compare with "
            "model_pair.device_map=split",
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="compare_schema", node=CompareConfig)
    # No model_pair/schema: TrainConfig types the group, and a pair option named "schema"
    # (with no models) would only be listed among the pairs a user can choose.
    cs.store(group="training", name="schema", node=TrainingConfig)
    cs.store(group="generation", name="schema", node=GenerationConfig)
    cs.store(group="data", name="schema", node=DataConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Validate a composed config: missing and out-of-range values raise :class:`ConfigError`."""
    missing = sorted(
        f"{group}.{key}"
        for group in ("model_pair", "training", "generation", "data")
        for key in cfg[group]
        if OmegaConf.is_missing(cfg[group], key)
    )
    if missing:
        raise ConfigError(
            f"missing required config value(s): {', '.join(missing)}; set them on the command "
            f"line, e.g. {missing[0]}=..."
        )
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf wraps errors raised while building the dataclasses
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise ConfigError(str(err)) from err


# ---------------------------------------------------------------- configs users already have

_PAIR_KEYS = frozenset(f.name for f in fields(ModelPairConfig))
_RUN_DIR_KEYS = ("output_dir",)
"""Keys of the seed experiment YAML that say where results go, not how they are computed."""


def load_experiment_file(
    path: str, overrides: list[str], output_dir: str | None
) -> tuple[dict, str | None]:
    """A seed experiment YAML plus ``key=value`` overrides, in :class:`TrainConfig`'s layout.

    Returns:
        The merged dict and the run directory: ``output_dir`` if given, else the YAML's own (None
        when neither names one; :func:`require_run_dir` turns that into the error).
    """
    if not Path(path).is_file():
        raise ConfigError(f"--config {path!r} does not exist")
    experiment = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    extra = OmegaConf.to_container(OmegaConf.from_dotlist(overrides))
    merged = OmegaConf.merge(experiment_to_dict(experiment), experiment_to_dict(extra))
    return OmegaConf.to_container(merged), output_dir or experiment.get("output_dir")


def require_run_dir(run_dir: str | None) -> str:
    """The run directory of an experiment command line, or the error that says how to give one."""
    if not run_dir:
        raise ConfigError("no run directory: pass --output-dir or set output_dir in the YAML")
    return str(run_dir)


def experiment_to_dict(experiment: Mapping) -> dict:
    """The seed README's experiment YAML, reshaped to :class:`TrainConfig`'s layout.

    The seed file is flat where ours has a ``model_pair`` group::

        name, training:, generation:, data:   -> the same keys
        model_1_name, model_2_name            -> model_pair.model_1_name, model_pair.model_2_name
        output_dir                            -> dropped: the run directory is the caller's choice

    Other :class:`ModelPairConfig` keys at the top level (``torch_dtype``, ``load_in_8bit``, …) move
    into ``model_pair`` too, and a mapping already in TrainConfig's layout passes through unchanged.
    """
    raw = {key: value for key, value in experiment.items() if key not in _RUN_DIR_KEYS}
    raw.pop("hydra", None)  # a saved .hydra/config.yaml or a compose(return_hydra_config=True)
    pair = dict(raw.pop("model_pair", None) or {})
    pair |= {key: raw.pop(key) for key in list(raw) if key in _PAIR_KEYS}
    return {"model_pair": pair, **raw} if pair else raw


def load_train_config(
    source: TrainConfig | DictConfig | Mapping | str | os.PathLike,
) -> TrainConfig:
    """A validated :class:`TrainConfig` from any config a user holds.

    Args:
        source: a TrainConfig; a Hydra-composed config; or a dict or YAML file path in either
            TrainConfig's layout or the seed experiment layout (see :func:`experiment_to_dict`).
            Values not given keep the schema's defaults.

    Raises:
        ConfigError: an unknown key, a wrong type, a missing model name or an out-of-range value,
            named in the message.
    """
    if isinstance(source, TrainConfig):
        return source
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        source = OmegaConf.load(path)
    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source, resolve=True)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), experiment_to_dict(source))
    except OmegaConfBaseException as err:
        first_line = str(err).splitlines()[0]
        raise ConfigError(
            f"config key {err.full_key!r}: {first_line} (the keys are documented in "
            "soft_prompting/config.py)"
        ) from None
    return to_train_config(merged)


def to_overrides(config: Mapping, prefix: str = "") -> list[str]:
    """Flatten a nested mapping into Hydra command-line overrides (``training.batch_size=4``).

    Strings are quoted, so ``organism:base``, paths with spaces and ``"true"`` stay strings.
    """
    overrides = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            overrides += to_overrides(value, f"{prefix}{key}.")
        else:
            overrides.append(f"{prefix}{key}={_override_value(value)}")
    return overrides


def _override_value(value) -> str:
    if isinstance(value, Enum):
        value = value.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_override_value(item) for item in value) + "]"
    if isinstance(value, Mapping):  # e.g. a strategy in generation.strategies
        # "key: value", as Hydra and YAML (OmegaConf's dotlist, the experiment scripts) both read it
        return (
            "{" + ", ".join(f"{key}: {_override_value(item)}" for key, item in value.items()) + "}"
        )
    # Inside Hydra quotes only backslashes before a quote (or at the end) and ${ need escaping.
    text = re.sub(r"(\\+)('|$)", lambda m: m.group(1) * 2 + m.group(2), str(value))
    return "'" + text.replace("'", "\\'").replace("${", "\\${") + "'"
