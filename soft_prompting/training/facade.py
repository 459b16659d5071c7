"""The documented Python API: a thin façade over :class:`DivergenceModule` and a Lightning trainer.

    from soft_prompting import DivergenceTrainer, ModelPairManager

    model_1, model_2, tokenizer = ModelPairManager().load_model_pair(name_1, name_2)
    trainer = DivergenceTrainer(model_1=model_1, model_2=model_2, tokenizer=tokenizer,
                                config=config)
    trainer.train(train_dataloader)
    dataset = trainer.generate_divergent_dataset(output_file="divergent_dataset.pt")

Nothing here trains or scores by itself: the soft prompt, its loss and its checkpoint are the
module's; the Lightning trainer, the default data and the dataset writer are the ones
``python -m soft_prompting.train`` uses (:mod:`soft_prompting.training.pipeline`).
This module only adapts what users hold (already loaded models, any config shape, any DataLoader).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from soft_prompting import run_files
from soft_prompting.config import TrainConfig, experiment_to_dict, load_train_config
from soft_prompting.data.datamodule import CategoryTextDataModule
from soft_prompting.errors import ConfigError, DataError
from soft_prompting.pair.loading import ModelPair, check_compatible
from soft_prompting.training import pipeline
from soft_prompting.training.module import DivergenceModule

log = logging.getLogger(__name__)

USER_CATEGORY = "user"
"""Category of the texts that came from the user's own DataLoader."""


class DivergenceTrainer:
    """Trains a soft prompt that makes two frozen models disagree, and writes the divergent dataset.

    Args:
        model_1: reference model, already loaded (e.g. by ``ModelPairManager``). Leave the three
            model arguments out to load the pair named in ``config``.
        model_2: the model compared against ``model_1``.
        tokenizer: the tokenizer both models share.
        config: the seed README's experiment YAML (a path or its dict), a dict or YAML in
            :class:`~soft_prompting.config.TrainConfig`'s layout, a ``TrainConfig``, or the Hydra
            config of ``python -m soft_prompting.train``. Model names it lacks are taken from the
            loaded models (``name_or_path``), so checkpoints can rebuild the pair later.
        output_dir: the run directory (checkpoints, soft prompt, metrics, dataset); default: the
            config's ``output_dir``, else ``outputs/<name>``.
        **trainer_kwargs: extra ``lightning.pytorch.Trainer`` arguments (``enable_progress_bar``,
            ``logger``, ``callbacks``…); they win over the config.
    """

    def __init__(
        self,
        model_1: torch.nn.Module | None = None,
        model_2: torch.nn.Module | None = None,
        tokenizer=None,
        config: TrainConfig | DictConfig | Mapping | str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        **trainer_kwargs,
    ) -> None:
        given = [model_1 is not None, model_2 is not None, tokenizer is not None]
        if any(given) and not all(given):
            raise ConfigError(
                "pass model_1, model_2 and tokenizer together, or none of them to load the pair "
                "named in config (model_1_name, model_2_name)"
            )
        raw = _config_mapping(config)
        output_dir = output_dir or raw.get("output_dir")
        raw = experiment_to_dict(raw)
        pair = None
        if model_1 is not None:
            pair = _frozen_pair(model_1, model_2, tokenizer)
            names = raw.setdefault("model_pair", {})
            for key, model in (("model_1_name", model_1), ("model_2_name", model_2)):
                if names.get(key) in (None, "", "???"):
                    names[key] = _model_name(model, key)
        self.config: TrainConfig = load_train_config(raw)
        self.output_dir = Path(output_dir or Path("outputs") / self.config.name)
        self.trainer_kwargs = trainer_kwargs
        pl.seed_everything(self.config.seed, workers=True)  # the prompt's random initialisation
        self.module = DivergenceModule(**pipeline.module_args(self.config), pair=pair)
        # Models the user loaded go where training.accelerator says, as a pair loaded by name does
        # (a quantised or dispatched pair stays where it was put); the prompt goes with them.
        self.module.to(self.module.pair.to(pipeline.pair_device(self.config)).device)
        self.lightning_trainer: pl.Trainer | None = None
        self._datamodule: CategoryTextDataModule | None = None
        self._user_texts: dict[str, list[str]] = {}
        self._has_trained = False

    # ------------------------------------------------------------------ what users reach for
    @property
    def pair(self) -> ModelPair:
        return self.module.pair

    @property
    def tokenizer(self):
        return self.module.tokenizer

    @property
    def soft_prompt(self) -> torch.Tensor:
        """``[num_soft_prompt_tokens, hidden_size]``, detached."""
        return self.module.soft_prompt.detach()

    @property
    def checkpoint_path(self) -> Path:
        """``last.ckpt`` of this run: ``DivergenceModule.load_from_checkpoint`` reloads it."""
        return self.output_dir / run_files.LAST_CHECKPOINT

    @property
    def datamodule(self) -> CategoryTextDataModule:
        """The project's category texts of ``config.data`` (built on first use)."""
        if self._datamodule is None:
            self._datamodule = pipeline.build_datamodule(self.module, self.config)
        return self._datamodule

    # ------------------------------------------------------------------ training
    def train(
        self,
        train_dataloader: Iterable | pl.LightningDataModule | None = None,
        val_dataloader: Iterable | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, float]:
        """Optimise the soft prompt; write ``last.ckpt``, ``soft_prompt/`` and ``metrics.json``.

        Args:
            train_dataloader: any DataLoader (or iterable of batches) yielding raw texts (a list of
                strings per batch, or dicts with a ``text`` list) or tokenized batches (dicts with
                ``input_ids`` and optionally ``attention_mask``); or the project's datamodule or
                one of its loaders; ``None`` uses the category texts of ``config.data``. In a
                data-parallel run each batch is a global batch: every rank takes its own slice.
            val_dataloader: the same kinds, for validation (with the project's datamodule its
                held-out texts are used).
            ckpt_path: resume from this checkpoint (``"last"``: this run's ``last.ckpt``).

        Returns:
            The last training divergence and, when there is validation data, the validation
            metrics (``val/divergence`` with the soft prompt, ``val/divergence_no_prompt``).
        """
        if not self._has_trained:
            pipeline.check_run_dir(self.output_dir, self._with_resume(ckpt_path))
        pl.seed_everything(self.config.seed, workers=True)
        fit_data, validate_data = self._fit_data(train_dataloader, val_dataloader)
        overrides = {"enable_model_summary": False} | self.trainer_kwargs
        if validate_data is None:
            overrides.setdefault("limit_val_batches", 0)
        # Ctrl+C (a notebook's interrupt) or a scheduler's signal: last.ckpt saved, Interrupted
        # raised, the handlers put back (Lightning's own would exit and leave Ctrl+C ignored).
        resume = 'call train(ckpt_path="last") again'
        with pipeline.Preemption(self.output_dir, resume) as preemption:
            trainer = pipeline.build_trainer(
                self.config, self.output_dir, None, preemption, **overrides
            )
            self.lightning_trainer = trainer
            trainer.fit(self.module, **fit_data, ckpt_path=ckpt_path)
        pipeline.save_last_checkpoint(trainer, self.output_dir)
        self._has_trained = True
        metrics = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("train/")
        }
        if validate_data is not None:
            results = trainer.validate(self.module, **validate_data, verbose=False)
            metrics |= {key: float(value) for key, value in results[0].items()}
        pipeline.export_results(trainer, self.module, self.output_dir, metrics)
        # Lightning hands the module back on the CPU; the pair stays where it is. Keep the prompt
        # with the pair, so using the module afterwards never drags a large pair to the CPU.
        self.module.to(self.pair.device)
        return metrics

    def _with_resume(self, ckpt_path: str | None) -> TrainConfig:
        return replace(self.config, ckpt_path=ckpt_path or self.config.ckpt_path)

    def _fit_data(self, train, val) -> tuple[dict, dict | None]:
        if train is None or isinstance(train, pl.LightningDataModule):
            datamodule = train if train is not None else self.datamodule
            if isinstance(datamodule, CategoryTextDataModule):
                self._datamodule = datamodule
            return {"datamodule": datamodule}, {"datamodule": datamodule}
        max_length = pipeline.fit_to_context(
            self.config.data.max_length, self.module.max_text_length
        )
        batches = {
            name: TokenizedBatches(loader, self.tokenizer, max_length)
            for name, loader in (("train", train), ("val", val))
            if loader is not None
        }
        self._user_texts = {name: b.seen_texts for name, b in batches.items()}
        fit = {"train_dataloaders": batches["train"]}
        if "val" not in batches:
            return fit, None
        return fit | {"val_dataloaders": batches["val"]}, {"dataloaders": batches["val"]}

    # ------------------------------------------------------------------ the divergent dataset
    def generate_divergent_dataset(
        self,
        output_file: str | os.PathLike | None = None,
        prompts: Iterable[str] | Iterable[tuple[str, str]] | None = None,
        num_prompts: int | None = None,
    ) -> list[dict]:
        """Score candidate prompts *without* the soft prompt and write the divergent dataset.

        Candidates are ``prompts`` when given; otherwise the hard prompts that
        ``config.generation.strategies`` propose from the texts of the loaders passed to
        :meth:`train` (else the category texts of ``config.data``), as
        ``python -m soft_prompting.train`` does. Both models continue each one
        (``config.generation``), records are sorted by ``metrics.kl_divergence``, highest first.

        Args:
            output_file: where to write; ``.pt`` (``torch.load(path, weights_only=True)``) and
                ``.jsonl`` are both written, side by side with the same stem. Default:
                ``<output_dir>/divergent_dataset.pt``.
            prompts: texts, or ``(category, text)`` pairs, to score.
            num_prompts: how many candidates at most (default ``config.generation.num_prompts``).

        Returns:
            The records (see :mod:`soft_prompting.hard_prompts.sampling` for the schema).
        """
        rows = None
        if prompts is not None:
            pairs = [(USER_CATEGORY, p) if isinstance(p, str) else tuple(p) for p in prompts]
            rows = [{"category": c, "prompt": p, "source": "user_prompts"} for c, p in pairs]
            if not rows:
                raise DataError("no candidate prompts to score: pass prompts=[...] or train first")
        texts = self._strategy_texts() if rows is None else {}
        if rows is None and not any(texts.values()):
            raise DataError("no candidate prompts to score: pass prompts=[...] or train first")
        # The same function as `python -m soft_prompting.train`: strategies → scoring → files.
        checkpoint = self.checkpoint_path if self._has_trained else None
        records = pipeline.write_dataset(
            self.module, texts, self.config, self.output_dir, checkpoint, rows, num_prompts
        )
        if output_file is not None:
            target = Path(output_file)
            run_files.write_torch(target.with_suffix(".pt"), records)
            run_files.write_jsonl(target.with_suffix(".jsonl"), records)
        return records

    def _strategy_texts(self) -> dict[str, list[str]]:
        """The texts the strategies start from: the user's loaders', else the category texts."""
        texts = (self._user_texts.get("train") or []) + (self._user_texts.get("val") or [])
        if texts:
            return {USER_CATEGORY: texts}
        return pipeline.all_texts_by_category(self.datamodule)

    def save_soft_prompt(self, directory: str | os.PathLike) -> Path:
        """Write the prompt as a PEFT prompt-tuning adapter (see ``DivergenceModule``)."""
        return self.module.save_soft_prompt(directory)


class TokenizedBatches:
    """Any loader's batches in the module's shape: ``input_ids`` and ``attention_mask`` tensors.

    Raw texts (a list of strings per batch, as PyTorch's default collate makes of a dataset of
    strings, or a dict with a ``text`` list) are tokenized, left-padded and cut to ``max_length``;
    tokenized dicts pass through (a missing ``attention_mask`` means every token counts). In a
    data-parallel run each rank keeps its own slice ``[rank::world]`` of every batch, as the
    project's datamodule does. The texts served are remembered (``seen_texts``, at most
    ``max_remembered``) as candidates for the divergent dataset.
    """

    def __init__(self, loader: Iterable, tokenizer, max_length: int, max_remembered: int = 10_000):
        self.loader = loader
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_remembered = max_remembered
        self.seen_texts: list[str] = []
        self._seen: set[str] = set()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        rank, world = _rank_and_world()
        for batch in self.loader:
            yield self.convert(batch, rank, world)

    def convert(self, batch, rank: int = 0, world: int = 1) -> dict:
        if isinstance(batch, str):
            batch = [batch]
        if isinstance(batch, Mapping) and "input_ids" not in batch and "text" in batch:
            batch = batch["text"]
        if isinstance(batch, list | tuple) and all(isinstance(t, str) for t in batch):
            return self._tokenize(list(batch)[rank::world])
        if isinstance(batch, Mapping) and "input_ids" in batch:
            input_ids = torch.as_tensor(batch["input_ids"])
            mask = batch.get("attention_mask")
            mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask)
            if input_ids.ndim != 2 or mask.shape != input_ids.shape:
                raise DataError(
                    f"a tokenized batch needs 2-D input_ids and attention_mask of one shape, got "
                    f"{tuple(input_ids.shape)} and {tuple(mask.shape)}: tokenize with "
                    "padding=True, return_tensors='pt'"
                )
            input_ids, mask = input_ids[rank::world], mask[rank::world]
            self._remember(self.tokenizer.batch_decode(input_ids, skip_special_tokens=True))
            return {"input_ids": input_ids, "attention_mask": mask}
        raise DataError(
            f"cannot train on a batch of type {type(batch).__name__}: the DataLoader must yield "
            "lists of strings, dicts with a 'text' list, or dicts with 'input_ids' (and "
            "'attention_mask') tensors"
        )

    def _tokenize(self, texts: list[str]) -> dict:
        # A blank text has no position to score: its divergence would be 0/0.
        texts = [text for text in texts if text.strip()]
        if not texts:
            raise DataError(
                "a batch of the DataLoader holds only blank texts: drop empty strings from the "
                "dataset (every text needs at least one token)"
            )
        self._remember(texts)
        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _remember(self, texts: list[str]) -> None:
        for text in texts:
            text = text.strip()
            if text and text not in self._seen and len(self.seen_texts) < self.max_remembered:
                self._seen.add(text)
                self.seen_texts.append(text)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _config_mapping(config) -> dict:
    """Any accepted config as a plain dict (not yet validated)."""
    if config is None:
        return {}
    if isinstance(config, TrainConfig):
        return asdict(config)
    if isinstance(config, str | os.PathLike):
        path = Path(config).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        config = OmegaConf.load(path)
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return dict(config)
    raise ConfigError(
        f"config of type {type(config).__name__}: pass a YAML path, a dict, a TrainConfig or a "
        "Hydra config"
    )


def _frozen_pair(model_1, model_2, tokenizer) -> ModelPair:
    """The user's models frozen and in eval mode, the tokenizer set up as the loader would."""
    for model in (model_1, model_2):
        model.requires_grad_(False)
        model.eval()
    if tokenizer.pad_token is None:
        # Padding is always masked out, so any id works; eos is the conventional stand-in.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    pair = ModelPair(model_1, model_2, tokenizer)
    check_compatible(pair, tokenizer)
    return pair


def _model_name(model, key: str) -> str:
    name = getattr(model, "name_or_path", "") or ""
    if not name:
        log.warning(
            "%s has no name_or_path: its checkpoint cannot rebuild the pair by itself; pass "
            "model_pair.%s in config to fix that",
            key.replace("_name", ""),
            key,
        )
        return "<in-memory model>"
    return str(name)
