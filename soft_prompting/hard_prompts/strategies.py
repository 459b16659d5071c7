"""Candidate hard prompts: several strategies behind one interface, each ``_target_``-swappable.

Every strategy has ``propose(module, texts_by_category, seed) -> list[Candidate]``; the strategies
of a run are listed in ``generation.strategies`` (``conf/generation/*.yaml``) and their candidates
merged by :func:`propose_candidates`. None of them scores its prompts for the dataset: that is
:func:`soft_prompting.hard_prompts.dataset.generate_divergent_dataset`'s job, always *without* the soft prompt.

Strategies:
    CategoryTextRanking: the user's own texts, ranked by the pair's divergence on them (baseline).
    SoftPromptExploration: model_1 continues short category seeds with the trained soft prompt
        prepended; the sampled texts are the candidates (finds behaviours the texts never mention).
    ProjectionSearch: the soft prompt projected onto the nearest real tokens (PEZ), refined by a
        GCG-style coordinate search on ``-divergence + fluency_weight * model_1 NLL``.

Every strategy's texts are cut where the pair's per-token divergence (measured without the soft
prompt) peaks, so a prompt ends where the two models part ways: a prompt that already contains the
disagreeing answer exposes nothing.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One candidate hard prompt."""

    category: str
    """Category of the text it came from (the discrete search: the nearest category)."""
    prompt: str
    """The prompt text, fed to both models without any soft prompt."""
    source: str
    """The strategy that proposed it."""
    score: float = 0.0
    """The pair's divergence at the prompt's last position (a cheap pre-score, no soft prompt)."""


# ---------------------------------------------------------------------------- shared measurements
def _tokenize(tokenizer, texts: list[str], device) -> dict:
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True).to(device)


@torch.no_grad()
def per_token_divergence(
    module, texts: list[str], batch_size: int = 8
) -> list[tuple[list[int], torch.Tensor]]:
    """The pair's divergence at every position of each text, *without* the soft prompt.

    Returns:
        Per text ``(token_ids, divergence)``: ``divergence[t]`` is the module's divergence of the
        two next-token distributions after token ``t`` (``[len(token_ids)]``, fp32, CPU).
    """
    results = []
    tokenizer = module.tokenizer
    for start in range(0, len(texts), batch_size):
        batch = _tokenize(tokenizer, texts[start : start + batch_size], module.device)
        logits_1, logits_2 = module.pair_logits(
            batch["input_ids"], batch["attention_mask"], use_prompt=False
        )
        values = module.divergence_fn(logits_1, logits_2).float().cpu()
        for ids, mask, row in zip(batch["input_ids"], batch["attention_mask"], values, strict=True):
            keep = mask.bool().cpu()
            results.append((ids.cpu()[keep].tolist(), row[keep]))
    return results


def cut_at_divergence_peak(
    module, texts: list[str], min_prompt_tokens: int = 2, batch_size: int = 8
) -> list[tuple[str, float]]:
    """Each text cut right after the token where the pair's next-token divergence peaks.

    Returns:
        Per text ``(prompt, peak divergence)``; the prompt keeps at least ``min_prompt_tokens``
        real tokens (special tokens are dropped when decoding).
    """
    tokenizer = module.tokenizer
    special = set(tokenizer.all_special_ids)
    cut = []
    for ids, values in per_token_divergence(module, texts, batch_size):
        real = torch.tensor([i not in special for i in ids])
        # The prompt may end at position t only once it holds min_prompt_tokens real tokens.
        allowed = real.long().cumsum(0) >= min(min_prompt_tokens, int(real.sum()))
        allowed &= real
        if not allowed.any():
            cut.append(("", 0.0))
            continue
        masked = torch.where(allowed, values, torch.full_like(values, -float("inf")))
        peak = int(masked.argmax())
        prompt = tokenizer.decode(ids[: peak + 1], skip_special_tokens=True).strip()
        cut.append((prompt, float(values[peak])))
    return cut


def _cut_candidates(
    module, items: list[tuple[str, str]], source: str, cut: bool, min_prompt_tokens: int
) -> list[Candidate]:
    """``(category, text)`` items → candidates, cut at their divergence peak (or whole)."""
    texts = [text for _, text in items]
    if cut:
        measured = cut_at_divergence_peak(module, texts, min_prompt_tokens)
    else:
        measured = [
            (t, float(v[-1]))
            for t, (_, v) in zip(texts, per_token_divergence(module, texts), strict=True)
        ]
    return [
        Candidate(category, prompt, source, score)
        for (category, _), (prompt, score) in zip(items, measured, strict=True)
        if prompt
    ]


def _sample_texts(texts_by_category: dict[str, list[str]], per_category: int, seed: int):
    rng = random.Random(seed)
    items = []
    for category, texts in sorted(texts_by_category.items()):
        chosen = list(texts)
        rng.shuffle(chosen)
        items += [(category, text) for text in chosen[:per_category]]
    return items


# ---------------------------------------------------------------------------- (c) the baseline
@dataclass
class CategoryTextRanking:
    """The user's own texts, ranked by the pair's divergence on them (the baseline strategy).

    Args:
        texts_per_category: texts measured per category.
        num_candidates: best-ranked candidates kept.
        cut_at_peak: cut each text where the divergence peaks (False: whole texts).
        min_prompt_tokens: shortest prompt a cut may leave.
    """

    texts_per_category: int = 64
    num_candidates: int = 32
    cut_at_peak: bool = True
    min_prompt_tokens: int = 2
    source: str = "category_text"

    def propose(self, module, texts_by_category: dict[str, list[str]], seed: int = 0):
        items = _sample_texts(texts_by_category, self.texts_per_category, seed)
        candidates = _cut_candidates(
            module, items, self.source, self.cut_at_peak, self.min_prompt_tokens
        )
        return sorted(candidates, key=lambda c: -c.score)[: self.num_candidates]


# ---------------------------------------------------------------------------- (a) exploration
@dataclass
class SoftPromptExploration:
    """model_1 continues short category seeds with the trained soft prompt prepended.

    The soft prompt steers model_1 towards text where the pair disagrees; the sampled texts (seed
    plus continuation, the soft prompt gone) are cut at their divergence peak.

    Args:
        num_seeds: category texts whose first words seed the sampling (spread over categories).
        seed_words: words of each text kept as its seed.
        samples_per_seed: continuations sampled per seed.
        max_new_tokens: tokens per continuation.
        temperature: sampling temperature.
        num_candidates: best-ranked candidates kept.
    """

    num_seeds: int = 24
    seed_words: int = 3
    samples_per_seed: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    num_candidates: int = 32
    min_prompt_tokens: int = 3
    batch_size: int = 16
    source: str = "soft_prompt_exploration"

    def propose(self, module, texts_by_category: dict[str, list[str]], seed: int = 0):
        per_category = max(1, -(-self.num_seeds // max(1, len(texts_by_category))))
        seeds = [
            (category, " ".join(text.split()[: self.seed_words]))
            for category, text in _sample_texts(texts_by_category, per_category, seed)
        ][: self.num_seeds]
        seeds = [(c, s) for c, s in seeds if s] * self.samples_per_seed
        torch.manual_seed(seed)
        tokenizer, items = module.tokenizer, []
        for start in range(0, len(seeds), self.batch_size):
            chunk = seeds[start : start + self.batch_size]
            batch = _tokenize(tokenizer, [s for _, s in chunk], module.device)
            new = module.sample(
                batch["input_ids"], batch["attention_mask"], self.max_new_tokens, self.temperature
            )
            for (category, text), tokens in zip(chunk, new, strict=True):
                continuation = tokenizer.decode(
                    _until_eos(tokens, tokenizer), skip_special_tokens=True
                )
                items.append((category, f"{text} {continuation.strip()}".strip()))
        candidates = _cut_candidates(module, items, self.source, True, self.min_prompt_tokens)
        return sorted(candidates, key=lambda c: -c.score)[: self.num_candidates]


def _until_eos(tokens: torch.Tensor, tokenizer) -> list[int]:
    ids = tokens.tolist()
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return ids


# ---------------------------------------------------------------------------- (b) PEZ + GCG
@dataclass
class SearchResult:
    """The outcome of :func:`discrete_search`."""

    token_ids: list[int]
    """Best prompt found (no special tokens)."""
    loss: float
    """Its loss: ``-divergence + fluency_weight * NLL``."""
    losses: list[float] = field(default_factory=list)
    """Best loss after projection and after each step (never increases)."""
    visited: list[tuple[float, list[int]]] = field(default_factory=list)
    """Every improving prompt, ``(loss, ids)``, in the order found."""


def allowed_token_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """Token ids a hard prompt may use: the real vocabulary minus special tokens and minus tokens
    that are no text on their own (a byte-level tokenizer's lone bytes of multi-byte characters,
    which decode to U+FFFD)."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    special = [i for i in tokenizer.all_special_ids if i < vocab_size]
    allowed[special] = False
    pieces = tokenizer.batch_decode([[i] for i in range(vocab_size)])
    allowed[[i for i, piece in enumerate(pieces) if "\ufffd" in piece]] = False
    return allowed


def project_to_tokens(prompt: torch.Tensor, embeddings: torch.Tensor, allowed: torch.Tensor):
    """PEZ projection: the allowed token whose embedding is nearest (cosine) to each virtual token.

    Args:
        prompt: ``[P, H]`` soft prompt.
        embeddings: ``[V, H]`` model_1's input embeddings (V = real vocabulary).
        allowed: ``[V]`` bool, tokens that may be chosen.

    Returns:
        ``[P]`` token ids (long), each allowed.
    """
    p = torch.nn.functional.normalize(prompt.float(), dim=-1)
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    similarity = p @ e.T
    similarity[:, ~allowed.to(similarity.device)] = -float("inf")
    return similarity.argmax(-1)


def _prefix_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. BOS), kept fixed in the search."""
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return ids[: len(ids) - len(plain)] if ids[-len(plain) :] == plain else []


def search_loss(module, one_hot_or_ids: torch.Tensor, prefix: list[int], fluency_weight: float):
    """``-mean divergence + fluency_weight * model_1 NLL`` of prompts, no soft prompt.

    Args:
        one_hot_or_ids: ``[B, P]`` token ids, or ``[B, P, V]`` one-hot rows (differentiable).
        prefix: fixed leading ids (BOS) put before every prompt.

    Returns:
        ``[B]`` losses.
    """
    pair, v = module.pair, module.pair.vocab_size
    if one_hot_or_ids.dim() == 2:
        one_hot = torch.nn.functional.one_hot(one_hot_or_ids, v).float()
    else:
        one_hot = one_hot_or_ids
    batch = one_hot.shape[0]
    pre = torch.tensor(prefix, dtype=torch.long, device=one_hot.device).expand(batch, -1)
    logits = []
    for model in (pair.model_1, pair.model_2):
        table = model.get_input_embeddings().weight
        embeds = torch.cat([table[pre], (one_hot.to(table.dtype) @ table[:v])], dim=1)
        out = model(inputs_embeds=embeds, use_cache=False)
        logits.append(out.logits[..., :v].float())
    n_pre = len(prefix)
    # Positions from the first prompt token on: each predicts the next token (the last, the
    # continuation's first).
    start = max(n_pre - 1, 0) if n_pre else 0
    divergence = module.divergence_fn(logits[0][:, start:], logits[1][:, start:]).mean(-1)
    log_probs = logits[0].log_softmax(-1)
    # Targets as the one-hot rows themselves (not their argmax), so the NLL's gradient reaches the
    # token choice and the swap ranking weighs fluency, not only the divergence.
    if n_pre:
        predicted, targets = log_probs[:, n_pre - 1 : -1], one_hot
    else:  # the first token has no prediction without a prefix
        predicted, targets = log_probs[:, :-1], one_hot[:, 1:]
    nll = -(targets * predicted).sum(-1).mean(-1)
    return -divergence + fluency_weight * nll


def discrete_search(
    module,
    start_ids: torch.Tensor,
    num_steps: int = 30,
    top_k: int = 32,
    num_candidates: int = 64,
    fluency_weight: float = 0.2,
    seed: int = 0,
) -> SearchResult:
    """GCG-style coordinate search from ``start_ids`` on :func:`search_loss`.

    Each step takes the loss gradient with respect to the one-hot tokens at the current best
    prompt, draws ``num_candidates`` single-token swaps among each position's ``top_k``
    gradient-ranked tokens, evaluates them in one batch, and moves only if one is better: the
    reported loss never increases.
    """
    pair = module.pair
    device = module.device
    allowed = allowed_token_ids(pair.tokenizer, pair.vocab_size).to(device)
    prefix = _prefix_ids(pair.tokenizer)
    generator = torch.Generator().manual_seed(seed)
    best = start_ids.to(device).long().clone()
    with torch.no_grad():
        best_loss = float(search_loss(module, best[None], prefix, fluency_weight)[0])
    result = SearchResult(best.tolist(), best_loss, [best_loss], [(best_loss, best.tolist())])
    for _ in range(num_steps):
        one_hot = torch.nn.functional.one_hot(best, pair.vocab_size).float()[None]
        one_hot.requires_grad_(True)
        search_loss(module, one_hot, prefix, fluency_weight).sum().backward()
        gradient = one_hot.grad[0]
        gradient[:, ~allowed] = float("inf")
        top = (-gradient).topk(min(top_k, int(allowed.sum())), dim=-1).indices  # [P, k]
        positions = torch.randint(0, len(best), (num_candidates,), generator=generator)
        choices = torch.randint(0, top.shape[1], (num_candidates,), generator=generator)
        candidates = best.repeat(num_candidates, 1)
        candidates[torch.arange(num_candidates), positions.to(device)] = top[
            positions.to(device), choices.to(device)
        ]
        with torch.no_grad():
            losses = search_loss(module, candidates, prefix, fluency_weight)
        i = int(losses.argmin())
        if float(losses[i]) < best_loss:
            best, best_loss = candidates[i].clone(), float(losses[i])
            result.visited.append((best_loss, best.tolist()))
        result.losses.append(best_loss)
    result.token_ids, result.loss = best.tolist(), best_loss
    return result


@dataclass
class ProjectionSearch:
    """The soft prompt projected onto real tokens (PEZ), refined by GCG-style discrete search.

    Args:
        num_steps: coordinate-search steps per start.
        top_k: gradient-ranked tokens considered per position.
        search_batch: candidate swaps evaluated per step.
        fluency_weight: λ of the model_1 NLL term (higher: more readable, less divergent).
        num_restarts: extra starts from random category-text tokens (the projection is the first).
        num_candidates: prompts kept (the best of each start and the improving steps before it).
    """

    num_steps: int = 20
    top_k: int = 32
    search_batch: int = 32
    fluency_weight: float = 0.2
    num_restarts: int = 1
    num_candidates: int = 8
    cut_at_peak: bool = True
    min_prompt_tokens: int = 2
    source: str = "projection_search"

    def propose(self, module, texts_by_category: dict[str, list[str]], seed: int = 0):
        pair = module.pair
        allowed = allowed_token_ids(pair.tokenizer, pair.vocab_size)
        embeddings = pair.model_1.get_input_embeddings().weight[: pair.vocab_size].detach()
        starts = [
            project_to_tokens(
                module.soft_prompt.detach(), embeddings, allowed.to(embeddings.device)
            )
        ]
        length = len(starts[0])
        generator = torch.Generator().manual_seed(seed)
        pool = allowed.nonzero().flatten()
        for _ in range(self.num_restarts):
            starts.append(pool[torch.randint(0, len(pool), (length,), generator=generator)])
        found: list[tuple[float, list[int]]] = []
        with torch.enable_grad():
            for i, start in enumerate(starts):
                result = discrete_search(
                    module,
                    start,
                    self.num_steps,
                    self.top_k,
                    self.search_batch,
                    self.fluency_weight,
                    seed + i,
                )
                log.info(
                    "projection search %d: loss %.3f -> %.3f", i, result.losses[0], result.loss
                )
                found += result.visited[-2:]
        found.sort(key=lambda item: item[0])
        texts = [pair.tokenizer.decode(ids, skip_special_tokens=True).strip() for _, ids in found]
        unique = [t for t in dict.fromkeys(texts) if t][: self.num_candidates]
        items = [(nearest_category(t, texts_by_category), t) for t in unique]
        return _cut_candidates(module, items, self.source, self.cut_at_peak, self.min_prompt_tokens)


def nearest_category(prompt: str, texts_by_category: dict[str, list[str]]) -> str:
    """The category whose texts' vocabulary covers most of ``prompt``'s words (search results
    belong to no category; this attributes them to the closest one)."""
    words = _words(prompt)
    best, best_share = next(iter(sorted(texts_by_category)), "search"), -1.0
    for category, texts in sorted(texts_by_category.items()):
        vocabulary = set().union(*(_words(t) for t in texts)) if texts else set()
        share = len(words & vocabulary) / max(len(words), 1)
        if share > best_share:
            best, best_share = category, share
    return best


# ---------------------------------------------------------------------------- merging
def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def merge_near_duplicates(candidates: list[Candidate], threshold: float = 0.8) -> list[Candidate]:
    """Keep the best-scored of each group of near-duplicate prompts.

    Two prompts are near-duplicates when they are equal after lower-casing and dropping
    punctuation, or when their word sets' Jaccard similarity is at least ``threshold``.
    """
    kept: list[tuple[Candidate, set[str], str]] = []
    for candidate in sorted(candidates, key=lambda c: -c.score):
        words = _words(candidate.prompt)
        normal = " ".join(re.findall(r"\w+", candidate.prompt.lower()))
        if any(
            normal == other_normal
            or (words and len(words & other) / len(words | other) >= threshold)
            for _, other, other_normal in kept
        ):
            continue
        kept.append((candidate, words, normal))
    return [candidate for candidate, _, _ in kept]


def propose_candidates(
    strategies: list, module, texts_by_category: dict[str, list[str]], limit: int, seed: int = 0
) -> list[Candidate]:
    """Every strategy's candidates, near-duplicates merged, up to ``limit`` taken round-robin.

    Round-robin over the strategies (each in its own pre-score order) keeps every strategy in the
    dataset, so the final ranking, done by scoring without the soft prompt, can compare them.
    """
    was_training = module.training
    module.eval()
    try:
        proposed = [s.propose(module, texts_by_category, seed) for s in strategies]
    finally:
        module.train(was_training)
    merged = merge_near_duplicates([c for group in proposed for c in group])
    by_source: dict[str, list[Candidate]] = {}
    for candidate in merged:
        by_source.setdefault(candidate.source, []).append(candidate)
    picked: list[Candidate] = []
    queues = list(by_source.values())
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return picked


def build_strategies(specs: list) -> list:
    """The strategies of ``generation.strategies`` (``_target_`` dicts), instantiated."""
    from hydra.utils import instantiate

    from soft_prompting.errors import ConfigError

    strategies = []
    for spec in specs:
        try:
            strategies.append(instantiate(dict(spec)))
        except Exception as err:
            raise ConfigError(
                f"generation.strategies entry {dict(spec)!r} cannot be built: "
                f"{str(err).splitlines()[0]}"
            ) from err
    return strategies
