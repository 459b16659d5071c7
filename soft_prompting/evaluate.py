"""Evaluate hard prompts without any soft prompt: held-out effects, significance, and lifts over
selection-matched baselines.

    python -m soft_prompting.evaluate prompts_file=outputs/run/divergent_dataset.jsonl \
        model_pair=toy_sandbagging hydra.run.dir=outputs/run/evaluation

Reads a prompts file (``.jsonl`` or ``.pt`` records with a ``prompt``, or ``.txt`` one prompt a
line) and, without any soft prompt:

1. **Held-out confirmation.** Every prompt is scored afresh on the ``"confirm"`` noise stream
   (never the samples that ranked it) with ``confirm_generations`` paired samples; the score it was
   selected by (the dataset's ``metrics.kl_divergence``) stays in the record as ``pre_score``.
2. **Significance.** Per prompt, the one-sided sign-flip permutation test on the per-sample
   log-likelihood-ratio gaps (:mod:`soft_prompting.maths.significance`; null: the two models'
   continuation distributions are the same there), Benjamini–Hochberg across the prompts
   (``q_value``), and the effect (mean gap, nats/token) with a bootstrap CI.
3. **Selection-matched baselines** (``baselines``), each with the same budget (propose
   ``baseline_candidates`` candidates, cut at their divergence peak, merge near-duplicates, score
   them on the ``"select"`` stream, keep the best as many as there are prompts, confirm those on
   fresh samples), all starting from the texts the run's strategies started from
   (:func:`~soft_prompting.training.pipeline.strategy_texts`): see :data:`BASELINES`.
   ``lifts`` = the prompts' mean held-out KL ÷ each baseline's, with a bootstrap CI.

A prompt is a **discovery** when ``q_value < fdr_level`` and its effect's CI lies above the best
effect any baseline prompt reached (:func:`discovery_rule`): it shows more than selection alone.

Writes into the run directory: ``evaluated_prompts.jsonl`` (sorted by held-out KL; built by
appending to ``*.partial.jsonl`` files, so a killed run resumes), ``baseline_prompts.jsonl``,
``random_texts.jsonl`` (the ``random_text_cut`` baseline), ``summary.json`` and ``evaluation.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import numpy as np
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
    to_overrides,
)
from soft_prompting.errors import (
    ConfigError,
    DataError,
    Interrupted,
    ModelLoadError,
    exit_2_on_config_errors,
    reported_errors,
)
from soft_prompting.hard_prompts.dataset import score_candidates, sort_by_divergence
from soft_prompting.hard_prompts.sampling import SamplingSettings
from soft_prompting.maths.significance import (
    benjamini_hochberg,
    mean_with_ci,
    ratio_of_means_ci,
    sign_flip_p_values,
)
from soft_prompting.pair.placement import resolve_device
from soft_prompting.run_files import environment, read_records, write_json, write_jsonl

log = logging.getLogger(__name__)

BASELINES: dict[str, str] = {
    "text_ranking": "the category texts ranked by the pair's divergence and cut at their peak "
    "(CategoryTextRanking alone: no soft prompt)",
    "untrained_pipeline": "every strategy of generation.strategies run with untrained soft "
    "prompts (training.num_prompts of them, the same initialisation, zero training steps)",
    "random_text_cut": "random category texts, each cut at its own divergence peak",
}
"""The selection-matched baselines ``evaluate`` can run, by name."""


@dataclass
class EvaluateConfig:
    """Root config of ``python -m soft_prompting.evaluate``."""

    model_pair: ModelPairConfig = field(default_factory=ModelPairConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling settings, the baselines' strategies and their candidate budget (``num_prompts``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The category texts the baselines start from."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Only ``num_soft_prompt_tokens`` (the untrained soft prompt's length), ``num_prompts`` (how
    many untrained prompts the ``untrained_pipeline`` baseline proposes from, as the run trained)
    and ``accelerator`` (where the pair is scored) are used."""
    prompts_file: str = MISSING
    """The prompts: .jsonl or .pt records with a ``prompt`` field, or .txt one prompt a line."""
    soft_prompt_checkpoint: str | None = None
    """A trained ``last.ckpt``: its divergence on the random texts is reported for reference
    (``summary.json``'s ``trained_soft_prompt.teacher_forced_divergence``; for a checkpoint of K
    prompts the mean over them, each prompt's own in ``teacher_forced_divergence_per_prompt``)."""
    max_prompts: int | None = None
    """Evaluate only the first this many prompts (null: all)."""
    name: str = "evaluation"
    """Run name."""
    seed: int = 0
    """Seed of the baselines, the untrained soft prompt, sampling and the bootstrap."""
    confirm_generations: int = 16
    """Fresh sample pairs per prompt behind every reported number (the test's smallest p: 2^-k)."""
    fdr_level: float = 0.05
    """False-discovery rate controlled across the prompts (Benjamini–Hochberg)."""
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    """Selection-matched baselines to run (names of :data:`BASELINES`); [] skips them (and then
    no prompt can be a discovery)."""
    baseline_candidates: int | None = None
    """Candidates each baseline proposes and scores (null: ``generation.num_prompts``, the
    dataset's budget)."""
    bootstrap_resamples: int = 2000
    """Resamples of every bootstrap confidence interval (95 %, percentile)."""

    def __post_init__(self) -> None:
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"max_prompts={self.max_prompts}: must be >= 1 or null")
        if self.confirm_generations < 2:
            raise ConfigError(
                f"confirm_generations={self.confirm_generations}: must be >= 2 (the test and "
                "the confidence intervals need several samples; 16 is the default)"
            )
        if not 0 < self.fdr_level < 1:
            raise ConfigError(f"fdr_level={self.fdr_level}: must be in (0, 1), e.g. 0.05")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ConfigError(
                f"baselines: unknown {unknown}; choose among {list(BASELINES)} (or [] for none)"
            )
        if self.baseline_candidates is not None and self.baseline_candidates < 1:
            raise ConfigError(
                f"baseline_candidates={self.baseline_candidates}: must be >= 1 or null"
            )
        if self.bootstrap_resamples < 100:
            raise ConfigError(f"bootstrap_resamples={self.bootstrap_resamples}: must be >= 100")


MATCHED_SETTINGS = (
    "seed",
    "model_pair.model_1_name",
    "model_pair.model_2_name",
    "model_pair.revision_1",
    "model_pair.revision_2",
    "data.categories",
    "data.text_dir",
    "data.hf_dataset",
    "data.hf_text_field",
    "data.hf_category_field",
    "data.max_texts_per_category",
    "data.val_fraction",
    "data.max_length",
    "training.num_soft_prompt_tokens",
    "training.num_prompts",
    "generation.strategies",
    "generation.num_prompts",
    "generation.max_length",
    "generation.num_generations_per_prompt",
    "generation.temperature",
    "generation.top_p",
    "generation.max_prompt_nll_ratio",
    "generation.localise_top",
    "generation.rounds",
    "generation.batch_size",  # which noise each candidate's samples get
)
"""What decides the texts the baselines start from and the selection they go through: evaluate
must be given the values of the run that wrote ``prompts_file`` for the baselines to match it."""

PATH_SETTINGS = frozenset({"data.text_dir", "model_pair.model_1_name", "model_pair.model_2_name"})
"""Matched settings that may name a folder: the same folder written two ways is the same value."""

ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
register_configs()


def read_prompts(path: str | Path) -> list[dict]:
    """``{"prompt", "category", "source", "pre_score"}`` rows of a prompts file (plus
    ``soft_prompt_index`` where a record has it).

    ``pre_score`` is the score the prompt was selected by: a dataset record's
    ``metrics.kl_divergence``, else its ``pre_score``, else None. Raises a clear DataError.
    """
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
        metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
        pre_score = metrics.get("kl_divergence", record.get("pre_score"))
        rows.append(
            {
                "prompt": prompt,
                "category": str(record.get("category", "prompts_file")),
                "source": str(record.get("source", "prompts_file")),
                "pre_score": float(pre_score) if isinstance(pre_score, (int, float)) else None,
                # Which trained prompt found it (training.num_prompts); datasets without it pass.
                **{k: record[k] for k in ("soft_prompt_index",) if k in record},
            }
        )
    if not rows:
        raise DataError(f"{path} holds no prompts: write one prompt a line (.txt) or records")
    return rows


def lift(value: float, baseline: float) -> float | None:
    """``value / baseline``, None when the baseline is zero (identical models)."""
    return value / baseline if baseline > 1e-12 else None


def discovery_rule(fdr_level: float) -> str:
    """The discovery rule in words (``summary.json["discovery_rule"]``)."""
    return (
        f"q_value < {fdr_level} (one-sided sign-flip test of the per-sample log-likelihood-ratio "
        "gap on fresh samples, Benjamini-Hochberg across the prompts) and the effect's 95% CI "
        "lower bound above the largest effect of any prompt the selection-matched baselines "
        "found (with the same budget, on fresh samples)"
    )


def is_discovery(record: dict, fdr_level: float, effect_threshold: float | None) -> bool:
    """Significant at the FDR level, and an effect clearly above every matched baseline's."""
    if effect_threshold is None or record.get("q_value") is None:
        return False
    low = record["effect"]["ci_low"]
    return record["q_value"] < fdr_level and low is not None and low > effect_threshold


def add_significance(records: list[dict], config: EvaluateConfig) -> None:
    """Give each record ``p_value``, ``q_value`` (BH across ``records``) and ``effect`` with CI."""
    if not records:
        return
    gaps = np.array([r["paired_samples"]["llr_gap"] for r in records], dtype=np.float64)
    p_values = sign_flip_p_values(gaps, seed=config.seed)
    q_values = benjamini_hochberg(p_values)
    mean, low, high = mean_with_ci(gaps, n_resamples=config.bootstrap_resamples, seed=config.seed)
    for i, record in enumerate(records):
        record["p_value"], record["q_value"] = float(p_values[i]), float(q_values[i])
        record["effect"] = {
            "value": float(mean[i]),
            "ci_low": _finite(low[i]),
            "ci_high": _finite(high[i]),
        }


def _finite(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def check_soft_prompt_checkpoint(path: str, pair_args: dict, module=None) -> torch.Tensor:
    """The trained prompt of ``path``, read with ``weights_only=True`` and checked against the
    pair (its saved model ids; with ``module``, the hidden size)."""
    from soft_prompting.training.module import check_same_pair

    state = run_files.read_checkpoint(path)
    saved = state.get("hyper_parameters") or {}
    check_same_pair(saved, pair_args, f"soft_prompt_checkpoint {path}")
    prompt = state["state_dict"]["soft_prompt"]
    if module is not None and prompt.shape[-1] != module.pair.hidden_size:
        raise ModelLoadError(
            f"soft_prompt_checkpoint {path} holds a prompt of hidden size {prompt.shape[-1]}, "
            f"but the pair's is {module.pair.hidden_size}: use a checkpoint of this pair"
        )
    return prompt


def untrained_module(config: EvaluateConfig, pair_args: dict):
    """The pair, with ``training.num_prompts`` untrained soft prompts (the baselines' and the
    scoring's module), placed on ``training.accelerator``."""
    from soft_prompting.training.module import DivergenceModule

    return DivergenceModule(
        **pair_args,
        num_soft_prompt_tokens=config.training.num_soft_prompt_tokens,
        # As many untrained prompts as the run trained: the soft-prompt strategies run once per
        # prompt for the dataset, so the untrained_pipeline baseline must too (selection-matched).
        num_prompts=config.training.num_prompts,
        seed=config.seed,
        pair_device=str(resolve_device(config.training.accelerator)),
    ).eval()


def differences_from_run(config: EvaluateConfig) -> dict:
    """Where evaluate's :data:`MATCHED_SETTINGS` differ from those of the train run that wrote
    ``prompts_file`` (its Hydra ``.hydra/config.yaml`` beside the file; none there: no check).

    Returns:
        ``{"run_config": path or None, "differ": {key: {"evaluate": value, "run": value}},
        "unchecked": [keys whose run value could not be resolved]}``.
    """
    path = Path(config.prompts_file).parent / ".hydra" / "config.yaml"
    if not path.is_file():
        return {"run_config": None, "differ": {}, "unchecked": []}
    try:  # YAML only: nothing is executed or unpickled
        run, ours = OmegaConf.create(run_files.read_yaml(path)), OmegaConf.structured(config)
    except Exception as err:  # a torn or hand-edited file: say so, evaluate anyway
        log.warning("%s: evaluate's settings are not checked against %s", err, path)
        return {"run_config": str(path), "differ": {}, "unchecked": list(MATCHED_SETTINGS)}
    absent, differ, unchecked = object(), {}, []
    run_cwd = _run_cwd(path.parent / "hydra.yaml")
    for key in MATCHED_SETTINGS:
        try:  # interpolations resolved on both sides, inside lists too
            theirs = OmegaConf.select(run, key, default=absent)
            if theirs is absent:  # an older run without the setting: nothing to compare
                continue
            mine, theirs = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                for value in (OmegaConf.select(ours, key), theirs)
            )
        except Exception:  # e.g. ${hydra:...} or ${oc.env:...} that cannot be resolved here
            unchecked.append(key)
            continue
        same = _same_folder(mine, theirs, run_cwd) if key in PATH_SETTINGS else None
        if same is False or (same is None and mine != theirs):
            differ[key] = {"evaluate": mine, "run": theirs}
    if differ:
        log.warning(
            "evaluate's settings differ from the run that wrote prompts_file (%s): %s. The "
            "baselines then start from other texts or another selection than the prompts did; "
            "pass the run's values: %s",
            path,
            ", ".join(f"{k}={v['evaluate']!r} (run: {v['run']!r})" for k, v in differ.items()),
            " ".join(to_overrides({k: v["run"] for k, v in differ.items()})),
        )
    if unchecked:
        log.warning("not checked against %s: %s (cannot be resolved here)", path, unchecked)
    return {"run_config": str(path), "differ": differ, "unchecked": unchecked}


def _run_cwd(hydra_file: Path) -> Path | None:
    """The folder the run was started from (Hydra's ``hydra.runtime.cwd``), where it can be read."""
    try:
        cwd = run_files.read_yaml(hydra_file)["hydra"]["runtime"]["cwd"]
    except Exception:  # no hydra.yaml, or one without it: relative paths are left unresolved
        return None
    return Path(cwd) if isinstance(cwd, str) else None


def _same_folder(mine, theirs, run_cwd: Path | None) -> bool | None:
    """Whether two settings name one folder (evaluate's path relative to where it runs, the run's
    relative to where the run was started); None where they are not both existing folders (an
    organism, a hub id, a relative path of a run whose start folder is unknown)."""
    if not (isinstance(mine, str) and isinstance(theirs, str)):
        return None
    ours, its = Path(mine).expanduser(), Path(theirs).expanduser()
    if not its.is_absolute():
        if run_cwd is None:
            return None
        its = run_cwd / its
    ours = ours if ours.is_absolute() else Path.cwd() / ours
    if not (ours.is_dir() and its.is_dir()):
        return None
    return ours.resolve() == its.resolve()


def evaluate(config: EvaluateConfig, run_dir: Path) -> dict:
    """The recipe: prompts → pair → confirm on fresh samples → baselines → test → summary."""
    rows = read_prompts(config.prompts_file)[: config.max_prompts]
    matched = differences_from_run(config)
    pair_args = {k: v for k, v in asdict(config.model_pair).items() if k != "description"}
    if config.soft_prompt_checkpoint:  # checked before any work; never unpickled
        check_soft_prompt_checkpoint(config.soft_prompt_checkpoint, pair_args)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    module = untrained_module(config, pair_args)
    print(f"evaluating on {module.pair.device} ({module.pair.model_1.dtype})")
    select = SamplingSettings.from_config(config.generation)
    confirm = dataclasses.replace(select, num_generations_per_prompt=config.confirm_generations)
    provenance = {
        "model_1_name": config.model_pair.model_1_name,
        "model_2_name": config.model_pair.model_2_name,
        "prompts_file": str(config.prompts_file),
        "seed": config.seed,
    }
    records = score_candidates(
        module.pair,
        rows,
        confirm,
        provenance,
        run_dir / run_files.partial(run_files.EVALUATED_PROMPTS),
        config.seed,
        stream="confirm",
    )
    texts = baseline_texts(module, config) if config.baselines else {}
    baselines = {
        name: run_baseline(
            name, module, config, texts, len(rows), select, confirm, provenance, run_dir
        )
        for name in config.baselines
    }
    summary = summarise(module, config, records, baselines) | {"matched_to_run": matched}
    records = sort_by_divergence(records)
    write_jsonl(run_dir / run_files.EVALUATED_PROMPTS, records)
    write_jsonl(run_dir / run_files.BASELINE_PROMPTS, [r for b in baselines.values() for r in b])
    write_jsonl(run_dir / run_files.RANDOM_TEXTS, baselines.get("random_text_cut", []))
    write_json(run_dir / run_files.SUMMARY, summary)
    run_files.write_text(run_dir / run_files.EVALUATION_MD, markdown(summary, records))
    (run_dir / run_files.partial(run_files.EVALUATED_PROMPTS)).unlink(missing_ok=True)
    for name in BASELINES:
        for stage in ("select", "confirm"):
            (run_dir / run_files.partial(run_files.baseline_stage(name, stage))).unlink(
                missing_ok=True
            )
    return summary


def baseline_strategies(name: str, config: EvaluateConfig, budget: int, num_categories: int):
    """The strategies of baseline ``name``, proposing about ``budget`` candidates in all."""
    from soft_prompting.hard_prompts.strategies import CategoryTextRanking, build_strategies

    if name == "untrained_pipeline":
        return build_strategies(config.generation.strategies)
    ranking = [
        s
        for s in build_strategies(config.generation.strategies)
        if isinstance(s, CategoryTextRanking)
    ]
    if name == "text_ranking":
        # The run's own ranking settings when it has them, with the whole budget to itself.
        base = ranking[0] if ranking else CategoryTextRanking()
        return [dataclasses.replace(base, num_candidates=budget, source=name)]
    # random_text_cut: as many random texts as the budget, each cut at its peak, none ranked away.
    per_category = -(-budget // max(num_categories, 1))
    return [
        CategoryTextRanking(
            texts_per_category=per_category,
            num_candidates=per_category * max(num_categories, 1),
            source=name,
        )
    ]


def baseline_texts(module, config: EvaluateConfig) -> dict[str, list[str]]:
    """What every baseline starts from: the texts the run's strategies started from."""
    from soft_prompting.training.pipeline import strategy_texts

    texts = {c: t for c, t in strategy_texts(module, config.data, config.seed).items() if t}
    if not texts:
        raise DataError(
            "the baselines need category texts: none were found for data.categories / "
            "data.text_dir (or pass baselines=[])"
        )
    return texts


def run_baseline(
    name: str,
    module,
    config: EvaluateConfig,
    texts: dict[str, list[str]],
    keep: int,
    select: SamplingSettings,
    confirm: SamplingSettings,
    provenance: dict,
    run_dir: Path,
) -> list[dict]:
    """One selection-matched baseline: propose from ``texts`` → score (select) → keep the best
    → confirm."""
    from soft_prompting.hard_prompts.strategies import propose_candidates

    budget = config.baseline_candidates or config.generation.num_prompts
    strategies = baseline_strategies(name, config, budget, len(texts))
    # The dataset's fluency cap too: a baseline is matched only if it is selected the same way.
    proposed = propose_candidates(
        strategies,
        module,
        texts,
        budget,
        config.seed,
        max_prompt_nll_ratio=config.generation.max_prompt_nll_ratio,
    )
    rows = [
        {"category": c.category, "prompt": c.prompt, "source": name, "pre_score": c.score}
        for c in proposed
    ]
    scored = score_candidates(
        module.pair,
        rows,
        select,
        provenance,
        run_dir / run_files.partial(run_files.baseline_stage(name, "select")),
        config.seed,
        progress=False,
        stream="select",
    )
    best = sort_by_divergence(scored)[:keep]
    kept = [
        {
            "category": r["category"],
            "prompt": r["prompt"],
            "source": name,
            "pre_score": r["metrics"]["kl_divergence"],
        }
        for r in best
    ]
    print(f"baseline {name}: {len(rows)} candidates scored, best {len(kept)} confirmed")
    return score_candidates(
        module.pair,
        kept,
        confirm,
        provenance,
        run_dir / run_files.partial(run_files.baseline_stage(name, "confirm")),
        config.seed,
        progress=False,
        stream="confirm",
    )


def _mean(records: list[dict], key: str) -> float:
    values = [r["metrics"][key] for r in records]
    return float(sum(values) / len(values)) if values else 0.0


def _effects(records: list[dict]) -> np.ndarray:
    return np.array([r["effect"]["value"] for r in records], dtype=np.float64)


def _kls(records: list[dict]) -> np.ndarray:
    return np.array([r["metrics"]["kl_divergence"] for r in records], dtype=np.float64)


@torch.no_grad()
def teacher_forced_divergence(module, texts: list[str], prompt=None, batch_size: int = 16) -> float:
    """Mean per-token divergence over ``texts``, with ``prompt`` (``[P, H]``) prepended or none."""
    tokenizer, total, count = module.tokenizer, 0.0, 0
    tokenizer.padding_side = "left"
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
        n = int(batch["attention_mask"].sum())
        batch = batch.to(module.pair.device)  # where the pair is, quantised pairs included
        value = module.divergence(
            batch["input_ids"],
            batch["attention_mask"],
            use_prompt=prompt is not None,
            prompt=prompt,
        )
        total, count = total + float(value) * n, count + n
    return total / max(count, 1)


def _group_summary(records: list[dict], config: EvaluateConfig) -> dict:
    effect, low, high = (None, None, None)
    if len(records) >= 2:
        mean, lo, hi = mean_with_ci(
            _effects(records), n_resamples=config.bootstrap_resamples, seed=config.seed
        )
        effect, low, high = float(mean), _finite(lo), _finite(hi)
    elif records:
        effect = float(_effects(records).mean())
    return {
        "num_prompts": len(records),
        "kl_divergence": _mean(records, "kl_divergence"),
        "reliability": _mean(records, "reliability"),
        "token_disagreement_rate": _mean(records, "token_disagreement_rate"),
        "vocab_jaccard_similarity": _mean(records, "vocab_jaccard_similarity"),
        "effect": {"value": effect, "ci_low": low, "ci_high": high},
        "num_significant": sum(r["q_value"] < config.fdr_level for r in records),
    }


def summarise(
    module, config: EvaluateConfig, records: list[dict], baselines: dict[str, list[dict]]
) -> dict:
    """``summary.json``: every number from the fresh (confirm) samples; marks the discoveries."""
    add_significance(records, config)
    for group in baselines.values():
        add_significance(group, config)  # BH within each baseline, as for the prompts
    baseline_summaries = {
        name: {"description": BASELINES[name], **_group_summary(group, config)}
        for name, group in baselines.items()
    }
    # The best effect that selection alone reached: a discovery must beat every baseline prompt.
    threshold = (
        max(float(_effects(g).max()) for g in baselines.values() if g)
        if any(baselines.values())
        else None
    )
    for record in records:
        record["discovery"] = is_discovery(record, config.fdr_level, threshold)
    no_lift = {"value": None, "ci_low": None, "ci_high": None}  # a baseline KL of 0: identical
    lifts = {
        name: ratio_of_means_ci(
            _kls(records), _kls(group), n_resamples=config.bootstrap_resamples, seed=config.seed
        )
        or dict(no_lift)
        for name, group in baselines.items()
    }
    prompts = _group_summary(records, config)
    random_cut = baseline_summaries.get("random_text_cut")
    summary = {
        "num_prompts": len(records),
        "prompts": prompts,
        "baselines": baseline_summaries,
        "lifts": lifts,
        "lifts_measure": "mean held-out kl_divergence of the prompts / that of the baseline's "
        "prompts (95% percentile-bootstrap CI over prompts)",
        "num_discoveries": sum(r["discovery"] for r in records),
        "discovery_rule": discovery_rule(config.fdr_level),
        "discovery_effect_threshold": threshold,
        "fdr_level": config.fdr_level,
        "effect_measure": "mean over fresh sample pairs of LLR(x) - LLR(y), LLR = mean per-token "
        "log p1 - log p2 (x: model_1's continuation, y: model_2's; nats/token, a symmetrised KL)",
        "confirm_generations": config.confirm_generations,
        # Kept for older readers: the random-text and untrained-soft-prompt lifts by their old names.
        "random_text": {
            "num_texts": random_cut["num_prompts"] if random_cut else 0,
            "kl_divergence": random_cut["kl_divergence"] if random_cut else None,
            "reliability": random_cut["reliability"] if random_cut else None,
        },
        "lift_vs_random_text": (lifts.get("random_text_cut") or {}).get("value"),
        "lift_vs_random_soft_prompt": (lifts.get("untrained_pipeline") or {}).get("value"),
        "reliability": prompts["reliability"],
        "reliability_random_text": random_cut["reliability"] if random_cut else None,
        "model_1_name": config.model_pair.model_1_name,
        "model_2_name": config.model_pair.model_2_name,
        "prompts_file": str(config.prompts_file),
        "seed": config.seed,
        "generation": asdict(config.generation),
        "environment": environment(module.pair.device),
    }
    if config.soft_prompt_checkpoint:
        trained = check_soft_prompt_checkpoint(
            config.soft_prompt_checkpoint, module.hparams, module
        )
        texts = [r["prompt"] for r in baselines.get("random_text_cut", records)]
        summary["trained_soft_prompt"] = {
            "checkpoint": config.soft_prompt_checkpoint,
            **trained_prompt_divergences(module, texts, trained),
        }
    return summary


def trained_prompt_divergences(module, texts: list[str], trained: torch.Tensor) -> dict:
    """``teacher_forced_divergence`` of a trained ``[P, H]`` prompt on ``texts``; of a ``[K, P, H]``
    checkpoint (``training.num_prompts = K``), the mean over its K prompts, and each prompt's own
    value in ``teacher_forced_divergence_per_prompt`` (prompt order of the checkpoint)."""
    if trained.dim() == 2:
        return {"teacher_forced_divergence": teacher_forced_divergence(module, texts, trained)}
    per_prompt = [teacher_forced_divergence(module, texts, prompt) for prompt in trained]
    return {
        "teacher_forced_divergence": sum(per_prompt) / len(per_prompt),
        "teacher_forced_divergence_per_prompt": per_prompt,
    }


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _ci(block: dict | None, unit: str = "") -> str:
    if not block or block.get("value") is None:
        return "–"
    if block.get("ci_low") is None or block.get("ci_high") is None:
        return f"{block['value']:.3f}{unit}"
    return f"{block['value']:.3f}{unit} [{block['ci_low']:.3f}, {block['ci_high']:.3f}]"


def evidence_sentence(summary: dict) -> str:
    """The evidence in one line: prompts, discoveries at the FDR level, effect, baselines."""
    baselines = "; ".join(
        f"{name} effect {_ci(b['effect'])}, lift {_ci(summary['lifts'].get(name), '×')}"
        for name, b in summary["baselines"].items()
    )
    return (
        f"{summary['num_prompts']} prompts, {summary['num_discoveries']} discoveries at FDR "
        f"{summary['fdr_level']}; effect {_ci(summary['prompts']['effect'])} nats/token; "
        f"baselines: {baselines or 'none run (no discovery can be claimed)'}."
    )


def markdown(summary: dict, records: list[dict], top: int = 20) -> str:
    """The summary and the top prompts as a Markdown report."""
    lines = [
        f"# Hard-prompt evaluation: {summary['model_1_name']} vs {summary['model_2_name']}",
        "",
        evidence_sentence(summary),
        "",
        f"Every number below comes from {summary['confirm_generations']} fresh sample pairs per "
        "prompt (never the samples that selected it).",
        "",
    ]
    differ = summary.get("matched_to_run", {}).get("differ")
    if differ:
        lines += [
            "**The baselines are not matched to the prompts' run**: "
            + ", ".join(f"`{k}` {v['evaluate']!r} (run: {v['run']!r})" for k, v in differ.items())
            + ". They started from other texts or another selection than the prompts did.",
            "",
        ]
    lines += [
        "| prompts | n | mean KL | effect [95% CI] | reliability | significant | lift (KL) |",
        "|---|---|---|---|---|---|---|",
        f"| evaluated | {summary['prompts']['num_prompts']} "
        f"| {_fmt(summary['prompts']['kl_divergence'])} | {_ci(summary['prompts']['effect'])} "
        f"| {_fmt(summary['prompts']['reliability'])} | {summary['prompts']['num_significant']} "
        "| |",
    ]
    for name, b in summary["baselines"].items():
        lines.append(
            f"| baseline {name} | {b['num_prompts']} | {_fmt(b['kl_divergence'])} "
            f"| {_ci(b['effect'])} | {_fmt(b['reliability'])} | {b['num_significant']} "
            f"| {_ci(summary['lifts'].get(name), '×')} |"
        )
    lines += [
        "",
        f"Discovery rule: {summary['discovery_rule']}.",
        "",
        "| rank | prompt | KL | pre_score | effect [95% CI] | q | source | discovery |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rank, r in enumerate(records[:top], 1):
        prompt = r["prompt"].replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {rank} | {prompt} | {_fmt(r['metrics']['kl_divergence'])} "
            f"| {_fmt(r.get('pre_score'))} | {_ci(r.get('effect'))} | {_fmt(r.get('q_value'))} "
            f"| {r.get('source', '')} | {'yes' if r.get('discovery') else ''} |"
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


@exit_2_on_config_errors
@hydra.main(version_base=None, config_path="pkg://soft_prompting.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            summary = evaluate(to_evaluate_config(cfg), run_dir)
        except KeyboardInterrupt:
            raise Interrupted(
                f"evaluate interrupted (Ctrl+C): the prompts scored so far are kept in {run_dir}"
                f"/*.partial.jsonl; go on from them with the same command and hydra.run.dir={run_dir}"
            ) from None
        print(evidence_sentence(summary))


if __name__ == "__main__":
    main()
