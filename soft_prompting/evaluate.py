"""Evaluate hard prompts without any soft prompt: reliability, and lift over baselines.

    python -m soft_prompting.evaluate prompts_file=outputs/run/divergent_dataset.jsonl \
        model_pair=toy_sandbagging hydra.run.dir=outputs/run/evaluation

Reads a prompts file (``.jsonl`` or ``.pt`` records with a ``prompt``, or ``.txt`` one prompt a
line), scores each prompt with both models *without* a soft prompt (as the divergent dataset is
scored), and compares them with two baselines:

- ``random_text``: as many prompts drawn at random from the category texts of ``data``, scored the
  same way: ``lift_vs_random_text`` = mean KL of the prompts ÷ mean KL of those texts;
- ``random_soft_prompt``: the teacher-forced divergence on the same random texts with an untrained
  random soft prompt prepended: ``lift_vs_random_soft_prompt`` = the prompts' teacher-forced
  divergence ÷ that. (A handful of continuous tokens can move a model a long way; hard prompts
  that beat a random one are doing more than adding noise.)

Reliability is each prompt's share of sampled continuation pairs whose two generations differ
(``generation.num_generations_per_prompt`` pairs). A prompt is a *discovery* when its KL is at least
:data:`DISCOVERY_THRESHOLD` nats and :data:`DISCOVERY_LIFT` times the random-text baseline.

Writes into the run directory: ``evaluated_prompts.jsonl`` (per prompt, sorted by KL; built by
appending to ``*.partial.jsonl`` files, so a killed run resumes), ``summary.json`` and
``evaluation.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from soft_prompting import run_files
from soft_prompting.config import (
    DataConfig,
    GenerationConfig,
    ModelPairConfig,
    TrainingConfig,
    register_configs,
)
from soft_prompting.errors import ConfigError, DataError, reported_errors
from soft_prompting.hard_prompts.dataset import (
    balanced_prompts,
    score_candidates,
    sort_by_divergence,
)
from soft_prompting.hard_prompts.sampling import SamplingSettings
from soft_prompting.run_files import environment, read_records, write_json, write_jsonl

DISCOVERY_THRESHOLD = 0.05
"""Smallest mean KL (nats per continuation token) a prompt needs to count as a discovery."""
DISCOVERY_LIFT = 3.0
"""... and how many times the random-text baseline's mean KL it must reach."""


@dataclass
class EvaluateConfig:
    """Root config of ``python -m soft_prompting.evaluate``."""

    model_pair: ModelPairConfig = field(default_factory=ModelPairConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Only ``num_soft_prompt_tokens`` is used: the length of the random-soft-prompt control."""
    prompts_file: str = MISSING
    """The prompts: .jsonl or .pt records with a ``prompt`` field, or .txt one prompt a line."""
    soft_prompt_checkpoint: str | None = None
    """A trained ``last.ckpt``: its divergence on the random texts is reported for reference."""
    max_prompts: int | None = None
    """Evaluate only the first this many prompts (null: all)."""
    name: str = "evaluation"
    """Run name."""
    seed: int = 0
    """Seed of the random baseline texts, the random soft prompt and sampling."""

    def __post_init__(self) -> None:
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"max_prompts={self.max_prompts}: must be >= 1 or null")


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
register_configs()


def read_prompts(path: str | Path) -> list[dict]:
    """``{"prompt", "category", "source"}`` rows of a prompts file; a clear DataError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts_file={str(path)!r} does not exist")
    if path.suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text: {err}") from err
        records = [{"prompt": line.strip()} for line in lines if line.strip()]
    elif path.suffix in (".jsonl", ".pt"):
        records = read_records(path)
    else:
        raise DataError(f"{path}: use a .jsonl, .pt or .txt prompts file")
    rows = []
    for number, record in enumerate(records, 1):
        prompt = record.get("prompt", record.get("text"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(
                f"{path}: record {number} has no non-empty 'prompt' (or 'text') string; "
                "each record needs one"
            )
        rows.append(
            {
                "prompt": prompt,
                "category": str(record.get("category", "prompts_file")),
                "source": str(record.get("source", "prompts_file")),
            }
        )
    if not rows:
        raise DataError(f"{path} holds no prompts: write one prompt a line (.txt) or records")
    return rows


def is_discovery(record: dict, baseline: float) -> bool:
    """Whether a scored prompt makes the pair diverge clearly beyond the random-text baseline."""
    kl = record["metrics"]["kl_divergence"]
    return kl >= DISCOVERY_THRESHOLD and kl >= DISCOVERY_LIFT * baseline


def lift(value: float, baseline: float) -> float | None:
    """``value / baseline``, None when the baseline is zero (identical models)."""
    return value / baseline if baseline > 1e-12 else None


def evaluate(config: EvaluateConfig, run_dir: Path) -> dict:
    """The recipe: prompts → pair → score prompts → random-text baselines → summary + table."""
    from soft_prompting.data.datamodule import CategoryTextDataModule
    from soft_prompting.training.module import DivergenceModule

    rows = read_prompts(config.prompts_file)[: config.max_prompts]
    run_dir.mkdir(parents=True, exist_ok=True)
    pair_args = {k: v for k, v in asdict(config.model_pair).items() if k != "description"}
    torch.manual_seed(config.seed)
    module = DivergenceModule(
        **pair_args, num_soft_prompt_tokens=config.training.num_soft_prompt_tokens, seed=config.seed
    ).eval()
    settings = SamplingSettings.from_config(config.generation)
    provenance = {
        "model_1_name": config.model_pair.model_1_name,
        "model_2_name": config.model_pair.model_2_name,
        "prompts_file": str(config.prompts_file),
        "seed": config.seed,
    }
    records = score_candidates(
        module.pair,
        rows,
        settings,
        provenance,
        run_dir / run_files.partial(run_files.EVALUATED_PROMPTS),
        config.seed,
    )
    datamodule = CategoryTextDataModule(
        module.tokenizer, **asdict(config.data) | {"seed": config.seed}
    )
    texts = {c: t for c, t in datamodule.load_categories().items() if t}
    random_rows = [
        {"prompt": text, "category": category, "source": "random_text"}
        for category, text in balanced_prompts(texts, len(rows), config.seed)
    ]
    baseline = score_candidates(
        module.pair,
        random_rows,
        settings,
        provenance,
        run_dir / run_files.partial(run_files.RANDOM_TEXTS),
        config.seed,
    )
    summary = summarise(module, config, records, baseline)
    for record in records:
        record["discovery"] = is_discovery(record, summary["random_text"]["kl_divergence"])
    records = sort_by_divergence(records)
    write_jsonl(run_dir / run_files.EVALUATED_PROMPTS, records)
    write_jsonl(run_dir / run_files.RANDOM_TEXTS, sort_by_divergence(baseline))
    write_json(run_dir / run_files.SUMMARY, summary)
    run_files.write_text(run_dir / run_files.EVALUATION_MD, markdown(summary, records))
    for name in (run_files.EVALUATED_PROMPTS, run_files.RANDOM_TEXTS):
        (run_dir / run_files.partial(name)).unlink(missing_ok=True)
    return summary


def _mean(records: list[dict], key: str) -> float:
    values = [r["metrics"][key] for r in records]
    return float(sum(values) / len(values)) if values else 0.0


@torch.no_grad()
def teacher_forced_divergence(module, texts: list[str], prompt=None, batch_size: int = 16) -> float:
    """Mean per-token divergence over ``texts``, with ``prompt`` (``[P, H]``) prepended or none."""
    tokenizer, total, count = module.tokenizer, 0.0, 0
    tokenizer.padding_side = "left"
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
        value = module.divergence(
            batch["input_ids"],
            batch["attention_mask"],
            use_prompt=prompt is not None,
            prompt=prompt,
        )
        n = int(batch["attention_mask"].sum())
        total, count = total + float(value) * n, count + n
    return total / max(count, 1)


def summarise(module, config: EvaluateConfig, records: list[dict], baseline: list[dict]) -> dict:
    prompts = [r["prompt"] for r in records]
    random_texts = [r["prompt"] for r in baseline]
    kl, kl_random = _mean(records, "kl_divergence"), _mean(baseline, "kl_divergence")
    forced = teacher_forced_divergence(module, prompts)
    random_prompt = module.soft_prompt.detach()  # untrained: the seeded random initialisation
    forced_random_soft = teacher_forced_divergence(module, random_texts, random_prompt)
    summary = {
        "num_prompts": len(records),
        "prompts": {
            "kl_divergence": kl,
            "reliability": _mean(records, "reliability"),
            "token_disagreement_rate": _mean(records, "token_disagreement_rate"),
            "teacher_forced_divergence": forced,
        },
        "random_text": {
            "num_texts": len(baseline),
            "kl_divergence": kl_random,
            "reliability": _mean(baseline, "reliability"),
            "teacher_forced_divergence": teacher_forced_divergence(module, random_texts),
        },
        "random_soft_prompt": {"teacher_forced_divergence": forced_random_soft},
        "lift_vs_random_text": lift(kl, kl_random),
        "lift_vs_random_soft_prompt": lift(forced, forced_random_soft),
        "reliability": _mean(records, "reliability"),
        "reliability_random_text": _mean(baseline, "reliability"),
        "num_discoveries": sum(is_discovery(r, kl_random) for r in records),
        "discovery_rule": f"kl_divergence >= {DISCOVERY_THRESHOLD} and >= {DISCOVERY_LIFT} x "
        "the random-text baseline's mean",
        "model_1_name": config.model_pair.model_1_name,
        "model_2_name": config.model_pair.model_2_name,
        "prompts_file": str(config.prompts_file),
        "seed": config.seed,
        "generation": asdict(config.generation),
        "environment": environment(),
    }
    if config.soft_prompt_checkpoint:
        state = torch.load(config.soft_prompt_checkpoint, map_location="cpu", weights_only=False)
        trained = state["state_dict"]["soft_prompt"]
        summary["trained_soft_prompt"] = {
            "checkpoint": config.soft_prompt_checkpoint,
            "teacher_forced_divergence": teacher_forced_divergence(module, random_texts, trained),
        }
    return summary


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(summary: dict, records: list[dict], top: int = 20) -> str:
    """The summary and the top prompts as a Markdown report."""
    lines = [
        f"# Hard-prompt evaluation: {summary['model_1_name']} vs {summary['model_2_name']}",
        "",
        "| measure | prompts | random texts | lift |",
        "|---|---|---|---|",
        f"| mean KL (continuations) | {_fmt(summary['prompts']['kl_divergence'])} "
        f"| {_fmt(summary['random_text']['kl_divergence'])} "
        f"| {_fmt(summary['lift_vs_random_text'])}× |",
        f"| reliability | {_fmt(summary['reliability'])} "
        f"| {_fmt(summary['reliability_random_text'])} | |",
        f"| teacher-forced divergence | {_fmt(summary['prompts']['teacher_forced_divergence'])} "
        f"| random soft prompt: {_fmt(summary['random_soft_prompt']['teacher_forced_divergence'])} "
        f"| {_fmt(summary['lift_vs_random_soft_prompt'])}× |",
        "",
        f"Discoveries ({summary['discovery_rule']}): {summary['num_discoveries']} of "
        f"{summary['num_prompts']}.",
        "",
        "| rank | prompt | KL | reliability | source | discovery |",
        "|---|---|---|---|---|---|",
    ]
    for rank, r in enumerate(records[:top], 1):
        prompt = r["prompt"].replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {rank} | {prompt} | {_fmt(r['metrics']['kl_divergence'])} "
            f"| {_fmt(r['metrics']['reliability'])} | {r.get('source', '')} "
            f"| {'yes' if r.get('discovery') else ''} |"
        )
    return "\n".join(lines) + "\n"


def to_evaluate_config(cfg: DictConfig) -> EvaluateConfig:
    """Validate a composed config; missing and out-of-range values raise ConfigError."""
    if OmegaConf.is_missing(cfg, "prompts_file"):
        raise ConfigError("missing prompts_file: pass prompts_file=path/to/divergent_dataset.jsonl")
    missing = [f"model_pair.{k}" for k in cfg.model_pair if OmegaConf.is_missing(cfg.model_pair, k)]
    if missing:
        raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise ConfigError(str(err)) from err


@hydra.main(version_base=None, config_path="pkg://soft_prompting.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        summary = evaluate(to_evaluate_config(cfg), Path(HydraConfig.get().runtime.output_dir))
        print(
            f"{summary['num_prompts']} prompts: lift {_fmt(summary['lift_vs_random_text'])}× over "
            f"random texts, {_fmt(summary['lift_vs_random_soft_prompt'])}× over a random soft "
            f"prompt; reliability {_fmt(summary['reliability'])}"
        )


if __name__ == "__main__":
    main()
