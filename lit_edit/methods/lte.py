"""LTE — Learning to Edit (Jiang et al., ACL 2024): alignment, then retrieval-based editing."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lit_edit.backbone import Backbone
from lit_edit.data.collate import PairCollator
from lit_edit.links import RecordsOf
from lit_edit.methods.base import EditorModule
from lit_edit.methods.lte_editing import RetrievalEditing
from lit_edit.nn.lora import LoraSettings, default_lora_targets, with_lora
from lit_edit.nn.losses import answer_logits
from lit_edit.nn.lte_positions import extend_context, set_dropout
from lit_edit.nn.lte_states import QuestionStates
from lit_edit.nn.lte_templates import ChatWrapper, TemplateName, template_text
from lit_edit.nn.retrieval import DEFAULT_ENCODER, EditMemory, Retriever
from lit_edit.nn.scope import ScopeHead, ScopeSettings
from lit_edit.nn.scope_training import ScopeTrainer
from lit_edit.records import QAPair
from lit_edit.schedules import warmup_cosine
from lit_edit.settings import coerce
from lit_edit.tokenization import IGNORE_INDEX, pad_sequences, pad_token_id

log = logging.getLogger(__name__)

__all__ = ["LTEEditor", "default_lora_targets"]


class LTEEditor(RetrievalEditing, EditorModule):
    """LTE: align the model to apply facts given in its prompt, then edit by retrieval.

    ``needs_training``: evaluating needs the aligned checkpoint (``--ckpt_path``); a backbone
    aligned elsewhere (e.g. a released LTE model) is evaluated with ``--allow_untrained true``.

    **Alignment** (``fit``): supervised fine-tuning on LTE parallel data
    (:class:`~lit_edit.data.lte_datamodule.LTEDataModule`): each human turn is wrapped by the
    tokenizer's chat template when it has one, followed by the answer and EOS; the loss is the
    cross-entropy of the answer and EOS tokens only. Full fine-tuning, or LoRA through peft.
    AdamW with linear warm-up then cosine decay to 0, stepped per optimizer step.

    **Editing** (``test``): :meth:`edit` inserts each edit into an embedding memory (key: the edit
    question's embedding, value: ``prompt + " " + target_new``); a query retrieves its top-k facts
    (normalised dot product) which are put in the template before the question. With an empty
    memory (pre-edit) the bare question is asked. Fluency samples come from the bare prompt (as
    KnowEdit and LTE measure it). The per-record values carry the retrieval hit rates of the
    in-scope queries (``retrieval/hit@1``: the top fact is the record's own; ``retrieval/hit@k``:
    it is among the top-k), logged as ``test/retrieval_hit@1`` and ``test/retrieval_hit@k``.

    Args:
        backbone: Model to align and edit (see :class:`~lit_edit.methods.base.EditorModule`).
        lora: Align with low-rank adapters through peft (:class:`~lit_edit.nn.lora.LoraSettings`;
            the paper's LTE-LoRA) instead of full fine-tuning (``None``, the default).
        scope: A learned scope in front of the edit memory (an extension, not in the paper;
            :class:`~lit_edit.nn.scope.ScopeSettings`): trained at each validation of ``fit``,
            saved with the checkpoint; at editing time only the retrieved edits it puts in
            scope go into the prompt (``None``: every retrieved edit does, the paper).
        lr: Peak learning rate (paper: 2e-5 full, 3e-4 LoRA, for 7B models).
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of the optimizer steps spent warming up.
        max_length: Longest training sequence; longer prompts lose tokens from the left
            (``None``: no limit).
        context_length: Make the backbone take sequences this long before aligning it (new
            learned position rows, see :func:`~lit_edit.nn.lte_positions.extend_context`); for
            models pretrained on contexts shorter than LTE's prompts, like TinyFacts' 128
            positions (``None``: keep the model as it is).
        dropout: Set every dropout probability of the backbone to this value for alignment
            (``None``: keep the model's own; the TinyFacts models are pretrained without dropout).
        retriever: Sentence encoder of the edit memory: ``"all-MiniLM-L6-v2"`` (offline
            default), the paper's ``"sentence-transformers/multi-qa-mpnet-base-dot-v1"``, a local
            path, or ``"hashing"`` (lexical, model-free).
        top_k: Facts retrieved per query (the paper: 1).
        key_dtype: Storage dtype of the memory's keys (see
            :class:`~lit_edit.nn.edit_memory.EditMemory`): ``"float16"``, or ``"int8"`` for the
            fastest scan of a large memory on a CPU.
        threshold: Minimum cosine similarity of a retrieved fact (``None``: no threshold, the
            paper; a query whose facts all fall below it is asked bare).
        template: ``"question"`` (the training wording, also LTE's retrieval evaluation) or
            ``"query"`` (the peer's single-edit evaluation wording, METHODS.md P12).
        use_chat_template: Wrap human turns with the tokenizer's chat template: ``None`` when it
            has one, ``True`` always (error without one), ``False`` never.
    """

    needs_training = True

    def __init__(
        self,
        backbone: Backbone | str = "tinyfacts",
        lora: LoraSettings | None = None,
        scope: ScopeSettings | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        max_length: int | None = None,
        context_length: int | None = None,
        dropout: float | None = None,
        retriever: str = DEFAULT_ENCODER,
        top_k: int = 1,
        key_dtype: str = "float16",
        threshold: float | None = None,
        template: TemplateName = "question",
        use_chat_template: bool | None = None,
    ) -> None:
        super().__init__(backbone)
        lora = coerce(LoraSettings, lora)
        scope = coerce(ScopeSettings, scope)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        layers = getattr(self.model.config, "num_hidden_layers", None)
        if scope is not None and scope.layer is not None and not (
            scope.layer >= 0 and (layers is None or scope.layer <= layers)
        ):
            raise ValueError(f"scope.layer must be in [0, {layers}], got {scope.layer}")
        self.lora = lora
        self.scope = scope
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.template = template_text(template)
        self.wrap = ChatWrapper(self.tokenizer, use_chat_template)
        self.collator = PairCollator(
            self.tokenizer, "right", None if max_length is None else max_length - 1
        )
        if context_length is not None:
            extend_context(self.model, context_length)
        if dropout is not None:
            set_dropout(self.model, dropout)
        if lora is None:
            self.model.requires_grad_(True)
        else:
            self.model = with_lora(self.model, lora)
        self.memory = EditMemory(key_dtype)
        self.retriever_name = retriever
        self.top_k = top_k
        self.threshold = threshold
        self.scope_head = ScopeHead() if scope else None
        self.question_states = None if scope is None or scope.layer is None else QuestionStates(
            self.model,
            lambda q: self.collator.encode(QAPair(self.wrap(q), "-")).prompt_ids,  # prompt only
            pad_token_id(self.tokenizer),
            scope.layer,
        )
        self._scope_trainer: ScopeTrainer | None = None
        self._records_of: RecordsOf | None = None
        self._retriever: Retriever | None = None

    # ------------------------------------------------------------------ alignment
    def encode_samples(self, pairs: Sequence[QAPair]) -> dict[str, torch.Tensor]:
        """Tokenize (human turn, answer) samples for supervised fine-tuning.

        Each sample is ``wrap(human) + " " + answer`` then EOS, right padded; ``labels`` are the
        answer and EOS tokens and ``-100`` elsewhere (prompt, padding).

        Args:
            pairs: ``B`` samples, prompt = the human turn before chat wrapping.

        Returns:
            ``input_ids``, ``attention_mask``, ``labels``, each ``[B, L]``.
        """
        eos = self.tokenizer.eos_token_id
        ids, labels = [], []
        for pair in pairs:
            enc = self.collator.encode(QAPair(self.wrap(pair.prompt), pair.answer))
            tail = enc.answer_ids + ([eos] if eos is not None else [])
            ids.append(enc.prompt_ids + tail)
            labels.append([IGNORE_INDEX] * len(enc.prompt_ids) + tail)
        input_ids, mask = pad_sequences(ids, pad_token_id(self.tokenizer), "right")  # [B, L]
        label_ids, _ = pad_sequences(labels, IGNORE_INDEX, "right")  # [B, L]
        return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids}

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Tokenize alignment batches (lists of ``QAPair``); leave edit records as they are."""
        if isinstance(batch, list) and batch and isinstance(batch[0], QAPair):
            return self.encode_samples(batch)
        return batch

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean answer-token cross-entropy and answer-token accuracy of a tokenized batch.

        Only the positions that predict an answer token go through the output head (a few per
        sequence): the same loss as full logits, for a fraction of the head's cost.
        """
        logits, labels = answer_logits(self.model, batch["input_ids"], batch["attention_mask"],
                                       batch["labels"])  # [N, V], [N]
        loss = nn.functional.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, acc

    def on_fit_start(self) -> None:
        """Put the backbone in training mode (it is loaded in eval mode) so dropout applies."""
        self.model.train()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Forget the cached hidden states of questions: the weights are about to change."""
        self._forget_states()

    def _forget_states(self) -> None:
        """Drop every cached hidden state (the editor's and the retriever's)."""
        if self.question_states is not None:
            self.question_states.clear()
        if self._retriever is not None:
            self._retriever.forget_states()

    def on_validation_epoch_end(self) -> None:
        """Train the scope head on the current weights (``fit`` only, not the sanity check).

        The checkpoint a validation triggers then holds a head that matches its weights.
        """
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if self.scope_head is not None and fitting and not self.trainer.sanity_checking:
            self.fit_scope()

    def on_train_end(self) -> None:
        """Train the scope head if no validation did (e.g. ``limit_val_batches=0``)."""
        if self.scope_head is not None and not self.scope_head.trained:
            self.fit_scope()

    def train_on_records(self, records_of: RecordsOf) -> None:
        """Take the data's edit records the scope head trains on (``records_of(split)``).

        :func:`lit_edit.links.connect` calls it (``train.py`` does, once both are built).
        """
        self._records_of = records_of

    def fit_scope(self) -> None:
        """Train :attr:`scope_head` on the datamodule's training edit records.

        See :class:`~lit_edit.nn.scope_training.ScopeTrainer` (pairs and their embeddings are
        built once; global random states are left as they were, so enabling the scope does not
        change the alignment). The final loss and validation accuracies are logged.

        Raises:
            ValueError: when no data module handed over its edit records (see
                :meth:`train_on_records`).
        """
        assert self.scope_head is not None
        if self._scope_trainer is None:
            self._scope_trainer = ScopeTrainer(
                self.scope_head,
                self.retriever.encoder,
                self.question_states,
                named_only=self.scope.positives == "named",
                negatives=self.scope.negatives,
                hard_negatives=self.scope.hard_negatives,
                steps=self.scope.steps,
                threshold=self.scope.threshold,
            )
            records_of = self._records_of
            if records_of is None:
                raise ValueError(
                    "scope=True trains the scope head on edit records: use an LTEDataModule "
                    "whose `edits` has a train split, handed over by train.py or, from Python, "
                    "by lit_edit.links.connect(editor, data) before Trainer.fit"
                )
            self._scope_trainer.prepare(records_of("train"), records_of("val"))
        log.info(self._scope_trainer.fit())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Answer-only SFT loss of an alignment batch."""
        loss, acc = self._loss(batch)
        n = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/answer_acc", acc, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Answer-only loss and token accuracy on validation alignment samples."""
        loss, acc = self._loss(batch)
        n = batch["input_ids"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/answer_acc", acc, prog_bar=True, batch_size=n, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the trainable weights; linear warm-up then cosine decay to 0, per step."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(self.warmup_ratio * total)
        schedule = {"scheduler": warmup_cosine(optimizer, warmup, total), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def unedited_answers(self, questions: list[str], max_new_tokens: int = 16) -> list[str]:
        """Greedy answers of the current model to bare questions (stops at EOS).

        Used by :class:`~lit_edit.data.lte_datamodule.LTEDataModule` (``unedited_answers:
        model``) before alignment, for the unedited twins of portability questions.
        """
        gens = self.evaluation.scorer().generate(
            self.model, self.tokenizer, [self.wrap(q) for q in questions], max_new_tokens
        )
        return [g.text.strip() for g in gens]

    # ------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Match the checkpoint's scope head to this editor's ``scope`` setting.

        A head in the checkpoint is dropped (with a warning) when ``scope`` is null, so that the
        same aligned model can be evaluated without it.

        Raises:
            ValueError: if ``scope`` is set and the checkpoint has no trained head.
        """
        super().on_load_checkpoint(checkpoint)
        self._forget_states()  # new weights
        state = checkpoint["state_dict"]
        key = "scope_head._extra_state"
        if self.scope_head is None and key in state:
            log.warning("the checkpoint's scope head is not used (scope: null)")
            del state[key]
        elif self.scope_head is not None and not (state.get(key) or {}).get("weights"):
            raise ValueError(
                "scope is set but the checkpoint has no trained scope head (aligned without "
                "one): evaluate with --model.init_args.scope null or align again with a scope"
            )
