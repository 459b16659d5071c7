"""Every config composes; the schemas own every default (YAML only selects and overrides); typos,
wrong types, choices outside their Enum and out-of-range values fail early, naming the key."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from soft_prompting.config import (
    CompareConfig,
    DataConfig,
    DeviceMap,
    Divergence,
    GenerationConfig,
    ModelPairConfig,
    PromptInit,
    TorchDtype,
    TrainConfig,
    TrainingConfig,
    load_train_config,
    register_configs,
    to_overrides,
    to_train_config,
)
from soft_prompting.errors import ConfigError
from soft_prompting.evaluate import EvaluateConfig  # registers evaluate_schema

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()

ROOT_SCHEMAS = {"train": TrainConfig, "evaluate": EvaluateConfig, "compare": CompareConfig}
GROUPS = ("model_pair", "training", "generation", "data", "experiment", "hparams_search")
GROUP_SCHEMAS = {
    "model_pair": ModelPairConfig,
    "training": TrainingConfig,
    "generation": GenerationConfig,
    "data": DataConfig,
}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_root(root: str, overrides: list[str]):
    with initialize_config_module(config_module="soft_prompting.conf", version_base=None):
        return compose(root, overrides=overrides)


def compose_train(overrides: list[str]):
    return compose_root("train", overrides)


@pytest.mark.parametrize(
    "override",
    [f"model_pair={name}" for name in group_options("model_pair") if name != "custom"]
    + [f"training={name}" for name in group_options("training")]
    + [f"generation={name}" for name in group_options("generation")]
    + [f"data={name}" for name in group_options("data")]
    + [f"experiment={name}" for name in group_options("experiment")]
    + [f"hparams_search={name}" for name in group_options("hparams_search")],
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
        ("generation.temperature=-0.5", "temperature"),
        ("generation.top_p=1.5", "top_p"),
        ("data.val_fraction=1.0", "val_fraction"),
        ("training.num_nodes=0", "num_nodes"),
        ("training.strategy=fsdp_cpu_offload", "use training.strategy=fsdp"),
        ("training.strategy=fsdp model_pair.load_in_4bit=true", "drop model_pair.device_map"),
    ],
)
def test_out_of_range_values_are_explained(override, message):
    with pytest.raises(ValueError, match=message):
        to_train_config(compose_train(override.split()))


# ---------------------------------------------------------------- choices are Enums
@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("training.divergence=kullback", Divergence),
        ("training.init=zeros", PromptInit),
        ("model_pair.torch_dtype=float8", TorchDtype),
        ("model_pair.device_map=auto", DeviceMap),
    ],
)
def test_a_choice_outside_its_enum_fails_at_compose_time_naming_the_allowed_values(
    override, allowed
):
    """Before any model loads: Hydra refuses the value while composing the config."""
    with pytest.raises(ConfigCompositionException) as err:
        compose_train([override])
    message = str(err.value.__cause__)
    assert override.split("=")[0] in message
    assert all(member.value in message for member in allowed), message


def test_the_python_api_refuses_a_bad_choice_the_same_way():
    with pytest.raises(ConfigError, match="training.divergence='kullback': use one of kl, "):
        TrainingConfig(divergence="kullback")
    with pytest.raises(ConfigError, match="expected one of \\[auto, float32"):
        load_train_config(
            {"model_pair": {"model_1_name": "a", "model_2_name": "b", "torch_dtype": "float8"}}
        )
    assert TrainingConfig(divergence="js").divergence is Divergence.js  # plain strings accepted


def test_the_divergence_choices_are_the_maths_divergences():
    from soft_prompting.maths.divergence import DIVERGENCES

    assert sorted(member.value for member in Divergence) == sorted(DIVERGENCES)


def test_choices_reach_the_module_and_its_checkpoint_as_plain_strings():
    """A checkpoint holding an Enum could only be read by unpickling this package's classes."""
    from soft_prompting.maths.divergence import get_divergence, jensen_shannon
    from soft_prompting.training.pipeline import module_args

    config = to_train_config(
        compose_train(
            ["training.divergence=js", "training.init=text", "training.init_text=hello"]
            + ["model_pair.torch_dtype=float32", "model_pair.device_map=split"]
        )
    )
    args = module_args(config)
    expected = {"divergence": "js", "init": "text", "torch_dtype": "float32", "device_map": "split"}
    assert {key: args[key] for key in expected} == expected
    assert all(type(args[key]) is str for key in expected)
    assert f"validation divergence ({config.training.divergence})" == "validation divergence (js)"
    assert get_divergence(args["divergence"]) is jensen_shannon
    assert "training.divergence='js'" in to_overrides(asdict(config))


# ---------------------------------------------------------------- one source of defaults
def flat(node, prefix: str = "") -> dict:
    """Leaves of a nested mapping as ``{"a.b": value}`` (lists are leaves)."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def written(group: str, option: str) -> tuple[dict, dict]:
    """What one option file sets: ``(keys from the root, group selections it overrides)``, the
    options it includes from its own group first (``defaults: [default]``)."""
    path = CONF / group / f"{option}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path))
    keys, selections = {}, {}
    for entry in raw.pop("defaults", None) or []:
        if isinstance(entry, str):
            if entry != "schema":
                included, chosen = written(group, entry)
                keys |= included
                selections |= chosen
        else:
            ((target, choice),) = entry.items()
            other = target.removeprefix("override ").strip("/")
            if not other.startswith("hydra"):
                selections[other] = choice
    prefix = "" if "@package _global_" in path.read_text() else f"{group}."
    keys |= {k: v for k, v in flat(raw, prefix).items() if not k.startswith("hydra.")}
    return keys, selections


def root_written(root: str, overrides: dict[str, str]) -> dict:
    """Every key the files chosen for ``root`` (with ``group=option`` overrides) set, in the
    order Hydra merges them: the groups' presets, then the experiment's own keys."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{root}.yaml"))
    choices = {}
    for entry in raw.pop("defaults"):
        if isinstance(entry, dict):
            ((group, option),) = entry.items()
            choices[group.removeprefix("optional ")] = option
    choices |= overrides
    global_keys = {}
    for group in ("experiment", "hparams_search"):
        if choices.get(group):
            own, selected = written(group, choices[group])
            global_keys |= own
            choices |= selected
    keys = {}
    for group in GROUP_SCHEMAS:
        keys |= written(group, choices[group])[0]
    return keys | global_keys


def schema_defaults(schema) -> dict:
    return flat(OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True))


def composed(root: str, overrides: list[str]) -> dict:
    return flat(OmegaConf.to_container(compose_root(root, overrides), enum_to_str=True))


@pytest.mark.parametrize(
    ("root", "override"),
    [("train", f"{g}={o}") for g in GROUPS for o in group_options(g)]
    + [(root, None) for root in ROOT_SCHEMAS],
)
def test_every_value_no_file_sets_is_the_schemas_default(root, override):
    """A composed config is its schema's defaults plus exactly what its files write: no YAML
    file holds a default of its own, so the command line cannot drift from the Python API."""
    overrides = dict([override.split("=")]) if override else {}
    got = composed(root, [override] if override else [])
    expected = schema_defaults(ROOT_SCHEMAS[root]) | root_written(root, overrides)
    assert got == expected


@pytest.mark.parametrize("group", [*GROUP_SCHEMAS, "experiment"])
def test_presets_only_override(group):
    """The ``default`` option writes nothing; every other option writes only values that differ
    from the schema's (a restated default would silently keep an old value when it changes)."""
    defaults = schema_defaults(TrainConfig)
    for option in group_options(group):
        keys, _ = written(group, option)
        if option == "default":
            assert keys == {}, f"conf/{group}/default.yaml restates {sorted(keys)}"
        restated = {k: v for k, v in keys.items() if defaults.get(k) == v}
        assert not restated, f"conf/{group}/{option}.yaml restates schema defaults {restated}"


@pytest.mark.parametrize("root", list(ROOT_SCHEMAS))
def test_the_root_files_hold_no_values(root):
    raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{root}.yaml"))
    assert set(raw) <= {"defaults", "hydra"}, (
        f"conf/{root}.yaml sets {set(raw) - {'defaults', 'hydra'}}"
    )


def test_the_python_api_and_the_command_line_start_from_the_same_defaults():
    """``DivergenceTrainer(config=dict)`` validates through load_train_config; the CLI composes."""
    cli = to_train_config(compose_train([]))
    api = load_train_config({"model_pair": asdict(cli.model_pair)})
    assert api == cli
    for group in ("training", "generation", "data"):
        assert getattr(cli, group) == GROUP_SCHEMAS[group](), group
