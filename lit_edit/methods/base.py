"""``EditorModule``: the LightningModule every editing method subclasses."""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_edit.backbone import load_causal_lm, load_tokenizer
from lit_edit.editing import EditHandle, ParameterSnapshot
from lit_edit.evaluation import Evaluation
from lit_edit.evaluation_run import EvaluationRun
from lit_edit.records import EditRecord, QAPair
from lit_edit.scoring import GeneratedAnswer, Generation, PairScore

log = logging.getLogger(__name__)


def _records_per_rank(loaders: Any) -> int | None:
    """Records this process will see in the test loaders (``None`` when unknown)."""
    if loaders is None:
        return None
    loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    try:
        return sum(len(dl.sampler) for dl in loaders)  # a DistributedSampler counts one rank
    except (TypeError, AttributeError):
        return None


class EditorModule(L.LightningModule):
    """Base class of every knowledge editor.

    A subclass implements :meth:`edit` (apply edits, return a handle that restores them
    bit-exactly), and ``training_step``/``configure_optimizers`` if it learns anything. Lightning's
    ``test`` runs an editing protocol (:mod:`lit_edit.protocols`) chosen by the ``evaluation``
    settings; the scores go to torchmetrics metrics, TensorBoard and a results folder.

    Checkpoints hold what the method learned, not the frozen backbone: parameters under
    ``model.`` are left out unless :meth:`saves_backbone` says otherwise.

    Args:
        backbone: Model to edit: ``"tinyfacts"`` (the embedded default), ``"tinyfacts-llama"``,
            a local directory or a Hugging Face hub name.
        dtype: Weights dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        trust_remote_code: Allow code shipped with a hub model to run (off by default).
        revision: Hub revision of the backbone to pin.
    """

    def __init__(
        self,
        backbone: str = "tinyfacts",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = load_causal_lm(
            backbone, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision
        )
        self.tokenizer = load_tokenizer(
            backbone, trust_remote_code=trust_remote_code, revision=revision
        )
        self.model.requires_grad_(False)
        self.evaluation = Evaluation()
        self._run: EvaluationRun | None = None
        self._bar: Any = None

    # ------------------------------------------------------------------ the editing contract
    @abstractmethod
    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Apply the edits of ``records`` together.

        Args:
            records: One or more edit records.

        Returns:
            A handle whose ``restore()`` brings the editor back bit-exactly.
        """

    def score_pairs(self, pairs: Sequence[QAPair]) -> list[PairScore]:
        """Teacher-forced scores of ``pairs`` under the editor's current state.

        Methods that answer through something else than the backbone's weights (a context, a
        retrieved fact, a counterfactual model) override this.

        Args:
            pairs: (prompt, answer) pairs.

        Returns:
            One score per pair, in order.
        """
        return self.evaluation.scorer().score(self.model, self.tokenizer, pairs)

    def generate_answers(self, pairs: Sequence[QAPair]) -> list[GeneratedAnswer]:
        """Greedy continuations of the pairs' prompts (exact match) under the current state.

        Methods that override :meth:`score_pairs` override this the same way.

        Args:
            pairs: (prompt, answer) pairs; the answer and its aliases set the lengths.

        Returns:
            One generated answer per pair, in order.
        """
        return self.evaluation.scorer().generate_answers(self.model, self.tokenizer, pairs)

    def record_values(self, records: Sequence[EditRecord]) -> list[dict[str, float | None]]:
        """Method-specific values of each record under the current state (none by default).

        Called by the evaluator right after scoring ``records``; the values join each record's
        metric values in ``records.jsonl`` (keys with a ``/`` are also averaged in the summary's
        ``breakdown``). E.g. LTE's retrieval hit rates.

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

    # ------------------------------------------------------------------ checkpoints
    def saves_backbone(self) -> bool:
        """Whether checkpoints include the backbone's weights (only if the method trains them)."""
        return False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen backbone from the checkpoint and record the writing class."""
        if not self.saves_backbone():
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("model.")]:
                del state[key]
        checkpoint["lit_edit_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint was written by this class and re-insert the backbone's weights."""
        written_by = checkpoint.get("lit_edit_class")
        mine = f"{type(self).__module__}.{type(self).__qualname__}"
        if written_by is not None and written_by != mine:
            raise TypeError(
                f"checkpoint was written by {written_by}; it cannot be loaded into {mine}"
            )
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith("model.") and key not in state:
                state[key] = value

    # ------------------------------------------------------------------ the test loop
    def configure_callbacks(self) -> list[Callback]:
        """Add the results writer (records.jsonl, summary.json, table, plot) to the trainer."""
        from lit_edit.callbacks import ResultsWriter

        return [ResultsWriter()]

    def on_test_start(self) -> None:
        """Start an evaluation run: fresh metrics, results and (optionally) a weight snapshot."""
        snapshot = ParameterSnapshot(self) if self.evaluation.verify_restore else None
        self._bar = None
        if self.trainer.progress_bar_callback is not None and self.trainer.is_global_zero:
            from tqdm.auto import tqdm

            total = _records_per_rank(self.trainer.test_dataloaders)
            self._bar = tqdm(total=total, desc="edits", unit="edit", dynamic_ncols=True)
        progress = self._bar.update if self._bar is not None else None
        self._run = EvaluationRun(
            self.evaluation, snapshot=snapshot, device=self.device, progress=progress
        )

    def test_step(self, batch: list[EditRecord], batch_idx: int) -> None:
        """Queue the batch's records and run the protocol on every complete group."""
        assert self._run is not None
        for metrics in self._run.add(self, batch):
            self._log_group(metrics)

    def on_test_epoch_end(self) -> None:
        """Run the last incomplete group and log the aggregated metrics."""
        assert self._run is not None
        for metrics in self._run.flush(self):
            self._log_group(metrics)
        values = {f"test/{k}": v for k, v in self._run.computed().items() if v is not None}
        self.log_dict(values, sync_dist=False, batch_size=1)
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _log_group(self, values: dict[str, float]) -> None:
        """Log one group's means as TensorBoard scalars indexed by the number of edits so far."""
        if self.logger is None or self.trainer.global_rank != 0:
            return
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_scalar"):
            return
        for name, value in values.items():
            experiment.add_scalar(f"test_groups/{name}", value, global_step=self._run.n_edited)

    @property
    def evaluation_run(self) -> EvaluationRun | None:
        """The current (or last) evaluation run, read by the results writer."""
        return self._run

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
