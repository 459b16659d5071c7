"""Checks that need a CUDA device (skipped elsewhere): the pair split over GPUs, FSDP on NCCL, and
every entrypoint placing the pair on the GPU by default.

Run on a GPU machine with ``python -m pytest -m gpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import train_tiny_pair

from soft_prompting.training.module import DivergenceModule

pytestmark = pytest.mark.gpu

TEXTS = ["the cat sat on the mat and the dog sat on the mat too", "what is one plus two"]


def loss_and_gradient(module: DivergenceModule) -> tuple[torch.Tensor, torch.Tensor]:
    module.to("cuda:0")
    batch = module.tokenizer(TEXTS, return_tensors="pt", padding=True).to("cuda:0")
    module.soft_prompt.grad = None
    divergence = module.divergence(batch["input_ids"], batch["attention_mask"])
    divergence.backward()
    return divergence.detach(), module.soft_prompt.grad.clone()


def test_a_pair_split_over_the_gpus_gives_the_whole_pairs_loss_and_gradient(tiny_pair_dirs):
    whole = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=3, torch_dtype="float32")
    split = DivergenceModule(
        *tiny_pair_dirs, num_soft_prompt_tokens=3, torch_dtype="float32", device_map="split"
    )
    model = split.pair.model_1
    assert model.lm_head.weight.device == torch.device("cuda:0")
    if torch.cuda.device_count() > 1:  # one GPU: transformers loads the model whole, no map kept
        assert model.hf_device_map["lm_head"] == 0
        assert len(set(model.hf_device_map.values())) > 1
    expected, split_result = loss_and_gradient(whole), loss_and_gradient(split)
    torch.testing.assert_close(split_result[0], expected[0])
    torch.testing.assert_close(split_result[1], expected[1])


def test_fsdp_on_the_gpu_learns_the_prompt_of_the_default_strategy(
    tiny_pair_dirs, text_dir, tmp_path
):
    plain = train_tiny_pair(tmp_path / "plain", tiny_pair_dirs, text_dir, accelerator="gpu")
    fsdp = train_tiny_pair(
        tmp_path / "fsdp", tiny_pair_dirs, text_dir, "training.strategy=fsdp", accelerator="gpu"
    )
    assert "decoder layers sharded over 1 ranks" in fsdp["output"]
    torch.testing.assert_close(fsdp["prompt"], plain["prompt"], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- every entrypoint on the GPU
# The defaults (training.accelerator=auto, mixed_precision=auto, torch_dtype=auto) must put the
# pair on the GPU, in bf16 where the GPU has it, in every stage (issue 15).
FAST_DATASET = [
    "write_dataset=true",
    "generation.num_prompts=2",
    "generation.max_length=4",
    "generation.num_generations_per_prompt=2",
    "training.mixed_precision=auto",
]


@pytest.fixture(scope="module")
def gpu_run(tiny_pair_dirs, text_dir, tmp_path_factory):
    """``python -m soft_prompting.train`` at the default accelerator, dataset included."""
    run_dir = tmp_path_factory.mktemp("gpu_train") / "run"
    result = train_tiny_pair(run_dir, tiny_pair_dirs, text_dir, *FAST_DATASET, accelerator="auto")
    return run_dir, result


def test_train_and_its_dataset_run_on_the_gpu_in_bf16(gpu_run):
    from soft_prompting.pair.placement import cuda_has_bf16

    run_dir, result = gpu_run
    assert result["metrics"]["environment"]["device"].startswith("cuda:0")
    assert (run_dir / "divergent_dataset.jsonl").read_text().strip()
    if cuda_has_bf16():  # Lightning's "Using bfloat16 Automatic Mixed Precision (AMP)"
        assert "bfloat16 Automatic Mixed Precision" in result["output"], result["output"][-2000:]


def test_the_pair_loads_on_the_gpu_in_bf16_by_default(tiny_pair_dirs):
    from soft_prompting.pair.loading import ModelPairManager
    from soft_prompting.pair.placement import cuda_has_bf16

    model_1, _, _ = ModelPairManager().load_model_pair(*tiny_pair_dirs)
    assert model_1.device.type == "cuda"
    assert model_1.dtype == (torch.bfloat16 if cuda_has_bf16() else torch.float32)


def test_a_checkpoint_opens_on_the_gpu(gpu_run):
    run_dir, _ = gpu_run
    module = DivergenceModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert module.pair.device.type == module.soft_prompt.device.type == "cuda"


def test_evaluate_scores_on_the_gpu_with_the_trained_prompt(
    gpu_run, tiny_pair_dirs, text_dir, tmp_path
):
    import json

    from conftest import run_entrypoint

    run_dir, _ = gpu_run
    out = tmp_path / "evaluation"
    result = run_entrypoint(
        "soft_prompting.evaluate",
        [
            f"model_pair.model_1_name={tiny_pair_dirs[0]}",
            f"model_pair.model_2_name={tiny_pair_dirs[1]}",
            f"data.text_dir={text_dir}",
            f"prompts_file={run_dir / 'divergent_dataset.jsonl'}",
            f"soft_prompt_checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}",
            "training.num_soft_prompt_tokens=4",
            "generation.max_length=4",
            "confirm_generations=4",
            "baseline_candidates=2",
            "bootstrap_resamples=200",
            f"hydra.run.dir={out}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluating on cuda:0" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["environment"]["device"].startswith("cuda:0")
    assert summary["trained_soft_prompt"]["teacher_forced_divergence"] > 0


def test_a_quantised_pair_is_evaluated_where_bitsandbytes_put_it(tiny_pair_dirs, gpu_run):
    """The teacher-forced baseline once fed CPU batches to a pair quantised onto the GPU."""
    pytest.importorskip("bitsandbytes")
    from soft_prompting.evaluate import teacher_forced_divergence

    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=4, load_in_8bit=True)
    prompt = torch.load(gpu_run[0] / "checkpoints" / "last.ckpt", weights_only=True)
    prompt = prompt["state_dict"]["soft_prompt"]  # read from a file: on the CPU
    assert teacher_forced_divergence(module, TEXTS, prompt) > 0


def test_compare_trains_and_evaluates_on_the_gpu(tiny_pair_dirs, text_dir, tmp_path):
    import json

    from conftest import run_entrypoint

    run_dir = tmp_path / "compare"
    result = run_entrypoint(
        "soft_prompting.compare",
        [
            "categories=[animals]",
            f"model_pair.model_1_name={tiny_pair_dirs[0]}",
            f"model_pair.model_2_name={tiny_pair_dirs[1]}",
            f"data.text_dir={text_dir}",
            "training.max_steps=2",
            "generation.num_prompts=2",
            "generation.max_length=4",
            "generation.num_generations_per_prompt=2",
            "bootstrap_samples=200",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    comparison = json.loads((run_dir / "comparison.json").read_text())
    job = comparison["jobs"][0]
    assert job["evaluation"]["status"] == "done", job
    job_dir = Path(job["run_dir"])
    metrics = json.loads((job_dir / "metrics.json").read_text())
    assert metrics["environment"]["device"].startswith("cuda:0")
    summaries = list((job_dir / "evaluation").rglob("summary.json"))
    assert summaries and all(
        json.loads(s.read_text())["environment"]["device"].startswith("cuda:0") for s in summaries
    )


def test_the_report_scores_with_the_pair_on_the_gpu(tiny_pair_dirs):
    from soft_prompting.report.build import load_pair

    names = {"model_1_name": tiny_pair_dirs[0], "model_2_name": tiny_pair_dirs[1]}
    pair, why = load_pair({"model_pair": names}, "auto")
    assert why is None and pair.device.type == "cuda"


def test_the_facade_trains_on_the_gpu_with_models_loaded_on_the_cpu(tiny_pair_dirs, tmp_path):
    from soft_prompting import DivergenceTrainer, ModelPairManager

    model_1, model_2, tokenizer = ModelPairManager(device="cpu").load_model_pair(*tiny_pair_dirs)
    trainer = DivergenceTrainer(
        model_1=model_1,
        model_2=model_2,
        tokenizer=tokenizer,
        output_dir=tmp_path / "run",
        config={"training": {"num_soft_prompt_tokens": 2, "max_steps": 2}},
        enable_progress_bar=False,
    )
    assert trainer.pair.device.type == trainer.module.soft_prompt.device.type == "cuda"
    trainer.train([TEXTS, TEXTS])
    assert trainer.pair.device.type == trainer.module.soft_prompt.device.type == "cuda"
    records = trainer.generate_divergent_dataset(prompts=["the cat sat on"], num_prompts=1)
    assert records and records[0]["metrics"]["kl_divergence"] >= 0


def test_sampling_noise_is_drawn_on_the_gpu_and_a_seed_repeats_it(tiny_pair_dirs, monkeypatch):
    """A host draw of rows × vocab uniforms per step, copied over, would cost more than the
    decoding step of a large pair (issue 15): the noise comes from a generator on the GPU."""
    from soft_prompting.hard_prompts.sampling import SamplingSettings, paired_generate
    from soft_prompting.pair.loading import ModelPairManager

    pair = ModelPairManager().load_model_pair(*tiny_pair_dirs)
    devices, rand = [], torch.rand

    def spy(*args, **kwargs):
        noise = rand(*args, **kwargs)
        devices.append(noise.device.type)
        return noise

    monkeypatch.setattr(torch, "rand", spy)
    settings = SamplingSettings(max_length=4, num_generations_per_prompt=8, temperature=0.9)
    first = paired_generate(pair, TEXTS, settings, seed=5)
    again = paired_generate(pair, TEXTS, settings, seed=5)
    assert devices and set(devices) == {"cuda"}
    for a, b in zip(first, again, strict=True):
        assert a.tokens.device.type == "cuda"
        assert torch.equal(a.tokens, b.tokens)


def test_generation_on_the_gpu_decodes_over_a_cache_allocated_once(
    tiny_pair_dirs, monkeypatch, caplog
):
    import dataclasses

    from helpers import spy_static_caches
    from transformers import StaticCache

    import soft_prompting.hard_prompts.sampling as sampling
    from soft_prompting.pair.loading import ModelPairManager

    pair = ModelPairManager(torch_dtype="float32").load_model_pair(*tiny_pair_dirs)
    built = spy_static_caches(monkeypatch)
    settings = sampling.SamplingSettings(max_length=6, num_generations_per_prompt=2, temperature=0)
    static = sampling.paired_generate(pair, TEXTS, settings, seed=0)
    # The default on CUDA, one cache per model, and used (no fallback to a growing one).
    assert [type(cache) for _, cache in built] == [StaticCache] * 2
    assert "growing key/value cache" not in caplog.text
    growing = sampling.paired_generate(
        pair, TEXTS, dataclasses.replace(settings, static_cache=False), seed=0
    )
    for a, b in zip(static, growing, strict=True):
        assert torch.equal(a.tokens, b.tokens)
