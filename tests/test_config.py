"""Every config composes; typos, wrong types and out-of-range values fail early, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from soft_prompting.config import TrainConfig, register_configs, to_train_config

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_module(config_module="soft_prompting.conf", version_base=None):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize(
    "override",
    [f"model_pair={name}" for name in group_options("model_pair") if name != "custom"]
    + [f"training={name}" for name in group_options("training")]
    + [f"generation={name}" for name in group_options("generation")]
    + [f"data={name}" for name in group_options("data")]
    + [f"experiment={name}" for name in group_options("experiment")],
)
def test_every_config_composes_and_validates(override):
    config = to_train_config(compose_train([override]))
    assert isinstance(config, TrainConfig)
    assert config.model_pair.model_1_name and config.model_pair.model_2_name


def test_default_is_the_offline_toy_pair():
    config = to_train_config(compose_train([]))
    assert config.model_pair.model_1_name.startswith("organism:")
    assert config.model_pair.model_2_name.startswith("organism:")


def test_contract_overrides_compose():
    config = to_train_config(
        compose_train(
            [
                "model_pair.model_1_name=/models/a",
                "model_pair.model_2_name=org/b",
                "data.text_dir=/data/texts",
            ]
        )
    )
    assert (config.model_pair.model_1_name, config.model_pair.model_2_name) == (
        "/models/a",
        "org/b",
    )
    assert config.data.text_dir == "/data/texts"


def test_custom_pair_requires_both_names():
    with pytest.raises(ValueError, match="model_pair.model_1_name"):
        to_train_config(compose_train(["model_pair=custom"]))


def test_typo_on_the_command_line_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["training.lerning_rate=0.1"])
    assert "lerning_rate" in str(err.value.__cause__ or err.value)


def test_wrong_type_on_the_command_line_fails():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["training.batch_size=many"])
    assert "batch_size" in str(err.value.__cause__ or err.value)


def test_typo_in_a_yaml_file_names_the_key(tmp_path):
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "typo.yaml").write_text("num_soft_prompt_tokenz: 4\n")
    with initialize_config_module(config_module="soft_prompting.conf", version_base=None):
        with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
            compose(
                "train",
                overrides=[f"hydra.searchpath=[file://{tmp_path}]", "training=typo"],
            )
    assert "num_soft_prompt_tokenz" in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.num_soft_prompt_tokens=0", "num_soft_prompt_tokens"),
        ("training.batch_size=0", "batch_size"),
        ("training.learning_rate=-1", "learning_rate"),
        ("training.divergence=kullback", "divergence"),
        ("generation.temperature=-0.5", "temperature"),
        ("generation.top_p=1.5", "top_p"),
        ("data.val_fraction=1.0", "val_fraction"),
        ("model_pair.torch_dtype=float8", "torch_dtype"),
        ("model_pair.device_map=auto", "device_map"),
        ("training.num_nodes=0", "num_nodes"),
        ("training.strategy=fsdp_cpu_offload", "use training.strategy=fsdp"),
        ("training.strategy=fsdp model_pair.load_in_4bit=true", "drop model_pair.device_map"),
    ],
)
def test_out_of_range_values_are_explained(override, message):
    with pytest.raises(ValueError, match=message):
        to_train_config(compose_train(override.split()))
