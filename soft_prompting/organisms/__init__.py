"""Model organisms: tiny Llama models with planted behaviours, built on first use from the toy
world in :mod:`~soft_prompting.organisms.corpus`, so everything runs offline.

``organism:NAME`` works wherever a model id does; ``python -m soft_prompting.organisms`` builds them
all and prints their folders.
"""

from soft_prompting.organisms.builder import (
    ORGANISM_PREFIX,
    ORGANISMS,
    PLANTED_BEHAVIOURS,
    cache_dir,
    is_organism,
    organism_path,
)

__all__ = [
    "ORGANISMS",
    "ORGANISM_PREFIX",
    "PLANTED_BEHAVIOURS",
    "cache_dir",
    "is_organism",
    "organism_path",
]
