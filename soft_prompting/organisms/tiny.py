"""Untrained tiny pairs: a word-level tokenizer and random-init Llamas, built in milliseconds,
nothing downloaded. The benchmark times them and the tests run on them; the same seed always gives
the same weights, so two seeds give two different models sharing one tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
"""Ids 0, 1, 2, 3 of every tiny tokenizer, as :func:`random_llama` expects them."""


def word_tokenizer(
    words: Sequence[str], model_max_length: int = 128, padding_side: str = "right"
) -> PreTrainedTokenizerFast:
    """A real fast tokenizer splitting on whitespace, one token per known word.

    Args:
        words: The vocabulary after the special tokens (``SPECIAL_TOKENS`` take ids 0-3); an
            unknown word becomes ``<unk>``.
        model_max_length: Longest input the tokenizer accepts without warning.
        padding_side: ``"right"`` or ``"left"``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side=padding_side,
    )


def random_llama(
    seed: int,
    vocab_size: int,
    hidden_size: int = 32,
    intermediate_size: int | None = None,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    max_position_embeddings: int = 128,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """A random-init ``LlamaForCausalLM`` whose weights depend only on ``seed`` and the shape.

    Initialised right on ``device`` in ``dtype`` (fast even for 7B shapes on a GPU). Special token
    ids match :func:`word_tokenizer`. ``intermediate_size`` defaults to twice ``hidden_size`` and
    ``num_key_value_heads`` to ``num_attention_heads`` (no grouped-query attention).
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
    )
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            return AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
