"""``EditorModule``: the LightningModule every editing method subclasses."""

from __future__ import annotations

import logging
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_edit.backbone import Backbone
from lit_edit.data.arrow import ArrowRecords
from lit_edit.data.arrow_tokens import (
    TokenCache,
    check_collatable_arrow,
    collation_key,
    tokens_on_each_machine,
)
from lit_edit.data.collate import PairCollator, check_collatable
from lit_edit.editing import EditHandle, EditorSequences, EditSequence
from lit_edit.evaluation import Evaluation
from lit_edit.records import EditRecord, QAPair
from lit_edit.scoring import GeneratedAnswer, Generation, PairScore
from lit_edit.settings import plain

log = logging.getLogger(__name__)


class _EditorMeta(ABCMeta, type(L.LightningModule)):
    """ABCMeta on top of LightningModule's metaclass, so that ``edit`` must be implemented."""


class EditorModule(L.LightningModule, metaclass=_EditorMeta):
    """Base class of every knowledge editor (the contract: :class:`~lit_edit.editor.Editor`).

    A subclass implements :meth:`edit` (apply edits, return a handle that restores them
    bit-exactly; a class without it cannot be instantiated; an edit that changes parameters in
    place makes its handle with :meth:`weights_handle`), and ``training_step`` /
    ``configure_optimizers`` if it learns anything. Methods that answer from a prompt with the
    edit in it (IKE, LTE) override the one hook :meth:`contextualise`; methods that answer
    through something else than the backbone (SERAC's counterfactual model) override
    :meth:`score_pairs` and :meth:`generate_answers`. A method that takes one edit at a time
    sets :attr:`max_edits_per_call` to 1. Lightning's ``test`` runs the editing evaluation
    (:class:`~lit_edit.evaluation_loop.EvaluationLoop`, added as a callback), with the
    protocol and settings of :attr:`evaluation`.

    Checkpoints hold what the method learned (:meth:`learned_state_keys`), not the frozen
    backbone.

    Args:
        backbone: Model to edit: a name (``"tinyfacts"``, the embedded default; a local
            directory or a hub name) or a :class:`~lit_edit.backbone.Backbone` spec (name,
            dtype, ``trust_remote_code``, revision).

    Attributes:
        max_edits_per_call: Most records one :meth:`edit` accepts (``None``: any number).
        needs_training: Whether the method edits through something it learns in ``fit`` (MEND's
            network, SERAC's classifier and counterfactual model, LTE's aligned model), so that
            evaluating it without
            a checkpoint scores an untrained editor: ``evaluate.py`` then refuses to run without
            ``--ckpt_path`` unless given ``--allow_untrained true``.
        long_records: What ``fit`` does with a record longer than the training
            ``max_length`` (``"error"`` or ``"skip"``; methods with a ``max_length`` take it as
            an init argument).
        unsupported_strategies: Strategy families ``fit`` refuses for this method, each with
            why and what to use instead (see :func:`lit_edit.strategies.check_strategy`;
            ``test`` always needs one device or DDP).
        evaluation: The evaluation settings ``test`` uses (the CLI sets them from its
            ``evaluation:`` section).
    """

    max_edits_per_call: int | None = None
    needs_training: bool = False
    unsupported_strategies: ClassVar[dict[str, str]] = {}
    long_records: str = "error"

    def __init__(self, backbone: Backbone | str = "tinyfacts") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = Backbone.of(backbone)
        for key, value in list(self.hparams.items()):  # plain values: checkpoints load safely
            self.hparams[key] = plain(value)
        self.hparams["backbone"] = self.backbone.to_hparam()
        self.model = self.backbone.load_model()
        self.tokenizer = self.backbone.load_tokenizer()
        self.model.requires_grad_(False)
        self.evaluation = Evaluation()
        self._sequences = EditorSequences()
        self.token_caches: list[TokenCache] = []  # the datasets backend's, set by fit's setup

    def test_shard_unit(self) -> int:
        """Consecutive test records one process evaluates together in a multi-process ``test``.

        The protocol's :attr:`~lit_edit.protocols.EditingProtocol.shard_unit` (``1`` for single
        edits, the batch size for batch edits, T for sequential editing); handed to the data
        module by :func:`~lit_edit.links.connect`.
        """
        return self.evaluation.protocol.shard_unit

    # ------------------------------------------------------------------ the editing contract
    @abstractmethod
    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Apply the edits of ``records`` together.

        The protocols call it with grad enabled, outside inference mode
        (:func:`~lit_edit.editor.apply_edit`).

        Args:
            records: One or more edit records (at most :attr:`max_edits_per_call`).

        Returns:
            A handle whose ``restore()`` brings the editor back bit-exactly.
        """

    def weights_handle(self, params: Sequence[torch.nn.Parameter]) -> EditHandle:
        """The handle of an edit about to change ``params`` in place: call it before changing them.

        Outside an edit sequence, a :class:`~lit_edit.editing.WeightsHandle` (a copy of each
        parameter: the edit alone is restored bit-exactly, as the single and batch protocols
        need). Inside one (:meth:`edit_sequence`, the sequential protocol's group), the
        sequence copies each parameter once, at its first edit, and the handle holds nothing
        (:class:`~lit_edit.editing.CoveredEdit`: restored with the sequence, not alone).

        Args:
            params: The parameters the edit changes.

        Returns:
            The edit's handle.
        """
        return self._sequences.weights_handle(params)

    def state_handle(self, owner: object, take: Callable[[], EditHandle]) -> EditHandle:
        """The handle of an edit about to change a non-parameter state in place (call it before).

        Like :meth:`weights_handle` for state that is not a parameter (e.g. WISE's side
        memory): outside an edit sequence ``take()`` (one handle per edit); inside one the
        sequence takes it once, at its first edit, and the handle holds nothing.

        Args:
            owner: The object whose state the edit changes.
            take: Makes a handle restoring ``owner``'s current state.

        Returns:
            The edit's handle.
        """
        return self._sequences.state_handle(owner, take)

    def edit_sequence(self) -> EditSequence:
        """Open a sequence of edits kept one after another and undone together.

        Push each edit's handle on it; its ``restore()`` (or context exit) brings the editor
        back bit-exactly to its state at the opening. It holds one copy of each parameter its
        edits change in place (:meth:`weights_handle`), whatever the number of edits, plus the
        other handles (e.g. edit-memory truncations). Until it is restored, every in-place edit
        of this editor is covered by it. :func:`~lit_edit.editor.open_sequence` calls it.

        Returns:
            The open sequence.
        """
        return self._sequences.open()

    def contextualise(self, prompts: Sequence[str]) -> list[str]:
        """The prompts the backbone is given for ``prompts`` under the current state.

        The identity by default; in-context methods put the edits in effect in front.
        :meth:`score_pairs` and :meth:`generate_answers` go through it; fluency samples
        (:meth:`sample`) do not (KnowEdit and LTE sample from the bare prompt).

        Args:
            prompts: Questions or sentence beginnings.

        Returns:
            One prompt per input, in order.
        """
        return list(prompts)

    def _contextualised(self, pairs: Sequence[QAPair]) -> list[QAPair]:
        """The pairs with their prompts through :meth:`contextualise`."""
        prompts = self.contextualise([p.prompt for p in pairs])
        return [
            pair if prompt == pair.prompt else QAPair(prompt, pair.answer, pair.aliases)
            for prompt, pair in zip(prompts, pairs, strict=True)
        ]

    def score_pairs(self, pairs: Sequence[QAPair]) -> list[PairScore]:
        """Teacher-forced scores of ``pairs`` under the editor's current state.

        Args:
            pairs: (prompt, answer) pairs.

        Returns:
            One score per pair, in order.
        """
        return self.evaluation.scorer().score(
            self.model, self.tokenizer, self._contextualised(pairs)
        )

    def generate_answers(self, pairs: Sequence[QAPair]) -> list[GeneratedAnswer]:
        """Greedy continuations of the pairs' prompts (exact match) under the current state.

        Args:
            pairs: (prompt, answer) pairs; the answer and its aliases set the lengths.

        Returns:
            One generated answer per pair, in order.
        """
        return self.evaluation.scorer().generate_answers(
            self.model, self.tokenizer, self._contextualised(pairs)
        )

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str]:
        """Greedy continuations of ``prompts`` under the current state (for notebooks).

        Through :meth:`contextualise`, like :meth:`generate_answers`; generation stops at EOS.

        Args:
            prompts: Questions or sentence beginnings.
            max_new_tokens: Most tokens generated per prompt.

        Returns:
            The generated text of each prompt (without the prompt).
        """
        generations = self.evaluation.scorer().generate(
            self.model, self.tokenizer, self.contextualise(prompts), max_new_tokens
        )
        return [g.text for g in generations]

    def record_values(self, records: Sequence[EditRecord]) -> list[dict[str, float | None]]:
        """Method-specific values of each record under the current state (none by default).

        Called by the evaluator right after scoring ``records``; the values join each record's
        metric values in ``records.jsonl``, their means are logged as ``test/<key>`` (``/`` as
        ``_``), and keys with a ``/`` are averaged in the summary's ``breakdown``. E.g. LTE's
        retrieval hit rates.

        Args:
            records: The records just scored.

        Returns:
            One dict per record, in order.
        """
        return [{} for _ in records]

    def sample(self, prompts: Sequence[str], max_length: int, seed: int) -> list[Generation]:
        """Seeded top-k samples (fluency) under the editor's current state.

        Args:
            prompts: Prompts.
            max_length: Total length in tokens, prompt included.
            seed: Seed of the sampling generators.

        Returns:
            One generation per prompt (``full_text`` is the fluency text).
        """
        return self.evaluation.scorer().sample(
            self.model, self.tokenizer, prompts, max_length=max_length, seed=seed
        )

    def edit_state_keys(self) -> set[str]:
        """The ``state_dict`` keys an edit may change (none by default).

        The contract test checks that an edit changes nothing else and that its handle brings
        these back bit-exactly. E.g. FT and MEND: their inner matrices; LTE: its edit memory.
        """
        return set()

    # ------------------------------------------------------------------ checkpoints
    def learned_state_keys(self) -> set[str]:
        """The ``state_dict`` keys a checkpoint keeps: what the method learned.

        By default: every tensor outside the backbone, and the backbone's parameters that
        require grad (those the method trains: LTE's full fine-tuning, LoRA adapters). The
        frozen backbone is left out, and is re-inserted from the loaded backbone on load. A
        method with learned state inside the backbone that does not require grad (WISE's side
        memory) adds its keys here.

        Returns:
            The keys to save.
        """
        model = self.model
        frozen = {  # tied weights (lm_head = wte) appear under every name
            f"model.{n}"
            for n, p in model.named_parameters(remove_duplicate=False)
            if not p.requires_grad
        }
        frozen |= {f"model.{n}" for n, _ in model.named_buffers(remove_duplicate=False)}
        return {k for k in self.state_dict() if k not in frozen}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only :meth:`learned_state_keys` and record the writing class."""
        keep = self.learned_state_keys()
        state = checkpoint["state_dict"]
        for key in [k for k in state if k not in keep]:
            del state[key]
        checkpoint["lit_edit_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint was written by this class and re-insert what it left out.

        Raises:
            TypeError: if another editor class wrote the checkpoint.
        """
        written_by = checkpoint.get("lit_edit_class")
        mine = f"{type(self).__module__}.{type(self).__qualname__}"
        if written_by is not None and written_by != mine:
            raise TypeError(
                f"checkpoint was written by {written_by}; it cannot be loaded into {mine}"
            )
        state = checkpoint["state_dict"]
        learned = self.learned_state_keys()
        for key, value in self.state_dict().items():
            if key not in state and key not in learned:
                state[key] = value

    # ------------------------------------------------------------------ Lightning plumbing
    def training_collation(self) -> tuple[Any, PairCollator] | None:
        """The batch builder ``fit`` tokenizes records with, and its :class:`PairCollator`.

        ``None`` (the default): the method does not tokenize records for training with a
        ``max_length``. A method that does returns both, and :meth:`setup` checks every
        training and validation record against the collator's ``max_length`` before the first
        step (an answer is never truncated).
        """
        return None

    def setup(self, stage: str) -> None:
        """At the start of ``fit``: every training and validation record fits ``max_length``.

        With ``long_records: skip`` the records that do not fit are left out of the splits
        (their number and indices logged). ``datasets``-backed records are tokenized once here
        and cached with their token ids (:mod:`~lit_edit.data.arrow_tokens`) for the batches.

        Raises:
            DataFileError: naming the first record with an answer longer than ``max_length``.
        """
        collation = self.training_collation()
        records = getattr(getattr(self._trainer, "datamodule", None), "records", None)
        if stage != "fit" or collation is None or not isinstance(records, dict):
            return
        key, self.token_caches = None, []
        for split in ("train", "val"):
            given = records.get(split)
            if not given:
                continue
            if isinstance(given, ArrowRecords):  # tokenized once through datasets, cached
                key = key or collation_key(self, collation[1])
                cache = tokens_on_each_machine(self._trainer, given, *collation, key)
                self.token_caches.append(cache)  # the token ids of its batches (known_encodings)
                kept = check_collatable_arrow(given, *collation, split, self.long_records,
                                              cache.fits)
                left = given.rows[~cache.fits].tolist()
            elif collation[1].max_length is None:  # nothing can be too long
                continue
            else:
                kept = check_collatable(given, *collation, split, self.long_records)
                left = sorted(set(r.index for r in given) - set(r.index for r in kept))
            if len(kept) < len(given):
                log.warning("%s split: left out %d of %d records whose answer is longer than "
                            "max_length=%d (long_records: skip); record indices %s", split,
                            len(given) - len(kept), len(given), collation[1].max_length, left)
                records[split] = kept

    def configure_callbacks(self) -> list[Callback]:
        """Add the evaluation of ``test`` and the random states in checkpoints.

        :class:`EvaluationLoop` edits and scores;
        :class:`~lit_edit.callbacks.RandomStateCheckpoint` lets a resumed ``fit`` continue the
        random streams.
        """
        from lit_edit.callbacks import RandomStateCheckpoint
        from lit_edit.evaluation_loop import EvaluationLoop

        return [EvaluationLoop(), RandomStateCheckpoint()]

    def test_step(self, batch: list[EditRecord], batch_idx: int) -> None:
        """Nothing: the :class:`~lit_edit.evaluation_loop.EvaluationLoop` edits and scores."""
        return None

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Move tensors to ``device``, leaving edit records (frozen dataclasses) as they are."""
        from lit_edit.data.transfer import move_batch_to_device

        return move_batch_to_device(batch, device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of the backbone under its current weights.

        Args:
            input_ids: ``[B, L]`` token ids.
            attention_mask: ``[B, L]`` with 1 on real tokens.

        Returns:
            ``[B, L, V]`` logits.
        """
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
