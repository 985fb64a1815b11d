"""Fine-tuning baselines FT-L and FT-M: optimise chosen MLP weights on the edit itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from lit_edit.backbone import Backbone, find_module, find_parameter
from lit_edit.data.collate import PairCollator
from lit_edit.editing import EditHandle
from lit_edit.methods.base import EditorModule
from lit_edit.nn.edit_optim import optimise
from lit_edit.nn.frozen_prefix import replay_frozen
from lit_edit.nn.layout import matrix_layout, mlp_out_name
from lit_edit.nn.losses import masked_nll
from lit_edit.nn.row_deltas import RowDeltas
from lit_edit.parallel_edits import RowDeltaEdits
from lit_edit.records import EditRecord
from lit_edit.tokenization import IGNORE_INDEX


class FTEditor(EditorModule):
    """Constrained fine-tuning of chosen weights on the edit (EasyEdit's FT-L and FT-M).

    Each edit runs ``steps`` Adam steps on the inner parameters only, from their current values,
    on the edit pairs ``(prompt, target_new)`` of all records edited together.

    * ``objective="masked"`` (FT-M): teacher-forced cross-entropy on the target tokens of
      ``prompt + " " + target_new`` (prompt masked).
    * ``objective="prompt_last"`` (FT-L, as in EasyEdit/ROME): every target token's log-prob is
      read at the prompt's last position (a bag-of-tokens loss at one position) and averaged.

    With ``norm_constraint`` set, after every step each weight is clamped to
    ``[W0 - c, W0 + c]`` around its pre-edit value (EasyEdit's ``norm_constraint``; its GPT-2
    default 5e-4 barely moves a small model, METHODS.md P18, so it is off by default).

    Args:
        backbone: Model to edit (see :class:`~lit_edit.methods.base.EditorModule`).
        inner_params: Names of the parameters to fine-tune; default: the output matrix of the
            MLP of the last block (``c_proj`` for GPT-2, ``down_proj`` for LLaMA).
        objective: ``"masked"`` (FT-M) or ``"prompt_last"`` (FT-L).
        lr: Adam learning rate.
        steps: Optimisation steps per edit.
        weight_decay: Adam weight decay.
        norm_constraint: L-infinity bound on the change of each weight (``None``: unbounded).
        early_stop_loss: Stop once the loss falls below this value (``None``: always ``steps``).
    """

    def __init__(
        self,
        backbone: Backbone | str = "tinyfacts",
        inner_params: list[str] | None = None,
        objective: Literal["masked", "prompt_last"] = "masked",
        lr: float = 5e-4,
        steps: int = 25,
        weight_decay: float = 0.0,
        norm_constraint: float | None = None,
        early_stop_loss: float | None = 1e-2,
    ) -> None:
        super().__init__(backbone)
        if objective not in ("masked", "prompt_last"):
            raise ValueError(f"objective must be 'masked' or 'prompt_last', got {objective!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        names = inner_params or [f"{mlp_out_name(self.model, -1)}.weight"]
        self.inner_names = list(names)
        self.inner = [find_parameter(self.model, n) for n in self.inner_names]
        self._layers = {}  # module name -> (layer, layout), for parallel single edits
        for name in self.inner_names:
            module_name = name.removesuffix(".weight")
            layer = find_module(self.model, module_name)
            self._layers[module_name] = (layer, matrix_layout(name, layer))
        self.objective = objective
        self.lr = lr
        self.steps = steps
        self.weight_decay = weight_decay
        self.norm_constraint = norm_constraint
        self.early_stop_loss = early_stop_loss

    def edit_state_keys(self) -> set[str]:
        """The inner matrices (an edit changes nothing else)."""
        return {f"model.{n}" for n in self.inner_names}

    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Fine-tune the inner parameters on the records' edits; the handle restores them.

        Args:
            records: Records edited together.

        Returns:
            A handle restoring the inner parameters bit-exactly (inside an edit sequence, restored
            with the sequence: :meth:`~lit_edit.methods.base.EditorModule.weights_handle`).
        """
        handle = self.weights_handle(self.inner)
        collate = PairCollator(self.tokenizer, padding_side="right")
        batch = collate([r.edit_pair for r in records])
        batch = {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}
        with replay_frozen(self.model, self.inner_names):  # the part below: once per edit
            optimise(
                self.inner,
                lambda: self._loss(batch),
                self.steps,
                self.lr,
                weight_decay=self.weight_decay,
                stop_below=self.early_stop_loss,
                linf_radius=self.norm_constraint,
            )
        return handle

    def parallel_edit(self, records: Sequence[EditRecord]) -> RowDeltaEdits:
        """``K`` independent single edits, fine-tuned together as one batched problem.

        Each record gets its own copy of the inner matrices as ``W + D_k`` (``D`` stacked,
        ``[K, *W.shape]``): row ``k`` of the edit batch runs with ``D_k``
        (:class:`~lit_edit.nn.row_deltas.RowDeltas`), the loss is the sum of the per-record
        losses, and Adam (elementwise) moves each ``D_k`` exactly as it would move ``W`` in that
        record's own edit; a record that reaches ``early_stop_loss`` is frozen there. The
        backbone's weights are not changed.

        Raises:
            ValueError: with ``weight_decay`` (it would act on ``D_k``, not on ``W + D_k``).
        """
        if self.weight_decay:
            raise ValueError("parallel single edits of FT need weight_decay: 0")
        deltas = {
            name: torch.zeros(len(records), *layer.weight.shape, device=self.device)
            for name, (layer, _) in self._layers.items()
        }
        rows = RowDeltas(self._layers, deltas)
        collate = PairCollator(self.tokenizer, padding_side="right")
        batch = collate([r.edit_pair for r in records])  # row k: record k's edit
        batch = {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}
        owners = list(range(len(records)))

        def losses() -> torch.Tensor:
            """Per-record losses, each row under its own delta."""
            with rows.rows(owners):
                return self._loss(batch, per_row=True)

        with replay_frozen(self.model, self.inner_names):
            optimise(
                list(deltas.values()),
                losses,
                self.steps,
                self.lr,
                stop_below=self.early_stop_loss,
                linf_radius=self.norm_constraint,
            )
        for d in deltas.values():
            d.requires_grad_(False)
        return RowDeltaEdits(self, rows)

    def _loss(self, batch: dict[str, torch.Tensor], per_row: bool = False) -> torch.Tensor:
        """The edit loss of the configured objective on a right-padded pair batch.

        Args:
            batch: ``input_ids``, ``attention_mask``, ``labels`` (``[B, L]``).
            per_row: Return each row's loss (``[B]``: the mean over its own answer tokens)
                instead of the batch loss.
        """
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits  # [B, L, V]
        labels = batch["labels"]  # [B, L], -100 outside the answers
        if self.objective == "masked":
            if per_row:
                return torch.stack([masked_nll(logits[i : i + 1], labels[i : i + 1])
                                    for i in range(labels.shape[0])])
            return masked_nll(logits, labels)
        logp = logits[:, :-1].float().log_softmax(-1)  # [B, L-1, V] predicts tokens 1..L-1
        target = labels[:, 1:]  # [B, L-1]
        mask = target != IGNORE_INDEX
        # prompt_last: all target tokens scored at the position predicting the first one
        first = mask.float().argmax(-1)  # [B] index of the first answer label
        rows = torch.arange(labels.shape[0], device=labels.device)
        last_logp = logp[rows, first]  # [B, V]
        per_token = last_logp.gather(-1, target.clamp(min=0))  # [B, L-1]
        rows = -(per_token * mask).sum(-1) / mask.sum(-1)  # [B]
        return rows if per_row else rows.mean()
