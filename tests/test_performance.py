"""The optimised training loss is the naive formulation's, exactly; the benchmark command runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import make_model, make_tokenizer

from soft_prompting.benchmark import naive_divergence, naive_prompt_tuning
from soft_prompting.pair.loading import ModelPair
from soft_prompting.training.module import DivergenceModule


def fresh_pair() -> ModelPair:
    """A tiny fp32 pair of its own (the loader's cache is shared by other tests)."""
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    models = [make_model(seed, len(tokenizer)).requires_grad_(False).eval() for seed in (1, 2)]
    return ModelPair(models[0], models[1], tokenizer)


def module_on(pair: ModelPair, **kwargs) -> DivergenceModule:
    return DivergenceModule("tiny-1", "tiny-2", pair=pair, **kwargs)


def loss_and_grad(module: DivergenceModule, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    module.soft_prompt.grad = None
    divergence = module.divergence(inputs["input_ids"], inputs["attention_mask"])
    divergence.backward()
    return divergence.detach(), module.soft_prompt.grad.clone()


def test_optimised_loss_and_gradient_equal_the_naive_peft_formulation():
    pair = fresh_pair()
    module = module_on(pair, num_soft_prompt_tokens=8, seed=3)
    assert module.fused_head, "the tiny Llama pair should take the chunked path"
    # Equal lengths: PEFT ignores position_ids, so padded rows would be positioned differently.
    texts = ["the cat sat on the mat and the dog", "what is one plus two and three four five"]
    inputs = pair.tokenizer(texts, return_tensors="pt", padding=True)
    assert inputs["attention_mask"].all()
    ours, our_grad = loss_and_grad(module, inputs)

    naive_pair = fresh_pair()
    peft_models, shared = naive_prompt_tuning(
        (naive_pair.model_1, naive_pair.model_2), 8, module.soft_prompt.detach()
    )
    theirs = naive_divergence(peft_models, dict(inputs), 8)
    theirs.backward()
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_grad, shared.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "js"])
def test_chunked_head_equals_full_logits_with_padding_and_small_chunks(divergence, monkeypatch):
    pair = fresh_pair()
    module = module_on(pair, num_soft_prompt_tokens=4, divergence=divergence)
    texts = ["the cat sat on the mat and the dog sat", "what is one plus two", "i am"]
    inputs = pair.tokenizer(texts, return_tensors="pt", padding=True)
    assert not inputs["attention_mask"].all()
    # Chunks of 3 positions: several chunks, one of them partial.
    import soft_prompting.maths.chunked_head as chunked

    monkeypatch.setattr(chunked, "chunk_rows_for", lambda vocab_size, device="cpu": 3)
    chunked_value, chunked_grad = loss_and_grad(module, inputs)
    module.fused_head = False
    full_value, full_grad = loss_and_grad(module, inputs)
    torch.testing.assert_close(chunked_value, full_value, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked_grad, full_grad, atol=1e-7, rtol=1e-5)
    with torch.no_grad():
        module.fused_head = True
        no_grad_value = module.divergence(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(no_grad_value, full_value, atol=1e-6, rtol=1e-5)


def test_softcapped_heads_fall_back_to_full_logits():
    pair = fresh_pair()
    pair.model_2.config.final_logit_softcapping = 30.0
    assert not module_on(pair).fused_head


def test_gradient_checkpointing_recomputes_and_keeps_the_gradient():
    pair = fresh_pair()
    inputs = pair.tokenizer(
        ["the cat sat on the mat", "what is one"], return_tensors="pt", padding=True
    )
    plain = loss_and_grad(module_on(pair, num_soft_prompt_tokens=4), inputs)
    checkpointed = module_on(pair, num_soft_prompt_tokens=4, gradient_checkpointing=True)
    recomputed = []
    down_proj = pair.model_1.model.layers[0].mlp.down_proj
    down_proj.register_forward_pre_hook(lambda module, args: recomputed.append(1))
    value, grad = loss_and_grad(checkpointed, inputs)
    # Once in the forward pass, once more when backward recomputes the layer.
    assert len(recomputed) == 2, "the frozen (eval-mode) models were not checkpointed"
    torch.testing.assert_close(value, plain[0])
    torch.testing.assert_close(grad, plain[1], atol=1e-7, rtol=1e-5)


def test_benchmark_command_writes_the_promised_json(tmp_path):
    out = tmp_path / "bench.json"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "soft_prompting.benchmark",
            "--preset",
            "tiny",
            "--threads",
            "1",
            "--json",
            str(out),
            "--repeats",
            "1",
            "--gen-repeats",
            "1",
            "--no-memory",
            # Compared with the fp32 naive step below: fp32 on every machine (auto would pick
            # bf16 on AMX or AMD AVX512-BF16 CPUs).
            "--no-mixed-precision",
            "--variants",
            "static_cache",  # the generation CUDA runs by default, timed beside the CPU's
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["train_precision"] == "32-true"
    for key in (
        "train_step_s",
        "naive_train_step_s",
        "train_speedup",
        "gen_score_s",
        "naive_gen_score_s",
        "gen_speedup",
        "settings",
        "device",
    ):
        assert report[key] is not None, key
    assert report["settings"]["preset"] == "tiny" and report["fused_head"]
    assert report["checks"]["train_divergence_abs_diff"] < 1e-5
    assert report["checks"]["gen_same_generation_1"] == 1.0
    assert report["gen_static_cache_s"] > 0 and report["gen_vs_static_cache"] > 0
    assert report["checks"]["gen_static_cache_same_generation_1"] == 1.0
    assert report["gen_cache"] == {"gen": "growing", "gen_static_cache": "static"}  # the CPU's


@pytest.mark.skipif(
    sys.platform != "linux", reason="the step's own peak needs /proc/self/clear_refs"
)
def test_peak_memory_of_a_step_is_measured_in_a_child_process():
    """The child reports the peak of the step itself: at least the tensors the step must hold."""
    from dataclasses import replace

    from soft_prompting.benchmark import MODELS, measure_memory_in_children, preset_settings

    settings = replace(preset_settings("tiny", "cpu"), batch_size=8, seq_len=512)
    memory = measure_memory_in_children(settings, ["naive_train"])["naive_train"]
    positions = settings.batch_size * (settings.num_virtual_tokens + settings.seq_len)
    logits_mb = positions * MODELS["tiny"]["vocab_size"] * 4 / 2**20  # one fp32 [B, P+T, V]
    # The naive forward holds both models' logits and both softmaxes at once.
    assert memory["step_rss_mb"] >= 4 * logits_mb, (memory, logits_mb)
    assert memory["peak_rss_mb"] == pytest.approx(
        memory["base_rss_mb"] + memory["step_rss_mb"], abs=0.2
    )


def test_what_a_step_saves_for_its_backward_counts_activations_not_weights():
    from soft_prompting.benchmark import preset_settings, saved_activations

    saved = saved_activations(preset_settings("tiny", "cpu"), log=lambda line: None)
    ops = saved["by_op_mb"]
    assert saved["total_mb"] == pytest.approx(sum(ops.values())) and saved["total_mb"] > 0
    assert "SiluBackward0.self" in ops  # the MLP's activations are kept...
    assert not any(op.startswith("MmBackward0.mat2") for op in ops)  # ...the frozen weights not
    assert "_ChunkedHeadDivergencesBackward.saved_tensors" in ops  # the head's [M, H] gradients
