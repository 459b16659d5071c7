"""The LightningModule on a tiny random pair: gradients, masking, padding, export, checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, save_pair_member
from helpers import fit_briefly

from soft_prompting.pair.loading import ModelLoadError, ModelPairManager
from soft_prompting.training.module import DivergenceModule


@pytest.fixture
def module(tiny_pair_dirs):
    return DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=4, seed=0)


def batch(tokenizer, texts):
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_gradient_reaches_the_soft_prompt_and_nothing_else(module):
    inputs = batch(module.tokenizer, ["the cat sat on the mat", "what is one plus two"])
    loss = -module.divergence(inputs["input_ids"], inputs["attention_mask"])
    loss.backward()
    assert module.soft_prompt.grad is not None
    assert module.soft_prompt.grad.abs().sum() > 0
    frozen = [p for m in (module.pair.model_1, module.pair.model_2) for p in m.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert [name for name, _ in module.named_parameters()] == ["soft_prompt"]


def test_an_optimizer_step_raises_the_divergence(module):
    inputs = batch(module.tokenizer, ["the cat sat on the mat", "what is one plus two"])
    optimizer = torch.optim.Adam([module.soft_prompt], lr=0.05)
    before = module.divergence(inputs["input_ids"], inputs["attention_mask"]).item()
    for _ in range(20):
        optimizer.zero_grad()
        (-module.divergence(inputs["input_ids"], inputs["attention_mask"])).backward()
        optimizer.step()
    assert module.divergence(inputs["input_ids"], inputs["attention_mask"]).item() > before * 1.2


def test_padded_and_unpadded_batches_give_the_same_loss(module):
    texts = ["the cat sat on the mat and the dog sat", "what is one plus two"]
    padded = batch(module.tokenizer, texts)
    together = module.divergence(padded["input_ids"], padded["attention_mask"])
    per_text, counts = [], []
    for text in texts:
        single = batch(module.tokenizer, [text])
        per_text.append(module.divergence(single["input_ids"], single["attention_mask"]))
        counts.append(single["attention_mask"].sum())
    token_weighted = sum(v * c for v, c in zip(per_text, counts, strict=True)) / sum(counts)
    torch.testing.assert_close(together, token_weighted, atol=1e-5, rtol=1e-5)


def test_padding_tokens_do_not_count(module):
    text = ["what is one plus two", "the cat sat on the mat and the dog sat"]
    inputs = batch(module.tokenizer, text)
    ids = inputs["input_ids"].clone()
    assert (inputs["attention_mask"] == 0).any()
    ids[inputs["attention_mask"] == 0] = module.tokenizer.convert_tokens_to_ids("gold")
    original = module.divergence(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(module.divergence(ids, inputs["attention_mask"]), original)


def test_scoring_without_prompt_really_omits_it(module):
    inputs = batch(module.tokenizer, ["the cat sat on the mat"])
    without = module.divergence(inputs["input_ids"], inputs["attention_mask"], use_prompt=False)
    with torch.no_grad():
        module.soft_prompt.mul_(3.0)
    again = module.divergence(inputs["input_ids"], inputs["attention_mask"], use_prompt=False)
    with_prompt = module.divergence(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(without, again)
    assert not torch.isclose(with_prompt, without)


def test_left_padding_does_not_change_soft_prompted_generation(module):
    """Generation from embeddings counts positions over real tokens, as training does."""
    texts = ["the cat sat on the mat and the dog sat on the mat", "what is one plus two"]
    inputs = batch(module.tokenizer, texts)
    assert (inputs["attention_mask"] == 0).any(), "the test needs a padded row"
    together = module.sample(inputs["input_ids"], inputs["attention_mask"], 6, temperature=0.0)
    for row, text in enumerate(texts):
        alone = batch(module.tokenizer, [text])
        expected = module.sample(alone["input_ids"], alone["attention_mask"], 6, temperature=0.0)
        n = expected.shape[1]  # alone, generation stops at end-of-sequence; in a batch, padding
        assert together[row, :n].tolist() == expected[0].tolist()
        assert (together[row, n:] == module.tokenizer.pad_token_id).all()


def test_validation_scores_the_bare_pair_once_per_batch(module, monkeypatch):
    calls = []
    divergence = module.divergence
    monkeypatch.setattr(
        module,
        "divergence",
        lambda *args, **kwargs: (
            calls.append(kwargs.get("use_prompt", True)) or divergence(*args, **kwargs)
        ),
    )
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    one = batch(module.tokenizer, ["the cat sat on the mat", "what is one plus two"])
    other = batch(module.tokenizer, ["i am a helpful assistant"])
    for inputs in (one, other, one, other):
        module.validation_step(dict(inputs), 0)
    assert calls == [True, False, True, False, True, True]
    module._no_prompt_divergence.clear()


def test_norm_constraint_keeps_prompt_within_real_embedding_norms(module):
    with torch.no_grad():
        module.soft_prompt.mul_(100.0)
    module.project_prompt_norms()
    norms = module.soft_prompt.norm(dim=-1)
    low, high = module.norm_range
    assert (norms <= high + 1e-4).all() and (norms >= low - 1e-4).all()


def test_text_initialisation_uses_model_1_embeddings(tiny_pair_dirs):
    module = DivergenceModule(
        *tiny_pair_dirs, num_soft_prompt_tokens=3, init="text", init_text="cat dog"
    )
    embeddings = module.pair.model_1.get_input_embeddings().weight
    ids = module.tokenizer("cat dog cat", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(module.soft_prompt.detach(), embeddings[ids])


def test_peft_loads_the_exported_prompt_and_reproduces_our_logits(module, tmp_path):
    from peft import PeftModel

    with torch.no_grad():
        module.soft_prompt.add_(0.1)
    module.save_soft_prompt(tmp_path / "soft_prompt")
    inputs = batch(module.tokenizer, ["the cat sat on the mat"])
    ours, _ = module.pair_logits(inputs["input_ids"], inputs["attention_mask"])
    base = ModelPairManager(torch_dtype="float32").load_model_pair(
        module.hparams.model_1_name, module.hparams.model_2_name
    )
    fresh_model_1 = type(base.model_1).from_pretrained(module.hparams.model_1_name)
    peft_model = PeftModel.from_pretrained(fresh_model_1, str(tmp_path / "soft_prompt"))
    theirs = peft_model(**inputs).logits[:, module.hparams.num_soft_prompt_tokens :]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_mismatched_tokenizers_fail_naming_the_difference(tmp_path, tiny_pair_dirs):
    other = save_pair_member(tmp_path / "other", seed=3, tokenizer=make_tokenizer(("zebra",)))
    with pytest.raises(ModelLoadError, match="tokenizers differ"):
        ModelPairManager().load_model_pair(tiny_pair_dirs[0], str(other))


def test_mismatched_hidden_sizes_fail(tmp_path, tiny_pair_dirs):
    wide = save_pair_member(tmp_path / "wide", seed=3, hidden_size=64)
    with pytest.raises(ModelLoadError, match="hidden sizes differ: 32 .* 64"):
        ModelPairManager().load_model_pair(tiny_pair_dirs[0], str(wide))


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelPairManager().load_model_pair(str(tmp_path / "nope"), str(tmp_path / "nope"))


TEXTS = {
    "a": [f"the cat sat on the mat {w}" for w in ("one", "two", "three", "four", "five")] * 2,
    "b": [f"what is {w} plus two" for w in ("one", "two", "three", "four", "five", "six")],
}


def fit(module, run_dir: Path, max_steps: int, ckpt_path=None):
    return fit_briefly(module, TEXTS, run_dir, max_steps, ckpt_path)[0]


def test_checkpoint_holds_only_the_prompt_and_loads_in_a_fresh_process(module, tmp_path):
    fit(module, tmp_path, max_steps=3)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.stat().st_size < 100_000, "the checkpoint must not hold the frozen models"
    state = torch.load(ckpt, weights_only=True)
    assert list(state["state_dict"]) == ["soft_prompt", "norm_range"]
    code = (
        "import sys, torch\n"
        "from soft_prompting.training.module import DivergenceModule\n"
        "m = DivergenceModule.load_from_checkpoint(sys.argv[1])\n"
        "torch.save(m.soft_prompt.detach(), sys.argv[2])\n"
        "print(m.pair.model_1.config.hidden_size)\n"
    )
    out = tmp_path / "prompt.pt"
    result = subprocess.run(
        [sys.executable, "-c", code, str(ckpt), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip().endswith("32")
    torch.testing.assert_close(torch.load(out), module.soft_prompt.detach())


def test_resume_continues_from_the_last_checkpoint(tiny_pair_dirs, tmp_path):
    first = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=4)
    fit(first, tmp_path, max_steps=2)
    resumed = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=4, seed=123)
    trainer = fit(resumed, tmp_path, max_steps=4, ckpt_path="last")
    assert trainer.global_step == 4
    straight = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=4)
    fit(straight, tmp_path / "straight", max_steps=4)
    torch.testing.assert_close(resumed.soft_prompt, straight.soft_prompt, atol=1e-5, rtol=1e-4)
