"""Placing a pair too large for one GPU: which tensors a layer split puts where.

FSDP training itself runs for real, on two CPU processes, in test_ddp.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from soft_prompting.data.datamodule import ResumableBatchSampler
from soft_prompting.errors import ConfigError, ModelLoadError
from soft_prompting.pair.loading import ModelPair, ModelPairManager
from soft_prompting.pair.sharding import decoder_layers, layer_device_map


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2: other module names than Llama, and a head tied to the input embeddings."""
    folder = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=3, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


def test_layers_spread_over_gpus_and_the_rest_stays_on_the_first(tiny_pair_dirs, gpt2_dir):
    llama = layer_device_map(tiny_pair_dirs[0], [0, 1])
    assert llama == {
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.norm": 0,
        "lm_head": 0,
    }
    gpt2 = layer_device_map(gpt2_dir, [0, 1])
    # GPU 0 holds the embeddings (1,344 parameters here; a layer has 3,280), so it gets fewer layers.
    assert [gpt2[f"transformer.h.{i}"] for i in range(3)] == [0, 1, 1]
    assert {k: v for k, v in gpt2.items() if ".h." not in k} == {
        "transformer.wte": 0,
        "transformer.wpe": 0,
        "transformer.drop": 0,
        "transformer.ln_f": 0,
        "lm_head": 0,
    }


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_the_split_places_every_weight(which, tiny_pair_dirs, gpt2_dir, tmp_path):
    """accelerate refuses a device_map that leaves a weight out. 'cpu' and 'disk' (offload) stand
    in for two GPUs: a real dispatch over two places, with accelerate's hooks moving activations."""
    path = tiny_pair_dirs[0] if which == "llama" else gpt2_dir
    device_map = layer_device_map(path, ["cpu", "disk"])
    assert set(device_map.values()) == {"cpu", "disk"}
    model = AutoModelForCausalLM.from_pretrained(
        path, device_map=device_map, offload_folder=str(tmp_path)
    )
    reference = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    # A dispatched model stays where the map put it; a plain one follows the module.
    assert ModelPair(model, model, None).is_placed
    assert not ModelPair(reference, reference, None).is_placed


def test_a_model_without_layer_classes_cannot_be_sharded():
    with pytest.raises(ConfigError, match="_no_split_modules"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without GPUs")
def test_split_without_a_gpu_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="drop model_pair.device_map"):
        ModelPairManager(device_map="split")


def test_a_batch_smaller_than_the_world_goes_whole_to_every_rank():
    """The module's token-weighted reduction keeps that batch's mean and gradient exact."""
    batches = {
        rank: list(ResumableBatchSampler(5, 4, seed=0, position=lambda n, r=rank: (0, r, 2)))
        for rank in (0, 1)
    }
    first = sorted(batches[0][0] + batches[1][0])
    assert len(batches[0][0]) == len(batches[1][0]) == 2
    assert batches[0][1] == batches[1][1] and len(batches[0][1]) == 1
    assert sorted(first + batches[0][1]) == [0, 1, 2, 3, 4]


def test_a_dispatched_pair_trains_the_prompt_the_whole_pair_does(tiny_pair_dirs, tmp_path):
    """The module on a pair split over two places ('cpu' and 'disk' standing in for GPUs): same
    loss and prompt gradient as on the whole pair, and the pair is never moved."""
    from transformers import AutoTokenizer

    from soft_prompting.training.module import DivergenceModule

    def split(path: str, offload: str) -> torch.nn.Module:
        device_map = layer_device_map(path, ["cpu", "disk"])
        model = AutoModelForCausalLM.from_pretrained(
            path, device_map=device_map, offload_folder=str(tmp_path / offload)
        )
        return model.requires_grad_(False).eval()

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dirs[0])
    pair = ModelPair(split(tiny_pair_dirs[0], "1"), split(tiny_pair_dirs[1], "2"), tokenizer)
    dispatched = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=3, pair=pair)
    whole = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=3)
    tokenizer.padding_side = "left"
    batch = tokenizer(
        ["the cat sat on the mat", "what is one plus two"], return_tensors="pt", padding=True
    )
    results = []
    for module in (whole, dispatched):
        loss = module.divergence(batch["input_ids"], batch["attention_mask"])
        loss.backward()
        results.append((loss.detach(), module.soft_prompt.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
    assert pair.is_placed
