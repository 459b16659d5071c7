"""The divergent dataset: candidate prompts, scored without the soft prompt, sorted by divergence,
written as ``divergent_dataset.jsonl`` and ``divergent_dataset.pt`` (the same records, plain types,
loadable with ``torch.load(path, weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import random
from pathlib import Path

from soft_prompting import run_files
from soft_prompting.errors import ConfigError, DataError
from soft_prompting.hard_prompts.sampling import SamplingSettings, score_prompts
from soft_prompting.pair.loading import ModelPair
from soft_prompting.run_files import read_jsonl, write_jsonl, write_torch

log = logging.getLogger(__name__)


def balanced_prompts(
    texts_by_category: dict[str, list[str]], num_prompts: int, seed: int
) -> list[tuple[str, str]]:
    """Up to ``num_prompts`` ``(category, text)`` pairs, taken round-robin over the categories."""
    rng = random.Random(seed)
    shuffled = {}
    for category, texts in sorted(texts_by_category.items()):
        texts = list(texts)
        rng.shuffle(texts)
        shuffled[category] = texts
    picked = []
    for row in itertools.zip_longest(*shuffled.values()):
        for category, text in zip(shuffled, row, strict=True):
            if text is not None and len(picked) < num_prompts:
                picked.append((category, text))
    return picked


def sort_by_divergence(records: list[dict]) -> list[dict]:
    """Records sorted by ``metrics.kl_divergence``, highest first."""
    return sorted(records, key=lambda r: r["metrics"]["kl_divergence"], reverse=True)


_STAMP = "_partial_of"
"""Key of a partial file's first line: a digest of what made its records."""


def _digest(described) -> str:
    text = json.dumps(
        described, sort_keys=True, default=lambda o: vars(o) if hasattr(o, "__dict__") else str(o)
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _key(row: dict) -> tuple[str, str, str]:
    return (row.get("source", ""), row.get("category", ""), row["prompt"])


def score_candidates(
    pair: ModelPair,
    candidates: list[dict],
    settings: SamplingSettings,
    provenance: dict,
    partial_path: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    stream: str = "select",
) -> list[dict]:
    """Score ``{"category", "prompt", "source", ...}`` rows without soft prompt, in input order.

    ``stream`` names the sampling noise (see ``sampling.score_prompts``): the dataset samples on
    ``"select"``, the evaluation confirms on fresh ``"confirm"`` samples.

    With ``partial_path``, each batch's records are appended to that JSONL file (flushed) as soon
    as they are scored, and the prompts already in it are not scored again: a killed run resumes
    where it stopped. Batches are fixed over the whole candidate list and seeded by their offset,
    so a resumed run gives the records an uninterrupted one would.
    """
    for number, row in enumerate(candidates, 1):
        if not str(row.get("prompt", "")).strip():
            raise DataError(
                f"candidate {number} (source {row.get('source', '?')!r}) is an empty prompt: "
                "both models would continue nothing; drop it or give it some text"
            )
    candidates = fit_prompts_to_context(pair, candidates, settings.max_length)
    done: dict[tuple, dict] = {}
    # The partial file's first line says what made its records: those of other settings, another
    # pair or seed are discarded, never mixed in.
    stamp = {
        _STAMP: _digest(
            [
                settings,
                provenance,
                seed,
                stream,
                pair.model_1.name_or_path,
                pair.model_2.name_or_path,
            ]
        )
    }
    if partial_path is not None and Path(partial_path).is_file():
        records = read_jsonl(partial_path)
        if records and records[0] == stamp:
            for record in records[1:]:
                done.setdefault(_key(record), record)
        else:
            print(f"discarding {partial_path}: its records come from other settings or another run")
    if partial_path is not None:
        # Rewritten without a torn last line, so appending cannot glue onto half a record.
        write_jsonl(partial_path, [stamp, *done.values()])
    params = {
        "max_length": settings.max_length,
        "num_generations_per_prompt": settings.num_generations_per_prompt,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
    }
    handle = open(partial_path, "a", encoding="utf-8") if partial_path is not None else None
    try:
        for offset in range(0, len(candidates), settings.batch_size):
            batch = candidates[offset : offset + settings.batch_size]
            pending = [row for row in batch if _key(row) not in done]
            if not pending:
                continue
            scored = score_prompts(
                pair,
                [row["prompt"] for row in pending],
                settings,
                seed + offset,
                progress=False,
                stream=stream,
            )
            for row, record in zip(pending, scored, strict=True):
                record = {**record, **{k: v for k, v in row.items() if k != "prompt"}}
                record["generation_params"] = dict(params)
                record["provenance"] = dict(provenance)
                done[_key(row)] = record
                if handle is not None:
                    handle.write(json.dumps(record, default=str) + "\n")
            if handle is not None:
                handle.flush()
                os.fsync(handle.fileno())
            if progress:
                print(
                    f"scored {min(offset + len(batch), len(candidates))}/{len(candidates)} prompts"
                )
    finally:
        if handle is not None:
            handle.close()
    return [done[_key(row)] for row in candidates if _key(row) in done]


def context_length(pair: ModelPair) -> int | None:
    """Tokens the models attend to (None: unknown)."""
    return getattr(pair.model_1.config, "max_position_embeddings", None)


def truncate_text(tokenizer, text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (unchanged when it fits)."""
    if len(text) <= max_tokens:  # a token covers at least one character
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).strip()


def truncate_texts(
    tokenizer, texts_by_category: dict[str, list[str]], max_tokens: int
) -> dict[str, list[str]]:
    """Every text cut to ``max_tokens`` tokens, as training cut them (one warning if any was)."""
    cut = {
        c: [truncate_text(tokenizer, t, max_tokens) for t in ts]
        for c, ts in texts_by_category.items()
    }
    changed = sum(a != b for c in cut for a, b in zip(cut[c], texts_by_category[c], strict=True))
    if changed:
        log.warning(
            "%d texts are longer than %d tokens and were cut for the hard-prompt strategies "
            "(data.max_length, capped by the models' context)",
            changed,
            max_tokens,
        )
    return cut


def fit_prompts_to_context(pair: ModelPair, rows: list[dict], new_tokens: int) -> list[dict]:
    """Prompts cut so that prompt + ``new_tokens`` continuation fit in the models' context."""
    context = context_length(pair)
    if context is None:
        return rows
    room = context - new_tokens - 1
    if room < 1:
        raise ConfigError(
            f"generation.max_length={new_tokens} leaves no room for a prompt in the models' "
            f"context of {context} tokens: lower generation.max_length"
        )
    fitted = [row | {"prompt": truncate_text(pair.tokenizer, row["prompt"], room)} for row in rows]
    changed = sum(a["prompt"] != b["prompt"] for a, b in zip(fitted, rows, strict=True))
    if changed:
        log.warning(
            "%d prompts are longer than the %d tokens the models' context leaves after a "
            "%d-token continuation; they were cut (the records hold the cut prompts)",
            changed,
            room,
            new_tokens,
        )
    return fitted


def dataset_fingerprint(
    module,
    texts_by_category: dict[str, list[str]],
    strategies: list,
    settings: SamplingSettings,
    provenance: dict,
    num_prompts: int,
    seed: int,
    candidates: list[dict] | None,
) -> str:
    """A digest of everything the divergent dataset depends on: the pair (ids and revisions), the
    trained prompt, the strategies, the texts or given candidates, the sampling and the seed."""
    hp = module.hparams
    described = {
        "pair": [hp.get(k) for k in ("model_1_name", "model_2_name", "revision_1", "revision_2")],
        "strategies": [[type(s).__qualname__, vars(s)] for s in strategies],
        "settings": dataclasses.asdict(settings),
        "provenance": provenance,
        "num_prompts": num_prompts,
        "seed": seed,
        "texts": texts_by_category,
        "candidates": candidates,
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    digest.update(module.soft_prompt.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _claim_partials(run_dir: Path, fingerprint: str, overwrite: bool) -> None:
    """Keep the partial files only if a killed run of these very settings left them."""
    partials = [
        run_dir / run_files.CANDIDATES,
        run_dir / run_files.partial(run_files.DATASET_JSONL),
    ]
    stamp = run_dir / run_files.DATASET_FINGERPRINT
    found = [p for p in partials if p.is_file()]
    saved = json.loads(stamp.read_text()).get("fingerprint") if stamp.is_file() else None
    if found and (overwrite or saved != fingerprint):
        why = "overwrite=true" if overwrite else "they come from other settings or another prompt"
        print(f"discarding {', '.join(p.name for p in found)} of an earlier run ({why})")
        for path in found:
            path.unlink()
    run_files.write_json(stamp, {"fingerprint": fingerprint})


def generate_divergent_dataset(
    module,
    texts_by_category: dict[str, list[str]],
    strategies: list,
    settings: SamplingSettings,
    provenance: dict,
    run_dir: str | Path,
    num_prompts: int,
    seed: int = 0,
    candidates: list[dict] | None = None,
    max_text_tokens: int | None = None,
    overwrite: bool = False,
    max_prompt_nll_ratio: float | None = None,
    localise_top: int = 20,
    rounds: int = 1,
) -> list[dict]:
    """Propose candidates with ``strategies``, score them without soft prompt, write the dataset.

    The candidates go to ``candidates.jsonl`` first and scored records to
    ``divergent_dataset.partial.jsonl`` as they come, so a killed run, started again in the same
    ``run_dir``, scores only what is left (both files go once the dataset is written); the final ``divergent_dataset.jsonl``/``.pt`` are written
    atomically, sorted by ``metrics.kl_divergence``, highest first.

    Args:
        module: the trained :class:`~soft_prompting.training.module.DivergenceModule`.
        texts_by_category: the texts the strategies start from.
        strategies: objects with ``propose(module, texts_by_category, seed)`` (see
            :mod:`soft_prompting.hard_prompts.strategies`).
        settings: sampling settings of the scoring continuations.
        provenance: model ids, soft-prompt checkpoint and seed, copied into every record.
        run_dir: where the files go.
        num_prompts: candidates scored at most.
        seed: proposal and sampling seed.
        candidates: ``{"category", "prompt", "source"}`` rows to score instead of proposing.
        max_text_tokens: cut the texts to this many tokens before the strategies see them (what
            training used; None: the models' context).
        overwrite: discard the partial files of an earlier run even if they match.
        max_prompt_nll_ratio: keep only proposed prompts whose model_1 NLL per token is at most
            this multiple of the texts' median (None: no cap; every record still gets
            ``prompt_nll`` and ``reference_nll``).
        localise_top: the first records (by divergence) that get ``trigger`` and per-word
            ``attributions`` (:mod:`soft_prompting.hard_prompts.triggers`).
        rounds: proposal rounds; later ones start from the best earlier prompts and where the
            pair parted ways after them (records carry their ``round``).

    The partial files are reused only when ``divergent_dataset.fingerprint.json`` says they were
    made from the same pair, prompt, texts and settings (:func:`dataset_fingerprint`).
    """
    from soft_prompting.hard_prompts.strategies import propose_candidates

    run_dir = Path(run_dir)
    limit = max_text_tokens or context_length(module.pair)
    if limit is not None:
        texts_by_category = truncate_texts(module.tokenizer, texts_by_category, limit)
    fingerprint = dataset_fingerprint(
        module, texts_by_category, strategies, settings, provenance, num_prompts, seed, candidates
    )
    if max_prompt_nll_ratio is not None or rounds != 1:  # another candidate list
        fingerprint += f":nll<={max_prompt_nll_ratio}:rounds={rounds}"
    _claim_partials(run_dir, fingerprint, overwrite)
    candidates_path = run_dir / run_files.CANDIDATES
    if candidates is None and candidates_path.is_file():
        candidates = read_jsonl(candidates_path)
        print(f"resuming with the {len(candidates)} candidates of {candidates_path}")
    if candidates is None:
        proposed = propose_candidates(
            strategies, module, texts_by_category, num_prompts, seed, max_prompt_nll_ratio, rounds
        )
        candidates = [
            {
                "category": c.category,
                "prompt": c.prompt,
                "source": c.source,
                "pre_score": c.score,
                "prompt_nll": c.prompt_nll,
                "reference_nll": c.reference_nll,
                "round": c.round,
                "soft_prompt_index": c.soft_prompt_index,
            }
            for c in proposed
        ]
    candidates = candidates[:num_prompts]
    write_jsonl(candidates_path, candidates)
    records = score_candidates(
        module.pair,
        candidates,
        settings,
        provenance,
        run_dir / run_files.partial(run_files.DATASET_JSONL),
        seed,
    )
    records = sort_by_divergence(records)
    if localise_top:
        from soft_prompting.hard_prompts.triggers import localise_records

        records = localise_records(module, records, localise_top)
    write_divergent_dataset(records, run_dir)
    # Finished: a later call proposes afresh (e.g. after more training) instead of resuming.
    (run_dir / run_files.partial(run_files.DATASET_JSONL)).unlink(missing_ok=True)
    candidates_path.unlink(missing_ok=True)
    (run_dir / run_files.DATASET_FINGERPRINT).unlink(missing_ok=True)
    return records


def write_divergent_dataset(records: list[dict], run_dir: str | Path) -> tuple[Path, Path]:
    """Write the records (already sorted) as JSONL and as a plain-types ``.pt``, atomically."""
    run_dir = Path(run_dir)
    return (
        write_jsonl(run_dir / run_files.DATASET_JSONL, records),
        write_torch(run_dir / run_files.DATASET_PT, records),
    )
