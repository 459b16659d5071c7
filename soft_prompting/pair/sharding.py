"""Placing a frozen pair that does not fit one GPU: FSDP across ranks, or a layer split in one process.

Both place the models the same way. The decoder layers — nearly all of the weights — are spread
out; the input embeddings, the final norm and the output head stay whole on the soft prompt's
device, because the module uses them directly, outside the models' own forward: it prepends the
prompt to the embedding output, and compares the two heads' logits a chunk of positions at a time.

* :func:`shard_pair` (``training.strategy=fsdp``): FSDP2 ``fully_shard`` on every decoder layer of
  both models over all ranks. Each rank keeps ``1/world`` of every layer and all-gathers a layer just
  before it runs (and again in backward); the frozen weights get no gradients, so nothing is
  reduce-scattered. The soft prompt stays an ordinary replicated tensor whose gradient the module
  all-reduces itself.
* :func:`layer_device_map` (``model_pair.device_map=split``): the same layers spread over the GPUs of
  one process with accelerate's dispatch; one GPU computes at a time.
"""

from __future__ import annotations

import logging

import torch

from soft_prompting.errors import ConfigError

log = logging.getLogger(__name__)


def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of each repeated transformer block, in order.

    The blocks are the classes a Hugging Face model lists in ``_no_split_modules`` (the unit that
    accelerate and FSDP auto-wrapping also use).
    """
    classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [(name, m) for name, m in model.named_modules() if type(m).__name__ in classes]
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} names no decoder-layer class in _no_split_modules, so its "
            "layers cannot be sharded or split: use training.strategy=ddp, 8/4-bit loading, or "
            "load the models with your own device_map through the Python API"
        )
    return layers


def is_sharded(model: torch.nn.Module) -> bool:
    """True once :func:`shard_pair` has sharded ``model``'s layers."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_pair(models: tuple[torch.nn.Module, ...], device: torch.device) -> None:
    """Shard every decoder layer of ``models`` over all ranks; put everything else on ``device``.

    Needs an initialised process group (Lightning's strategy sets it up). Safe to call again: a
    model already sharded is left alone, so repeated ``trainer.fit``/``validate`` calls are fine.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    models = [model for model in models if not is_sharded(model)]
    mesh = init_device_mesh(device.type, (dist.get_world_size(),)) if models else None
    for model in models:
        layers = decoder_layers(model)
        in_layers = {id(t) for _, layer in layers for t in (*layer.parameters(), *layer.buffers())}
        # The rest first, tensor by tensor: model.to(device) would also copy the unsharded layers
        # whole onto one GPU, which is what sharding is there to avoid.
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if id(param) not in in_layers:
                    param.data = param.data.to(device)  # in place: tied weights stay tied
            for name, buffer in module.named_buffers(recurse=False):
                if id(buffer) not in in_layers:
                    module._buffers[name] = buffer.to(device)
        for _, layer in layers:
            # fully_shard keeps this rank's slice of each weight and moves it to the mesh's device.
            fully_shard(layer, mesh=mesh)
        local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
        log.info(
            "rank %d holds %d of %s's %d frozen parameters (%d decoder layers sharded over %d ranks)",
            dist.get_rank(),
            sum(t.numel() for t in local),
            type(model).__name__,
            sum(p.numel() for p in model.parameters()),
            len(layers),
            dist.get_world_size(),
        )


def layer_device_map(
    model_path: str, gpus: list, trust_remote_code: bool = False, revision: str | None = None
) -> dict:
    """A ``device_map`` that spreads ``model_path``'s decoder layers over ``gpus``, in order.

    Everything outside the layers (embeddings, final norm, rotary tables, head) goes on ``gpus[0]``,
    the soft prompt's device, which therefore gets fewer layers: each GPU ends up with about the
    same number of parameters. The map is built from the model's config alone (no weights read).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        model_path, revision=revision, trust_remote_code=trust_remote_code
    )
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    layers = decoder_layers(skeleton)
    names = [name for name, _ in layers]
    sizes = [sum(p.numel() for p in layer.parameters()) for _, layer in layers]
    rest = sum(p.numel() for p in skeleton.parameters()) - sum(sizes)  # tied weights count once
    share = (rest + sum(sizes)) / len(gpus)
    placement, load = {}, rest
    for name, size in zip(names, sizes, strict=True):
        # A layer goes where the middle of its parameters falls when they are laid end to end.
        placement[name] = gpus[min(int((load + size / 2) // share), len(gpus) - 1)]
        load += size
    for name, module in skeleton.named_modules():
        holds_layers = name == "" or any(n.startswith(name + ".") for n in names)
        if holds_layers:  # a container of layers: only its own tensors go on gpus[0]
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            placement |= {f"{name}.{t}".lstrip("."): gpus[0] for t, _ in own}
        elif name not in placement and not any(name.startswith(p + ".") for p in placement):
            placement[name] = gpus[0]  # embeddings, final norm, rotary tables, head: whole
    return placement
