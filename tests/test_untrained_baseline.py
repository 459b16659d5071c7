"""The untrained_pipeline baseline is selection-matched for runs of several prompts: evaluate
builds as many untrained prompts as the run trained, and compare tells it how many."""

from __future__ import annotations

import subprocess

from hydra import compose, initialize_config_module

from soft_prompting.config import CompareConfig, ModelPairConfig, TrainingConfig, register_configs
from soft_prompting.evaluate import EvaluateConfig, untrained_module
from soft_prompting.hard_prompts.strategies import SoftPromptExploration, _propose_per_prompt

register_configs()


def test_a_two_prompt_baseline_proposes_from_both_untrained_prompts(tiny_pair_dirs):
    config = EvaluateConfig(
        model_pair=ModelPairConfig(model_1_name=tiny_pair_dirs[0], model_2_name=tiny_pair_dirs[1]),
        training=TrainingConfig(num_prompts=2, num_soft_prompt_tokens=3, accelerator="cpu"),
        prompts_file="unused.jsonl",
    )
    pair_args = {"model_1_name": tiny_pair_dirs[0], "model_2_name": tiny_pair_dirs[1]}
    module = untrained_module(config, pair_args)
    assert tuple(module.prompts.shape[:2]) == (2, 3)
    assert not module.prompts[0].equal(module.prompts[1])  # two draws of the same init
    strategy = SoftPromptExploration(
        num_seeds=1, samples_per_seed=1, max_new_tokens=3, num_candidates=2
    )
    texts = {"animals": ["the cat sat on the mat", "a dog is helpful"]}
    proposed = _propose_per_prompt([strategy], module, texts, seed=0)
    assert {c.soft_prompt_index for c in proposed} == {0, 1}


def test_compare_passes_the_number_of_prompts_to_evaluate(tiny_pair_dirs, tmp_path, monkeypatch):
    import soft_prompting.compare as compare_module
    import soft_prompting.evaluate  # noqa: F401  (registers the evaluate schema)

    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(compare_module.subprocess, "run", fake_run)
    config = CompareConfig(
        model_pair=ModelPairConfig(model_1_name=tiny_pair_dirs[0], model_2_name=tiny_pair_dirs[1]),
        training=TrainingConfig(num_prompts=3, num_soft_prompt_tokens=5),
    )
    assert compare_module.run_evaluation(config, "animals", tmp_path)["status"] == "done"
    (command,) = commands
    with initialize_config_module(config_module="soft_prompting.conf", version_base=None):
        evaluated = compose("evaluate", overrides=command[3:])
    assert evaluated.training.num_prompts == 3
    assert evaluated.training.num_soft_prompt_tokens == 5


def test_a_k_prompt_checkpoint_reports_each_prompts_divergence_and_their_mean(tiny_pair_dirs):
    import pytest
    import torch

    from soft_prompting.evaluate import teacher_forced_divergence, trained_prompt_divergences
    from soft_prompting.training.module import DivergenceModule

    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=3).eval()
    texts = ["the cat sat on the mat", "one plus two is three"]
    trained = torch.randn(2, 3, module.pair.hidden_size, generator=torch.Generator().manual_seed(0))
    values = trained_prompt_divergences(module, texts, trained)
    per_prompt = values["teacher_forced_divergence_per_prompt"]
    assert per_prompt == [teacher_forced_divergence(module, texts, p) for p in trained]
    assert per_prompt[0] != per_prompt[1]
    assert values["teacher_forced_divergence"] == pytest.approx(sum(per_prompt) / 2)
    assert values["teacher_forced_divergence"] == pytest.approx(
        teacher_forced_divergence(module, texts, trained), rel=1e-5
    )
    single = trained_prompt_divergences(module, texts, trained[1])
    assert single == {"teacher_forced_divergence": per_prompt[1]}
