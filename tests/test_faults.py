"""Faults a user or a machine causes: each is one clear line, nothing earlier is lost, runs never mix.

Every test here names a finding of issue 14 (or a case found while fixing them) and fails when the
behaviour it names breaks. Fast cases call the functions in-process on the tiny pair; only signal
delivery needs a subprocess.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, save_pair_member
from helpers import contract_args, run_main

from soft_prompting import run_files
from soft_prompting.config import (
    CompareConfig,
    DataConfig,
    GenerationConfig,
    TrainingConfig,
    load_train_config,
)
from soft_prompting.errors import (
    ConfigError,
    DataError,
    DivergenceError,
    ModelLoadError,
    RunDirError,
    SoftPromptingError,
)
from soft_prompting.pair.loading import ModelPairManager
from soft_prompting.training.module import DivergenceModule


def tiny_config(tiny_pair_dirs, text_dir, **overrides):
    """A TrainConfig for the tiny pair that trains a few steps and writes a small dataset."""
    raw = {
        "model_pair": {"model_1_name": tiny_pair_dirs[0], "model_2_name": tiny_pair_dirs[1]},
        "data": {"text_dir": str(text_dir)},
        "training": {
            "num_soft_prompt_tokens": 2,
            "batch_size": 6,
            "max_steps": 2,
            "checkpoint_every_n_steps": 1,
            "accelerator": "cpu",
            "log_every_n_steps": 1,
        },
        "generation": {
            "num_prompts": 4,
            "max_length": 4,
            "num_generations_per_prompt": 1,
            "strategies": [
                {"_target_": "soft_prompting.hard_prompts.strategies.CategoryTextRanking"}
            ],
        },
        "write_dataset": False,
    }
    for key, value in overrides.items():
        group, _, name = key.rpartition("__")
        (raw.setdefault(group, {}) if group else raw)[name] = value
    return load_train_config(raw)


def train_in_process(config, run_dir: Path) -> dict:
    from soft_prompting.train import train

    return train(config, run_dir)


class Exploit:
    """A pickle that writes a marker file when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def planted_checkpoint(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": {"soft_prompt": Exploit(marker)}}))
    return path


@pytest.fixture
def no_pair_loading(monkeypatch):
    """Fail the test if anything loads a model pair (checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model pair was loaded before the input was checked")

    monkeypatch.setattr(ModelPairManager, "load_model_pair", refuse)


# ---------------------------------------------------------------- nothing is unpickled
def test_evaluate_never_unpickles_the_soft_prompt_checkpoint(tmp_path, no_pair_loading):
    from soft_prompting.evaluate import EvaluateConfig, evaluate

    marker = tmp_path / "pwned"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat\n")
    config = EvaluateConfig(
        prompts_file=str(prompts),
        soft_prompt_checkpoint=str(planted_checkpoint(tmp_path / "evil.ckpt", marker)),
    )
    config.model_pair.model_1_name = config.model_pair.model_2_name = "organism:base"
    with pytest.raises(ModelLoadError, match="evil.ckpt"):
        evaluate(config, tmp_path / "evaluation")
    assert not marker.exists(), "the planted pickle ran"


def test_garbage_checkpoint_is_one_line_without_weights_only_advice(
    tmp_path, tiny_pair_dirs, text_dir, no_pair_loading
):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(256))
    config = tiny_config(tiny_pair_dirs, text_dir, ckpt_path=str(garbage))
    with pytest.raises(ModelLoadError) as caught:
        train_in_process(config, tmp_path / "run")
    message = str(caught.value)
    assert "garbage.ckpt" in message and "weights_only" not in message
    assert "\n" not in message


def test_planted_pickle_as_ckpt_path_is_refused(tmp_path, tiny_pair_dirs, text_dir):
    marker = tmp_path / "pwned"
    config = tiny_config(
        tiny_pair_dirs, text_dir, ckpt_path=str(planted_checkpoint(tmp_path / "e.ckpt", marker))
    )
    with pytest.raises(ModelLoadError, match="e.ckpt"):
        train_in_process(config, tmp_path / "run")
    assert not marker.exists()


def test_missing_ckpt_path_fails_before_the_pair_loads(
    tmp_path, tiny_pair_dirs, text_dir, no_pair_loading
):
    config = tiny_config(tiny_pair_dirs, text_dir, ckpt_path=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ModelLoadError, match="nope.ckpt"):
        train_in_process(config, tmp_path / "run")


# ---------------------------------------------------------------- resuming
@pytest.fixture(scope="module")
def finished_run(tiny_pair_dirs, text_dir, tmp_path_factory) -> Path:
    """A finished two-step run of the tiny pair (checkpoints, soft prompt, curve)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train_in_process(tiny_config(tiny_pair_dirs, text_dir), run_dir)
    return run_dir


def test_resume_keeps_the_training_curve(tmp_path, tiny_pair_dirs, text_dir, finished_run):
    run_dir = tmp_path / "run"
    import shutil

    shutil.copytree(finished_run, run_dir)
    before = (run_dir / run_files.TRAINING_CURVE).read_text().splitlines()
    steps_before = {line.split(",")[-1] for line in before[1:]}
    assert steps_before, "the first run logged no curve"
    config = tiny_config(tiny_pair_dirs, text_dir, training__max_steps=4, ckpt_path="last")
    train_in_process(config, run_dir)
    after = (run_dir / run_files.TRAINING_CURVE).read_text().splitlines()
    header = after[0].split(",")
    step_column = header.index("step")
    steps = [int(line.split(",")[step_column]) for line in after[1:]]
    assert min(steps) == 0, "the curve before the resume is gone"
    assert max(steps) >= 2
    train_rows = [line for line in after[1:] if line.split(",")[header.index("train/divergence")]]
    train_steps = [int(line.split(",")[step_column]) for line in train_rows]
    assert len(train_steps) == len(set(train_steps)), "steps logged twice after the resume"
    assert "learning_rate" in (run_dir / run_files.LOGS / "hparams.yaml").read_text()


def test_checkpoint_of_another_pair_with_the_same_shape_is_refused(
    tmp_path, tiny_pair_dirs, text_dir, finished_run, no_pair_loading
):
    other = save_pair_member(tmp_path / "other", seed=7)
    config = tiny_config(
        (tiny_pair_dirs[0], str(other)),
        text_dir,
        ckpt_path=str(finished_run / run_files.LAST_CHECKPOINT),
    )
    with pytest.raises(ModelLoadError) as caught:
        train_in_process(config, tmp_path / "run")
    assert f"model_pair.model_2_name={tiny_pair_dirs[1]}" in str(caught.value)


def test_module_refuses_a_checkpoint_of_another_pair(tiny_pair_dirs, finished_run):
    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=2)
    state = torch.load(finished_run / run_files.LAST_CHECKPOINT, weights_only=True)
    state["hyper_parameters"]["revision_2"] = "abc123"
    with pytest.raises(ModelLoadError, match="model_pair.revision_2"):
        module.on_load_checkpoint(state)


# ---------------------------------------------------------------- one run per directory
def test_a_second_run_in_the_same_directory_is_refused(tmp_path, tiny_pair_dirs, text_dir):
    run_dir = tmp_path / "run"
    with run_files.run_dir_lock(run_dir):
        with pytest.raises(RunDirError, match="another run"):
            train_in_process(tiny_config(tiny_pair_dirs, text_dir), run_dir)
    assert not (run_dir / run_files.CHECKPOINTS).exists()
    with run_files.run_dir_lock(run_dir):  # released: the lock can be taken again
        pass


def test_lock_is_released_after_a_failed_run(tmp_path, tiny_pair_dirs, text_dir):
    config = tiny_config(tiny_pair_dirs, text_dir, ckpt_path=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ModelLoadError):
        train_in_process(config, tmp_path / "run")
    with run_files.run_dir_lock(tmp_path / "run"):
        pass


# ---------------------------------------------------------------- full disk
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_keeps_the_soft_prompt_written_before(tmp_path, tiny_pair_dirs, monkeypatch):
    from soft_prompting.training import module as module_file

    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=2)
    folder = module.save_soft_prompt(tmp_path / "soft_prompt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        module.soft_prompt.add_(1.0)

    def half_written(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 7)
        enospc()

    monkeypatch.setattr(module_file, "save_file", half_written)
    with pytest.raises(RunDirError, match="no space left") as caught:
        module.save_soft_prompt(folder)
    assert "\n" not in str(caught.value)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after == before, "a failed write damaged the soft prompt written before"


def test_full_disk_keeps_the_last_checkpoint(
    tmp_path, finished_run, tiny_pair_dirs, text_dir, monkeypatch
):
    from soft_prompting.training.pipeline import AtomicCheckpointIO, build_trainer

    trainer = build_trainer(tiny_config(tiny_pair_dirs, text_dir), tmp_path / "run")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)

    target = tmp_path / "last.ckpt"
    target.write_bytes((finished_run / run_files.LAST_CHECKPOINT).read_bytes())
    before = target.read_bytes()
    state = torch.load(target, weights_only=True)

    def half_saved(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\0\0")
        enospc()

    monkeypatch.setattr(torch, "save", half_saved)
    with pytest.raises(RunDirError, match="no space left"):
        AtomicCheckpointIO().save_checkpoint(state, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "a temporary file was left"


def test_full_disk_while_writing_json_keeps_the_old_file(tmp_path, monkeypatch):
    target = run_files.write_json(tmp_path / "metrics.json", {"a": 1})
    monkeypatch.setattr(Path, "write_text", enospc)
    with pytest.raises(RunDirError, match="metrics.json"):
        run_files.write_json(target, {"a": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 1}


# ---------------------------------------------------------------- partial files never mix runs
def stale_partials(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    stale = {"category": "animals", "prompt": "STALE PROMPT", "source": "stale"}
    run_files.write_jsonl(run_dir / run_files.CANDIDATES, [stale])
    record = stale | {"metrics": {"kl_divergence": 99.0}, "generation_params": {"max_length": 48}}
    run_files.write_jsonl(run_dir / run_files.partial(run_files.DATASET_JSONL), [record])


@pytest.fixture(scope="module")
def tiny_module(tiny_pair_dirs):
    return DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=2)


def write_dataset(module, config, run_dir, texts=None):
    from soft_prompting.training import pipeline

    texts = texts or {"animals": ["the cat sat on the mat", "the dog sat on the mat"]}
    return pipeline.write_dataset(module, texts, config, run_dir, None)


@pytest.mark.parametrize("overwrite", [False, True])
def test_stale_partial_files_are_not_mixed_into_a_fresh_run(
    tmp_path, tiny_module, tiny_pair_dirs, text_dir, overwrite
):
    run_dir = tmp_path / "run"
    stale_partials(run_dir)
    config = tiny_config(tiny_pair_dirs, text_dir, overwrite=overwrite)
    records = write_dataset(tiny_module, config, run_dir)
    assert records and all(r["prompt"] != "STALE PROMPT" for r in records)
    assert all(r["generation_params"]["max_length"] == 4 for r in records)


def test_partial_files_of_other_settings_are_discarded(
    tmp_path, tiny_module, tiny_pair_dirs, text_dir
):
    from soft_prompting.hard_prompts import dataset

    run_dir = tmp_path / "run"
    config = tiny_config(tiny_pair_dirs, text_dir)
    calls = []
    original = dataset.score_candidates

    def interrupted(*args, **kwargs):
        calls.append(1)
        original(*args, **kwargs)
        raise KeyboardInterrupt  # a kill after scoring, before the final files

    dataset.score_candidates = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            write_dataset(tiny_module, config, run_dir)
    finally:
        dataset.score_candidates = original
    assert (run_dir / run_files.partial(run_files.DATASET_JSONL)).is_file()
    changed = tiny_config(tiny_pair_dirs, text_dir, generation__max_length=6)
    records = write_dataset(tiny_module, changed, run_dir)
    assert all(r["generation_params"]["max_length"] == 6 for r in records)
    # ... while the same settings resume from the partial files
    with pytest.raises(KeyboardInterrupt):
        dataset.score_candidates = interrupted
        try:
            write_dataset(tiny_module, config, run_dir)
        finally:
            dataset.score_candidates = original
    partial = run_files.read_jsonl(run_dir / run_files.partial(run_files.DATASET_JSONL))
    scored = []
    dataset.score_prompts, original_score = (
        lambda pair, prompts, *a, **k: (
            scored.extend(prompts) or original_score(pair, prompts, *a, **k)
        ),
        dataset.score_prompts,
    )
    try:
        write_dataset(tiny_module, config, run_dir)
    finally:
        dataset.score_prompts = original_score
    assert partial and not scored, "a resume with the same settings scored everything again"


# ---------------------------------------------------------------- context limit everywhere
def test_long_texts_are_cut_to_the_context_in_every_stage(
    tmp_path, tiny_module, tiny_pair_dirs, text_dir
):
    seen = []

    class Spy:
        def propose(self, module, texts_by_category, seed):
            from soft_prompting.hard_prompts.strategies import Candidate

            for texts in texts_by_category.values():
                seen.extend(len(module.tokenizer(t)["input_ids"]) for t in texts)
            text = next(iter(texts_by_category.values()))[0]
            return [Candidate(prompt=text, category="animals", source="spy", score=1.0)]

    from soft_prompting.hard_prompts.dataset import generate_divergent_dataset
    from soft_prompting.hard_prompts.sampling import SamplingSettings

    config = tiny_config(tiny_pair_dirs, text_dir)
    long_text = " ".join(["the cat sat on the mat"] * 2000)  # 12,000 tokens, context 128
    settings = SamplingSettings.from_config(config.generation)
    records = generate_divergent_dataset(
        tiny_module,
        {"animals": [long_text]},
        [Spy()],
        settings,
        {},
        tmp_path,
        4,
        max_text_tokens=32,
    )
    assert seen and max(seen) <= 32 + 2
    limit = 128 - config.generation.max_length
    assert all(len(tiny_module.tokenizer(r["prompt"])["input_ids"]) <= limit for r in records)
    user = [{"category": "user", "prompt": long_text, "source": "user"}]
    from soft_prompting.hard_prompts.dataset import score_candidates

    scored = score_candidates(tiny_module.pair, user, settings, {})
    assert len(tiny_module.tokenizer(scored[0]["prompt"])["input_ids"]) <= limit


# ---------------------------------------------------------------- files silently ignored
def test_txt_beside_jsonl_of_the_same_category_is_refused(tmp_path):
    from soft_prompting.data.datamodule import load_text_dir

    (tmp_path / "persona.txt").write_text("a\nb\n")
    (tmp_path / "persona.jsonl").write_text('{"text": "c"}\n{"text": "d"}\n')
    with pytest.raises(
        DataError, match=r"persona\.txt.*persona\.jsonl|persona\.jsonl.*persona\.txt"
    ):
        load_text_dir(tmp_path, None)


def test_jsonl_whose_last_line_is_plain_text_is_refused(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\nthe last prompt, as plain text\n')
    with pytest.raises(DataError, match=r"prompts\.jsonl:2"):
        run_files.read_jsonl(path)


def test_torn_last_line_is_dropped_and_said(tmp_path, caplog):
    path = tmp_path / "x.partial.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "tor')
    with caplog.at_level("WARNING"):
        assert run_files.read_jsonl(path) == [{"prompt": "a"}]
    assert any("x.partial.jsonl:2" in r.getMessage() for r in caplog.records)


def test_corrupt_line_in_a_run_dataset_is_one_line_in_report(tmp_path, capsys):
    from soft_prompting.report.build import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / run_files.DATASET_JSONL).write_text(
        '{"prompt": "a", "metrics": {"kl_divergence": 1.0}}\n{not json}\n'
        '{"prompt": "b", "metrics": {"kl_divergence": 0.5}}\n'
    )
    with pytest.raises(SystemExit) as caught:
        main([f"run_dir={run_dir}"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{run_files.DATASET_JSONL}:2" in err


# ---------------------------------------------------------------- checked at compose time
@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: TrainingConfig(learning_rate=math.inf), "learning_rate"),
        (lambda: TrainingConfig(learning_rate=math.nan), "learning_rate"),
        (lambda: TrainingConfig(weight_decay=-1.0), "weight_decay"),
        (lambda: TrainingConfig(gradient_clip_val=math.nan), "gradient_clip_val"),
        (lambda: TrainingConfig(on_policy_weight=math.inf), "on_policy_weight"),
        (lambda: TrainingConfig(val_check_interval=0.0), "val_check_interval"),
        (lambda: GenerationConfig(temperature=math.inf), "temperature"),
        (lambda: GenerationConfig(top_p=math.nan), "top_p"),
        (lambda: DataConfig(val_fraction=math.nan), "val_fraction"),
        (lambda: DataConfig(categories=["no_such_category"]), "no_such_category"),
        (lambda: CompareConfig(categories=["no_such_category"]), "no_such_category"),
    ],
)
def test_bad_values_fail_when_the_config_is_built(make, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make()


def test_unknown_category_of_a_text_dir_fails_at_compose(text_dir):
    with pytest.raises(ConfigError, match="nope"):
        CompareConfig(categories=["nope"], data=DataConfig(text_dir=str(text_dir)))
    CompareConfig(categories=["animals"], data=DataConfig(text_dir=str(text_dir)))


def test_gpu_accelerator_without_cuda_fails_at_compose():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="accelerator"):
        TrainingConfig(accelerator="gpu")


# ---------------------------------------------------------------- messages that mislead
def test_missing_tokenizer_names_the_folder(tmp_path, tiny_pair_dirs):
    from conftest import make_model

    folder = tmp_path / "no_tokenizer"
    make_model(1, 50).save_pretrained(folder)
    with pytest.raises(ModelLoadError) as caught:
        ModelPairManager().load_model_pair(str(folder), tiny_pair_dirs[1])
    message = str(caught.value)
    assert str(folder) in message and "tokenizer" in message
    assert "sentencepiece" not in message and "tiktoken" not in message


def test_nan_with_no_checkpoint_does_not_promise_one(tiny_pair_dirs, tmp_path):
    import lightning.pytorch as pl

    from soft_prompting.data.datamodule import CategoryTextDataModule

    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=2)
    datamodule = CategoryTextDataModule(module.tokenizer, batch_size=2)
    datamodule.load_categories = lambda: {"a": [f"the cat sat {w}" for w in "abcdefghij"]}
    original = module.divergence
    module.divergence = lambda *a, **k: original(*a, **k) * float("nan")
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    with pytest.raises(DivergenceError) as caught:
        trainer.fit(module, datamodule=datamodule)
    assert "last good" not in str(caught.value) and "no checkpoint" in str(caught.value)


def test_tokenizers_with_different_special_tokens_are_warned_about(tmp_path, caplog):
    from conftest import make_model

    from soft_prompting.pair.loading import ModelPair, check_compatible

    tokenizer_1, tokenizer_2 = make_tokenizer(), make_tokenizer()
    tokenizer_2.eos_token = "<s>"
    tokenizer_2.pad_token = "<unk>"
    model = make_model(1, len(tokenizer_1))
    with caplog.at_level("WARNING"):
        check_compatible(ModelPair(model, model, tokenizer_1), tokenizer_2)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "eos" in text and "'</s>'" in text and "'<s>'" in text and "pad" in text


def test_an_empty_prompt_is_never_scored(tiny_module):
    from soft_prompting.hard_prompts.dataset import score_candidates
    from soft_prompting.hard_prompts.sampling import SamplingSettings

    settings = SamplingSettings.from_config(GenerationConfig(max_length=2))
    rows = [
        {"category": "c", "prompt": "the cat", "source": "s"},
        {"category": "c", "prompt": "  ", "source": "s"},
    ]
    with pytest.raises(DataError, match="empty"):
        score_candidates(tiny_module.pair, rows, settings, {})


def test_empty_prompts_file_records_are_refused(tmp_path):
    from soft_prompting.evaluate import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "   "}\n')
    with pytest.raises(DataError, match="record 2"):
        read_prompts(path)


def test_cuda_device_without_cuda_is_one_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="CUDA"):
        ModelPairManager(device="cuda")


def test_training_on_only_blank_texts_is_one_error(tiny_pair_dirs, tmp_path):
    from torch.utils.data import DataLoader

    from soft_prompting import DivergenceTrainer
    from soft_prompting import ModelPairManager as Manager

    model_1, model_2, tokenizer = Manager().load_model_pair(*tiny_pair_dirs)
    trainer = DivergenceTrainer(
        model_1=model_1,
        model_2=model_2,
        tokenizer=tokenizer,
        output_dir=tmp_path / "run",
        config={"training": {"num_soft_prompt_tokens": 2, "max_steps": 2, "accelerator": "cpu"}},
        enable_progress_bar=False,
    )
    with pytest.raises(DataError, match="blank"):
        trainer.train(DataLoader(["", "   ", "\n", ""], batch_size=2))


# ---------------------------------------------------------------- signals (a real process)
SIGNAL_ARGS = [
    "training.num_soft_prompt_tokens=2",
    "training.batch_size=2",
    "training.max_steps=100000",
    "training.checkpoint_every_n_steps=100000",
    "training.accelerator=cpu",
    "write_dataset=false",
]


def wait_until_training(run_dir: Path, running) -> bool:
    """Whether ``run_dir``'s training curve got a few steps (within 2 minutes, while
    ``running()`` holds)."""
    curve = run_dir / run_files.TRAINING_CURVE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and running():
        if curve.is_file() and len(curve.read_text().splitlines()) > 3:
            return True
        time.sleep(0.05)
    return False


def assert_stopped_with_a_checkpoint(returncode: int, err: str, signum, run_dir: Path) -> None:
    assert returncode not in (0, None), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert signal.Signals(signum).name in err and "ckpt_path=last" in err
    state = torch.load(run_dir / run_files.LAST_CHECKPOINT, weights_only=True)
    assert state["global_step"] >= 2


@pytest.mark.slow
def test_a_schedulers_sigterm_saves_a_checkpoint_and_exits_non_zero(
    tmp_path, tiny_pair_dirs, text_dir
):
    """From outside, as a scheduler preempts a job: the run in a process of its own."""
    run_dir = tmp_path / "run"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "soft_prompting.train",
            *contract_args(tiny_pair_dirs, text_dir, run_dir),
            *SIGNAL_ARGS,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_training(run_dir, lambda: process.poll() is None)
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert_stopped_with_a_checkpoint(process.returncode, err, signal.SIGTERM, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_ctrl_c_and_slurms_sigusr1_save_a_checkpoint_and_exit_non_zero(
    tmp_path, tiny_pair_dirs, text_dir, signum
):
    """The run in this process (no interpreter start-up), the signal sent to it by a thread."""
    run_dir = tmp_path / "run"
    unhandled: list[int] = []  # a signal the run did not take must not end pytest
    finished = threading.Event()

    def not_taken(received, frame):
        unhandled.append(received)
        if not finished.is_set():  # stop the run (it would go on for 100000 steps)
            raise RuntimeError(f"the run did not take {signal.Signals(received).name}")

    def send() -> None:
        if wait_until_training(run_dir, lambda: not finished.is_set()):
            os.kill(os.getpid(), signum)

    previous = signal.signal(signum, not_taken)
    try:
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            result = run_main(
                "soft_prompting.train",
                [*contract_args(tiny_pair_dirs, text_dir, run_dir), *SIGNAL_ARGS],
                tmp_path,
                {"OMP_NUM_THREADS": "1"},
            )
        finally:
            finished.set()
            sender.join()
    finally:
        signal.signal(signum, previous)
    assert not unhandled, result.stderr[-2000:]
    assert_stopped_with_a_checkpoint(result.returncode, result.stderr, signum, run_dir)


@pytest.mark.slow
def test_ctrl_c_in_a_notebooks_train_call_saves_a_checkpoint_and_gives_ctrl_c_back(
    tmp_path, tiny_pair_dirs
):
    """The Python API under a notebook's interrupt: Lightning's own handling would exit the cell
    with SystemExit and leave SIGINT ignored for the rest of the kernel; the run stops with
    last.ckpt and an Interrupted that says how to go on, and Ctrl+C works again after."""
    from torch.utils.data import DataLoader

    from soft_prompting import DivergenceTrainer
    from soft_prompting.errors import Interrupted

    run_dir = tmp_path / "run"
    trainer = DivergenceTrainer(
        output_dir=run_dir,
        config={
            "model_pair": {"model_1_name": tiny_pair_dirs[0], "model_2_name": tiny_pair_dirs[1]},
            "training": {
                "num_soft_prompt_tokens": 2,
                "max_steps": 100000,
                "log_every_n_steps": 1,
                "checkpoint_every_n_steps": 100000,
                "accelerator": "cpu",
            },
        },
        enable_progress_bar=False,
    )
    texts = ["the cat sat on the mat", "what is one plus two", "i am a helpful assistant"] * 4
    finished = threading.Event()

    def send() -> None:
        if wait_until_training(run_dir, lambda: not finished.is_set()):
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        with pytest.raises(
            Interrupted, match=r'SIGINT at step \d+: .*call train\(ckpt_path="last"\)'
        ):
            trainer.train(DataLoader(texts, batch_size=2))
    finally:
        finished.set()
        sender.join()
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl+C is the notebook's again
    state = torch.load(run_dir / run_files.LAST_CHECKPOINT, weights_only=True)
    assert state["global_step"] >= 2


# ---------------------------------------------------------------- more run-directory files
def report_exit(run_dir: Path, capsys) -> str:
    from soft_prompting.report.build import main

    with pytest.raises(SystemExit) as caught:
        main([f"run_dir={run_dir}"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def dataset_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"prompt": "a", "metrics": {"kl_divergence": 1.0}}
    run_files.write_jsonl(run_dir / run_files.DATASET_JSONL, [record])
    return run_dir


def test_corrupt_metrics_json_is_one_line_in_report(tmp_path, capsys):
    run_dir = dataset_run(tmp_path)
    (run_dir / run_files.METRICS).write_text('{"val/divergence": 0.')
    assert "metrics.json:1 is not valid JSON" in report_exit(run_dir, capsys)


def test_corrupt_hydra_config_is_one_line_in_report(tmp_path, capsys):
    run_dir = dataset_run(tmp_path)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("seed: [unclosed\n")
    assert "config.yaml is not a valid YAML config" in report_exit(run_dir, capsys)


def test_planted_pickle_dataset_message_does_not_advise_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / run_files.DATASET_PT
    path.write_bytes(pickle.dumps([{"prompt": Exploit(marker)}]))
    with pytest.raises(DataError) as caught:
        run_files.read_records(path)
    assert "weights_only" not in str(caught.value) and not marker.exists()


def test_load_from_checkpoint_of_garbage_is_one_clear_error(tmp_path):
    garbage = tmp_path / "last.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="last.ckpt") as caught:
        DivergenceModule.load_from_checkpoint(garbage)
    assert "weights_only" not in str(caught.value)


def test_resume_with_another_prompt_length_fails_before_loading(
    tmp_path, tiny_pair_dirs, text_dir, finished_run, no_pair_loading
):
    config = tiny_config(
        tiny_pair_dirs,
        text_dir,
        training__num_soft_prompt_tokens=5,
        ckpt_path=str(finished_run / run_files.LAST_CHECKPOINT),
    )
    with pytest.raises(SoftPromptingError, match="training.num_soft_prompt_tokens=2"):
        train_in_process(config, tmp_path / "run")


def test_text_dir_that_is_a_file_fails_before_loading(tmp_path, tiny_pair_dirs, no_pair_loading):
    not_a_folder = tmp_path / "texts.txt"
    not_a_folder.write_text("a\nb\n")
    with pytest.raises(DataError, match="not a folder"):
        train_in_process(tiny_config(tiny_pair_dirs, not_a_folder), tmp_path / "run")


# ---------------------------------------------------------------- odd inputs a new user gives
def test_category_file_with_a_byte_order_mark_reads_cleanly(tmp_path):
    from soft_prompting.data.datamodule import read_category_file

    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbffirst\nsecond\n")
    assert read_category_file(tmp_path / "bom.jsonl") == ["first", "second"]
    assert read_category_file(tmp_path / "bom.txt") == ["first", "second"]


def test_a_folder_named_like_a_category_file_is_one_error(tmp_path):
    from soft_prompting.data.datamodule import load_text_dir

    (tmp_path / "ok.txt").write_text("a\nb\n")
    (tmp_path / "odd.txt").mkdir()
    with pytest.raises(DataError, match="odd.txt is a folder"):
        load_text_dir(tmp_path, None)


def test_ckpt_path_that_is_a_folder_names_the_file_to_use(tmp_path):
    with pytest.raises(ModelLoadError, match="is a folder: point at .*last.ckpt"):
        run_files.read_checkpoint(tmp_path)


def test_run_dir_that_is_a_file_is_one_error(tmp_path):
    not_a_folder = tmp_path / "run"
    not_a_folder.write_text("")
    with pytest.raises(RunDirError, match="cannot write"):
        with run_files.run_dir_lock(not_a_folder):
            pass


def test_generation_longer_than_the_context_fails_before_training(
    tiny_module, tiny_pair_dirs, text_dir
):
    from soft_prompting.training.pipeline import build_datamodule

    config = tiny_config(tiny_pair_dirs, text_dir, generation__max_length=500)
    with pytest.raises(ConfigError, match="generation.max_length=500"):
        build_datamodule(tiny_module, config)


def test_unknown_device_name_is_one_error():
    with pytest.raises(ModelLoadError, match="banana"):
        ModelPairManager(device="banana")


def test_a_signal_stops_a_sweep_and_a_comparison_not_just_one_job(tmp_path, monkeypatch):
    import soft_prompting.train
    from soft_prompting.compare import run_category
    from soft_prompting.errors import Interrupted, reported_errors

    with pytest.raises(SystemExit) as caught:
        with reported_errors(exit_on_error=False):  # a multirun job
            raise Interrupted("stopped by SIGTERM")
    assert caught.value.code == 2

    def preempted(config, run_dir):
        raise Interrupted("stopped by SIGTERM")

    monkeypatch.setattr(soft_prompting.train, "train", preempted)
    config = CompareConfig(categories=["persona"])
    config.model_pair.model_1_name = config.model_pair.model_2_name = "organism:base"
    with pytest.raises(Interrupted):
        run_category(config, "persona", tmp_path / "persona")


def test_report_refuses_records_that_were_never_scored(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_files.write_jsonl(run_dir / run_files.DATASET_JSONL, [{"prompt": "a"}])
    assert "record 1 has no number at metrics.kl_divergence" in report_exit(run_dir, capsys)


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name
)
def test_a_signal_outside_the_fit_is_one_line_and_handlers_are_restored(tmp_path, signum):
    from soft_prompting.errors import Interrupted
    from soft_prompting.training.pipeline import Preemption

    before = signal.getsignal(signum)
    with pytest.raises(Interrupted, match=f"stopped by {signum.name}.*ckpt_path=last"):
        with Preemption(tmp_path):  # e.g. while the pair loads or the dataset is scored
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the handler runs here
    assert signal.getsignal(signum) == before


def test_evaluation_partials_of_other_settings_are_not_mixed_in(tmp_path, tiny_module):
    from soft_prompting.hard_prompts.dataset import score_candidates
    from soft_prompting.hard_prompts.sampling import SamplingSettings

    partial = tmp_path / run_files.partial(run_files.EVALUATED_PROMPTS)
    rows = [{"category": "c", "prompt": "the cat sat", "source": "s"}]
    short = SamplingSettings.from_config(GenerationConfig(max_length=2))
    score_candidates(tiny_module.pair, rows, short, {}, partial, progress=False)
    longer = SamplingSettings.from_config(GenerationConfig(max_length=5))
    records = score_candidates(tiny_module.pair, rows, longer, {}, partial, progress=False)
    assert records[0]["generation_params"]["max_length"] == 5
    again = score_candidates(tiny_module.pair, rows, longer, {}, partial, progress=False)
    assert again == records, "the same settings did not resume from the partial file"
