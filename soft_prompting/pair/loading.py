"""Loading the frozen model pair: hub ids, local ``save_pretrained`` folders, or the project's own
``organism:NAME`` toy models.

:class:`ModelPairManager` returns ``(model_1, model_2, tokenizer)`` with both models frozen and in eval
mode, checks that the two are comparable (same vocabulary, same hidden size) and caches loaded pairs,
so a notebook or a sweep that asks twice loads once.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from soft_prompting.errors import ModelLoadError
from soft_prompting.organisms import builder as organisms
from soft_prompting.pair.placement import cuda_has_bf16, resolve_device
from soft_prompting.pair.sharding import layer_device_map

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelPair:
    """Two frozen causal LMs that share a tokenizer."""

    model_1: PreTrainedModel
    model_2: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def vocab_size(self) -> int:
        """Real vocabulary size; logits beyond it (embedding padding) are sliced off."""
        return len(self.tokenizer)

    @property
    def hidden_size(self) -> int:
        return self.model_1.get_input_embeddings().weight.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.model_1.get_input_embeddings().weight.device

    @property
    def is_placed(self) -> bool:
        """Quantised, or dispatched over several devices: the models stay where they were put."""
        model = self.model_1
        return bool(getattr(model, "is_quantized", False)) or hasattr(model, "hf_device_map")

    def to(self, device: torch.device | str) -> ModelPair:
        """Move both models (not models loaded with a device_map, which stay where they were put)."""
        if not self.is_placed:
            self.model_1.to(device)
            self.model_2.to(device)
        return self

    def __iter__(self):
        return iter((self.model_1, self.model_2, self.tokenizer))


def resolve_dtype(name: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU that computes it in hardware and float32 elsewhere (the CPU
    included: there ``training.mixed_precision`` decides whether the forward runs in bf16)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and cuda_has_bf16(device) else torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"torch_dtype={name!r}: use auto, {', '.join(_DTYPES)}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "bfloat16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(
            "torch_dtype=bfloat16 but this GPU has no bfloat16 support: use "
            "model_pair.torch_dtype=float16 (or float32)"
        )
    return _DTYPES[name]


def resolve_model_path(name: str) -> str:
    """Turn ``organism:NAME`` into its built folder; check that a local path exists.

    A hub id that is not in the local cache is probed with a short connection attempt, so an
    unreachable hub is a one-line error instead of a minute of retries.
    """
    if organisms.is_organism(name):
        return str(organisms.organism_path(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{name!r} is a folder without config.json: pass a folder written by "
                "save_pretrained (model and tokenizer), or a hub id"
            )
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path {name!r} does not exist: check the path")
    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return name
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelLoadError(
            f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            "download it on a connected machine, or pass a local save_pretrained folder"
        )
    if not _hub_reachable():
        raise ModelLoadError(
            f"model {name!r} is neither a local folder nor cached, and the Hugging Face hub cannot "
            "be reached: download it where there is network (huggingface-cli download "
            f"{name}) or pass a local save_pretrained folder"
        )
    return name


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_compatible(pair: ModelPair, tokenizer_2: PreTrainedTokenizerBase) -> None:
    """Raise :class:`ModelLoadError` naming the first difference that makes the pair incomparable."""
    vocab_1, vocab_2 = pair.tokenizer.get_vocab(), tokenizer_2.get_vocab()
    if len(vocab_1) != len(vocab_2):
        raise ModelLoadError(
            f"the two tokenizers differ: vocabulary sizes {len(vocab_1)} vs {len(vocab_2)}; "
            "soft prompting compares next-token distributions, so both models need the same tokenizer"
        )
    for token, index in sorted(vocab_1.items(), key=lambda item: item[1]):
        if vocab_2.get(token) != index:
            raise ModelLoadError(
                f"the two tokenizers differ: token {token!r} has id {index} in model_1 and "
                f"{vocab_2.get(token)} in model_2; both models need the same tokenizer"
            )
    differing = [
        f"{name} {getattr(pair.tokenizer, name)!r} vs {getattr(tokenizer_2, name)!r}"
        for name in _SPECIAL_TOKENS
        if getattr(pair.tokenizer, name) != getattr(tokenizer_2, name)
    ]
    if differing:
        log.warning(
            "the two tokenizers share a vocabulary but not their special tokens (%s); model_1's "
            "are used for both, so model_2 may stop or pad differently from how it was trained",
            "; ".join(differing),
        )
    hidden_1 = pair.model_1.get_input_embeddings().weight.shape[-1]
    hidden_2 = pair.model_2.get_input_embeddings().weight.shape[-1]
    if hidden_1 != hidden_2:
        raise ModelLoadError(
            f"hidden sizes differ: {hidden_1} (model_1) vs {hidden_2} (model_2); one soft prompt "
            "is prepended to both, so they need the same embedding width"
        )
    for which, model in (("model_1", pair.model_1), ("model_2", pair.model_2)):
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < len(vocab_1):
            raise ModelLoadError(
                f"{which} predicts {rows} tokens but the tokenizer has {len(vocab_1)}: "
                "tokenizer and model do not belong together"
            )


class ModelPairManager:
    """Loads and caches frozen model pairs.

    Args:
        device: where the models live: ``auto`` (the best device here, see
            :func:`~soft_prompting.pair.placement.resolve_device`), ``cpu``, ``cuda``, ``cuda:1``;
            quantised models go on a CUDA device, which bitsandbytes places them on.
        torch_dtype: ``auto``, a dtype name, or a ``torch.dtype``.
        load_in_8bit: quantise both models to 8 bits (bitsandbytes, CUDA).
        load_in_4bit: quantise both models to 4 bits, NF4 (bitsandbytes, CUDA).
        trust_remote_code: run modelling code shipped with hub repositories.
        device_map: ``split`` spreads each model's decoder layers over all visible GPUs, the rest
            on ``cuda:0`` (see :func:`~soft_prompting.pair.sharding.layer_device_map`); None keeps each
            model whole on ``device``.
    """

    _cache: dict[tuple, ModelPair] = {}

    def __init__(
        self,
        device: str | torch.device = "auto",
        torch_dtype: str | torch.dtype = "auto",
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        trust_remote_code: bool = False,
        device_map: str | None = None,
    ) -> None:
        if load_in_8bit and load_in_4bit:
            raise ModelLoadError("load_in_8bit and load_in_4bit are both set: pick one")
        if device_map not in (None, "split"):
            raise ModelLoadError(
                f"device_map={device_map!r}: use 'split' (layers over all visible GPUs) or None; "
                "for any other placement load the models yourself and pass them to "
                "DivergenceTrainer"
            )
        if device_map and not torch.cuda.is_available():
            raise ModelLoadError(
                "device_map='split' spreads the models over GPUs and none is visible: drop "
                "model_pair.device_map or run on a GPU machine"
            )
        if device_map:
            device = "cuda:0"  # where the split puts embeddings and heads, so the soft prompt too
        elif device in ("auto", "gpu"):
            # Quantised on a machine without CUDA: "cpu", and _quantization_config says why not.
            device = resolve_device(device)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ModelLoadError(f"device={device!r}: use cpu, cuda or cuda:N ({err})") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(
                f"device={device!r} but CUDA is not available on this machine: use device='cpu'"
            )
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device={device!r} but this machine has {torch.cuda.device_count()} GPU(s): use "
                "cuda:0 … or check CUDA_VISIBLE_DEVICES"
            )
        self.torch_dtype = resolve_dtype(torch_dtype, self.device)
        self.load_in_8bit = load_in_8bit
        self.load_in_4bit = load_in_4bit
        self.trust_remote_code = trust_remote_code
        self.device_map = device_map

    def load_model_pair(
        self,
        model_1_name: str,
        model_2_name: str,
        revision_1: str | None = None,
        revision_2: str | None = None,
    ) -> ModelPair:
        """Load (or fetch from the cache) two frozen models and model_1's tokenizer.

        Returns:
            A :class:`ModelPair`, which also unpacks as ``model_1, model_2, tokenizer``.
        """
        key = (
            model_1_name,
            model_2_name,
            revision_1,
            revision_2,
            str(self.device),
            self.torch_dtype,
            self.load_in_8bit,
            self.load_in_4bit,
            self.device_map,
        )
        if key not in self._cache:
            self._cache[key] = self._load(model_1_name, model_2_name, revision_1, revision_2)
        return self._cache[key]

    @classmethod
    def clear_cache(cls) -> int:
        """Forget every loaded pair, so their memory can be freed (between sweep jobs).

        Returns how many of the forgotten models are still alive (referenced elsewhere)."""
        refs = [
            weakref.ref(model)
            for pair in cls._cache.values()
            for model in (pair.model_1, pair.model_2)
        ]
        cls._cache.clear()
        gc.collect()  # a finished Lightning trainer and its module hold the pair through cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return sum(ref() is not None for ref in refs)

    def _load(self, name_1: str, name_2: str, rev_1: str | None, rev_2: str | None) -> ModelPair:
        path_1, path_2 = resolve_model_path(name_1), resolve_model_path(name_2)
        tokenizer = self._load_tokenizer(path_1, rev_1)
        tokenizer_2 = self._load_tokenizer(path_2, rev_2)
        model_1 = self._load_model(path_1, rev_1)
        model_2 = self._load_model(path_2, rev_2)
        pair = ModelPair(model_1, model_2, tokenizer)
        check_compatible(pair, tokenizer_2)
        return pair

    def _load_tokenizer(self, path: str, revision: str | None) -> PreTrainedTokenizerBase:
        folder = Path(path)
        if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelLoadError(
                f"{path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): save it there "
                "with tokenizer.save_pretrained(FOLDER), or copy the base model's tokenizer files"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                path, revision=revision, trust_remote_code=self.trust_remote_code
            )
        except (OSError, ValueError, TypeError, KeyError) as err:
            reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise ModelLoadError(
                f"cannot load the tokenizer of {path}: {reason}; check its tokenizer files "
                "(tokenizer.json, tokenizer_config.json) or save it again with save_pretrained"
            ) from None
        if tokenizer.pad_token is None:
            # Padding is always masked out, so any id works; eos is the conventional stand-in.
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ModelLoadError(f"tokenizer of {path!r} has no pad, eos or unk token to pad with")
        tokenizer.padding_side = "left"
        return tokenizer

    def _load_model(self, path: str, revision: str | None) -> PreTrainedModel:
        kwargs: dict = {
            "revision": revision,
            "trust_remote_code": self.trust_remote_code,
            "dtype": self.torch_dtype,
        }
        if self.load_in_8bit or self.load_in_4bit:
            kwargs["quantization_config"] = self._quantization_config()
            kwargs["device_map"] = {"": self.device.index or 0}
        if self.device_map == "split":
            gpus = list(range(torch.cuda.device_count()))
            kwargs["device_map"] = layer_device_map(path, gpus, self.trust_remote_code, revision)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if "device_map" not in kwargs:
            model.to(self.device)
        model.requires_grad_(False)
        model.eval()
        return model

    def _quantization_config(self):
        if not torch.cuda.is_available() or self.device.type != "cuda":
            raise ModelLoadError(
                "8-bit/4-bit loading needs bitsandbytes on a CUDA device; this run is on "
                f"{self.device}: drop model_pair.load_in_8bit/load_in_4bit or run on a GPU"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ModelLoadError(
                "8-bit/4-bit loading needs bitsandbytes: pip install 'soft-prompting[quantization]'"
            ) from err
        from transformers import BitsAndBytesConfig

        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
