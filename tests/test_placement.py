"""Where the pair runs and in which precision (soft_prompting.pair.placement), decided on a CPU
machine by pretending to have the hardware: CUDA, several GPUs, bf16 on the GPU or on the CPU."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from soft_prompting.config import TrainingConfig, load_train_config
from soft_prompting.errors import ConfigError
from soft_prompting.pair import placement
from soft_prompting.pair.loading import resolve_dtype
from soft_prompting.pair.placement import autocast_dtype, lightning_precision, resolve_device
from soft_prompting.training import pipeline


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA GPUs that compute bf16 (an A100 box, as far as placement can see)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(placement, "_mps_available", lambda: False)
    monkeypatch.setattr(placement, "cuda_has_bf16", lambda device=None: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(placement, "_mps_available", lambda: False)


def test_auto_is_the_gpu_when_there_is_one_and_the_cpu_otherwise(two_gpus, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("gpu") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_each_data_parallel_rank_loads_the_pair_on_its_own_gpu(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto", "ddp", devices=2) == torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("strategy", "devices"), [("fsdp", 2), ("fsdp", 1), ("ddp_spawn", 2), ("auto", 2)]
)
def test_sharded_or_forked_runs_load_the_pair_on_the_cpu(two_gpus, strategy, devices):
    """FSDP shards the layers onto the ranks itself; forked ranks must not inherit a used GPU."""
    assert resolve_device("auto", strategy, devices) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cpu:0", "gpus"])
def test_an_unknown_accelerator_is_one_line_naming_the_choices(name):
    with pytest.raises(ConfigError, match="training.accelerator=.*auto, cpu, gpu, cuda, mps"):
        resolve_device(name)


def test_a_gpu_asked_for_on_a_machine_without_one_is_refused(cpu_only):
    with pytest.raises(ConfigError, match="no CUDA GPU: use training.accelerator=auto or cpu"):
        resolve_device("gpu")


def test_mixed_precision_auto_is_bf16_where_the_hardware_has_it(two_gpus, monkeypatch):
    assert autocast_dtype("auto", "cuda:0") == torch.bfloat16
    monkeypatch.setattr(placement, "cuda_has_bf16", lambda device=None: False)  # a V100
    assert autocast_dtype("auto", "cuda:0") is None
    assert autocast_dtype(True, "cuda:0") == torch.float16  # asked for: fp16 autocast
    monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype(True, "cpu") == torch.bfloat16
    assert autocast_dtype(False, "cuda:0") is autocast_dtype(False, "cpu") is None
    assert autocast_dtype("auto", "mps") is None
    assert [lightning_precision(v, "cpu") for v in ("auto", True, False)] == [
        "32-true",
        "bf16-mixed",
        "32-true",
    ]


def test_the_trainer_precision_follows_the_accelerator_not_the_machine(two_gpus, monkeypatch):
    monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda: False)
    on_gpu = load_train_config({"model_pair": {"model_1_name": "a", "model_2_name": "b"}})
    assert on_gpu.training.mixed_precision == "auto"
    assert pipeline.precision(on_gpu) == "bf16-mixed"
    on_cpu = load_train_config(
        {
            "model_pair": {"model_1_name": "a", "model_2_name": "b"},
            "training": {"accelerator": "cpu"},
        }
    )
    assert pipeline.precision(on_cpu) == "32-true"


def test_bf16_counts_as_native_on_cpus_where_it_was_faster(monkeypatch, tmp_path):
    """AMX, or AVX512-BF16 on AMD; AVX512-BF16 on an Intel CPU without AMX measured slower."""
    query = {"_is_avx512_bf16_supported": lambda: True, "_is_amx_tile_supported": lambda: False}
    monkeypatch.setattr(torch, "cpu", types.SimpleNamespace(**query))
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(placement, "_cpuinfo", lambda: placement._read_cpuinfo(cpuinfo))
    cpuinfo.write_text("vendor_id : GenuineIntel\nflags : fpu avx512f avx512_bf16\n")
    assert not placement.cpu_has_native_bf16()  # this machine: a Xeon with AMX hidden
    cpuinfo.write_text("vendor_id : AuthenticAMD\nflags : fpu avx512f avx512_bf16\n")
    assert placement.cpu_has_native_bf16()  # Zen 4
    query["_is_amx_tile_supported"] = lambda: True
    monkeypatch.setattr(torch, "cpu", types.SimpleNamespace(**query))
    cpuinfo.write_text("vendor_id : GenuineIntel\nflags : fpu avx512f\n")
    assert placement.cpu_has_native_bf16()  # Sapphire Rapids, as torch reports it
    monkeypatch.setattr(torch, "cpu", types.SimpleNamespace())  # a PyTorch without the queries
    assert not placement.cpu_has_native_bf16()
    cpuinfo.write_text("vendor_id : GenuineIntel\nflags : fpu amx_tile amx_bf16\n")
    assert placement.cpu_has_native_bf16()
    cpuinfo.write_text("processor : 0\nFeatures : fp asimd sve bf16\n")  # Arm: unmeasured
    assert not placement.cpu_has_native_bf16()
    assert placement._read_cpuinfo(tmp_path / "missing") == (set(), "")


@pytest.mark.parametrize(
    ("given", "expected"),
    [("auto", "auto"), (True, True), (False, False), ("true", True), ("False", False)],
)
def test_mixed_precision_takes_auto_or_a_boolean(given, expected):
    assert TrainingConfig(mixed_precision=given).mixed_precision == expected


def test_mixed_precision_outside_its_values_is_one_line():
    with pytest.raises(ConfigError, match="training.mixed_precision='half': use auto, true or f"):
        TrainingConfig(mixed_precision="half")


def test_the_command_line_spells_mixed_precision_as_before():
    from hydra import compose, initialize_config_module

    from soft_prompting.config import register_configs, to_train_config

    register_configs()
    pair = ["model_pair.model_1_name=a", "model_pair.model_2_name=b"]
    with initialize_config_module("soft_prompting.conf", version_base=None):
        values = [
            to_train_config(compose("train", [*pair, *extra])).training.mixed_precision
            for extra in ([], ["training.mixed_precision=true"], ["training.mixed_precision=false"])
        ]
    assert values == ["auto", True, False]


def test_torch_dtype_auto_is_bf16_on_a_gpu_with_it_and_fp32_on_the_cpu(two_gpus, monkeypatch):
    from soft_prompting.pair import loading

    monkeypatch.setattr(loading, "cuda_has_bf16", lambda device=None: True)
    monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32  # mixed_precision decides there
    monkeypatch.setattr(loading, "cuda_has_bf16", lambda device=None: False)
    assert resolve_dtype("auto", "cuda:0") == torch.float32


def test_a_pair_loaded_by_name_goes_where_the_run_will_train(tiny_pair_dirs, monkeypatch):
    from soft_prompting.pair.loading import ModelPairManager
    from soft_prompting.training.module import DivergenceModule

    assert ModelPairManager().device == torch.device("cpu")  # auto, on this machine
    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=2, pair_device="cpu")
    assert module.pair.device == module.soft_prompt.device == torch.device("cpu")
    assert "pair_device" not in module.hparams  # a checkpoint opens wherever it is loaded
    config = load_train_config(
        {
            "model_pair": {"model_1_name": tiny_pair_dirs[0], "model_2_name": tiny_pair_dirs[1]},
            "training": {"strategy": "fsdp", "devices": 2},
        }
    )
    assert pipeline.module_args(config)["pair_device"] == "cpu"


def test_the_facade_places_the_users_models_where_training_accelerator_says(
    tiny_pair_dirs, tmp_path, monkeypatch
):
    """Moved with the one placement function: a device nobody else would pick (meta) shows it."""
    from soft_prompting import DivergenceTrainer
    from soft_prompting.pair.loading import ModelPairManager

    model_1, model_2, tokenizer = ModelPairManager(device="cpu").load_model_pair(*tiny_pair_dirs)
    model_1, model_2 = (type(m)(m.config) for m in (model_1, model_2))  # not the cached pair
    monkeypatch.setattr(pipeline, "pair_device", lambda config: torch.device("meta"))
    trainer = DivergenceTrainer(
        model_1=model_1,
        model_2=model_2,
        tokenizer=tokenizer,
        output_dir=tmp_path / "run",
        config={"training": {"num_soft_prompt_tokens": 2}},
    )
    assert trainer.pair.device.type == "meta"
    assert trainer.module.soft_prompt.device.type == "meta"
    assert model_2.get_input_embeddings().weight.device.type == "meta"


def test_the_teacher_forced_baseline_scores_on_the_pairs_device():
    """Its batches follow the pair (a quantised pair on the GPU crashed on CPU batches)."""
    from helpers import make_tokenizer

    from soft_prompting.evaluate import teacher_forced_divergence

    seen = []

    def divergence(ids, mask, use_prompt, prompt):
        seen.append((ids.device.type, mask.device.type))
        return torch.tensor(0.5)

    module = types.SimpleNamespace(
        tokenizer=make_tokenizer(),
        pair=types.SimpleNamespace(device=torch.device("meta")),
        divergence=divergence,
    )
    value = teacher_forced_divergence(module, ["the cat sat", "one two"], batch_size=1)
    assert seen == [("meta", "meta"), ("meta", "meta")] and value == pytest.approx(0.5)


def test_compare_evaluates_on_the_accelerator_it_trained_on(tmp_path, monkeypatch):
    import soft_prompting.compare as compare_module
    from soft_prompting.config import CompareConfig, ModelPairConfig

    (tmp_path / "argv_evaluate.py").write_text(
        "import pathlib, sys\n"
        "args = dict(a.split('=', 1) for a in sys.argv[1:])\n"
        "out = pathlib.Path(args['hydra.run.dir'])\n"
        "out.mkdir(parents=True)\n"
        "(out / 'argv.txt').write_text(args['training.accelerator'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(compare_module, "EVALUATE_MODULE", "argv_evaluate")
    config = CompareConfig(
        model_pair=ModelPairConfig(model_1_name="a", model_2_name="b"),
        training=TrainingConfig(accelerator="cpu"),
    )
    job_dir = tmp_path / "animals"
    job_dir.mkdir()
    result = compare_module.run_evaluation(config, "animals", job_dir)
    assert result["status"] == "done", result
    assert (job_dir / "evaluation" / "argv.txt").read_text() == "cpu"
    assert sys.modules.get("argv_evaluate") is None  # it ran as its own process


def test_a_checkpoint_opens_where_its_pair_was_placed(tiny_pair_dirs, tmp_path, monkeypatch):
    """Lightning moves a loaded module to its checkpoint tensors' device (the CPU after a fit);
    the module must follow its pair instead, or the first forward drags the pair along."""
    import lightning

    from soft_prompting.pair.loading import ModelPair
    from soft_prompting.training.module import DivergenceModule

    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=2, pair_device="cpu")
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    # A pair placed on another device than the checkpoint's (meta stands in for the GPU).
    monkeypatch.setattr(ModelPair, "device", property(lambda self: torch.device("meta")))
    loaded = DivergenceModule.load_from_checkpoint(path)
    assert loaded.soft_prompt.device.type == "meta"
