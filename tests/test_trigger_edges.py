"""Trigger localisation at its edges: a prompt that does not diverge, and a prompt longer than
``max_words`` whose localised words all go."""

from __future__ import annotations

import pytest

import soft_prompting.hard_prompts.triggers as triggers


def fake_divergence(score):
    def last_divergence(module, texts, batch_size=32):
        return [score(text.split()) for text in texts]

    return last_divergence


def test_a_prompt_that_does_not_diverge_has_no_trigger(monkeypatch):
    for full in (0.0, -1e-7):  # JS and KL can come out a rounding error below zero
        monkeypatch.setattr(
            triggers, "last_divergence", fake_divergence(lambda words, full=full: full)
        )
        found = triggers.localise(None, "the cat sat on the mat")
        assert found.trigger == ""
        assert found.divergence_without_trigger == full
        assert found.divergence == full


def test_removing_every_localised_word_keeps_the_heads_scored_divergence(monkeypatch):
    # 2 head words beyond max_words=64; the head alone keeps 0.5 of the pair's divergence.
    head, words = ["h1", "h2"], [f"w{i}" for i in range(64)]
    score = lambda ws: 0.5 * ("h1" in ws) + 0.01 * sum(w.startswith("w") for w in ws)  # noqa: E731
    monkeypatch.setattr(triggers, "last_divergence", fake_divergence(score))
    found = triggers.localise(None, " ".join(head + words))
    assert found.divergence == pytest.approx(1.14)
    assert found.trigger == " ".join(words)  # all of them, and still over 20 % is left
    assert found.divergence_without_trigger == pytest.approx(0.5)
