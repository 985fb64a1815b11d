"""``datasets``-backed records tokenized once at the start of ``fit``, cached with their token ids.

At the start of ``fit`` every training and validation record goes through the method's training
collation once (:func:`~lit_edit.data.collate.check_collatable`: an answer is never truncated, so
a too short ``max_length`` must fail before the first step, or ``long_records: skip`` leave the
record out). For records backed by a ``datasets`` table (:class:`~lit_edit.data.arrow.ArrowRecords`)
that tokenization runs through :meth:`datasets.Dataset.map` over the split's rows (batched, one
process), and what it gives per row — whether it fits (``int8``) and the (prompt, answer) texts
and untruncated token ids of every pair its collation encoded — is written by ``datasets`` as an
Arrow cache file next to the table's own cache (``cache-<fingerprint>.arrow``). Its fingerprint
hashes the table's fingerprint and the split's rows (``datasets``' own fingerprint of the row
selection) with the method's collation key (:func:`collation_key`: the method class, its
hyperparameters, the collator's ``max_length`` and padding side, the tokenizer, and the source
of the method's module and of the collation and tokenization code). A second run with the same
data and settings, and every other process of a multi-process run, memory-maps the file instead
of tokenizing again; the split is never turned into a Python list of records (the kept records
are a row selection of the same table). During training each batch's encodings are read from
the file (:func:`known_encodings` into :attr:`PairCollator.known
<lit_edit.data.collate.PairCollator>`), so the loader does not tokenize again: the same ids,
read instead of computed (truncation to ``max_length`` is still applied by the collator).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lit_edit.data.arrow import ArrowRecords, decode_rows
from lit_edit.data.collate import PairCollator, check_collatable
from lit_edit.records import DataFileError, EditRecord
from lit_edit.tokenization import EncodedPair

FITS_COLUMN = "lit_edit_fits"
"""The column of the cached check: 1 when the record's training collation fits ``max_length``."""
PROMPTS, ANSWERS = "lit_edit_prompts", "lit_edit_answers"
"""The columns of the (prompt, answer) texts of every pair a record's training collation encodes."""
PROMPT_IDS, ANSWER_IDS = "lit_edit_prompt_ids", "lit_edit_answer_ids"
"""The columns of those pairs' token ids (untruncated, as ``encode_pair`` gives them)."""
COLUMNS = (FITS_COLUMN, PROMPTS, ANSWERS, PROMPT_IDS, ANSWER_IDS)
"""Every column of the token cache."""


def collation_key(method: Any, collator: PairCollator) -> str:
    """A key of everything the training collation of ``method`` depends on.

    Args:
        method: The editor (a ``LightningModule`` with ``hparams``).
        collator: Its training :class:`~lit_edit.data.collate.PairCollator`.

    Returns:
        A hex digest: the method's class and module source, its hyperparameters, the collator's
        settings, the tokenizer (``datasets``' hash of it) and the collation and tokenization code.
    """
    from datasets.fingerprint import Hasher

    from lit_edit import tokenization
    from lit_edit.data import collate

    cls = type(method)
    sources = [inspect.getsource(m) for m in (inspect.getmodule(cls), collate, tokenization)
               if m is not None]
    parts = [
        f"{cls.__module__}.{cls.__qualname__}",
        json.dumps(dict(getattr(method, "hparams", {})), sort_keys=True, default=repr),
        str(collator.max_length), collator.padding_side,
        Hasher.hash(collator.tokenizer),
        *sources,
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class TokenCache:
    """The cached tokenization of a split: per row, whether it fits and the pairs' token ids.

    Args:
        table: The ``datasets`` table of :func:`cached_tokens` (memory-mapped), one row per
            record of ``rows``.
        rows: The records' table rows, in the table's order.
        source: The records' file (``EditRecord.source``).
    """

    def __init__(self, table: Any, rows: np.ndarray, source: str) -> None:
        self.table = table
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)
        self._order = np.argsort(self.rows, kind="stable")
        self._sorted = self.rows[self._order]
        self.fits = np.asarray(table.with_format("numpy")[FITS_COLUMN]) == 1

    def encodings(self, records: Sequence[EditRecord]) -> dict[tuple[str, str], EncodedPair]:
        """The cached encodings of every pair the training collation of ``records`` tokenizes.

        Args:
            records: A batch; records of another file or row are left out (tokenized as usual).

        Returns:
            ``(prompt, answer)`` → its untruncated encoding.
        """
        rows = np.asarray([r.index for r in records if r.source == self.source], dtype=np.int64)
        if not len(rows):
            return {}
        at = np.minimum(np.searchsorted(self._sorted, rows), len(self._sorted) - 1)
        found = self._sorted[at] == rows
        positions = self._order[at[found]].tolist()
        out: dict[tuple[str, str], EncodedPair] = {}
        if not positions:
            return out
        got = self.table[positions]
        for prompts, answers, p_ids, a_ids in zip(got[PROMPTS], got[ANSWERS], got[PROMPT_IDS],
                                                  got[ANSWER_IDS], strict=True):
            for key, enc in zip(zip(prompts, answers, strict=True),
                                map(EncodedPair, p_ids, a_ids), strict=True):
                out[key] = enc
        return out


def known_encodings(caches: Sequence[TokenCache],
                    records: Sequence[EditRecord]) -> dict[tuple[str, str], EncodedPair]:
    """The cached encodings of a batch, from whichever split's cache holds each record.

    Args:
        caches: The method's token caches (``EditorModule.token_caches``; empty: none).
        records: The batch.

    Returns:
        ``(prompt, answer)`` → encoding, for :attr:`PairCollator.known
        <lit_edit.data.collate.PairCollator>` (empty when nothing is cached).
    """
    out: dict[tuple[str, str], EncodedPair] = {}
    for cache in caches:
        out.update(cache.encodings(records))
    return out


def cached_tokens(records: ArrowRecords, collate: Callable[[list[EditRecord]], Any],
                  collator: PairCollator, key: str) -> TokenCache:
    """Each record's training collation tokenized once: whether it fits, and its token ids.

    Args:
        records: The split's records.
        collate: The method's training batch builder.
        collator: The :class:`~lit_edit.data.collate.PairCollator` it uses.
        key: :func:`collation_key` of the method.

    Returns:
        The split's :class:`TokenCache` (from the cache file, or tokenized and written).
    """
    import datasets
    from datasets.fingerprint import Hasher

    rows = records.rows
    selection = records.table.select(rows)  # datasets fingerprints the row selection

    def tokenize(batch: dict[str, list[Any]], positions: list[int]) -> dict[str, list[Any]]:
        """Collate each record of the batch alone: fits or not, and every pair it tokenized."""
        out: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        for position, raw in zip(positions, decode_rows(batch, records.json_rows), strict=True):
            record = records.build(int(rows[position]), raw)
            collator.recorded = recorded = []
            try:
                fits = check_collatable([record], collate, collator, "", "skip")
            finally:
                collator.recorded = None
            out[FITS_COLUMN].append(int(bool(fits)))
            pairs = dict(recorded)  # each distinct pair once
            out[PROMPTS].append([p for p, _ in pairs])
            out[ANSWERS].append([a for _, a in pairs])
            out[PROMPT_IDS].append([e.prompt_ids for e in pairs.values()])
            out[ANSWER_IDS].append([e.answer_ids for e in pairs.values()])
        return out

    ids = datasets.Sequence(datasets.Sequence(datasets.Value("int32")))
    features = datasets.Features({
        FITS_COLUMN: datasets.Value("int8"), PROMPTS: datasets.Sequence(datasets.Value("string")),
        ANSWERS: datasets.Sequence(datasets.Value("string")), PROMPT_IDS: ids, ANSWER_IDS: ids,
    })
    fingerprint = Hasher.hash(["lit_edit-tokens-v2", selection._fingerprint, key])
    collator.known = {}  # tokenize everything here
    table = selection.map(
        tokenize, batched=True, with_indices=True, remove_columns=selection.column_names,
        features=features, new_fingerprint=fingerprint,
        desc="lit_edit: tokenizing the split once (max_length check, cached token ids)",
    )
    return TokenCache(table, rows, records.source)


def tokens_on_each_machine(trainer: Any, records: ArrowRecords,
                           collate: Callable[[list[EditRecord]], Any], collator: PairCollator,
                           key: str) -> TokenCache:
    """:func:`cached_tokens`, computed by one process per machine.

    With several processes the first of each machine tokenizes (or opens the cache) while the
    others wait at a barrier, then open the cache file it wrote.

    Args:
        trainer: The Lightning trainer (``None``: one process).
        records: The split.
        collate: The method's training collation.
        collator: Its pair collator (``max_length``).
        key: :func:`collation_key`.

    Returns:
        The split's token cache.
    """
    many = trainer is not None and trainer.world_size > 1
    if many and trainer.local_rank == 0:
        cache = cached_tokens(records, collate, collator, key)
        trainer.strategy.barrier("lit_edit-max-length-check")
        return cache
    if many:
        trainer.strategy.barrier("lit_edit-max-length-check")
    return cached_tokens(records, collate, collator, key)


def check_collatable_arrow(
    records: ArrowRecords,
    collate: Callable[[list[EditRecord]], Any],
    collator: PairCollator,
    split: str,
    long_records: str,
    fits: np.ndarray,
) -> ArrowRecords:
    """:func:`~lit_edit.data.collate.check_collatable` with the flags of :func:`cached_tokens`.

    Args:
        records: The split's records.
        collate: The method's training batch builder.
        collator: The :class:`~lit_edit.data.collate.PairCollator` it uses.
        split: Name of the split (for the error).
        long_records: ``"error"`` or ``"skip"``.
        fits: :attr:`TokenCache.fits` of ``records``.

    Returns:
        The records that fit (a row selection; ``records`` itself when all do).

    Raises:
        DataFileError: the error :func:`~lit_edit.data.collate.check_collatable` gives for the
            first record that does not fit (that record is collated again to say why).
    """
    if collator.max_length is None or bool(fits.all()):
        return records
    if long_records != "skip":
        first = records[int(np.argmin(fits))]
        check_collatable([first], collate, collator, split, "error")
        raise DataFileError(first.source or "<records>", f"{split} split: the cached max_length "
                            "check and the collation disagree; clear the datasets cache",
                            first.index)
    return records.select(np.flatnonzero(fits).tolist())
