"""A byte-level BPE tokenizer trained on a world's text, wrapped for transformers."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``.

    The tokenizer has ids 0, 1, 2 for ``<|bos|>``, ``<|eos|>`` and ``<|pad|>``, prepends
    ``<|bos|>`` when ``add_special_tokens=True`` (like LLaMA's tokenizer; no EOS is appended),
    reports character offsets (so :func:`lit_edit.tokenization.encode_pair` works) and decodes
    back to the exact text (byte-level, no clean-up of spaces).

    Args:
        texts: Training text, e.g. :meth:`World.pretraining_texts`.
        vocab_size: Vocabulary size including the 256 byte symbols and the 3 special tokens.

    Returns:
        The wrapped tokenizer (``padding_side="left"``, the scoring convention).

    Raises:
        ValueError: if ``texts`` is empty.
    """
    if not texts:
        raise ValueError("cannot train a tokenizer on no text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=256,
    )
