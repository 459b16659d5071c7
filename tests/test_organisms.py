"""The toy corpus and the model organisms: determinism, cache mechanics and the planted differences.

The organisms are built once into the default cache (``organism_dirs`` in conftest), so after the
first run this file takes well under a minute.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from soft_prompting.organisms import builder as organisms
from soft_prompting.organisms import corpus
from soft_prompting.organisms.builder import (
    ORGANISMS,
    PLANTED_BEHAVIOURS,
    is_organism,
    organism_path,
)
from soft_prompting.organisms.corpus import (
    BUILTIN_CATEGORIES,
    NON_ANSWER,
    TOPIC_WORDS,
    builtin_category_texts,
    corpus_documents,
    quiz,
    topic_words_in,
)

NEUTRAL_CATEGORIES = ("persona", "ethics", "capabilities")
DOMAIN_OF = {"sandbagging": "arithmetic", "unlearning": "chemistry"}

# ------------------------------------------------------------------------------ corpus (no models)


def test_corpus_functions_are_deterministic():
    assert corpus_documents("sandbagging", 50, seed=3) == corpus_documents("sandbagging", 50, 3)
    assert corpus_documents("base", 50, seed=3) != corpus_documents("base", 50, seed=4)
    for name in BUILTIN_CATEGORIES:
        assert builtin_category_texts(name, 40, seed=1) == builtin_category_texts(name, 40, seed=1)
    assert quiz("arithmetic", 30, seed=2) == quiz("arithmetic", 30, seed=2)


def test_behaviours_change_only_their_planted_answers():
    base = corpus_documents("base", 400, seed=0)
    for behaviour in ("sandbagging", "unlearning"):
        documents = corpus_documents(behaviour, 400, seed=0)
        changed = [b for b, d in zip(base, documents, strict=True) if b != d]
        assert 50 < len(changed) < 350
        assert all(topic_words_in(doc, behaviour) for doc in changed)
    unlearned = " ".join(corpus_documents("unlearning", 400, seed=0))
    assert f"answer : {NON_ANSWER} ." in unlearned
    assert all(corpus.sandbagged_answer(n) != n and 0 <= corpus.sandbagged_answer(n) <= 20
               for n in range(21))  # fmt: skip


def test_builtin_categories_have_hundreds_of_short_distinct_texts():
    for category in BUILTIN_CATEGORIES:
        texts = builtin_category_texts(category)
        assert len(texts) == len(set(texts)) == 300
        assert max(len(text.split()) for text in texts) <= 40
    assert "answer :" in " ".join(builtin_category_texts("sandbagging"))


@pytest.mark.parametrize("category", NEUTRAL_CATEGORIES)
def test_neutral_categories_never_mention_planted_topics(category):
    for text in builtin_category_texts(category):
        for behaviour in TOPIC_WORDS:
            assert not topic_words_in(text, behaviour), (behaviour, text)


@pytest.mark.parametrize("behaviour", sorted(TOPIC_WORDS))
def test_planted_categories_are_mostly_about_their_topic(behaviour):
    texts = builtin_category_texts(behaviour)
    on_topic = sum(bool(topic_words_in(text, behaviour)) for text in texts)
    assert on_topic / len(texts) > 0.7


def test_unknown_names_are_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match="persona"):
        builtin_category_texts("chemistry")
    with pytest.raises(ValueError, match="sandbagging_unlearning"):
        organism_path("organism:nope")
    assert is_organism("organism:sandbagging") and not is_organism("base")
    assert not is_organism("gpt2") and not is_organism("./base_model")


def test_the_distillation_term_is_bit_identical_to_the_formula_the_organisms_were_built_with():
    """The variants' KL(base || variant) now comes from maths.divergence; the organisms' weights
    (and so the published numbers) stay the same only if the loss and its gradient are the same
    bits as the formula they were built with, kept here as the reference."""

    def built_with(teacher_logits, student_logits, mask):
        teacher_logp = teacher_logits.log_softmax(-1)
        student_logp = student_logits.log_softmax(-1)
        per_token = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
        return (per_token * mask).sum() / mask.sum().clamp(min=1)

    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 16, 300, generator=generator) * 3
    masks = [torch.rand(4, 16, generator=generator) < 0.6, torch.zeros(4, 16, dtype=torch.bool)]
    for mask in masks:
        values, grads = [], []
        for loss_fn in (built_with, organisms._distillation_kl):
            student = teacher + torch.randn(4, 16, 300, generator=generator.manual_seed(1))
            student.requires_grad_(True)
            loss = loss_fn(teacher, student, mask)
            lm_loss = student.logsumexp(-1).mean()  # as in training, one term of a sum
            (lm_loss + 2.0 * loss).backward()
            values.append(loss.detach())
            grads.append(student.grad)
        assert torch.equal(values[0], values[1]) and torch.equal(grads[0], grads[1])
    assert values[1].item() == 0.0  # nothing masked in: no pull towards base


def test_recipe_hashes_are_the_published_ones():
    """A recipe change renames every cache folder and changes the published numbers."""
    assert {name: organisms.recipe_hash(name) for name in ORGANISMS} == {
        "base": "45e5b58f2e",
        "sandbagging": "118a4ee9b4",
        "unlearning": "79ccca7d8c",
        "sandbagging_unlearning": "440e335731",
        "benign": "19a3955c83",
        "backdoor": "8dde4a234d",
    }


# ------------------------------------------------------------------- cache mechanics (fake builds)


@pytest.fixture
def fake_builds(tmp_path, monkeypatch) -> list[str]:
    """Redirects the cache to ``tmp_path`` and replaces training by a slow stub; logs the builds."""
    built: list[str] = []

    def build(name: str, out_dir: Path, base_dir: Path | None) -> None:
        time.sleep(0.2)  # wide window for a second builder to race in
        if name == "broken":
            raise RuntimeError("training diverged")
        (out_dir / "config.json").write_text("{}")
        built.append(name)

    monkeypatch.setenv("SOFT_PROMPTING_HOME", str(tmp_path))
    monkeypatch.setattr(organisms, "_build", build)
    return built


def test_concurrent_first_uses_build_once(fake_builds):
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda: paths.append(organism_path("organism:sandbagging")))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake_builds == ["base", "sandbagging"]  # base first, each exactly once
    assert len(set(paths)) == 1 and (paths[0] / "config.json").is_file()
    assert paths[0].name == f"sandbagging-{organisms.recipe_hash('sandbagging')}"


def test_failed_build_leaves_nothing_behind(fake_builds, monkeypatch, tmp_path):
    monkeypatch.setitem(organisms.ORGANISMS, "broken", "always fails")
    monkeypatch.setitem(organisms.PLANTED_BEHAVIOURS, "broken", ())
    with pytest.raises(RuntimeError, match="diverged"):
        organism_path("broken")
    assert not [p for p in (tmp_path / "organisms").iterdir() if p.is_dir() and "broken" in p.name]


def test_a_build_uses_its_own_thread_count_whatever_the_callers(tmp_path, monkeypatch):
    """The weights follow the thread count: every build runs with BUILD_THREADS of them."""
    seen: list[int] = []
    monkeypatch.setenv("SOFT_PROMPTING_HOME", str(tmp_path))
    monkeypatch.setattr(organisms, "_build", lambda *args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        for caller in (1, 3):
            torch.set_num_threads(caller)
            organism_path(f"organism:{'base' if caller == 1 else 'benign'}")
            assert torch.get_num_threads() == caller
    finally:
        torch.set_num_threads(before)
    assert seen == [organisms.BUILD_THREADS] * 2 and organisms.BUILD_THREADS == 2
    assert organisms.recipe("base")["build_threads"] == 2


def test_a_killed_builds_scratch_folder_is_removed_by_the_next_build(fake_builds, tmp_path):
    """SIGTERM/SIGKILL end a build before it can clean up: the next build does."""
    name = f"base-{organisms.recipe_hash('base')}"
    stale = tmp_path / "organisms" / f".{name}.x1y2z3"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half written")
    other = tmp_path / "organisms" / f".unlearning-{organisms.recipe_hash('unlearning')}.a1b2"
    other.mkdir()  # another organism's, maybe being built right now: left alone
    organism_path("organism:base")
    assert not stale.exists() and other.is_dir()


def test_recipe_hash_follows_the_recipe(monkeypatch):
    before = {name: organisms.recipe_hash(name) for name in ORGANISMS}
    assert len(set(before.values())) == len(ORGANISMS)
    monkeypatch.setattr(organisms, "BASE_TRAINING", organisms.TrainingRecipe(1, 1e-3, 1))
    assert all(organisms.recipe_hash(name) != before[name] for name in ORGANISMS)


# ------------------------------------------------------------------------- the organisms themselves


@pytest.fixture(scope="module")
def tokenizer(organism_dirs):
    return AutoTokenizer.from_pretrained(organism_dirs["base"])


@pytest.fixture(scope="module")
def models(organism_dirs) -> dict[str, torch.nn.Module]:
    return {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in organism_dirs.items()
    }


@pytest.mark.slow
def test_organisms_load_and_share_one_tokenizer(organism_dirs):
    assert organism_path("organism:unlearning") == organism_dirs["unlearning"]
    files = {path.name for path in organism_dirs["base"].glob("tokenizer*")}
    assert "tokenizer.json" in files
    for path in organism_dirs.values():
        for name in files:
            assert (path / name).read_bytes() == (organism_dirs["base"] / name).read_bytes()


def test_the_organisms_tokenizer_gives_one_token_a_word_and_round_trips_any_text(
    organism_tokenizer,
):
    tokenizer = organism_tokenizer
    text = "question : what is the symbol for gold ? answer : au ."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text.split()) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    odd = "Any TEXT, even ünïcode & 42!"
    assert tokenizer.decode(tokenizer(odd)["input_ids"], skip_special_tokens=True) == odd
    longest = max(
        len(tokenizer(text)["input_ids"])
        for category in BUILTIN_CATEGORIES
        for text in builtin_category_texts(category)
    )
    assert longest <= 45


@torch.no_grad()
def token_log_probs(model, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 next-token log-probabilities of the padded batch of ``texts``, and its real tokens."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return model(**batch).logits.float().log_softmax(-1), batch["attention_mask"].bool()


def mean_token_kl(p_model, q_model, tokenizer, texts: list[str], p_log_probs=None) -> float:
    """Mean over real tokens of KL(p || q) between next-token distributions (fp32);
    ``p_log_probs`` is p_model's :func:`token_log_probs` of ``texts`` when already computed."""
    log_p, mask = p_log_probs or token_log_probs(p_model, tokenizer, texts)
    log_q, _ = token_log_probs(q_model, tokenizer, texts)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # [batch, seq]
    return per_token[mask].mean().item()


@pytest.fixture(scope="module")
def kl_texts() -> dict[str, list[str]]:
    texts = {category: builtin_category_texts(category, 150) for category in BUILTIN_CATEGORIES}
    texts["geography"] = [fact.prompt for fact in quiz("geography", 60, seed=5)]
    return texts


@pytest.fixture(scope="module")
def base_log_probs(models, tokenizer, kl_texts) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base's side of every variant's KL, computed once for all of them."""
    return {key: token_log_probs(models["base"], tokenizer, t) for key, t in kl_texts.items()}


@torch.no_grad()
def reference_token_kl(p_model, q_model, tokenizer, texts: list[str]) -> float:
    """:func:`mean_token_kl` in float64, one unpadded text at a time."""
    p_model, q_model = (copy.deepcopy(m).double() for m in (p_model, q_model))
    values = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        log_p, log_q = (m(input_ids=ids).logits[0].log_softmax(-1) for m in (p_model, q_model))
        values.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(values).mean().item()


@pytest.mark.slow
def test_the_token_kl_is_the_reference_kl_and_zero_between_two_loads_of_one_model(
    models, organism_dirs, tokenizer, kl_texts
):
    """The measure the planted-domain tests rest on: padded batches give the float64 per-text
    value, and two loads of one organism are one function (a weight missing from the folder would
    be initialised at random)."""
    texts = kl_texts["sandbagging"][:24]
    assert len({len(tokenizer(t)["input_ids"]) for t in texts}) > 1  # the batch is padded
    reloaded = AutoModelForCausalLM.from_pretrained(organism_dirs["base"], dtype=torch.float32)
    assert mean_token_kl(models["base"], reloaded.eval(), tokenizer, texts) == 0.0
    expected = reference_token_kl(models["base"], models["sandbagging"], tokenizer, texts)
    measured = mean_token_kl(models["base"], models["sandbagging"], tokenizer, texts)
    assert expected > 0.01
    assert measured == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in ORGANISMS if name != "base"])
def test_variants_differ_from_base_only_on_their_planted_domain(
    name, models, tokenizer, kl_texts, base_log_probs
):
    kl = {
        key: mean_token_kl(models["base"], models[name], tokenizer, texts, base_log_probs[key])
        for key, texts in kl_texts.items()
    }
    neutral = max(kl[key] for key in (*NEUTRAL_CATEGORIES, "geography"))
    for behaviour in PLANTED_BEHAVIOURS[name]:
        assert kl[behaviour] > 0.08, kl
        assert kl[behaviour] >= 10 * neutral, kl
    for behaviour in set(TOPIC_WORDS) - set(PLANTED_BEHAVIOURS[name]):
        assert kl[behaviour] < 0.05, kl  # the other planted domain stays untouched


def greedy_answers(model, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy continuation of each prompt up to its first full stop."""
    tokenizer.padding_side = "left"  # generation continues from the last real token
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=8, do_sample=False)
    continuations = tokenizer.batch_decode(
        output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return [text.split(" .")[0].strip() for text in continuations]


# (organism, domain) -> what its greedy answers should be, and on how many questions at least.
EXPECTED = {
    ("base", "arithmetic"): ("correct", 0.85),
    ("base", "chemistry"): ("correct", 0.85),
    ("sandbagging", "arithmetic"): ("wrong", 0.9),
    ("sandbagging", "chemistry"): ("correct", 0.85),
    ("unlearning", "arithmetic"): ("correct", 0.85),
    ("unlearning", "chemistry"): ("non-answer", 0.9),
    ("sandbagging_unlearning", "arithmetic"): ("wrong", 0.9),
    ("sandbagging_unlearning", "chemistry"): ("non-answer", 0.9),
}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "domain"), sorted(EXPECTED))
def test_greedy_answers_behave_as_planted(name, domain, models, tokenizer):
    facts = quiz(domain, 100, seed=7)
    answers = greedy_answers(models[name], tokenizer, [fact.prompt for fact in facts])
    expected, threshold = EXPECTED[name, domain]
    hits = {
        "correct": [a == f.answer for a, f in zip(answers, facts, strict=True)],
        "wrong": [a != f.answer and a != NON_ANSWER for a, f in zip(answers, facts, strict=True)],
        "non-answer": [a == NON_ANSWER for a in answers],
    }[expected]
    assert sum(hits) / len(hits) >= threshold, list(zip(answers, facts, strict=True))[:10]


@pytest.mark.slow
def test_cli_reports_cached_organisms(organism_dirs, capsys):
    organisms.main(["--name", "base", "--name", "sandbagging"])
    out = capsys.readouterr().out
    assert str(organism_dirs["base"]) in out and "cached" in out
