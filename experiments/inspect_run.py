# %% [markdown]
# # Inspect a finished run
#
# Loads a training run's Lightning checkpoint — a few kilobytes: the soft prompt and the model ids,
# from which the frozen pair is rebuilt — regenerates a few divergent examples and plots them.
#
# The test suite executes this notebook in a Jupyter kernel on a tiny run. It has a script twin for
# terminals, `experiments/inspect_run.py`, with the same cells (a test checks it; keep them identical,
# e.g. `jupytext --sync experiments/inspect_run.ipynb`):
#
#     RUN_DIR=outputs/experiment_1 python experiments/inspect_run.py

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from soft_prompting.hard_prompts.sampling import SamplingSettings, score_prompts
from soft_prompting.run_files import read_jsonl
from soft_prompting.training.module import DivergenceModule

RUN_DIR = Path(os.environ.get("RUN_DIR", "outputs/experiment_1"))
NUM_EXAMPLES = int(os.environ.get("NUM_EXAMPLES", "4"))

# %% [markdown]
# ## The soft prompt, back from its checkpoint

# %%
module = DivergenceModule.load_from_checkpoint(
    RUN_DIR / "checkpoints" / "last.ckpt", map_location="cpu"
)
print(f"{module.hparams.model_1_name}  vs  {module.hparams.model_2_name}")
print(f"soft prompt: {tuple(module.soft_prompt.shape)} (virtual tokens, hidden size)")

# %% [markdown]
# ## A few divergent examples, regenerated
#
# The run's top prompts are scored again *without* the soft prompt: both models continue each one
# and the per-token KL(p1 || p2) of model_1's continuation is measured. Beside it, the divergence
# on each prompt's own text with and without the soft prompt: what the training optimised.

# %%
dataset_file = RUN_DIR / "divergent_dataset.jsonl"
if not dataset_file.is_file():
    raise FileNotFoundError(f"{dataset_file} is missing: train with write_dataset=true")
records = read_jsonl(dataset_file)[:NUM_EXAMPLES]
prompts = [record["prompt"] for record in records]
params = records[0]["generation_params"]
settings = SamplingSettings(
    max_length=params["max_length"],
    num_generations_per_prompt=params["num_generations_per_prompt"],
    temperature=params["temperature"],
    top_p=params["top_p"],
)
regenerated = score_prompts(module.pair, prompts, settings, seed=1, progress=False)

tokenizer = module.tokenizer
tokenizer.padding_side = "left"
with_prompt, without_prompt = [], []
with torch.no_grad():
    for prompt in prompts:
        batch = tokenizer([prompt], return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with_prompt.append(module.divergence(ids, mask).item())
        without_prompt.append(module.divergence(ids, mask, use_prompt=False).item())

for number, (old, new) in enumerate(zip(records, regenerated, strict=True), start=1):
    print(
        f"#{number}  KL {new['metrics']['kl_divergence']:.3f} "
        f"(in the dataset: {old['metrics']['kl_divergence']:.3f})  {new['prompt']!r}"
    )
    print(f"    model_1: {new['generation_1']!r}")
    print(f"    model_2: {new['generation_2']!r}")

# %% [markdown]
# ## Plots

# %%
labels = [f"#{number}" for number in range(1, len(prompts) + 1)]
positions = range(len(prompts))
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
left.bar(
    [p - 0.2 for p in positions],
    [r["metrics"]["kl_divergence"] for r in records],
    0.4,
    label="in the dataset",
)
left.bar(
    [p + 0.2 for p in positions],
    [r["metrics"]["kl_divergence"] for r in regenerated],
    0.4,
    label="regenerated",
)
left.set_xticks(list(positions), labels)
left.set_ylabel("KL(p1 || p2) per continuation token")
left.set_title("Top prompts, no soft prompt")
left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
right.bar([p - 0.2 for p in positions], without_prompt, 0.4, label="without soft prompt")
right.bar([p + 0.2 for p in positions], with_prompt, 0.4, label="with soft prompt")
right.set_xticks(list(positions), labels)
right.set_ylabel(f"{module.hparams.divergence} divergence per text token")
right.set_title("On the prompt's own text")
right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
fig.tight_layout()
plot_file = RUN_DIR / "inspect_run.png"
fig.savefig(plot_file, dpi=100)
print(f"plot: {plot_file}")
plt.show()
