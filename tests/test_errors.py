"""Bad input fails early with a short message naming the fix; nothing computed is lost."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, run_entrypoint, save_pair_member
from helpers import SMALL_STRATEGIES, contract_args, run_main

from soft_prompting.data.datamodule import load_text_dir, read_category_file
from soft_prompting.errors import DataError, DivergenceError, ModelLoadError
from soft_prompting.pair.loading import ModelPairManager, resolve_model_path
from soft_prompting.run_files import read_records, write_jsonl
from soft_prompting.training.module import DivergenceModule


def run_train(args: list[str], cwd: Path, env: dict | None = None):
    return run_main("soft_prompting.train", args, cwd, env)


def run_train_in_a_process(args: list[str], cwd: Path):
    return run_entrypoint("soft_prompting.train", args, cwd)


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


# ---------------------------------------------------------------- models
def test_missing_model_path_on_the_command_line(tmp_path, text_dir):
    result = run_train(
        [
            f"model_pair.model_1_name={tmp_path}/missing",
            f"model_pair.model_2_name={tmp_path}/missing",
            f"data.text_dir={text_dir}",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
    )
    assert_user_error(result, "does not exist")
    assert result.returncode == 2


def test_unreachable_hub_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        resolve_model_path("some-org/some-model-that-is-not-cached")
    assert time.monotonic() - start < 10


def test_offline_mode_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        resolve_model_path("some-org/another-uncached-model")


def test_mismatched_tokenizers_on_the_command_line(tmp_path, tiny_pair_dirs, text_dir):
    other = save_pair_member(tmp_path / "other", seed=3, tokenizer=make_tokenizer(("zebra",)))
    result = run_train(
        [
            f"model_pair.model_1_name={tiny_pair_dirs[0]}",
            f"model_pair.model_2_name={other}",
            f"data.text_dir={text_dir}",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
    )
    assert_user_error(result, "tokenizers differ")


def test_quantisation_without_cuda_is_refused(tiny_pair_dirs):
    if torch.cuda.is_available():
        pytest.skip("this machine can quantise")
    with pytest.raises(ModelLoadError, match="CUDA"):
        ModelPairManager(load_in_8bit=True).load_model_pair(*tiny_pair_dirs)
    with pytest.raises(ModelLoadError, match="pick one"):
        ModelPairManager(load_in_8bit=True, load_in_4bit=True)


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    from soft_prompting.pair.loading import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(ModelLoadError, match="float16"):
        resolve_dtype("bfloat16", "cuda")


def test_trust_remote_code_is_off_by_default():
    from soft_prompting.config import ModelPairConfig

    assert ModelPairManager().trust_remote_code is False
    assert ModelPairConfig(model_1_name="a", model_2_name="b").trust_remote_code is False


# ---------------------------------------------------------------- config on the command line
@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("training.num_soft_prompt_tokens=0", "num_soft_prompt_tokens"),
        # A choice outside its Enum is refused while Hydra composes the config, naming the values.
        ("training.divergence=kullback", "expected one of [kl, reverse_kl, js]"),
        # A strategy's bad setting is refused before training, not at the dataset stage after it.
        (
            "generation.strategies=[{_target_: soft_prompting.hard_prompts.strategies."
            "SoftPromptExploration, max_new_tokens: 0}]",
            "cannot be built: max_new_tokens=0: must be a whole number >= 1",
        ),
    ],
)
def test_out_of_range_values_on_the_command_line(tmp_path, override, fragment):
    result = run_train([override, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert_user_error(result, fragment)
    assert result.returncode == 2  # at compose time too, before any model loads
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained first


def test_typo_on_the_command_line_names_the_key(tmp_path):
    result = run_train(["training.lerning_rate=0.1", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert_user_error(result, "lerning_rate")


def test_debug_flag_shows_the_traceback(tmp_path):
    result = run_train(
        ["training.num_soft_prompt_tokens=0", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
        env={"SOFT_PROMPTING_DEBUG": "1"},
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr


# ---------------------------------------------------------------- category files
def test_category_file_problems_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        read_category_file(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_category_file(tmp_path / "latin1.txt")
    (tmp_path / "notext.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match='notext.jsonl:2 has no string "text"'):
        read_category_file(tmp_path / "notext.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl:1 is not valid JSON"):
        read_category_file(tmp_path / "broken.jsonl")


def test_missing_category_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no .txt or .jsonl"):
        load_text_dir(tmp_path, None)
    (tmp_path / "persona.txt").write_text("hello there\nhow are you\n")
    with pytest.raises(DataError, match="ethics"):
        load_text_dir(tmp_path, ["persona", "ethics"])
    with pytest.raises(DataError, match="not a folder"):
        load_text_dir(tmp_path / "nope", None)


def test_bad_category_file_on_the_command_line(tmp_path, tiny_pair_dirs):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "ok.txt").write_text("the cat sat\nthe dog sat\n")
    (texts / "empty.txt").write_text("")
    result = run_train(
        [
            f"model_pair.model_1_name={tiny_pair_dirs[0]}",
            f"model_pair.model_2_name={tiny_pair_dirs[1]}",
            f"data.text_dir={texts}",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
    )
    assert_user_error(result, "empty.txt holds no text")


def test_long_texts_are_truncated_with_one_warning(tiny_pair_dirs, caplog):
    from soft_prompting.data.datamodule import CategoryTextDataModule

    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=2)
    datamodule = CategoryTextDataModule(module.tokenizer, max_length=4, batch_size=2)
    datamodule.load_categories = lambda: {"a": ["the cat sat on the mat"] + ["the dog"] * 1 + ["a"]}
    with caplog.at_level("WARNING"):
        datamodule.setup()
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 4


def test_max_length_is_fitted_to_the_models_context():
    from soft_prompting.training.pipeline import fit_to_context

    assert fit_to_context(64, 120) == 64
    assert fit_to_context(500, 120) == 120
    assert fit_to_context(64, None) == 64


# ---------------------------------------------------------------- numerics and checkpoints
def test_nan_divergence_stops_with_the_batch_named_and_the_checkpoint_kept(
    tiny_pair_dirs, tmp_path
):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from soft_prompting.data.datamodule import CategoryTextDataModule

    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=2)
    datamodule = CategoryTextDataModule(module.tokenizer, batch_size=2)
    datamodule.load_categories = lambda: {"a": [f"the cat sat {w}" for w in "abcdefghij"]}
    original = module.divergence

    def poisoned(*args, **kwargs):
        value = original(*args, **kwargs)
        return value * float("nan") if module.trainer.global_step >= 3 else value

    module.divergence = poisoned
    trainer = pl.Trainer(
        max_steps=10,
        logger=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1)
        ],
    )
    with pytest.raises(DivergenceError, match="training batch 3"):
        trainer.fit(module, datamodule=datamodule)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    assert torch.isfinite(saved["state_dict"]["soft_prompt"]).all()


def test_checkpoint_of_another_pair_is_refused(tiny_pair_dirs, tmp_path):
    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=2)
    checkpoint = {"state_dict": {"soft_prompt": torch.zeros(3, 64)}}
    with pytest.raises(
        ModelLoadError, match="another model pair, prompt length or number of prompts"
    ):
        module.on_load_checkpoint(checkpoint)


# ---------------------------------------------------------------- safe files
class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/soft_prompting_pwned",))


def test_a_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "divergent_dataset.pt"
    path.write_bytes(pickle.dumps([{"prompt": Exploit()}]))
    with pytest.raises(DataError, match="refusing to unpickle"):
        read_records(path)
    assert not Path("/tmp/soft_prompting_pwned").exists()


def test_records_round_trip_and_torn_last_line(tmp_path):
    records = [{"prompt": "a", "metrics": {"kl_divergence": 1.0}}]
    write_jsonl(tmp_path / "r.jsonl", records)
    assert read_records(tmp_path / "r.jsonl") == records
    with (tmp_path / "r.jsonl").open("a") as handle:
        handle.write('{"prompt": "tor')
    assert read_records(tmp_path / "r.jsonl") == records


# ---------------------------------------------------------------- killed runs resume
def resumable_args(tiny_pair_dirs, text_dir, run_dir: Path) -> list[str]:
    return [
        *contract_args(tiny_pair_dirs, text_dir, run_dir),
        "training.max_steps=14",
        "training.batch_size=4",
        "training.checkpoint_every_n_steps=2",
        "write_dataset=false",
    ]


@pytest.mark.slow
def test_sigkilled_training_resumes_to_the_same_prompt(tiny_pair_dirs, text_dir, tmp_path):
    straight = tmp_path / "straight"
    assert (
        run_train(resumable_args(tiny_pair_dirs, text_dir, straight), cwd=tmp_path).returncode == 0
    )

    killed = tmp_path / "killed"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "soft_prompting.train",
            *resumable_args(tiny_pair_dirs, text_dir, killed),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if last.exists() and torch.load(last, weights_only=True)["global_step"] >= 4:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    step_at_kill = torch.load(last, weights_only=True)["global_step"]
    assert step_at_kill < 14

    resumed = run_train(
        [*resumable_args(tiny_pair_dirs, text_dir, killed), "ckpt_path=last"], cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final_straight = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    final_resumed = torch.load(last, weights_only=True)
    assert final_resumed["global_step"] == final_straight["global_step"] == 14
    torch.testing.assert_close(
        final_resumed["state_dict"]["soft_prompt"],
        final_straight["state_dict"]["soft_prompt"],
        atol=1e-6,
        rtol=1e-5,
    )


def test_same_seed_and_config_give_an_identical_dataset(tiny_pair_dirs, text_dir, tmp_path):
    """One run in a process of its own, one in this process: nothing may hang on the process
    (its string hash seed, what ran in it before)."""
    outputs = []
    for name, run in (("first", run_train_in_a_process), ("second", run_train)):
        run_dir = tmp_path / name
        args = contract_args(tiny_pair_dirs, text_dir, run_dir) + [
            "training.max_steps=3",
            "generation.num_prompts=6",
            "generation.max_length=6",
            SMALL_STRATEGIES,
        ]
        result = run(args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        records = [json.loads(x) for x in (run_dir / "divergent_dataset.jsonl").open()]
        for record in records:
            record.pop("provenance")
        outputs.append(records)
    assert outputs[0] == outputs[1]


def test_wandb_key_is_never_written(tiny_pair_dirs, text_dir, tmp_path):
    secret = "0123456789abcdef0123456789abcdef01234567"
    run_dir = tmp_path / "run"
    args = contract_args(tiny_pair_dirs, text_dir, run_dir) + [
        "training.max_steps=2",
        "generation.num_prompts=2",
        "generation.max_length=4",
        SMALL_STRATEGIES,
        "wandb.enabled=true",
        "wandb.mode=offline",
    ]
    result = run_train(args, cwd=tmp_path, env={"WANDB_API_KEY": secret, "WANDB_MODE": None})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / "wandb").is_dir(), "W&B did not log offline into the run directory"
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"the key leaked into {path}"
    assert secret not in result.stdout + result.stderr
