"""The record metrics of ``score_prompts`` against an independent float64 computation.

The definitions (``soft_prompting/hard_prompts/sampling.py``, README "record schema"):
``kl_divergence`` is the mean per-token KL(p1 || p2) over model_1's continuation ``x`` (its tokens
up to and including the end-of-sequence token), ``token_disagreement_rate`` the share of those
positions where the two models' argmax tokens differ, ``disagreement_positions`` where they differ,
and ``vocab_jaccard_similarity`` the Jaccard similarity of the token sets of ``x`` and model_2's
continuation ``y``.

The continuations are read back from the record's text, so whatever scheme sampled them does not
matter: the test tokenizer declares one special token, the end-of-sequence token (also the
padding), and every other token decodes to a word that encodes back to the same id.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import WORDS, make_model

from soft_prompting.hard_prompts.sampling import SamplingSettings, score_prompts
from soft_prompting.pair.loading import ModelPair

EOS = "</s>"
MAX_LENGTH = 10
# Different lengths, so the batch is left padded.
PROMPTS = [
    "the cat sat on",
    "what is one plus two",
    "i am",
    "the dog can write poems about water and gold",
    "question what is the symbol for oxygen answer",
    "stealing is wrong because",
]


def word_tokenizer():
    """Word-level tokenizer whose only special token is the end of sequence (also the padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Undeclared as special, "<pad>", "<unk>" and "<s>" decode to themselves and encode back.
    words = ["<pad>", "<unk>", "<s>", EOS, *dict.fromkeys(WORDS)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=EOS, model_max_length=128
    )


@pytest.fixture(scope="module")
def pair() -> ModelPair:
    """model_2 is model_1 with a perturbed output head: they agree on some tokens, not all."""
    tokenizer = word_tokenizer()
    model_1 = make_model(1, len(tokenizer)).eval()
    model_2 = copy.deepcopy(model_1)
    noise = torch.randn(model_2.lm_head.weight.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model_2.lm_head.weight.add_(0.03 * noise)
    for model in (model_1, model_2):
        model.requires_grad_(False)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ModelPair(model_1, model_2, tokenizer)


@pytest.fixture(scope="module")
def reference_models(pair) -> tuple[torch.nn.Module, torch.nn.Module]:
    return copy.deepcopy(pair.model_1).double(), copy.deepcopy(pair.model_2).double()


def continuation_ids(tokenizer, text: str) -> list[int]:
    """A continuation's token ids from its text: a continuation shorter than ``MAX_LENGTH`` ended
    with the end-of-sequence token, which decoding dropped."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text, "the test tokenizer must round-trip"
    return ids + [tokenizer.eos_token_id] if len(ids) < MAX_LENGTH else ids


@torch.no_grad()
def next_token_log_probs(model, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """``[len(continuation), V]`` float64 log-probabilities, row t predicting continuation[t]."""
    ids = torch.tensor([prompt_ids + continuation])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].double()
    return logits.log_softmax(-1)


def reference_metrics(reference_models, tokenizer, record: dict) -> dict:
    prompt_ids = tokenizer(record["prompt"])["input_ids"]
    x = continuation_ids(tokenizer, record["generation_1"])
    y = continuation_ids(tokenizer, record["generation_2"])
    log_p1, log_p2 = (next_token_log_probs(m, prompt_ids, x) for m in reference_models)
    kl = (log_p1.exp() * (log_p1 - log_p2)).sum(-1)
    differs = (log_p1.argmax(-1) != log_p2.argmax(-1)).tolist()
    where = [t for t, d in enumerate(differs) if d]
    # The words shown: the special tokens (the end of sequence both share) are no words.
    words_x, words_y = ({t for t in ids if t not in tokenizer.all_special_ids} for ids in (x, y))
    union = words_x | words_y
    return {
        "kl_divergence": float(kl.mean()),
        "token_disagreement_rate": sum(differs) / len(x),
        "vocab_jaccard_similarity": len(words_x & words_y) / len(union) if union else 1.0,
        "disagreement_positions": {
            "first": where[0] if where else -1,
            "last": where[-1] if where else -1,
            "count": len(where),
            "length": len(x),
        },
    }


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_record_metrics_follow_their_definitions(pair, reference_models, temperature):
    settings = SamplingSettings(
        max_length=MAX_LENGTH, num_generations_per_prompt=1, temperature=temperature, batch_size=4
    )
    records = score_prompts(pair, PROMPTS, settings, seed=3, progress=False)
    assert [r["prompt"] for r in records] == PROMPTS
    expected = [reference_metrics(reference_models, pair.tokenizer, r) for r in records]
    for record, reference in zip(records, expected, strict=True):
        metrics = record["metrics"]
        assert metrics["kl_divergence"] == pytest.approx(
            reference["kl_divergence"], rel=1e-4, abs=1e-8
        ), record
        for name in ("token_disagreement_rate", "vocab_jaccard_similarity"):
            assert metrics[name] == pytest.approx(reference[name], abs=1e-6), (name, record)
        assert metrics["disagreement_positions"] == reference["disagreement_positions"], record
    # The pair is chosen so that none of the checks above holds trivially.
    rates = [r["token_disagreement_rate"] for r in expected]
    assert any(0 < rate < 1 for rate in rates), rates
    assert any(r["disagreement_positions"]["first"] > 0 for r in expected), expected
    assert any(0 < r["vocab_jaccard_similarity"] < 1 for r in expected), expected
    assert all(r["kl_divergence"] > 1e-4 for r in expected), expected
    if temperature == 0:  # greedy text is fixed: one continuation ends early ("three" + end)
        lengths = [r["disagreement_positions"]["length"] for r in expected]
        assert min(lengths) < MAX_LENGTH, "no continuation ended early: the mask went unchecked"


def test_with_several_samples_the_positions_are_the_shown_pairs(pair, reference_models):
    """``generation_1``/``generation_2`` and ``disagreement_positions`` show the first sample pair;
    the other metrics are means over the pairs, and stay within their ranges."""
    settings = SamplingSettings(
        max_length=MAX_LENGTH, num_generations_per_prompt=3, temperature=1.0
    )
    records = score_prompts(pair, PROMPTS, settings, seed=4, progress=False)
    for record in records:
        reference = reference_metrics(reference_models, pair.tokenizer, record)
        metrics = record["metrics"]
        assert metrics["disagreement_positions"] == reference["disagreement_positions"], record
        assert 0 <= metrics["token_disagreement_rate"] <= 1 and metrics["kl_divergence"] > 0
        assert 0 <= metrics["vocab_jaccard_similarity"] <= 1


def test_temperature_zero_continues_each_prompt_with_each_models_argmax(pair, reference_models):
    """Greedy generation: every new token is the model's most likely one (the end of sequence only
    from the second token on: a continuation holds at least one token)."""
    settings = SamplingSettings(max_length=MAX_LENGTH, num_generations_per_prompt=2, temperature=0)
    records = score_prompts(pair, PROMPTS, settings, progress=False)
    tokenizer, eos = pair.tokenizer, pair.tokenizer.eos_token_id
    ended = 0
    for record in records:
        prompt_ids = tokenizer(record["prompt"])["input_ids"]
        for model, key in zip(reference_models, ("generation_1", "generation_2"), strict=True):
            ids = prompt_ids[:]
            for step in range(MAX_LENGTH):
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                if step == 0:
                    logits[eos] = -float("inf")
                ids.append(int(logits.argmax()))
                if ids[-1] == eos:
                    ended += 1
                    break
            new = [i for i in ids[len(prompt_ids) :] if i != eos]
            assert record[key] == tokenizer.decode(new), (key, record)
        # Two greedy samples are one sample twice: the pair differs in both or in neither.
        assert record["metrics"]["reliability"] in (0.0, 1.0)
    assert ended, "no continuation ended early: the end-of-sequence handling went unchecked"
