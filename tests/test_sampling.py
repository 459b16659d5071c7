"""Paired sampling with common random numbers, on tiny random pairs (no hub)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from soft_prompting.hard_prompts.sampling import (
    SamplingSettings,
    noise_seed,
    paired_generate,
    score_prompts,
)
from soft_prompting.pair.loading import ModelPairManager

PROMPTS = ["the cat sat on", "i am a helpful assistant", "what is one plus"]
SETTINGS = SamplingSettings(max_length=6, num_generations_per_prompt=8, temperature=0.7)


@pytest.fixture(scope="module")
def pair(tiny_pair_dirs):
    return ModelPairManager(device="cpu").load_model_pair(*tiny_pair_dirs)


@pytest.fixture(scope="module")
def identical(tiny_pair_dirs):
    # Two separate loads of the same weights: the models are equal, not the same object.
    return ModelPairManager(device="cpu").load_model_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[0] + "/"
    )


def test_identical_models_never_differ_at_temperature_0_7(identical):
    assert identical.model_1 is not identical.model_2
    records = score_prompts(identical, PROMPTS, SETTINGS, progress=False)
    for record in records:
        metrics = record["metrics"]
        assert metrics["reliability"] == 0.0
        assert metrics["vocab_jaccard_similarity"] == 1.0
        assert metrics["kl_divergence"] == 0.0
        assert record["paired_samples"]["llr_gap"] == [0.0] * 8
        assert record["generation_1"] == record["generation_2"]


def test_different_models_differ_and_gaps_are_positive_on_average(pair):
    records = score_prompts(pair, PROMPTS, SETTINGS, progress=False)
    assert all(r["metrics"]["reliability"] > 0 for r in records)
    gaps = [g for r in records for g in r["paired_samples"]["llr_gap"]]
    assert sum(gaps) / len(gaps) > 0  # its expectation is a symmetrised KL


def test_each_model_samples_its_own_distribution(pair):
    """Shared noise must not bias either model: the first token's frequencies are softmax(l/T)."""
    settings = SamplingSettings(max_length=1, num_generations_per_prompt=4000, temperature=0.7)
    gen_1, gen_2 = paired_generate(pair, ["the cat sat on"], settings, seed=0)
    batch = pair.tokenizer(["the cat sat on"], return_tensors="pt")
    for model, gen in ((pair.model_1, gen_1), (pair.model_2, gen_2)):
        with torch.no_grad():
            logits = model(**batch).logits[0, -1, : pair.vocab_size].float()
        logits[pair.tokenizer.eos_token_id] = -float("inf")  # at least one new token
        expected = (logits / 0.7).softmax(-1)
        observed = torch.bincount(gen.tokens[:, 0], minlength=pair.vocab_size).float() / 4000
        assert 0.5 * (observed - expected).abs().sum() < 0.06  # total variation


def test_greedy_equals_generate_with_left_padding(pair):
    settings = SamplingSettings(max_length=5, num_generations_per_prompt=1, temperature=0.0)
    gen_1, gen_2 = paired_generate(pair, PROMPTS, settings, seed=0)
    tokenizer = pair.tokenizer
    for model, gen in ((pair.model_1, gen_1), (pair.model_2, gen_2)):
        for row, prompt in enumerate(PROMPTS):
            batch = tokenizer([prompt], return_tensors="pt")
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=5,
                min_new_tokens=1,
                pad_token_id=tokenizer.pad_token_id,
            )
            expected = out[0, batch["input_ids"].shape[1] :].tolist()
            got = gen.tokens[row][gen.mask[row]].tolist()
            assert got == expected[: len(got)] and len(got) == len(
                expected[: expected.index(tokenizer.eos_token_id) + 1]
                if tokenizer.eos_token_id in expected
                else expected
            )


def test_streams_draw_fresh_samples_and_a_seed_repeats_them(pair):
    settings = dataclasses.replace(SETTINGS, temperature=1.5)
    first = score_prompts(pair, PROMPTS, settings, seed=0, progress=False)
    again = score_prompts(pair, PROMPTS, settings, seed=0, progress=False)
    fresh = score_prompts(pair, PROMPTS, settings, seed=0, progress=False, stream="confirm")
    gaps = [r["paired_samples"]["llr_gap"] for r in first]
    assert gaps == [r["paired_samples"]["llr_gap"] for r in again]
    assert gaps != [r["paired_samples"]["llr_gap"] for r in fresh]
    assert noise_seed(0, "select", 0) != noise_seed(0, "confirm", 0)


def test_an_int_temperature_samples_like_the_float(pair):
    """``temperature=1`` (an int, as a Python caller writes it) is the same setting as ``1.0``."""
    as_int = SamplingSettings(max_length=4, num_generations_per_prompt=2, temperature=1, top_p=1)
    as_float = SamplingSettings(max_length=4, num_generations_per_prompt=2, temperature=1.0)
    from_int = paired_generate(pair, PROMPTS, as_int, seed=3)
    from_float = paired_generate(pair, PROMPTS, as_float, seed=3)
    assert len(from_int) == len(from_float) > 0
    for a, b in zip(from_int, from_float, strict=True):
        assert torch.equal(a.tokens, b.tokens)


def test_a_cache_allocated_once_samples_what_a_growing_cache_samples(pair, monkeypatch):
    """CUDA decodes over a static cache (SamplingSettings.static_cache=None there); on the CPU
    it is asked for, and must draw the same continuations, left padding included."""
    from helpers import spy_static_caches
    from transformers import StaticCache

    built = spy_static_caches(monkeypatch)
    settings = dataclasses.replace(SETTINGS, max_length=5)
    growing = paired_generate(pair, PROMPTS, dataclasses.replace(settings, static_cache=False), 4)
    assert built == []  # the CPU's default, too
    assert paired_generate(pair, PROMPTS, settings, seed=4)[0].tokens.shape[1] > 0 and built == []
    static = paired_generate(pair, PROMPTS, dataclasses.replace(settings, static_cache=True), 4)
    width = pair.tokenizer(PROMPTS, padding=True, return_tensors="pt")["input_ids"].shape[1]
    # One per model, room for every step, and a cache transformers really allocated once.
    assert [(n, type(cache)) for n, cache in built] == [(width + 5, StaticCache)] * 2
    for a, b in zip(growing, static, strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)


def test_a_model_that_takes_no_static_cache_decodes_over_a_growing_one(pair, caplog):
    """A model whose own code rejects transformers' StaticCache (remote code, a hybrid cache)
    still generates, over the growing cache, and the fallback is said once."""
    from transformers import StaticCache

    from soft_prompting.hard_prompts.sampling import CachedDecoder

    model = pair.model_1
    forward = model.forward

    def refusing(*args, **kwargs):
        if any(isinstance(value, StaticCache) for value in kwargs.values()):
            raise TypeError("this model brings its own cache")
        return forward(*args, **kwargs)

    batch = pair.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    first = dict(batch) | {"position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        plain = CachedDecoder(model, first, pair.vocab_size)
        model.forward = refusing
        try:
            fallen_back = CachedDecoder(model, first, pair.vocab_size, max_new_tokens=3)
            assert not fallen_back.static
            for _ in range(2):
                token = plain.logits.argmax(-1)
                torch.testing.assert_close(fallen_back.logits, plain.logits)
                plain.advance(token)
                fallen_back.advance(token)
        finally:
            del model.forward
    assert [r.getMessage() for r in caplog.records if "growing key/value cache" in r.getMessage()]


def test_vocabulary_jaccard_is_over_the_words_shown_not_the_end_of_sequence(pair, monkeypatch):
    """Two continuations with no word in common have similarity 0, though both end with EOS."""
    import soft_prompting.hard_prompts.sampling as sampling
    from soft_prompting.hard_prompts.sampling import Continuations, continuation_mask

    eos = pair.tokenizer.eos_token_id
    words = pair.tokenizer.convert_tokens_to_ids(["cat", "dog", "sat"])
    rows = [[words[0], words[2], eos], [words[1], eos, eos]]
    other = [[words[1], eos, eos], [words[1], eos, eos]]

    def fixed(pair, prompts, settings, seed):
        return tuple(
            Continuations(torch.tensor(t), continuation_mask(torch.tensor(t), eos))
            for t in (rows, other)
        )

    monkeypatch.setattr(sampling, "paired_generate", fixed)
    settings = SamplingSettings(max_length=3, num_generations_per_prompt=2)
    (record,) = score_prompts(pair, ["the cat"], settings, progress=False)
    # Pair 1: {cat, sat} vs {dog}: 0. Pair 2: {dog} vs {dog}: 1. Mean 0.5 (with EOS: 1/4 and 1).
    assert record["metrics"]["vocab_jaccard_similarity"] == 0.5
    assert record["generation_1"] == "cat sat" and record["generation_2"] == "dog"
