"""Candidate hard prompts: several strategies behind one interface, each ``_target_``-swappable.

Every strategy has ``propose(module, texts_by_category, seed) -> list[Candidate]``; the strategies
of a run are listed in ``generation.strategies`` (``conf/generation/*.yaml``) and their candidates
merged by :func:`propose_candidates`. None of them scores its prompts for the dataset: that is
:func:`soft_prompting.hard_prompts.dataset.generate_divergent_dataset`'s job, always *without* the soft prompt.

Strategies:
    CategoryTextRanking: the user's own texts, ranked by the pair's divergence on them (baseline).
    SoftPromptExploration: model_1 and model_2 continue short category seeds with the trained
        soft prompt prepended; the sampled texts are the candidates (finds behaviours the texts
        never mention, including ones only model_2 writes, such as a backdoor's trigger).
    ContrastiveExploration: the same seeds continued from amplified logit differences,
        ``logits_b + alpha * (logits_b - logits_a)``, in both directions (no soft prompt).
    ProjectionSearch: the soft prompt projected onto the nearest real tokens (PEZ), refined by a
        GCG-style coordinate search on ``-divergence + fluency_weight * model_1 NLL``.
    WhiteBoxPrior: the words whose embedding and output-head rows the fine-tune moved most,
        written into category texts where model_1 finds them likeliest (no soft prompt).

Every strategy's texts are cut where the pair's per-token divergence (measured without the soft
prompt) peaks, so a prompt ends where the two models part ways: a prompt that already contains the
disagreeing answer exposes nothing. The final selection (:func:`propose_candidates`) measures each
prompt's fluency, model_1's per-token NLL without soft prompt, and with
``max_prompt_nll_ratio`` keeps only prompts within that multiple of the category texts' median.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from dataclasses import dataclass, field

import torch

from soft_prompting.hard_prompts.sampling import CachedDecoder, static_by_default

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
    prompt_nll: float | None = None
    """model_1's mean per-token NLL of the prompt, no soft prompt (set by the final selection)."""
    reference_nll: float | None = None
    """The category texts' median per-token NLL under model_1, no soft prompt (the yardstick)."""
    round: int = 1
    """The proposal round that found it (``generation.rounds``; 2+: refined from round 1)."""
    soft_prompt_index: int | None = None
    """Which trained soft prompt produced it (``training.num_prompts``); None: a strategy that
    uses no soft prompt."""


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
    module,
    texts: list[str],
    min_prompt_tokens: int = 2,
    batch_size: int = 8,
    first_within: float = 1.0,
) -> list[tuple[str, float]]:
    """Each text cut right after the token where the pair's next-token divergence peaks.

    With ``first_within < 1`` the cut comes at the *first* position whose divergence reaches that
    share of the peak: where the pair first parts ways, before a sampled text goes on to write
    the disagreeing answer itself (the later, higher peaks inside that answer make long,
    disfluent prompts that already hold what they should reveal).

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
        if masked[peak] <= 0:
            # No divergence anywhere (e.g. identical models): no peak to cut at, keep the text
            # whole rather than its first tokens (which would merge into a handful of stubs).
            peak = int(allowed.nonzero()[-1])
        elif first_within < 1.0:
            peak = int((masked >= first_within * masked[peak]).nonzero()[0])
        prompt = tokenizer.decode(ids[: peak + 1], skip_special_tokens=True).strip()
        cut.append((prompt, float(values[peak])))
    return cut


def _cut_candidates(
    module,
    items: list[tuple[str, str]],
    source: str,
    cut: bool,
    min_prompt_tokens: int,
    first_within: float = 1.0,
) -> list[Candidate]:
    """``(category, text)`` items → candidates, cut at their divergence peak (or whole)."""
    texts = [text for _, text in items]
    if cut:
        measured = cut_at_divergence_peak(
            module, texts, min_prompt_tokens, first_within=first_within
        )
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
NON_NEGATIVE = {
    "temperature": "0: greedy",
    "alpha": "0: plain sampling of the side",
    "fluency_weight": "0: divergence alone",
}
"""The strategies' real-valued settings that must be >= 0, and what 0 means."""


class StrategySettings:
    """A strategy's settings, checked when ``generation.strategies`` is built (before training):
    counts are whole numbers >= 1 (``num_restarts`` >= 0), :data:`NON_NEGATIVE` numbers >= 0, a
    cut share in (0, 1] and sides among :data:`SIDES`."""

    ZERO_ALLOWED = frozenset({"num_restarts"})

    def __post_init__(self) -> None:
        from soft_prompting.errors import ConfigError

        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            least = 0 if spec.name in self.ZERO_ALLOWED else 1
            if spec.type in ("int", "int | None") and not (
                (value is None and spec.type == "int | None")
                or (isinstance(value, int) and not isinstance(value, bool) and value >= least)
            ):
                raise ConfigError(f"{spec.name}={value!r}: must be a whole number >= {least}")
        for name, meaning in NON_NEGATIVE.items():
            value = getattr(self, name, 0.0)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigError(f"{name}={value!r}: must be a number >= 0 ({meaning})")
        cut = getattr(self, "cut_first_within", 1.0)
        if not isinstance(cut, int | float) or not 0 < cut <= 1:
            raise ConfigError(f"cut_first_within={cut!r}: must be in (0, 1] (1: at the peak)")
        sides = getattr(self, "sides", SIDES)
        unknown = isinstance(sides, str) or [side for side in sides if side not in SIDES]
        if unknown or not sides:
            raise ConfigError(f"sides={sides!r}: a list of one or both of {list(SIDES)}")


@dataclass
class CategoryTextRanking(StrategySettings):
    """The user's own texts, ranked by the pair's divergence on them (the baseline strategy).

    Args:
        texts_per_category: texts measured per category.
        num_candidates: best-ranked candidates kept.
        cut_at_peak: cut each text where the divergence peaks (False: whole texts).
        min_prompt_tokens: shortest prompt a cut may leave.
    """

    texts_per_category: int = 64
    num_candidates: int = 128
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
SIDES = ("model_1", "model_2")


@torch.no_grad()
def sample_continuations(
    module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    side: str = "model_1",
    alpha: float = 0.0,
    use_prompt: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continuations sampled from one side of the pair, optionally with its difference amplified.

    Each step samples from ``logits_b + alpha * (logits_b - logits_a)`` (``b = side``, ``a`` the
    other model; logit-difference amplification): ``alpha=0`` is plain sampling from ``side``, a
    positive ``alpha`` favours what ``b`` says and ``a`` does not (rare behaviours surface in far
    fewer samples).

    Args:
        input_ids: ``[B, L]`` left-padded seeds.
        attention_mask: ``[B, L]``.
        max_new_tokens: tokens sampled per row (after an end-of-sequence token: more tokens, cut
            when decoding).
        temperature: 0 is greedy.
        side: ``"model_1"`` or ``"model_2"``.
        alpha: amplification of ``side``'s logit difference (0: none).
        use_prompt: prepend the trained soft prompt to both models (``module.active_prompt``:
            with several prompts, the one :func:`propose_candidates` is running).
        generator: random stream of the draws (a fresh one seeded 0 when None).

    Returns:
        ``[B, max_new_tokens]`` token ids below the real vocabulary size.
    """
    if side not in SIDES:
        from soft_prompting.errors import ConfigError

        raise ConfigError(f"exploration side {side!r}: use one of {', '.join(SIDES)}")
    if max_new_tokens == 0:  # nothing to sample: no forward at all
        return input_ids.new_zeros(len(input_ids), 0)
    module._sync_pair_device()
    pair = module.pair
    model_b = pair.model_2 if side == "model_2" else pair.model_1
    model_a = pair.model_1 if side == "model_2" else pair.model_2
    prompt = module.active_prompt.detach() if use_prompt else None
    device = input_ids.device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)

    # The seeds (behind the soft prompt) go through each model once; every sampled token after
    # that is one cached step.
    # On CUDA the cache is allocated once for all the steps (see SamplingSettings.static_cache).
    steps = max_new_tokens if static_by_default(pair) else None
    decoders = [
        CachedDecoder(
            model,
            module._model_inputs(model, input_ids, attention_mask, prompt),
            pair.vocab_size,
            max_new_tokens=steps,
        )
        for model in ((model_b, model_a) if alpha else (model_b,))
    ]
    new = []
    for step in range(max_new_tokens):
        logits = decoders[0].logits
        if alpha:
            logits = logits + alpha * (logits - decoders[1].logits)
        if temperature > 0:
            probs = (logits / temperature).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            token = logits.argmax(-1)
        new.append(token)
        if step < max_new_tokens - 1:
            for decoder in decoders:
                decoder.advance(token)
    return torch.stack(new, dim=1)


@dataclass
class SoftPromptExploration(StrategySettings):
    """Both models continue short category seeds with the trained soft prompt prepended.

    The soft prompt steers the sampling towards text where the pair disagrees; the sampled texts
    (seed plus continuation, the soft prompt gone) are cut at their divergence peak. Sampling
    from model_2 too matters: a behaviour only model_2 has (a backdoor's trigger word) is one
    model_1 almost never writes.

    Args:
        num_seeds: category texts whose first words seed the sampling (spread over categories).
        seed_words: words of each text kept as its seed (whole short texts by default: the
            prompt then starts as text a person wrote, and stays fluent).
        samples_per_seed: continuations sampled per seed and side.
        max_new_tokens: tokens per continuation.
        temperature: sampling temperature (below 1: more fluent text).
        num_candidates: best-ranked candidates kept.
        sides: the models sampled (``model_1``, ``model_2`` or both).
        alpha: logit-difference amplification of the sampled side (0: plain sampling).
        use_soft_prompt: prepend the trained soft prompt while sampling.
        cut_first_within: cut where the divergence first reaches this share of the sample's
            peak (1: at the peak; see :func:`cut_at_divergence_peak`).
    """

    num_seeds: int = 24
    seed_words: int = 40
    samples_per_seed: int = 4
    max_new_tokens: int = 32
    temperature: float = 0.7
    num_candidates: int = 96
    min_prompt_tokens: int = 3
    batch_size: int = 16
    sides: tuple[str, ...] = SIDES
    alpha: float = 0.0
    use_soft_prompt: bool = True
    cut_first_within: float = 0.5
    source: str = "soft_prompt_exploration"

    @property
    def uses_soft_prompt(self) -> bool:
        """Run once per trained prompt (see :func:`propose_candidates`)."""
        return self.use_soft_prompt

    def propose(self, module, texts_by_category: dict[str, list[str]], seed: int = 0):
        per_category = max(1, -(-self.num_seeds // max(1, len(texts_by_category))))
        seeds = [
            (category, " ".join(text.split()[: self.seed_words]))
            for category, text in _sample_texts(texts_by_category, per_category, seed)
        ][: self.num_seeds]
        seeds = [(c, s) for c, s in seeds if s] * self.samples_per_seed
        generator = torch.Generator(device=module.device).manual_seed(seed)
        tokenizer, items = module.tokenizer, []
        for side in self.sides:
            for start in range(0, len(seeds), self.batch_size):
                chunk = seeds[start : start + self.batch_size]
                batch = _tokenize(tokenizer, [s for _, s in chunk], module.device)
                new = sample_continuations(
                    module,
                    batch["input_ids"],
                    batch["attention_mask"],
                    self.max_new_tokens,
                    self.temperature,
                    side,
                    self.alpha,
                    self.use_soft_prompt,
                    generator,
                )
                for (category, text), tokens in zip(chunk, new, strict=True):
                    continuation = tokenizer.decode(
                        _until_eos(tokens, tokenizer), skip_special_tokens=True
                    )
                    items.append((category, f"{text} {continuation.strip()}".strip()))
        candidates = _cut_candidates(
            module, items, self.source, True, self.min_prompt_tokens, self.cut_first_within
        )
        return sorted(candidates, key=lambda c: -c.score)[: self.num_candidates]


@dataclass
class ContrastiveExploration(SoftPromptExploration):
    """Exploration by logit-difference amplification, in both directions, no soft prompt.

    Each side samples from ``logits_b + alpha * (logits_b - logits_a)``: model_2's differences
    from model_1 amplified, and model_1's from model_2. What one model says and the other almost
    never does (a trigger word, a changed answer) comes up in a few samples. Cut at the divergence
    peak like every strategy.
    """

    alpha: float = 0.5
    use_soft_prompt: bool = False
    source: str = "contrastive_exploration"


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
    plausible_top_k: int | None = None,
) -> SearchResult:
    """GCG-style coordinate search from ``start_ids`` on :func:`search_loss`.

    Each step takes the loss gradient with respect to the one-hot tokens at the current best
    prompt, draws ``num_candidates`` single-token swaps among each position's ``top_k``
    gradient-ranked tokens, evaluates them in one batch, and moves only if one is better: the
    reported loss never increases. With ``plausible_top_k``, a position may only take one of the
    tokens model_1 (no soft prompt) ranks in its top ``plausible_top_k`` after the prompt so far:
    swaps stay readable instead of the gradient's favourite odd token.
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
        if plausible_top_k:
            gradient[~_plausible(module, best, prefix, plausible_top_k)] = float("inf")
        ranked = (-gradient).topk(min(top_k, int(allowed.sum())), dim=-1)
        # A position with fewer than top_k permitted tokens repeats its best one, never a barred one.
        top = torch.where(ranked.values.isfinite(), ranked.indices, ranked.indices[:, :1])
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


@torch.no_grad()
def _plausible(module, ids: torch.Tensor, prefix: list[int], k: int) -> torch.Tensor:
    """``[P, V]`` bool: the ``k`` tokens model_1 finds likeliest at each prompt position, given
    the tokens before it (the first position without a prefix: every token)."""
    model, v = module.pair.model_1, module.pair.vocab_size
    full = torch.tensor([*prefix, *ids.tolist()], device=ids.device)[None]
    log_probs = model(input_ids=full, use_cache=False).logits[0, :, :v]
    plausible = torch.zeros(len(ids), v, dtype=torch.bool, device=ids.device)
    # Prediction for prompt position i comes from full position len(prefix) + i - 1.
    for i in range(len(ids)):
        at = len(prefix) + i - 1
        if at < 0:
            plausible[i] = True
        else:
            plausible[i, log_probs[at].topk(min(k, v)).indices] = True
    return plausible


@dataclass
class ProjectionSearch(StrategySettings):
    """The soft prompt projected onto real tokens (PEZ), refined by GCG-style discrete search.

    Args:
        num_steps: coordinate-search steps per start.
        top_k: gradient-ranked tokens considered per position.
        search_batch: candidate swaps evaluated per step.
        fluency_weight: λ of the model_1 NLL term (higher: more readable, less divergent).
        num_restarts: extra starts from the first tokens of random category texts, so those
            searches edit real text (the projection is the first start).
        num_candidates: prompts kept (the best of each start and the improving steps before it).
        plausible_top_k: swaps only to tokens model_1 ranks in its top ``plausible_top_k`` at
            that position (null: any token; see :func:`discrete_search`).
    """

    num_steps: int = 20
    top_k: int = 32
    search_batch: int = 32
    fluency_weight: float = 0.2
    num_restarts: int = 2
    num_candidates: int = 8
    cut_at_peak: bool = True
    min_prompt_tokens: int = 2
    plausible_top_k: int | None = 64
    source: str = "projection_search"
    uses_soft_prompt = True
    """Run once per trained prompt (see :func:`propose_candidates`)."""

    def propose(self, module, texts_by_category: dict[str, list[str]], seed: int = 0):
        pair = module.pair
        allowed = allowed_token_ids(pair.tokenizer, pair.vocab_size)
        embeddings = pair.model_1.get_input_embeddings().weight[: pair.vocab_size].detach()
        starts = [
            project_to_tokens(
                module.active_prompt.detach(), embeddings, allowed.to(embeddings.device)
            )
        ]
        length = len(starts[0])
        generator = torch.Generator().manual_seed(seed)
        pool = allowed.nonzero().flatten()
        texts = [t for _, t in _sample_texts(texts_by_category, self.num_restarts, seed)]
        random.Random(seed).shuffle(texts)
        for text in texts[: self.num_restarts]:
            ids = pair.tokenizer(text, add_special_tokens=False)["input_ids"][:length]
            ids = [i for i in ids if i < pair.vocab_size and allowed[i]]
            if len(ids) < 2:  # nothing to edit: a random start
                ids = pool[torch.randint(0, len(pool), (length,), generator=generator)].tolist()
            starts.append(torch.tensor(ids, device=embeddings.device))
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
                    self.plausible_top_k,
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


# ---------------------------------------------------------------------------- (d) white-box prior
def _row_pairs(pair) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(model_1 rows, model_2 rows)`` of the input embeddings and of the output heads, each
    ``[V, H]`` over the real vocabulary, where both models have them with the same shape (a head
    tied to the embeddings is the same matrix and counts once)."""
    v, found = pair.vocab_size, []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        modules = [getattr(m, get, lambda: None)() for m in (pair.model_1, pair.model_2)]
        weights = [getattr(m, "weight", None) for m in modules]
        if any(not isinstance(w, torch.Tensor) or w.dim() != 2 or len(w) < v for w in weights):
            continue
        a, b = (w[:v].detach() for w in weights)
        if a.shape != b.shape or any(a is x or a.data_ptr() == x.data_ptr() for x, _ in found):
            continue
        found.append((a, b))
    return found


def _word_ids(tokenizer, word: str) -> tuple[list[int], list[int]]:
    """The word's tokens at the start of a text and after a space (they differ for byte-level
    and SentencePiece tokenizers)."""
    before = len(tokenizer("a", add_special_tokens=False)["input_ids"])
    spaced = tokenizer(f"a {word}", add_special_tokens=False)["input_ids"][before:]
    return tokenizer(word, add_special_tokens=False)["input_ids"], spaced


def _word_token(tokenizer, token_id: int) -> str | None:
    """The token as a word to write into a text, or None when it is no word (punctuation, a piece
    of a longer word, digits): inserted, those make text nobody writes."""
    word = tokenizer.decode([token_id], skip_special_tokens=True).strip()
    if len(word) < 3 or not word.isalpha():
        return None
    return word if [token_id] in _word_ids(tokenizer, word) else None


@torch.no_grad()
def changed_tokens(module, num_tokens: int) -> list[tuple[str, float]]:
    """The ``num_tokens`` words whose vocabulary rows the fine-tune moved most, with their score
    (:func:`soft_prompting.maths.row_change.changed_rows_score` over the input embeddings and the
    output heads); empty when the models share no such matrix of the same shape."""
    from soft_prompting.maths.row_change import changed_rows_score

    pair = module.pair
    rows = _row_pairs(pair)
    if not rows:
        log.warning(
            "white-box prior: the models expose no embeddings or output heads of the same shape; "
            "it proposes nothing"
        )
        return []
    score = changed_rows_score(rows)  # on the weights' devices, in row chunks; [V] on the CPU
    score[~allowed_token_ids(pair.tokenizer, pair.vocab_size)] = -1.0
    words: list[tuple[str, float]] = []
    for token_id in score.argsort(descending=True).tolist():
        if len(words) >= num_tokens or score[token_id] <= 0:
            break
        word = _word_token(pair.tokenizer, token_id)
        if word is not None and word not in dict(words):
            words.append((word, float(score[token_id])))
    return words


@torch.no_grad()
def insertion_points(module, texts: list[str], words: list[str], per_text: int) -> list[list]:
    """Per text and word, the ``per_text`` word boundaries where model_1 (no soft prompt) finds
    the word likeliest: ``result[i][j]`` lists, best first, how many of text ``i``'s words come
    before each chosen insertion of word ``j``. One forward pass per text reads every word's
    log-probability (of its first token) after every prefix; a boundary with no token before it
    (a tokenizer without BOS, at the start) is skipped."""
    tokenizer, model = module.tokenizer, module.pair.model_1
    forms = [_word_ids(tokenizer, w) for w in words]
    at_start = torch.tensor([(bare or [0])[0] for bare, _ in forms])
    after_space = torch.tensor([(spaced or bare or [0])[0] for bare, spaced in forms])
    chosen = []
    for text in texts:
        parts = text.split()
        full = tokenizer(" ".join(parts), return_tensors="pt").to(module.device)
        logits = module._model_logits(model, full["input_ids"], full["attention_mask"], None)
        log_probs = logits[0, :, : module.pair.vocab_size].float().log_softmax(-1).cpu()
        scores = []  # per boundary k: [len(words)] log-probabilities of the inserted word
        for k in range(len(parts) + 1):
            n = len(tokenizer(" ".join(parts[:k]))["input_ids"])
            if 0 < n <= len(log_probs):
                row = log_probs[n - 1]
                scores.append((k, row[after_space] if k else row[at_start]))
        chosen.append(
            [
                [k for k, _ in sorted(scores, key=lambda item, j=j: -float(item[1][j]))[:per_text]]
                for j in range(len(words))
            ]
        )
    return chosen


@dataclass
class WhiteBoxPrior(StrategySettings):
    """Words whose embedding and output-head rows changed most, written into category texts.

    Where both models expose input embeddings and output heads of the same shape, tokens are
    ranked by how far their rows moved between model_1 and model_2 (each matrix's row distances in
    units of their root mean square, summed; :mod:`soft_prompting.maths.row_change`): a planted
    trigger is read in a new context and written more often, so its rows move. The top words
    are inserted into category texts where model_1 finds them likeliest (so the text stays
    fluent), and each text is cut where the divergence peaks (the whole question the word sits
    in, not just up to the word: one rare word in a longer prompt keeps it fluent). Pairs without comparable matrices get no candidates (a warning).

    Args:
        num_tokens: changed words tried.
        texts_per_token: category texts each word is written into (spread over categories).
        positions_per_text: insertion points per text and word (model_1's likeliest first).
        num_candidates: best-ranked candidates kept.
        cut_first_within: see :func:`cut_at_divergence_peak` (1: at the peak).
    """

    num_tokens: int = 8
    texts_per_token: int = 48
    positions_per_text: int = 3
    num_candidates: int = 256
    min_prompt_tokens: int = 3
    cut_first_within: float = 1.0
    source: str = "white_box_prior"

    def propose(self, module, texts_by_category: dict[str, list[str]], seed: int = 0):
        words = changed_tokens(module, self.num_tokens)
        if not words:
            return []
        log.info("white-box prior: most changed words %s", ", ".join(w for w, _ in words))
        per_category = max(1, -(-self.texts_per_token // max(1, len(texts_by_category))))
        chosen = _sample_texts(texts_by_category, per_category, seed)[: self.texts_per_token]
        chosen = [(c, t) for c, t in chosen if t.split()]
        points = insertion_points(
            module, [t for _, t in chosen], [w for w, _ in words], self.positions_per_text
        )
        items = []
        for (category, text), per_word in zip(chosen, points, strict=True):
            parts = text.split()
            for (word, _), ks in zip(words, per_word, strict=True):
                items += [(category, " ".join([*parts[:k], word, *parts[k:]])) for k in ks]
        candidates = _cut_candidates(
            module, items, self.source, True, self.min_prompt_tokens, self.cut_first_within
        )
        return sorted(candidates, key=lambda c: -c.score)[: self.num_candidates]


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


@torch.no_grad()
def prompt_nll(module, texts: list[str], batch_size: int = 16) -> list[float]:
    """model_1's mean per-token NLL of each text, no soft prompt (its fluency; BOS not counted).

    The first real token counts only when a special token (BOS) precedes it, since without one
    nothing predicts it.
    """
    tokenizer, model = module.tokenizer, module.pair.model_1
    values = []
    for start in range(0, len(texts), batch_size):
        batch = _tokenize(tokenizer, texts[start : start + batch_size], module.device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = module._model_logits(model, ids, mask, None).float()
        token_nll = -logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        counted = mask[:, 1:].bool() & mask[:, :-1].bool()
        per_text = (token_nll * counted).sum(-1) / counted.sum(-1).clamp(min=1)
        values += [float(v) for v in per_text.cpu()]
    return values


def reference_nll(
    module, texts_by_category: dict[str, list[str]], per_category: int = 64, seed: int = 0
) -> float:
    """The category texts' median per-token NLL under model_1, no soft prompt: what a prompt
    written like the user's own texts costs (the yardstick of ``max_prompt_nll_ratio``)."""
    texts = [t for _, t in _sample_texts(texts_by_category, per_category, seed) if t.strip()]
    if not texts:
        return float("nan")
    return float(torch.tensor(prompt_nll(module, texts)).median())


def select_fluent(
    module,
    candidates: list[Candidate],
    texts_by_category: dict[str, list[str]],
    max_prompt_nll_ratio: float | None,
    seed: int = 0,
) -> list[Candidate]:
    """Candidates with their ``prompt_nll`` and ``reference_nll`` set; with a ratio, only those
    whose NLL is at most ``max_prompt_nll_ratio`` times the reference (fluency traded against
    divergence: a prompt nobody would write is dropped however divergent)."""
    if not candidates:
        return candidates
    reference = reference_nll(module, texts_by_category, seed=seed)
    nlls = prompt_nll(module, [c.prompt for c in candidates])
    measured = [
        dataclasses.replace(c, prompt_nll=round(n, 4), reference_nll=round(reference, 4))
        for c, n in zip(candidates, nlls, strict=True)
    ]
    if max_prompt_nll_ratio is None or reference != reference:  # no cap, or no texts (NaN)
        return measured
    kept = [c for c in measured if c.prompt_nll <= max_prompt_nll_ratio * reference]
    log.info(
        "fluency cap %.2f x reference NLL %.3f: %d of %d candidates kept",
        max_prompt_nll_ratio,
        reference,
        len(kept),
        len(measured),
    )
    return kept


@torch.no_grad()
def refinement_texts(
    module, candidates: list[Candidate], top: int = 16, max_new_tokens: int = 16
) -> dict[str, list[str]]:
    """The next round's starting texts: the ``top`` best candidates (by pre-score), each followed
    by model_1's and by model_2's greedy continuation, no soft prompt: the prompts that worked and
    the text where the pair parted ways after them (a backdoor's model_2 side writes its trigger
    there)."""
    best = sorted(merge_near_duplicates(candidates), key=lambda c: -c.score)[:top]
    texts: dict[str, list[str]] = {}
    if not best:
        return texts
    tokenizer = module.tokenizer
    batch = _tokenize(tokenizer, [c.prompt for c in best], module.device)
    for side in SIDES:
        new = sample_continuations(
            module, batch["input_ids"], batch["attention_mask"], max_new_tokens, 0.0, side,
            use_prompt=False,
        )  # fmt: skip
        for candidate, tokens in zip(best, new, strict=True):
            continuation = tokenizer.decode(_until_eos(tokens, tokenizer), skip_special_tokens=True)
            text = f"{candidate.prompt} {continuation.strip()}".strip()
            texts.setdefault(candidate.category, []).append(text)
    return texts


def propose_candidates(
    strategies: list,
    module,
    texts_by_category: dict[str, list[str]],
    limit: int,
    seed: int = 0,
    max_prompt_nll_ratio: float | None = None,
    rounds: int = 1,
) -> list[Candidate]:
    """Every strategy's candidates, near-duplicates merged, the too-disfluent dropped
    (:func:`select_fluent`), up to ``limit`` taken round-robin.

    With ``rounds > 1``, each further round runs the strategies again from
    :func:`refinement_texts` of everything proposed so far (candidates tagged with their round).
    Round-robin over the strategies (each in its own pre-score order) keeps every strategy in the
    dataset, so the final ranking, done by scoring without the soft prompt, can compare them.
    """
    was_training = module.training
    module.eval()
    try:
        proposed = _propose_per_prompt(strategies, module, texts_by_category, seed)
        for number in range(2, rounds + 1):
            texts = refinement_texts(module, proposed)
            log.info("round %d: %d starting texts", number, sum(map(len, texts.values())))
            if texts:
                proposed += [
                    dataclasses.replace(c, round=number)
                    for c in _propose_per_prompt(strategies, module, texts, seed + number)
                ]
        # The cap before the merge: a disfluent near-duplicate must not win the merge and then
        # take its fluent twin out with it when the cap drops it.
        fluent = select_fluent(module, proposed, texts_by_category, max_prompt_nll_ratio, seed)
        merged = merge_near_duplicates(fluent)
    finally:
        module.train(was_training)
    by_source: dict[str, list[Candidate]] = {}
    for candidate in merged:
        by_source.setdefault(candidate.source, []).append(candidate)
    # Within a strategy, the trained prompts take turns too: each prompt's finds reach the
    # dataset, whichever prompt pre-scores highest (one prompt: the strategy's own order).
    return _round_robin([_by_prompt(queue) for queue in by_source.values()], limit)


def _round_robin(queues: list[list[Candidate]], limit: int | None = None) -> list[Candidate]:
    """One from each queue in turn (each keeps its order) until ``limit`` or all are empty."""
    queues = [list(queue) for queue in queues]
    picked: list[Candidate] = []
    while (limit is None or len(picked) < limit) and any(queues):
        for queue in queues:
            if queue and (limit is None or len(picked) < limit):
                picked.append(queue.pop(0))
    return picked


def _by_prompt(candidates: list[Candidate]) -> list[Candidate]:
    """One strategy's candidates, the soft prompts that produced them taking turns."""
    groups: dict[int | None, list[Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(candidate.soft_prompt_index, []).append(candidate)
    return _round_robin(list(groups.values()))


def _propose_per_prompt(strategies: list, module, texts: dict[str, list[str]], seed: int):
    """Every strategy's candidates; one that uses the soft prompt (``uses_soft_prompt``) runs
    once per trained prompt (``training.num_prompts``), each candidate tagged with the prompt's
    index. Every prompt gets the same seed, so their candidates differ only by the prompt."""
    proposed: list[Candidate] = []
    for strategy in strategies:
        if not getattr(strategy, "uses_soft_prompt", False):
            proposed += strategy.propose(module, texts, seed)
            continue
        for index in range(getattr(module, "num_prompts", 1)):
            with module.using_prompt(index):
                proposed += [
                    dataclasses.replace(c, soft_prompt_index=index)
                    for c in strategy.propose(module, texts, seed)
                ]
    return proposed


def build_strategies(specs: list) -> list:
    """The strategies of ``generation.strategies`` (``_target_`` dicts), instantiated."""
    from hydra.utils import instantiate

    from soft_prompting.errors import ConfigError

    strategies = []
    for spec in specs:
        try:
            strategies.append(instantiate(dict(spec)))
        except Exception as err:
            # Hydra wraps the strategy's own complaint (a bad value, an unknown argument)
            own = isinstance(err.__cause__, ConfigError | TypeError | ValueError)
            reason = err.__cause__ if own else err
            raise ConfigError(
                f"generation.strategies entry {dict(spec)!r} cannot be built: "
                f"{str(reason).splitlines()[0]}"
            ) from err
    return strategies
