"""The ``fit``-start ``max_length`` check of ``datasets``-backed records, tokenized once and cached.

At the start of ``fit`` every training and validation record goes through the method's training
collation once (:func:`~lit_edit.data.collate.check_collatable`: an answer is never truncated, so
a too short ``max_length`` must fail before the first step, or ``long_records: skip`` leave the
record out). For records backed by a ``datasets`` table (:class:`~lit_edit.data.arrow.ArrowRecords`)
that tokenization runs through :meth:`datasets.Dataset.map` over the split's rows (batched, one
process), and what it gives, one ``int8`` per row (1: fits, 0: does not), is written by
``datasets`` as an Arrow cache file next to the table's own cache (``cache-<fingerprint>.arrow``).
Its fingerprint hashes the table's fingerprint and the split's rows (``datasets``' own fingerprint
of the row selection) with the method's collation key (:func:`collation_key`: the method class,
its hyperparameters, the collator's ``max_length`` and padding side, the tokenizer, and the source
of the method's module and of the collation and tokenization code). A second run with the same
data and settings, and every other process of a multi-process run, memory-maps the flags instead
of tokenizing again; the split is never turned into a Python list of records (the kept records
are a row selection of the same table).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from lit_edit.data.arrow import ArrowRecords, decode_rows
from lit_edit.data.collate import PairCollator, check_collatable
from lit_edit.records import DataFileError, EditRecord

FITS_COLUMN = "lit_edit_fits"
"""The column of the cached check: 1 when the record's training collation fits ``max_length``."""


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


def _fits(collate: Callable[[list[EditRecord]], Any], collator: PairCollator,
          record: EditRecord) -> bool:
    """Whether ``collate([record])`` fits the collator's ``max_length``."""
    return bool(check_collatable([record], collate, collator, "", "skip"))


def cached_fits(records: ArrowRecords, collate: Callable[[list[EditRecord]], Any],
                collator: PairCollator, key: str) -> np.ndarray:
    """Whether each record's training collation fits ``max_length``, from the cache or tokenized.

    Args:
        records: The split's records.
        collate: The method's training batch builder.
        collator: The :class:`~lit_edit.data.collate.PairCollator` it uses.
        key: :func:`collation_key` of the method.

    Returns:
        ``[len(records)]`` booleans, in the records' order.
    """
    import datasets
    from datasets.fingerprint import Hasher

    rows = records.rows
    selection = records.table.select(rows)  # datasets fingerprints the row selection

    def flags(batch: dict[str, list[Any]], positions: list[int]) -> dict[str, list[int]]:
        """1 for each record of the batch that collates within ``max_length``, else 0."""
        out = []
        for position, raw in zip(positions, decode_rows(batch, records.json_rows), strict=True):
            record = records.build(int(rows[position]), raw)
            out.append(int(_fits(collate, collator, record)))
        return {FITS_COLUMN: out}

    fingerprint = Hasher.hash(["lit_edit-fits-v1", selection._fingerprint, key])
    flagged = selection.map(
        flags, batched=True, with_indices=True, remove_columns=selection.column_names,
        features=datasets.Features({FITS_COLUMN: datasets.Value("int8")}),
        new_fingerprint=fingerprint, desc="lit_edit: max_length check (tokenized once, cached)",
    )
    return np.asarray(flagged.with_format("numpy")[FITS_COLUMN]) == 1


def fits_on_each_machine(trainer: Any, records: ArrowRecords,
                         collate: Callable[[list[EditRecord]], Any], collator: PairCollator,
                         key: str) -> np.ndarray:
    """:func:`cached_fits`, computed by one process per machine.

    With several processes the first of each machine tokenizes (or opens the cache) while the
    others wait at a barrier, then open the cache file it wrote.

    Args:
        trainer: The Lightning trainer (``None``: one process).
        records: The split.
        collate: The method's training collation.
        collator: Its pair collator (``max_length``).
        key: :func:`collation_key`.

    Returns:
        One bool per record: whether it fits.
    """
    many = trainer is not None and trainer.world_size > 1
    if many and trainer.local_rank == 0:
        fits = cached_fits(records, collate, collator, key)
        trainer.strategy.barrier("lit_edit-max-length-check")
        return fits
    if many:
        trainer.strategy.barrier("lit_edit-max-length-check")
    return cached_fits(records, collate, collator, key)


def check_collatable_arrow(
    records: ArrowRecords,
    collate: Callable[[list[EditRecord]], Any],
    collator: PairCollator,
    split: str,
    long_records: str,
    fits: np.ndarray,
) -> ArrowRecords:
    """:func:`~lit_edit.data.collate.check_collatable` with the flags of :func:`cached_fits`.

    Args:
        records: The split's records.
        collate: The method's training batch builder.
        collator: The :class:`~lit_edit.data.collate.PairCollator` it uses.
        split: Name of the split (for the error).
        long_records: ``"error"`` or ``"skip"``.
        fits: :func:`cached_fits` of ``records``.

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
