"""The documented Python API (the seed README's "Basic Usage") on a tiny random pair."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import SMALL_STRATEGY_LIST
from torch.utils.data import DataLoader

from soft_prompting.config import TrainConfig, load_train_config, to_overrides
from soft_prompting.errors import ConfigError, DataError
from soft_prompting.training.module import DivergenceModule

TEXTS = [
    f"the {animal} sat on the mat and {word}"
    for animal in ("cat", "dog")
    for word in ("one", "two", "three", "four", "five", "six")
]
SEED_YAML = """\
name: "tiny_detection"
output_dir: "{output_dir}"
model_1_name: "{model_1}"
model_2_name: "{model_2}"

training:
  num_soft_prompt_tokens: 4
  learning_rate: 5e-2
  batch_size: 4
  num_epochs: 1
  mixed_precision: false
  gradient_checkpointing: false

generation:
  max_length: 6
  num_generations_per_prompt: 2
  temperature: 0.7
  top_p: 1.0

data:
  categories: ["persona", "ethics", "capabilities"]
  max_texts_per_category: 1000
"""


@pytest.fixture
def seed_yaml(tiny_pair_dirs, tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text(
        SEED_YAML.format(
            output_dir=tmp_path / "run", model_1=tiny_pair_dirs[0], model_2=tiny_pair_dirs[1]
        )
    )
    return path


def quiet():
    return {"enable_progress_bar": False, "logger": False}


def test_import_is_lazy_and_pulls_no_optional_extra():
    code = textwrap.dedent(
        """
        import sys
        import soft_prompting
        assert "torch" not in sys.modules, "import soft_prompting must stay cheap"
        from soft_prompting import DivergenceTrainer, ModelPairManager
        optional = ["wandb", "umap", "sklearn", "optuna", "bitsandbytes", "submitit", "hdbscan",
                    "numba", "datasets", "nbclient"]
        print(sorted(name for name in optional if name in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_documented_snippet_works_as_written(seed_yaml, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(seed_yaml)
    name_1, name_2 = (
        load_train_config(config).model_pair.model_1_name,
        load_train_config(config).model_pair.model_2_name,
    )
    train_dataloader = DataLoader(TEXTS, batch_size=4, shuffle=True)
    # --- the seed README, verbatim but for the names and the device ---
    from soft_prompting import DivergenceTrainer, ModelPairManager

    model_manager = ModelPairManager(device="cpu", load_in_8bit=False)
    model_1, model_2, tokenizer = model_manager.load_model_pair(name_1, name_2)
    trainer = DivergenceTrainer(
        model_1=model_1, model_2=model_2, tokenizer=tokenizer, config=config
    )
    before = trainer.soft_prompt.clone()
    trainer.train(train_dataloader)
    dataset = trainer.generate_divergent_dataset(output_file="divergent_dataset.pt")
    # ---
    assert trainer.lightning_trainer.global_step == 3  # 12 texts, batch 4, one epoch
    assert not torch.equal(before, trainer.soft_prompt)
    assert trainer.output_dir == tmp_path / "run"  # the YAML's output_dir
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "soft_prompt" / "adapter_model.safetensors").is_file()
    strategies = {
        "category_text",
        "soft_prompt_exploration",
        "contrastive_exploration",
        "projection_search",
        "white_box_prior",
    }
    assert dataset and {record["source"] for record in dataset} <= strategies
    kl = [record["metrics"]["kl_divergence"] for record in dataset]
    assert kl == sorted(kl, reverse=True)
    assert set(dataset[0]) >= {"prompt", "generation_1", "generation_2", "metrics"}
    assert set(dataset[0]["metrics"]) >= {
        "kl_divergence",
        "token_disagreement_rate",
        "vocab_jaccard_similarity",
        "disagreement_positions",
    }
    assert torch.load(tmp_path / "divergent_dataset.pt", weights_only=True) == dataset
    lines = (tmp_path / "divergent_dataset.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == [r["prompt"] for r in dataset]
    assert dataset[0]["provenance"]["soft_prompt_checkpoint"].endswith("last.ckpt")


def test_the_checkpoint_rebuilds_the_pair_from_the_loaded_models_names(tiny_pair_dirs, tmp_path):
    from soft_prompting import DivergenceTrainer, ModelPairManager

    model_1, model_2, tokenizer = ModelPairManager().load_model_pair(*tiny_pair_dirs)
    config = {"training": {"num_soft_prompt_tokens": 3, "max_steps": 2, "batch_size": 4}}
    trainer = DivergenceTrainer(
        model_1, model_2, tokenizer, config=config, output_dir=tmp_path, **quiet()
    )
    assert trainer.config.model_pair.model_1_name == tiny_pair_dirs[0]
    trainer.train(DataLoader(TEXTS, batch_size=4))
    reloaded = DivergenceModule.load_from_checkpoint(trainer.checkpoint_path)
    torch.testing.assert_close(reloaded.soft_prompt.detach(), trainer.soft_prompt)


def test_every_config_form_gives_the_same_training_config(seed_yaml, tiny_pair_dirs):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from soft_prompting.config import experiment_to_dict, register_configs

    from_yaml = load_train_config(seed_yaml)
    raw = OmegaConf.to_container(OmegaConf.load(seed_yaml))
    assert load_train_config(raw) == from_yaml
    assert load_train_config(from_yaml) == from_yaml
    register_configs()
    with initialize_config_module(config_module="soft_prompting.conf", version_base=None):
        composed = compose(
            "train", overrides=["model_pair=custom", *to_overrides(experiment_to_dict(raw))]
        )
    from_hydra = load_train_config(composed)
    assert from_hydra.model_pair.description == "user-supplied pair"  # from model_pair=custom
    from_hydra.model_pair.description = from_yaml.model_pair.description
    assert from_hydra == from_yaml
    assert from_yaml.model_pair.model_1_name == tiny_pair_dirs[0]
    assert from_yaml.training.learning_rate == pytest.approx(0.05)
    assert from_yaml.data.categories == ["persona", "ethics", "capabilities"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_1_name": "a", "model_2_name": "b", "trainig": {}}, "trainig"),
        ({"model_1_name": "a", "model_2_name": "b", "training": {"batch_size": "x"}}, "batch_size"),
        ({"model_1_name": "a"}, "model_pair.model_2_name"),
        ({"model_1_name": "a", "model_2_name": "b", "training": {"num_epochs": 0}}, "num_epochs"),
    ],
)
def test_bad_configs_name_the_key(config, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(config)


def test_a_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")


def test_overrides_keep_strings_strings():
    overrides = to_overrides(
        {"model_pair": {"model_1_name": "organism:base"}, "data": {"categories": ["a", "true"]}}
    )
    assert overrides == ["model_pair.model_1_name='organism:base'", "data.categories=['a','true']"]


@pytest.fixture(scope="module")
def api_trainer(tiny_pair_dirs, tmp_path_factory):
    from soft_prompting import DivergenceTrainer

    config = {
        "model_1_name": tiny_pair_dirs[0],
        "model_2_name": tiny_pair_dirs[1],
        "training": {"num_soft_prompt_tokens": 2, "max_steps": 2, "batch_size": 4},
        "data": {"max_texts_per_category": 12},
        "generation": {
            "num_prompts": 4,
            "num_generations_per_prompt": 1,
            "max_length": 4,
            "strategies": SMALL_STRATEGY_LIST,
        },
    }
    return DivergenceTrainer(config=config, output_dir=tmp_path_factory.mktemp("api"), **quiet())


def test_raw_texts_and_right_padded_tokenized_batches_give_the_same_loss(api_trainer):
    from soft_prompting.training.facade import TokenizedBatches

    tokenizer = api_trainer.tokenizer
    batches = TokenizedBatches([], tokenizer, max_length=64)
    texts = ["the cat sat on the mat and the dog sat", "what is one plus two"]
    from_texts = batches.convert(texts)
    tokenizer.padding_side = "right"
    right_padded = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    converted = batches.convert(right_padded)
    assert converted["input_ids"][1, -1] == tokenizer.pad_token_id  # really right padded
    module = api_trainer.module
    torch.testing.assert_close(
        module.divergence(**from_texts), module.divergence(**converted), atol=1e-5, rtol=1e-5
    )
    assert batches.seen_texts == texts


def test_trains_on_tokenized_batches_and_on_the_projects_datamodule(api_trainer):
    tokenizer = api_trainer.tokenizer
    tokenizer.padding_side = "left"
    tokenized = [
        dict(tokenizer(TEXTS[i : i + 4], padding=True, return_tensors="pt")) for i in (0, 4)
    ]
    metrics = api_trainer.train(tokenized)
    assert api_trainer.lightning_trainer.global_step == 2
    assert metrics["train/divergence"] > 0

    datamodule = api_trainer.datamodule
    datamodule.setup("fit")
    api_trainer.train(datamodule.train_dataloader(), datamodule.val_dataloader())
    assert api_trainer.lightning_trainer.global_step == 2
    metrics = api_trainer.train(datamodule)
    assert {"val/divergence", "val/divergence_no_prompt"} <= set(metrics)


def test_dataset_from_the_config_categories_without_a_user_loader(api_trainer, tmp_path):
    api_trainer._user_texts = {}
    records = api_trainer.generate_divergent_dataset(output_file=tmp_path / "ds.jsonl")
    # The strategies of config.generation propose the candidates, as in `soft_prompting.train`.
    sources = {
        "category_text",
        "soft_prompt_exploration",
        "contrastive_exploration",
        "projection_search",
        "white_box_prior",
    }
    assert len(records) == 4 and {r["source"] for r in records} <= sources
    assert (tmp_path / "ds.jsonl").is_file() and (tmp_path / "ds.pt").is_file()
    given = api_trainer.generate_divergent_dataset(
        output_file=tmp_path / "mine.pt", prompts=[("arithmetic", "what is one plus two")]
    )
    assert [(r["category"], r["prompt"]) for r in given] == [("arithmetic", "what is one plus two")]


def test_a_batch_of_the_wrong_kind_is_a_clear_error(api_trainer):
    with pytest.raises(DataError, match="lists of strings"):
        api_trainer.train([[1, 2, 3]])


def test_models_must_come_together(tiny_pair_dirs):
    from soft_prompting import DivergenceTrainer, ModelPairManager

    model_1, _, tokenizer = ModelPairManager().load_model_pair(*tiny_pair_dirs)
    with pytest.raises(ConfigError, match="together"):
        DivergenceTrainer(model_1=model_1, tokenizer=tokenizer, config=TrainConfig())


def test_the_rest_of_the_documented_imports_work():
    import inspect

    from soft_prompting.analysis import BehavioralClusteringAnalyzer, DivergenceAnalyzer
    from soft_prompting.tracking import ExperimentTracker

    for analyzer in (DivergenceAnalyzer, BehavioralClusteringAnalyzer):
        assert inspect.signature(analyzer).parameters["metrics"].default is None
    assert {"config", "use_wandb", "project_name"} <= set(
        inspect.signature(ExperimentTracker).parameters
    )
