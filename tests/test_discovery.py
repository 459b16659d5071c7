"""Discovery power: both-sided and contrastive exploration, the fluency cap, trigger localisation.

Hand-built tiny pairs make the answers known: in ``flip`` model_2 is model_1 except for one
token's input embedding, so the two models disagree exactly when that token is in the text; in
``loud`` model_2 is model_1 with one output token boosted, so model_2 says it and model_1 rarely.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_model, make_tokenizer
from transformers import StaticCache

from soft_prompting.errors import ConfigError
from soft_prompting.hard_prompts.sampling import CachedDecoder
from soft_prompting.hard_prompts.strategies import (
    Candidate,
    ContrastiveExploration,
    SoftPromptExploration,
    WhiteBoxPrior,
    changed_tokens,
    merge_near_duplicates,
    prompt_nll,
    propose_candidates,
    reference_nll,
    sample_continuations,
    select_fluent,
)
from soft_prompting.hard_prompts.triggers import last_divergence, localise, localise_records
from soft_prompting.training.module import DivergenceModule

FLIP_WORD = "gold"
LOUD_WORD = "poems"
TEXTS = {
    "animals": ["the cat sat on the mat", "the dog sat on the mat and read books"],
    "maths": ["what is one plus two", "three plus four is seven", "five minus one is four"],
}


def _save(directory, model, tokenizer) -> str:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory) -> dict[str, str]:
    """model_1 and two edited copies of it: ``flip`` (one input row changed) and ``loud``."""
    root = tmp_path_factory.mktemp("discovery_pairs")
    tokenizer = make_tokenizer()
    base = make_model(1, len(tokenizer))
    dirs = {"base": _save(root / "base", base, tokenizer)}
    flip = make_model(1, len(tokenizer))
    flip.load_state_dict(base.state_dict())
    with torch.no_grad():
        row = tokenizer.convert_tokens_to_ids(FLIP_WORD)
        flip.get_input_embeddings().weight[row] = 5 * torch.randn(flip.config.hidden_size)
    dirs["flip"] = _save(root / "flip", flip, tokenizer)
    loud = make_model(1, len(tokenizer))
    loud.load_state_dict(base.state_dict())
    with torch.no_grad():
        row = tokenizer.convert_tokens_to_ids(LOUD_WORD)
        # The output row along the final norm's typical direction: large logit everywhere.
        head = loud.get_output_embeddings().weight
        head[row] = 50 * head.mean(0) / head.mean(0).norm()
        loud.lm_head.weight[row] += 0  # keep the edited row (no tied weights here)
    dirs["loud"] = _save(root / "loud", loud, tokenizer)
    return dirs


def _module(first: str, second: str) -> DivergenceModule:
    return DivergenceModule(first, second, num_soft_prompt_tokens=4).eval()


@pytest.fixture(scope="module")
def flip(pair_dirs) -> DivergenceModule:
    return _module(pair_dirs["base"], pair_dirs["flip"])


@pytest.fixture(scope="module")
def loud(pair_dirs) -> DivergenceModule:
    return _module(pair_dirs["base"], pair_dirs["loud"])


def _seeds(module, texts: list[str]):
    module.tokenizer.padding_side = "left"
    return module.tokenizer(texts, return_tensors="pt", padding=True)


# ------------------------------------------------------------------------ trigger localisation
def test_localisation_names_the_one_token_that_flips_model_2(flip):
    prompt = f"the cat sat on the mat and read {FLIP_WORD}"
    assert last_divergence(flip, ["the cat sat on the mat and read books"])[0] < 1e-6
    found = localise(flip, prompt)
    assert found.divergence > 1e-3
    # The trigger is the word without which the pair agrees; its context still diverges.
    assert found.trigger == FLIP_WORD
    assert found.divergence_without_trigger < 0.2 * found.divergence
    assert FLIP_WORD in found.trigger_context.split()
    assert len(found.trigger_context.split()) < len(prompt.split())
    assert found.trigger_context_divergence >= 0.8 * found.divergence
    scores = {a["word"]: a["attribution"] for a in found.attributions}
    # Dropping the flipping word removes all of the divergence; no other word matters as much.
    assert scores[FLIP_WORD] == pytest.approx(found.divergence, rel=1e-4)
    assert max(scores, key=scores.get) == FLIP_WORD


def test_localised_records_get_trigger_and_attributions_only_at_the_top(flip):
    records = [{"prompt": f"what is two plus {FLIP_WORD}"}, {"prompt": "the cat sat"}]
    located = localise_records(flip, records, top=1)
    assert located[0]["trigger"] == FLIP_WORD
    assert FLIP_WORD in located[0]["trigger_context"].split()
    assert [a["word"] for a in located[0]["attributions"]] == records[0]["prompt"].split()
    assert "trigger" not in located[1]


# ------------------------------------------------------------------------ contrastive sampling
def test_contrastive_sampling_with_alpha_zero_is_plain_greedy_sampling_of_that_side(flip):
    seeds = [f"{start} {FLIP_WORD}" for start in ("the cat", "what is", "i am", "one plus")]
    batch = _seeds(flip, [*seeds, "what is one"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = sample_continuations(flip, ids, mask, 5, temperature=0, side="model_2", alpha=0.0,
                                use_prompt=False)  # fmt: skip
    reference = flip.pair.model_2.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
    )[:, ids.shape[1] :]
    eos = flip.tokenizer.eos_token_id
    for row, expected in zip(ours.tolist(), reference.tolist(), strict=True):
        # generate stops a row at its end of sequence; the loop draws on (cut when decoding).
        end = expected.index(eos) + 1 if eos in expected else len(expected)
        assert row[:end] == expected[:end]
    none = sample_continuations(flip, ids, mask, 0, temperature=0, side="model_2", use_prompt=False)
    assert none.shape == (len(ids), 0) and none.dtype == ids.dtype
    # With alpha > 0 the first token is the argmax of l_b + alpha (l_b - l_a), in either direction.
    with torch.no_grad():
        logits = [
            m(input_ids=ids, attention_mask=mask).logits[:, -1]
            for m in (flip.pair.model_1, flip.pair.model_2)
        ]
    changed = False
    for side, (l_a, l_b) in (("model_2", logits), ("model_1", logits[::-1])):
        plain = sample_continuations(flip, ids, mask, 1, 0, side, 0.0, False)
        amplified = sample_continuations(flip, ids, mask, 1, 0, side, 50.0, False)
        assert torch.equal(amplified[:, 0], (l_b + 50.0 * (l_b - l_a)).argmax(-1))
        changed |= bool((amplified != plain).any())
    assert changed  # the amplification did pick other tokens


def _recomputed(module, ids, mask, steps, temperature, side, alpha, generator):
    """sample_continuations without a cache: every step runs the whole sequence again."""
    pair = module.pair
    model_b, model_a = (
        (pair.model_2, pair.model_1) if side == "model_2" else (pair.model_1, pair.model_2)
    )

    def last(model):
        inputs = module._model_inputs(model, ids, mask, module.active_prompt.detach())
        return model(**inputs).logits[:, -1, : pair.vocab_size].float()

    new = []
    for _ in range(steps):
        logits = last(model_b)
        logits = logits + alpha * (logits - last(model_a))
        token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
        new.append(token)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return torch.cat(new, dim=1)


@pytest.mark.parametrize("static", [False, True], ids=["growing_cache", "static_cache"])
def test_the_cached_decoder_gives_the_logits_of_the_whole_sequence_run_again(flip, static):
    """Behind the soft prompt, left-padded rows: each cached step equals a full forward, over a
    cache that grows and over one allocated once for every step (what CUDA decodes over)."""
    batch = _seeds(flip, ["the cat", f"what is one plus {FLIP_WORD}", "i am a helpful"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model, prompt, vocab = flip.pair.model_2, flip.active_prompt.detach(), flip.pair.vocab_size
    with torch.no_grad():
        inputs = flip._model_inputs(model, ids, mask, prompt)
        decoder = CachedDecoder(model, inputs, vocab, max_new_tokens=4 if static else None)
        assert decoder.static is static
        for word in ("two", "is", "four", "the"):
            assert isinstance(decoder.cache, StaticCache) is static  # the cache the steps use
            full = model(**flip._model_inputs(model, ids, mask, prompt)).logits[:, -1, :vocab]
            torch.testing.assert_close(decoder.logits, full, atol=1e-5, rtol=1e-5)
            token = torch.tensor(flip.tokenizer.convert_tokens_to_ids([word] * len(ids)))
            decoder.advance(token)
            ids, mask = (
                torch.cat([ids, token[:, None]], 1),
                torch.cat([mask, torch.ones_like(token)[:, None]], 1),
            )


@pytest.mark.parametrize("side", ["model_1", "model_2"])
def test_cached_sampling_draws_what_recomputing_every_step_draws(flip, side):
    batch = _seeds(flip, ["the cat", f"what is one plus {FLIP_WORD}", "i am a helpful"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        cached = sample_continuations(
            flip, ids, mask, 8, 0.9, side, 0.5, True, torch.Generator().manual_seed(5)
        )
        recomputed = _recomputed(
            flip, ids, mask, 8, 0.9, side, 0.5, torch.Generator().manual_seed(5)
        )
    assert torch.equal(cached, recomputed)


def test_amplifying_a_zero_difference_changes_no_sample(pair_dirs):
    same = _module(pair_dirs["base"], pair_dirs["base"])
    batch = _seeds(same, ["the cat", "what is one plus"])

    def draw(alpha: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        return sample_continuations(
            same, batch["input_ids"], batch["attention_mask"], 6, 1.0, "model_1", alpha,
            True, generator,
        )  # fmt: skip

    assert torch.equal(draw(0.0), draw(4.0))


def test_unknown_side_is_refused(flip):
    batch = _seeds(flip, ["the cat"])
    with pytest.raises(ConfigError, match="model_1, model_2"):
        sample_continuations(flip, batch["input_ids"], batch["attention_mask"], 1, side="model_3")


# ------------------------------------------------------------------------ both-sided exploration
def test_exploration_of_model_2_writes_what_only_model_2_says(loud):
    def share(sides) -> float:
        # min_prompt_tokens beyond any text: the cut keeps each sampled text whole.
        strategy = SoftPromptExploration(
            num_seeds=4, samples_per_seed=2, max_new_tokens=6, sides=sides, min_prompt_tokens=99
        )
        prompts = [c.prompt for c in strategy.propose(loud, TEXTS, seed=0)]
        return sum(LOUD_WORD in p.split() for p in prompts) / len(prompts)

    assert share(("model_2",)) >= 0.8
    assert share(("model_1",)) <= 0.2


def test_contrastive_exploration_defaults_amplify_both_directions_without_soft_prompt():
    strategy = ContrastiveExploration()
    assert strategy.alpha > 0 and not strategy.use_soft_prompt
    assert set(strategy.sides) == {"model_1", "model_2"}
    assert strategy.source == "contrastive_exploration"


# ------------------------------------------------------------------------ fluency
def test_prompt_nll_is_model_1s_mean_token_loss_without_soft_prompt(flip):
    text = "the cat sat on the mat"
    ids = flip.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = flip.pair.model_1(input_ids=ids, labels=ids).loss.item()
    # Padded in a batch with a longer text, the value is the same.
    assert prompt_nll(flip, [text, "the dog sat on the mat and read books"])[0] == pytest.approx(
        expected, rel=1e-4
    )


def test_fluency_cap_drops_prompts_far_less_likely_than_the_texts(flip):
    texts = [t for ts in TEXTS.values() for t in ts]
    reference = reference_nll(flip, TEXTS)
    nlls = prompt_nll(flip, texts + ["gold gold four poems"])
    candidates = [Candidate("x", t, "s") for t in texts + ["gold gold four poems"]]
    middle = sorted(nlls)[len(nlls) // 2 - 1 : len(nlls) // 2 + 1]
    ratio = sum(middle) / 2 / reference  # about half the prompts pass, none on the edge
    kept = select_fluent(flip, candidates, TEXTS, ratio)
    expected = [c.prompt for c, n in zip(candidates, nlls, strict=True) if n <= ratio * reference]
    assert 0 < len(expected) < len(candidates)
    assert [c.prompt for c in kept] == expected
    assert all(c.reference_nll == pytest.approx(reference, abs=1e-3) for c in kept)
    assert all(c.prompt_nll <= ratio * reference + 1e-3 for c in kept)
    uncapped = select_fluent(flip, candidates, TEXTS, None)
    assert len(uncapped) == len(candidates) and all(c.prompt_nll is not None for c in uncapped)


def test_max_prompt_nll_ratio_and_rounds_are_checked():
    from soft_prompting.config import GenerationConfig

    with pytest.raises(ConfigError, match="max_prompt_nll_ratio"):
        GenerationConfig(max_prompt_nll_ratio=0)
    assert GenerationConfig(max_prompt_nll_ratio=None).max_prompt_nll_ratio is None
    with pytest.raises(ConfigError, match="generation.rounds"):
        GenerationConfig(rounds=0)


# ------------------------------------------------------------------------ iterated refinement
class _Recording:
    """A strategy proposing each text it is given whole, and remembering what it was given."""

    source = "recording"

    def __init__(self):
        self.given: list[dict[str, list[str]]] = []

    def propose(self, module, texts_by_category, seed=0):
        self.given.append(texts_by_category)
        return [
            Candidate(category, text, self.source, score=float(len(text)))
            for category, texts in texts_by_category.items()
            for text in texts
        ]


def test_a_second_round_starts_from_the_best_prompts_and_both_models_continuations(flip):
    strategy = _Recording()
    picked = propose_candidates([strategy], flip, TEXTS, limit=100, rounds=2)
    assert len(strategy.given) == 2
    second = [t for texts in strategy.given[1].values() for t in texts]
    best = sorted(merge_near_duplicates(
        [Candidate(c, t, "recording", float(len(t))) for c, ts in TEXTS.items() for t in ts]
    ), key=lambda c: -c.score)  # fmt: skip
    # Each best prompt comes back twice, once continued by each model (greedy, no soft prompt).
    assert len(second) == 2 * len(best)
    for candidate in best:
        starting = [t for t in second if t.startswith(candidate.prompt + " ")]
        assert len(starting) == 2
    assert {c.round for c in picked} == {1, 2}
    once = _Recording()
    propose_candidates([once], flip, TEXTS, limit=100, rounds=1)
    assert len(once.given) == 1


class _Fixed:
    """A strategy proposing fixed candidates."""

    def __init__(self, candidates):
        self.candidates, self.source = candidates, candidates[0].source

    def propose(self, module, texts_by_category, seed=0):
        return list(self.candidates)


def test_a_disfluent_near_duplicate_does_not_take_its_fluent_twin_out_with_it(flip):
    twins = ["the cat sat on the mat and read books", "the cat sat on the mat and read books books"]
    nlls = prompt_nll(flip, twins)
    fluent, disfluent = sorted(range(2), key=nlls.__getitem__)
    assert merge_near_duplicates([Candidate("c", t, "s") for t in twins])[1:] == []  # twins
    reference = reference_nll(flip, TEXTS)
    ratio = sum(nlls) / 2 / reference  # the fluent twin passes, the other does not
    candidates = [
        Candidate("c", twins[disfluent], "s", score=2.0),  # the merge would keep this one
        Candidate("c", twins[fluent], "s", score=1.0),
    ]
    picked = propose_candidates([_Fixed(candidates)], flip, TEXTS, 10, max_prompt_nll_ratio=ratio)
    assert [c.prompt for c in picked] == [twins[fluent]]


# ------------------------------------------------------------------------ white-box prior
def test_white_box_prior_ranks_the_edited_rows_first(flip, loud):
    assert changed_tokens(flip, 3)[0][0] == FLIP_WORD  # its input embedding row moved
    assert changed_tokens(loud, 3)[0][0] == LOUD_WORD  # its output-head row moved


def test_white_box_prior_writes_the_word_into_category_texts(flip, pair_dirs):
    candidates = WhiteBoxPrior(num_tokens=1, texts_per_token=5).propose(flip, TEXTS, seed=0)
    assert candidates and all(c.source == "white_box_prior" for c in candidates)
    texts = [t for ts in TEXTS.values() for t in ts]
    for candidate in candidates:
        words = candidate.prompt.split()
        assert words.count(FLIP_WORD) == 1
        rest = " ".join(w for w in words if w != FLIP_WORD)
        assert any(t.startswith(rest) for t in texts), candidate.prompt  # a text, cut
    # Identical models moved no row: nothing to propose.
    same = _module(pair_dirs["base"], pair_dirs["base"])
    assert changed_tokens(same, 3) == [] and WhiteBoxPrior().propose(same, TEXTS) == []
