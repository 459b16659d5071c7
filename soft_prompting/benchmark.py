"""Measure the project's training step and generation+scoring against naive formulations.

    python -m soft_prompting.benchmark --preset body_heavy --threads 1 --json bench.json

A preset is a random-init Llama pair (seeds 1 and 2, nothing downloaded) and a workload. In one
process, after a warm-up, the variants are timed interleaved and the medians reported:

- ``train``: the project's real step, what ``python -m soft_prompting.train`` runs: a
  :class:`~soft_prompting.training.module.DivergenceModule` built from ``module_args`` of a default
  :class:`~soft_prompting.config.TrainConfig`, Lightning's precision context, its
  ``training_step``, backward, gradient clipping, Adam step and norm projection.
- ``naive_train``: PEFT prompt tuning around each model, the two prompt embeddings tied to one
  Parameter, fp32, full logits at every position, ``softmax().log()``, ``F.kl_div`` masked to the
  text positions, Adam step.
- ``gen``: :func:`~soft_prompting.hard_prompts.sampling.score_prompts` (both models decode over a
  key/value cache, static on CUDA; every log-probability teacher-forced), greedy.
- ``naive_gen``: a recompute-everything greedy loop (no KV cache, full logits every step) for both
  models, then per-position scoring (one forward of each model per continuation position).

Peak memory: on CPU each variant runs again alone in a child process, which reports its peak
resident set (``VmHWM``, reset after the pair is built, so the building transient does not count);
on CUDA, ``torch.cuda.max_memory_allocated`` around each variant. ``--variants`` adds optional
training-step variants (``generic_head``, ``fp32``, ``bf16_autocast``, ``bf16_weights``,
``compile``) and generation variants (``growing_cache``, ``static_cache``: the key/value cache
that is not the device's default) measured in the same loop.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from soft_prompting.organisms.tiny import SPECIAL_TOKENS, random_llama, word_tokenizer
from soft_prompting.pair.placement import lightning_precision

MODELS: dict[str, dict] = {
    "tiny": dict(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
    ),
    "body_heavy": dict(
        num_hidden_layers=8,
        hidden_size=512,
        intermediate_size=1408,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8192,
    ),
    "vocab_heavy": dict(
        num_hidden_layers=4,
        hidden_size=256,
        intermediate_size=688,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "llama7b": dict(
        num_hidden_layers=32,
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
}

# Published dense bf16 tensor-core peaks (FLOP/s), matched against the CUDA device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}

VARIANTS = (
    "generic_head",
    "fp32",
    "bf16_autocast",
    "bf16_weights",
    "compile",
    "growing_cache",
    "static_cache",
)
"""Measured beside the defaults: training variants, and two of generation (``score_prompts`` over
a cache that grows by a copy per token, or one allocated once; the default is static on CUDA)."""

SCALING: dict[str, tuple[int, ...]] = {
    "seq_len": (64, 128, 256),
    "num_virtual_tokens": (4, 8, 16, 32),
    "vocab_size": (8192, 16384, 32000),
}
"""``--scaling``: each knob varied alone around the preset's workload (train and naive steps)."""


@dataclass
class Settings:
    """One benchmark run: the pair, the workload and how it is measured."""

    preset: str = "body_heavy"
    device: str = "cpu"
    threads: int = 1
    dtype: str = "float32"
    """Weights of the project's pair (the naive training baseline is always fp32)."""
    batch_size: int = 8
    seq_len: int = 128
    num_virtual_tokens: int = 8
    gen_prompts: int = 8
    prompt_len: int = 32
    new_tokens: int = 64
    mixed_precision: bool | str = "auto"
    """The project's ``training.mixed_precision``: auto (its default: bf16 autocast where the
    hardware has bf16), True or False."""
    vocab_size: int | None = None
    """Overrides the preset's vocabulary (``--scaling``)."""
    gradient_checkpointing: bool = False
    compile: bool = False
    naive_train: bool = True
    naive_gen: bool = True
    warmup: int = 1
    repeats: int = 5
    gen_repeats: int = 3
    memory: bool = True
    variants: tuple[str, ...] = ()


def preset_settings(preset: str, device: str) -> Settings:
    """The issue's workload for ``preset``; ``llama7b`` is the GPU one (bf16, 8×256, recompute;
    generation of 64 prompts × 64 new tokens, issue 15's batch)."""
    settings = Settings(preset=preset, device=device)
    if preset == "tiny":
        settings = replace(
            settings,
            batch_size=2,
            seq_len=16,
            gen_prompts=2,
            prompt_len=8,
            new_tokens=8,
            repeats=2,
            gen_repeats=1,
        )
    if preset == "llama7b":
        settings = replace(
            settings,
            dtype="bfloat16",
            seq_len=256,
            gradient_checkpointing=True,
            gen_prompts=64,
            naive_train=False,
            naive_gen=False,
            repeats=5,
            gen_repeats=2,
        )
    return settings


# ---------------------------------------------------------------------------- the pair
def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``w0 w1 …`` with pad/unk/bos/eos = 0/1/2/3 (no download)."""
    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    return word_tokenizer(words, model_max_length=1 << 20, padding_side="left")


def build_pair(settings: Settings, dtype: torch.dtype | None = None):
    """Two random-init Llamas (seeds 1 and 2) of the preset, frozen, in eval mode."""
    from soft_prompting.pair.loading import ModelPair

    dtype = dtype or getattr(torch, settings.dtype)
    models = []
    for seed in (1, 2):
        # Random init right on the device: fast for 7B.
        model = random_llama(
            seed,
            **model_dims(settings),
            max_position_embeddings=4096,
            dtype=dtype,
            device=settings.device,
        )
        model.requires_grad_(False)
        model.eval()
        models.append(model)
    return ModelPair(models[0], models[1], synthetic_tokenizer(model_dims(settings)["vocab_size"]))


def model_dims(settings: Settings) -> dict:
    """The preset's Llama dimensions, with ``settings.vocab_size`` when it is set."""
    dims = dict(MODELS[settings.preset])
    return dims | ({"vocab_size": settings.vocab_size} if settings.vocab_size else {})


def training_batch(settings: Settings, vocab_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    shape = (settings.batch_size, settings.seq_len)
    ids = torch.randint(4, vocab_size, shape, generator=generator)
    return {
        "input_ids": ids.to(settings.device),
        "attention_mask": torch.ones(shape, dtype=torch.long, device=settings.device),
    }


def generation_prompts(settings: Settings, vocab_size: int) -> list[str]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(
        0, vocab_size - 4, (settings.gen_prompts, settings.prompt_len), generator=generator
    )
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def frozen_params(model) -> int:
    """N in the 8N-FLOP-per-token count: every weight but the input embedding table."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding)


# ---------------------------------------------------------------------------- training steps
def project_train_step(
    settings: Settings, pair, mixed_precision: bool | None = None, compile: bool | None = None
) -> tuple[Callable[[dict], float], object]:
    """The training step ``train`` runs, at the default performance settings of ``TrainConfig``."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from soft_prompting.config import ModelPairConfig, TrainConfig, TrainingConfig
    from soft_prompting.training.module import DivergenceModule
    from soft_prompting.training.pipeline import module_args, precision

    training = TrainingConfig(
        num_soft_prompt_tokens=settings.num_virtual_tokens,
        batch_size=settings.batch_size,
        mixed_precision=settings.mixed_precision if mixed_precision is None else mixed_precision,
        gradient_checkpointing=settings.gradient_checkpointing,
        compile=settings.compile if compile is None else compile,
    )
    config = TrainConfig(
        model_pair=ModelPairConfig(
            model_1_name=f"random:{settings.preset}:1",
            model_2_name=f"random:{settings.preset}:2",
            torch_dtype=settings.dtype,
        ),
        training=training,
    )
    module = DivergenceModule(**module_args(config), pair=pair).to(settings.device)
    optimizer = module.configure_optimizers()
    name = precision(config)
    plugin = Precision() if name == "32-true" else MixedPrecision(name, settings.device)
    clip = training.gradient_clip_val

    def step(batch: dict) -> float:
        # Lightning's automatic optimisation, without the Trainer's bookkeeping.
        optimizer.zero_grad(set_to_none=True)
        with plugin.train_step_context():
            loss = module.training_step(batch, 0)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([module.soft_prompt], clip)
        optimizer.step()
        if training.norm_constraint:  # what DivergenceModule.optimizer_step does after the step
            module.project_prompt_norms()
        return -loss.item()

    return step, module


def naive_prompt_tuning(models, num_virtual_tokens: int, init: torch.Tensor):
    """PEFT prompt tuning around each model, the prompt embeddings tied to one Parameter."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    peft_models = [
        get_peft_model(
            model,
            PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens),
        )
        for model in models
    ]
    shared = torch.nn.Parameter(init.detach().clone().float())
    for peft_model in peft_models:
        peft_model.prompt_encoder["default"].embedding.weight = shared
    return peft_models, shared


def naive_divergence(peft_models, batch: dict, num_virtual_tokens: int) -> torch.Tensor:
    """KL(p1 || p2) the naive way: full fp32 logits, ``softmax().log()``, masked ``F.kl_div``."""
    logits_1, logits_2 = (m(**batch).logits for m in peft_models)  # [B, P+T, V]
    q_1, q_2 = logits_1.softmax(-1), logits_2.softmax(-1)
    kl = F.kl_div(q_2.log(), q_1, reduction="none").sum(-1)[:, num_virtual_tokens:]
    mask = batch["attention_mask"].float()
    return (kl * mask).sum() / mask.sum()


def naive_train_step(settings: Settings, pair, init: torch.Tensor) -> Callable[[dict], float]:
    """The issue's naive baseline step: :func:`naive_divergence`, backward, Adam step."""
    n_virtual = settings.num_virtual_tokens
    peft_models, shared = naive_prompt_tuning(
        (pair.model_1, pair.model_2), n_virtual, init.to(settings.device)
    )
    optimizer = torch.optim.Adam([shared], lr=0.03)

    def step(batch: dict) -> float:
        optimizer.zero_grad()
        divergence = naive_divergence(peft_models, batch, n_virtual)
        (-divergence).backward()
        optimizer.step()
        return divergence.item()

    return step


# ---------------------------------------------------------------------------- generation + scoring
def project_gen_score(
    settings: Settings, pair, prompts: list[str], static_cache: bool | None = None
) -> Callable[[], list[dict]]:
    """``score_prompts`` as the dataset runs it (``static_cache`` None: its default here)."""
    from soft_prompting.hard_prompts.sampling import SamplingSettings, score_prompts

    sampling = SamplingSettings(
        max_length=settings.new_tokens,
        num_generations_per_prompt=1,
        temperature=0.0,
        top_p=1.0,
        batch_size=settings.gen_prompts,
        static_cache=static_cache,
    )
    return lambda: score_prompts(pair, prompts, sampling, seed=0, progress=False)


@torch.no_grad()
def naive_greedy(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, eos: int, pad: int):
    """Greedy decoding that recomputes the whole sequence (and all its logits) every step."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = []
    for _ in range(new_tokens):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).logits
        token = torch.where(done, pad, logits[:, -1].argmax(-1))
        new.append(token)
        done |= token == eos
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if done.all():
            break
    return torch.stack(new, dim=1)


def naive_gen_score(settings: Settings, pair, prompts: list[str], new_tokens: int | None = None):
    """Both models decode without cache, then each continuation position is scored on its own."""
    from soft_prompting.hard_prompts.sampling import continuation_mask
    from soft_prompting.maths.divergence import (
        disagreement_positions,
        forward_kl,
        token_disagreement_rate,
        vocab_jaccard_similarity,
    )

    tokenizer = pair.tokenizer
    n_new = new_tokens or settings.new_tokens

    @torch.no_grad()
    def run() -> list[dict]:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(settings.device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        tokens_1 = naive_greedy(pair.model_1, ids, mask, n_new, eos, pad)
        tokens_2 = naive_greedy(pair.model_2, ids, mask, n_new, eos, pad)
        per_position = {1: [], 2: []}
        for t in range(tokens_1.shape[1]):
            full = torch.cat([ids, tokens_1[:, :t]], dim=1)
            full_mask = torch.cat([mask, torch.ones_like(tokens_1[:, :t])], dim=1)
            position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
            for k, model in ((1, pair.model_1), (2, pair.model_2)):
                logits = model(
                    input_ids=full,
                    attention_mask=full_mask,
                    position_ids=position_ids,
                    use_cache=False,
                ).logits
                # A copy: a view would keep the whole [B, T, V] logits of every step alive.
                per_position[k].append(logits[:, -1, : pair.vocab_size].float().clone())
        logits_1, logits_2 = (torch.stack(per_position[k], dim=1) for k in (1, 2))
        cont_1 = continuation_mask(tokens_1, eos)
        cont_2 = continuation_mask(tokens_2, eos)
        kl = forward_kl(logits_1, logits_2)
        kl = torch.where(cont_1, kl, 0).sum(-1) / cont_1.sum(-1).clamp(min=1)
        disagreement = token_disagreement_rate(logits_1, logits_2, cont_1)
        positions = disagreement_positions(logits_1, logits_2, cont_1)
        records = []
        for i, prompt in enumerate(prompts):
            ids_1, ids_2 = tokens_1[i][cont_1[i]].tolist(), tokens_2[i][cont_2[i]].tolist()
            text_1 = tokenizer.decode(ids_1, skip_special_tokens=True).strip()
            text_2 = tokenizer.decode(ids_2, skip_special_tokens=True).strip()
            records.append(
                {
                    "prompt": prompt,
                    "generation_1": text_1,
                    "generation_2": text_2,
                    "metrics": {
                        "kl_divergence": float(kl[i]),
                        "token_disagreement_rate": float(disagreement[i]),
                        "vocab_jaccard_similarity": vocab_jaccard_similarity(ids_1, ids_2),
                        "disagreement_positions": positions[i],
                    },
                }
            )
        return records

    return run


# ---------------------------------------------------------------------------- measuring
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable, device: str):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    peak = _proc_status_mb("VmHWM")
    if peak is None:  # no /proc: the lifetime maximum (kB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak / 1024 / (1024 if sys.platform == "darwin" else 1)
    return peak


def memory_child(settings: Settings, variant: str) -> dict:
    """Run one variant alone (warm-up + 2 runs) and report this process's peak RSS."""
    fn = build_variant(settings, variant)
    gc.collect()
    base = _proc_status_mb("VmRSS")
    exact = _reset_peak_rss()
    for _ in range(1 if variant == "naive_gen" else 3):
        fn()
    peak = _peak_rss_mb()
    return {
        "peak_rss_mb": round(peak, 1),
        "step_rss_mb": round(peak - base, 1) if (base is not None and exact) else None,
        "base_rss_mb": None if base is None else round(base, 1),
    }


def build_variant(settings: Settings, variant: str) -> Callable[[], object]:
    """A zero-argument callable running ``variant`` once (for the memory children)."""
    if variant == "train":
        pair = build_pair(settings)
        batch = training_batch(settings, pair.vocab_size)
        step, _ = project_train_step(settings, pair)
        return lambda: step(batch)
    if variant == "naive_train":
        pair = build_pair(settings, torch.float32)
        batch = training_batch(settings, pair.vocab_size)
        # Only for the initial prompt: without checkpointing or compile, which would otherwise be
        # switched on in the naive baseline's (shared) models.
        plain = replace(settings, gradient_checkpointing=False, compile=False)
        _, module = project_train_step(plain, pair)
        init = module.soft_prompt.detach().clone()
        del module
        step = naive_train_step(settings, pair, init)
        return lambda: step(batch)
    pair = build_pair(settings)
    prompts = generation_prompts(settings, pair.vocab_size)
    if variant == "gen":
        return project_gen_score(settings, pair, prompts)
    return naive_gen_score(settings, pair, prompts)


def measure_memory_in_children(
    settings: Settings, variants: list[str], log: Callable[[str], None] = print
) -> dict[str, dict]:
    """Each variant alone in a child process (which builds its own pair): its peak RSS."""
    results = {}
    for number, variant in enumerate(variants, 1):
        log(f"memory {number}/{len(variants)}: {variant} in a child process…")
        started = time.perf_counter()
        spec = json.dumps(asdict(settings) | {"variants": []})
        # A fixed mmap threshold returns every freed tensor to the OS at once, so the peak RSS
        # follows live memory; glibc's default dynamic threshold keeps freed blocks of up to
        # 32 MB in its heap and the peak would measure allocator caching instead.
        env = os.environ | {
            "OMP_NUM_THREADS": str(settings.threads),
            "MALLOC_MMAP_THRESHOLD_": "131072",
        }
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "soft_prompting.benchmark",
                "--_memory-child",
                variant,
                "--_settings",
                spec,
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(
            f"memory {number}/{len(variants)}: {variant} peak RSS "
            f"{results[variant]['peak_rss_mb']:.0f} MB ({time.perf_counter() - started:.1f}s)"
        )
    return results


def run_benchmark(settings: Settings, log: Callable[[str], None] = print) -> dict:
    from soft_prompting.hard_prompts.sampling import static_by_default

    device, cuda = settings.device, settings.device.startswith("cuda")
    t0 = time.perf_counter()
    log(f"building the {settings.preset} pair on {device}…")
    pair = build_pair(settings)
    batch = training_batch(settings, pair.vocab_size)
    prompts = generation_prompts(settings, pair.vocab_size)
    log(f"built the {settings.preset} pair in {time.perf_counter() - t0:.1f}s")

    train, module = project_train_step(settings, pair)
    steps: dict[str, Callable[[], object]] = {"train": lambda: train(batch)}
    reference_loss = {}
    caches: dict[str, bool | None] = {"gen": None}  # each generation's static_cache setting
    if settings.naive_train:
        naive_pair = build_pair(settings, torch.float32)
        naive = naive_train_step(settings, naive_pair, module.soft_prompt)
        steps["naive_train"] = lambda: naive(batch)
    for variant in settings.variants:
        if variant == "generic_head":
            generic, generic_module = project_train_step(settings, pair)
            generic_module.fused_head = False
            steps["train_generic_head"] = lambda f=generic: f(batch)
        elif variant == "fp32":
            fp32, _ = project_train_step(settings, pair, mixed_precision=False)
            steps["train_fp32"] = lambda f=fp32: f(batch)
        elif variant == "bf16_autocast":
            bf16, _ = project_train_step(settings, pair, mixed_precision=True)
            steps["train_bf16_autocast"] = lambda f=bf16: f(batch)
        elif variant == "bf16_weights":
            bf16_pair = build_pair(settings, torch.bfloat16)
            bf16w, _ = project_train_step(settings, bf16_pair, mixed_precision=True)
            steps["train_bf16_weights"] = lambda f=bf16w: f(batch)
        elif variant == "compile":
            compiled, _ = project_train_step(settings, pair, compile=True)
            steps["train_compile"] = lambda f=compiled: f(batch)
        elif variant in ("growing_cache", "static_cache"):
            caches[f"gen_{variant}"] = variant == "static_cache"
        else:
            raise ValueError(f"unknown variant {variant!r}: choose from {VARIANTS}")
    gens: dict[str, Callable[[], object]] = {
        name: project_gen_score(settings, pair, prompts, static) for name, static in caches.items()
    }
    if settings.naive_gen:
        gens["naive_gen"] = naive_gen_score(settings, pair, prompts)

    # Warm-up: the first call pays allocation, kernel selection and (with compile) compilation.
    log(f"warm-up: {settings.warmup} call(s) of {', '.join(steps)} and one generation…")
    first_call_s = {}
    for name, fn in steps.items():
        for i in range(settings.warmup):
            seconds, value = timed(fn, device)
            if i == 0:
                first_call_s[name] = seconds
                reference_loss[name] = value
    warm_gens = {name: fn for name, fn in gens.items() if name != "naive_gen"}
    if "naive_gen" in gens:
        warm_gens["naive_gen"] = naive_gen_score(settings, pair, prompts, new_tokens=2)
    for fn in warm_gens.values():
        timed(fn, device)
    log("warm-up done: " + ", ".join(f"{k} {v:.2f}s" for k, v in first_call_s.items()))

    times: dict[str, list[float]] = {name: [] for name in [*steps, *gens]}
    peak_gpu: dict[str, float] = {}
    outputs = {}

    def run(name: str, fn: Callable) -> None:
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        seconds, outputs[name] = timed(fn, device)
        times[name].append(seconds)
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            peak_gpu[name] = max(peak_gpu.get(name, 0), peak / 2**20)
            peak_gpu[name + "_step"] = max(peak_gpu.get(name + "_step", 0), (peak - before) / 2**20)

    # Interleaved: every repeat runs every variant, in an order that alternates.
    for r in range(settings.repeats):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            run(name, steps[name])
        log(
            f"train repeat {r + 1}/{settings.repeats}: "
            + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in steps)
        )
    for r in range(settings.gen_repeats):
        for name in list(gens) if r % 2 == 0 else list(gens)[::-1]:
            run(name, gens[name])
        log(
            f"gen repeat {r + 1}/{settings.gen_repeats}: "
            + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in gens)
        )

    median = {name: statistics.median(values) for name, values in times.items() if values}
    result: dict = {
        "preset": settings.preset,
        "train_step_s": median["train"],
        "naive_train_step_s": median.get("naive_train"),
        "train_speedup": ratio(median.get("naive_train"), median["train"]),
        "gen_score_s": median["gen"],
        "naive_gen_score_s": median.get("naive_gen"),
        "gen_speedup": ratio(median.get("naive_gen"), median["gen"]),
        "times_s": {name: [round(v, 4) for v in values] for name, values in times.items()},
        "first_call_s": first_call_s,
        "fused_head": bool(module.fused_head),
        "train_precision": lightning_precision(settings.mixed_precision, device),
        "checks": consistency_checks(reference_loss, outputs),
        # The key/value cache each generation decodes over (unless its model rejects a static one).
        "gen_cache": {
            name: "static" if static_by_default(pair, static) else "growing"
            for name, static in caches.items()
        },
    }
    for variant in settings.variants:
        if f"gen_{variant}" in median:  # a generation variant: its time and the default's speed-up
            result[f"gen_{variant}_s"] = median[f"gen_{variant}"]
            result[f"gen_vs_{variant}"] = ratio(median[f"gen_{variant}"], median["gen"])
            continue
        key = f"train_{variant}"
        result[f"{key}_step_s"] = median[key]
        result[f"{key}_speedup_vs_naive"] = ratio(median.get("naive_train"), median[key])
        result[f"{key}_vs_train"] = ratio(median["train"], median[key])
    if "train_compile" in first_call_s:
        result["compile_s"] = first_call_s["train_compile"] - median["train_compile"]
    for key in ("fp32", "bf16_autocast", "bf16_weights"):
        if f"train_{key}" in reference_loss:
            diff = abs(reference_loss[f"train_{key}"] - reference_loss["train"])
            result[f"{key}_divergence_abs_diff"] = diff
            result[f"{key}_divergence_rel_diff"] = diff / max(abs(reference_loss["train"]), 1e-30)

    # Throughput against the 8N-FLOP-per-trained-token limit.
    trained_tokens = settings.batch_size * (settings.num_virtual_tokens + settings.seq_len)
    n_params = frozen_params(pair.model_1)
    flops = 8 * n_params * trained_tokens
    result |= {
        "params_per_model": n_params,
        "train_tokens_per_s": trained_tokens / median["train"],
        "train_tflops_8n": flops / median["train"] / 1e12,
        "gen_new_tokens_per_s": 2 * settings.gen_prompts * settings.new_tokens / median["gen"],
    }

    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        result |= {
            "peak_gpu_mb": peak_gpu.get("train"),
            "naive_peak_gpu_mb": peak_gpu.get("naive_train"),
            "gen_peak_gpu_mb": peak_gpu.get("gen"),
            "naive_gen_peak_gpu_mb": peak_gpu.get("naive_gen"),
            "peak_gpu_step_mb": {
                k[: -len("_step")]: v for k, v in peak_gpu.items() if k.endswith("_step")
            },
            "peak_bf16_flops": peak,
            "train_mfu_bf16": None if peak is None else flops / median["train"] / peak,
        }
        result["peak_rss_mb"] = result["peak_gpu_mb"]
        result["naive_peak_rss_mb"] = result["naive_peak_gpu_mb"]
        result["memory_ratio"] = ratio(result["peak_gpu_mb"], result["naive_peak_gpu_mb"])
    elif settings.memory:
        log("measuring peak memory, one child process per variant")
        wanted = ["train"] + (["naive_train"] if settings.naive_train else []) + ["gen"]
        wanted += ["naive_gen"] if settings.naive_gen else []
        memory = measure_memory_in_children(settings, wanted, log)
        get = lambda v, k="peak_rss_mb": memory.get(v, {}).get(k)  # noqa: E731
        result |= {
            "peak_rss_mb": get("train"),
            "naive_peak_rss_mb": get("naive_train"),
            "memory_ratio": ratio(get("train"), get("naive_train")),
            "step_rss_mb": get("train", "step_rss_mb"),
            "naive_step_rss_mb": get("naive_train", "step_rss_mb"),
            "step_memory_ratio": ratio(
                get("train", "step_rss_mb"), get("naive_train", "step_rss_mb")
            ),
            "gen_peak_rss_mb": get("gen"),
            "naive_gen_peak_rss_mb": get("naive_gen"),
            "memory_children": memory,
        }
    result["settings"] = asdict(settings)
    result["device"] = describe_device(settings)
    result["total_s"] = time.perf_counter() - t0
    return result


def scaling_table(settings: Settings, log: Callable[[str], None] = print) -> list[dict]:
    """Median train and naive step times with one knob of :data:`SCALING` varied at a time (the
    others at the preset's values); the two steps interleaved, as in :func:`run_benchmark`."""
    rows, done = [], {}
    base = {"seq_len": settings.seq_len, "num_virtual_tokens": settings.num_virtual_tokens}
    base["vocab_size"] = model_dims(settings)["vocab_size"]
    for knob, values in SCALING.items():
        for value in values:
            point = base | {knob: value}
            key = tuple(sorted(point.items()))
            if key not in done:
                done[key] = _scaling_point(replace(settings, **point), log)
            rows.append({"vary": knob, **point, **done[key]})
    return rows


def _scaling_point(settings: Settings, log: Callable[[str], None]) -> dict:
    pair = build_pair(settings)
    batch = training_batch(settings, pair.vocab_size)
    train, module = project_train_step(settings, pair)
    naive = naive_train_step(settings, build_pair(settings, torch.float32), module.soft_prompt)
    steps = {"train": lambda: train(batch), "naive_train": lambda: naive(batch)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():
        timed(fn, settings.device)  # warm-up
    for r in range(settings.repeats):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            times[name].append(timed(steps[name], settings.device)[0])
    median = {name: statistics.median(values) for name, values in times.items()}
    log(
        f"scaling seq_len={settings.seq_len} virtual={settings.num_virtual_tokens} "
        f"vocab={pair.vocab_size}: train {median['train']:.3f}s, naive {median['naive_train']:.3f}s"
    )
    return {
        "train_step_s": median["train"],
        "naive_train_step_s": median["naive_train"],
        "train_speedup": ratio(median["naive_train"], median["train"]),
    }


def profile_steps(settings: Settings, log: Callable[[str], None] = print, top: int = 12) -> dict:
    """Where a train and a naive step spend their time: ``torch.profiler``'s operators by self
    time (one warm-up, then one profiled call of each), as a table per step. On CUDA the time is
    the kernels' device time; the naive step is left out when the preset leaves it out."""
    from torch.profiler import ProfilerActivity, profile

    pair = build_pair(settings)
    batch = training_batch(settings, pair.vocab_size)
    train, module = project_train_step(settings, pair)
    steps = {"train": lambda: train(batch)}
    if settings.naive_train:
        naive = naive_train_step(settings, build_pair(settings, torch.float32), module.soft_prompt)
        steps["naive_train"] = lambda: naive(batch)
    cuda = settings.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    clock = "self_device_time_total" if cuda else "self_cpu_time_total"
    tables = {}
    for name, fn in steps.items():
        fn()
        with profile(activities=activities) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        averages = prof.key_averages()
        total = sum(getattr(e, clock) for e in averages) or 1
        rows = sorted(averages, key=lambda e: -getattr(e, clock))[:top]
        tables[name] = [
            {
                "op": e.key,
                "self_s": getattr(e, clock) / 1e6,
                "share": getattr(e, clock) / total,
                "calls": e.count,
            }
            for e in rows
        ]
        log(
            f"profile {name}: " + ", ".join(f"{r['op']} {r['share']:.0%}" for r in tables[name][:5])
        )
    return tables


def saved_activations(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """What one real training step keeps for its backward: every tensor the autograd graph of
    its divergence saved, counted once per storage, by the operation that saved it. The frozen
    weights the matrix products keep (``MmBackward0``) are the models themselves, not the step's."""
    pair = build_pair(settings)
    batch = training_batch(settings, pair.vocab_size)
    _, module = project_train_step(settings, pair)
    models = (pair.model_1, pair.model_2)
    weights = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
    divergence = module.training_step(batch, 0)
    by_op: dict[str, float] = {}
    seen, stack, visited = set(), [divergence.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attribute in dir(node):  # built-in operations' _saved_*, custom Functions' own
            if not (attribute.startswith("_saved_") or attribute == "saved_tensors"):
                continue
            with contextlib.suppress(Exception):  # some saved values cannot be read back
                value = getattr(node, attribute)
                for tensor in value if isinstance(value, tuple | list) else [value]:
                    if not isinstance(tensor, torch.Tensor):
                        continue
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() in seen or storage.data_ptr() in weights:
                        continue
                    seen.add(storage.data_ptr())
                    key = f"{type(node).__name__}.{attribute.removeprefix('_saved_')}"
                    by_op[key] = by_op.get(key, 0.0) + storage.nbytes() / 2**20
        stack.extend(next_node for next_node, _ in node.next_functions)
    total = sum(by_op.values())
    rows = sorted(by_op.items(), key=lambda item: -item[1])
    log(f"saved for backward: {total:.0f} MB; " + ", ".join(f"{k} {v:.0f}" for k, v in rows[:6]))
    return {"total_mb": total, "by_op_mb": dict(rows)}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def consistency_checks(losses: dict, outputs: dict) -> dict:
    """Both formulations must compute the same thing: loss and generations side by side."""
    checks = {"divergence_first_step": {k: v for k, v in losses.items()}}
    if "train" in losses and "naive_train" in losses:
        checks["train_divergence_abs_diff"] = abs(losses["train"] - losses["naive_train"])
    if "gen" in outputs and "naive_gen" in outputs:
        ours, theirs = outputs["gen"], outputs["naive_gen"]
        same = sum(
            a["generation_1"] == b["generation_1"] for a, b in zip(ours, theirs, strict=True)
        )
        checks["gen_same_generation_1"] = same / max(1, len(ours))
        checks["gen_kl_max_abs_diff"] = (
            max(
                abs(a["metrics"]["kl_divergence"] - b["metrics"]["kl_divergence"])
                for a, b in zip(ours, theirs, strict=True)
                if a["generation_1"] == b["generation_1"]
            )
            if same
            else None
        )
    for name in ("gen_growing_cache", "gen_static_cache"):
        if "gen" in outputs and name in outputs:
            pairs = list(zip(outputs["gen"], outputs[name], strict=True))
            same = sum(a["generation_1"] == b["generation_1"] for a, b in pairs)
            checks[f"{name}_same_generation_1"] = same / max(1, len(pairs))
    return checks


def describe_device(settings: Settings) -> dict:
    info = {
        "device": settings.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = next(x.split(":", 1)[1].strip() for x in cpuinfo if "model name" in x)
    except (OSError, StopIteration):
        pass
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    if settings.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(MODELS), default="body_heavy")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="write the result here (also printed)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--gen-prompts", type=int, help="prompts generated for in one batch")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--gen-repeats", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the project's training.mixed_precision (default: auto, as train runs)",
    )
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None
    )
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--naive-train", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--naive-gen", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure peak RSS in child processes (CPU)",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="instead: time train and naive steps with seq_len, virtual tokens and vocabulary "
        "varied one at a time around the preset",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: torch.profiler's top operators of one train and one naive step",
    )
    parser.add_argument(
        "--activations",
        action="store_true",
        help="instead: what one train step saves for its backward, by operation (MB)",
    )
    parser.add_argument(
        "--variants",
        default="",
        help=f"comma-separated extra training or generation variants: {','.join(VARIANTS)}",
    )
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    parser.add_argument("--_settings", dest="settings_json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = preset_settings(args.preset, device)
    overrides = {
        "threads": args.threads,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "new_tokens": args.new_tokens,
        "gen_prompts": args.gen_prompts,
        "repeats": args.repeats,
        "gen_repeats": args.gen_repeats,
        "warmup": args.warmup,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "compile": args.compile,
        "naive_train": args.naive_train,
        "naive_gen": args.naive_gen,
        "memory": args.memory,
    }
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if args.variants:
        settings = replace(settings, variants=tuple(v for v in args.variants.split(",") if v))
    if args.threads is None:
        settings = replace(settings, threads=torch.get_num_threads())
    if settings.preset == "llama7b" and not device.startswith("cuda"):
        print("warning: the llama7b preset is meant for a GPU", file=sys.stderr)
    return settings


def main(argv: list[str] | None = None) -> dict | None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    args = parse_args(argv)
    if args.memory_child:
        settings = Settings(**json.loads(args.settings_json))
        settings.variants = tuple(settings.variants)
        torch.set_num_threads(settings.threads)
        print(json.dumps(memory_child(settings, args.memory_child)))
        return None
    settings = settings_from_args(args)
    torch.set_num_threads(settings.threads)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.scaling or args.profile or args.activations:
        result = {"preset": settings.preset}
        if args.scaling:
            result["scaling"] = scaling_table(settings, log)
        if args.profile:
            result["profile"] = profile_steps(settings, log)
        if args.activations:
            result["saved_for_backward"] = saved_activations(settings, log)
        result |= {"settings": asdict(settings), "device": describe_device(settings)}
    else:
        result = run_benchmark(settings, log=log)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
