"""Category texts: where they come from, how they are split, batched and padded.

Sources, in order of precedence:

- ``text_dir``: a folder with one file per category, ``NAME.txt`` (one text a line) or
  ``NAME.jsonl`` (one ``{"text": ...}`` object a line);
- ``hf_dataset``: a Hugging Face dataset (needs the ``datasets`` extra and a reachable hub);
- otherwise the project's built-in categories (:data:`soft_prompting.organisms.corpus.BUILTIN_CATEGORIES`).

Each category is shuffled with the seed, cut to ``max_texts_per_category`` and split into train and
validation texts the same way every run. Batches are left-padded, which is what the soft prompt
expects: the prompt goes in front of the padding (see :mod:`soft_prompting.training.module`).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from soft_prompting.errors import DataError
from soft_prompting.organisms import corpus

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class CategoryText:
    text: str
    category: str


def read_category_file(path: Path) -> list[str]:
    """Texts of one category file (``.txt``: a text a line; ``.jsonl``: a ``text`` field a line)."""
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first text.
        content = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as err:
        raise DataError(f"category file {path} does not exist") from err
    except IsADirectoryError as err:
        raise DataError(f"category file {path} is a folder: put a text file there") from err
    except UnicodeDecodeError as err:
        raise DataError(
            f"category file {path} is not UTF-8 (byte {err.start}): re-save it as UTF-8"
        ) from err
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number} is not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{number} has no string "text" field: {line[:80]!r}')
            line = record["text"]
        if line.strip():
            texts.append(line.strip())
    if not texts:
        raise DataError(f"category file {path} holds no text: add texts or drop the category")
    return texts


def load_text_dir(text_dir: str | Path, categories: list[str] | None) -> dict[str, list[str]]:
    """Categories of a folder: every ``NAME.txt``/``NAME.jsonl``, or those named in ``categories``."""
    folder = Path(text_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.text_dir={str(text_dir)!r} is not a folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix not in TEXT_SUFFIXES:
            continue
        if path.stem in files:
            raise DataError(
                f"category {path.stem!r} has two files, {files[path.stem].name} and {path.name}, "
                f"in {folder}: merge them into one, or rename one to start another category"
            )
        files[path.stem] = path
    if not files:
        raise DataError(
            f"data.text_dir={str(text_dir)!r} has no .txt or .jsonl files: put one file per "
            "category there (NAME.txt, a text a line)"
        )
    wanted = categories or sorted(files)
    missing = [name for name in wanted if name not in files]
    if missing:
        raise DataError(
            f"categories {missing} have no file in {folder} (found: {sorted(files)}): add "
            f"{missing[0]}.txt or fix data.categories"
        )
    return {name: read_category_file(files[name]) for name in wanted}


def available_categories(text_dir: str | None, hf_dataset: str | None) -> list[str] | None:
    """The category names a data source offers, found without reading any text (None: unknown
    until the Hugging Face dataset is loaded)."""
    if text_dir:
        folder = Path(text_dir).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.text_dir={str(text_dir)!r} is not a folder")
        return sorted({p.stem for p in folder.iterdir() if p.suffix in TEXT_SUFFIXES})
    if hf_dataset:
        return None
    return list(corpus.BUILTIN_CATEGORIES)


def load_builtin(categories: list[str] | None, seed: int) -> dict[str, list[str]]:
    """The project's own category texts (they speak the toy organisms' language)."""
    wanted = categories or list(corpus.BUILTIN_CATEGORIES)
    unknown = [name for name in wanted if name not in corpus.BUILTIN_CATEGORIES]
    if unknown:
        raise DataError(
            f"unknown built-in categories {unknown}: use {list(corpus.BUILTIN_CATEGORIES)}, or "
            "give your own with data.text_dir=FOLDER"
        )
    return {name: corpus.builtin_category_texts(name, seed=seed) for name in wanted}


def load_hf_dataset(
    dataset: str, text_field: str, category_field: str | None, categories: list[str] | None
) -> dict[str, list[str]]:
    """Texts of a Hugging Face dataset's train split, grouped by ``category_field``."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise DataError(
            "data.hf_dataset needs the datasets package: pip install 'soft-prompting[datasets]'"
        ) from err
    rows = load_dataset(dataset, split="train")
    if text_field not in rows.column_names:
        raise DataError(f"{dataset} has no column {text_field!r}: set data.hf_text_field")
    grouped: dict[str, list[str]] = {}
    for row in rows:
        name = str(row[category_field]) if category_field else dataset.split("/")[-1]
        if categories is None or name in categories:
            grouped.setdefault(name, []).append(str(row[text_field]))
    return grouped


def split_category(
    texts: list[str], max_texts: int, val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded shuffle, cut to ``max_texts``, then ``(train, val)`` with at least one text each."""
    texts = list(dict.fromkeys(texts))  # duplicates would leak between train and validation
    random.Random(seed).shuffle(texts)
    texts = texts[:max_texts]
    if len(texts) < 2:
        raise DataError(f"a category needs at least 2 distinct texts, got {len(texts)}")
    n_val = min(len(texts) - 1, max(1, math.ceil(val_fraction * len(texts))))
    return texts[n_val:], texts[:n_val]


class TextCollator:
    """Tokenises a list of :class:`CategoryText` into a left-padded batch."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: list[CategoryText]) -> dict:
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(
            [item.text for item in items],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "category": [item.category for item in items],
        }


class ResumableBatchSampler(Sampler[list[int]]):
    """Seeded per-epoch shuffling that can resume in the middle of an epoch and shard across ranks.

    The order of epoch ``e`` depends only on ``(seed, e)`` (or is the items' own order with
    ``shuffle=False``). Before each pass it asks ``position()`` for ``(batches already done this
    epoch, rank, world size)``, so a run resumed from a mid-epoch checkpoint sees exactly the
    batches an uninterrupted run would have seen, and each data-parallel rank takes its own slice
    of every global batch. A batch with fewer items than ranks goes whole to every rank: the
    module's token-weighted reduction then still gives that batch's mean and gradient.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, position=None, shuffle: bool = True
    ) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = position or (lambda num_batches: (0, 0, 1))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_items / self.batch_size)

    def __iter__(self):
        order = list(range(self.num_items))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        done, rank, world = self.position(len(self))
        for start in range(done * self.batch_size, self.num_items, self.batch_size):
            batch = order[start : start + self.batch_size]
            yield batch[rank::world] if len(batch) >= world else batch


class CategoryTextDataModule(pl.LightningDataModule):
    """Category texts for soft-prompt training.

    Args:
        tokenizer: the pair's tokenizer.
        categories: categories to use (None: all of the source).
        text_dir: folder with one file per category.
        hf_dataset, hf_text_field, hf_category_field: a Hugging Face dataset instead.
        max_texts_per_category: texts kept per category.
        val_fraction: held-out share of each category.
        max_length: tokens per text (longer texts are truncated, with one warning).
        batch_size: texts per batch.
        num_workers: DataLoader workers.
        seed: split and shuffle seed.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        categories: list[str] | None = None,
        text_dir: str | None = None,
        hf_dataset: str | None = None,
        hf_text_field: str = "text",
        hf_category_field: str | None = None,
        max_texts_per_category: int = 1000,
        val_fraction: float = 0.15,
        max_length: int = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.categories = list(categories) if categories else None
        self.text_dir = text_dir
        self.hf_dataset = hf_dataset
        self.hf_text_field = hf_text_field
        self.hf_category_field = hf_category_field
        self.max_texts_per_category = max_texts_per_category
        self.val_fraction = val_fraction
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_texts: list[CategoryText] = []
        self.val_texts: list[CategoryText] = []

    def load_categories(self) -> dict[str, list[str]]:
        """Raw texts per category, from whichever source is configured."""
        if self.text_dir:
            return load_text_dir(self.text_dir, self.categories)
        if self.hf_dataset:
            return load_hf_dataset(
                self.hf_dataset, self.hf_text_field, self.hf_category_field, self.categories
            )
        return load_builtin(self.categories, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_texts:
            return
        for category, texts in self.load_categories().items():
            try:
                train, val = split_category(
                    texts, self.max_texts_per_category, self.val_fraction, self.seed
                )
            except DataError as err:
                raise DataError(f"category {category!r}: {err}") from err
            self.train_texts += [CategoryText(t, category) for t in train]
            self.val_texts += [CategoryText(t, category) for t in val]
        self._warn_truncation()

    def _warn_truncation(self) -> None:
        texts = [item.text for item in self.train_texts + self.val_texts]
        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        too_long = sum(length > self.max_length for length in lengths)
        if too_long:
            log.warning(
                "%d of %d texts are longer than %d tokens and are truncated "
                "(raise data.max_length to keep more; the models' context is the limit)",
                too_long,
                len(texts),
                self.max_length,
            )

    def texts_by_category(self, split: str = "val") -> dict[str, list[str]]:
        """The texts of one split, grouped by category (for generation and baselines)."""
        items = self.val_texts if split == "val" else self.train_texts
        grouped: dict[str, list[str]] = {}
        for item in items:
            grouped.setdefault(item.category, []).append(item.text)
        return grouped

    def train_dataloader(self) -> DataLoader:
        sampler = ResumableBatchSampler(
            len(self.train_texts), self.batch_size, self.seed, self._training_position
        )
        return DataLoader(
            self.train_texts,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=TextCollator(self.tokenizer, self.max_length),
        )

    def val_dataloader(self) -> DataLoader:
        sampler = ResumableBatchSampler(
            len(self.val_texts), self.batch_size, self.seed, self._rank_position, shuffle=False
        )
        return DataLoader(
            self.val_texts,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=TextCollator(self.tokenizer, self.max_length),
        )

    def _training_position(self, num_batches: int) -> tuple[int, int, int]:
        """(batches of the current epoch already trained, rank, world size) from the trainer."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0, 1
        consumed = trainer.global_step * trainer.accumulate_grad_batches
        done = consumed - trainer.current_epoch * num_batches
        return min(max(done, 0), num_batches), trainer.global_rank, trainer.world_size

    def _rank_position(self, num_batches: int) -> tuple[int, int, int]:
        """(0, rank, world size): validation always starts at its first batch."""
        trainer = self.trainer
        return (0, 0, 1) if trainer is None else (0, trainer.global_rank, trainer.world_size)
