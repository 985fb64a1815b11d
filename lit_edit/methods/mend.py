"""MEND: a hypernetwork trained to turn one fine-tuning gradient into a good edit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch.func import functional_call

from lit_edit.backbone import Backbone, find_module, find_parameter
from lit_edit.data.collate import EditCollator
from lit_edit.data.transfer import move_batch_to_device
from lit_edit.editing import EditHandle, WeightsHandle
from lit_edit.methods.base import EditorModule
from lit_edit.nn.hooks import capture_factors
from lit_edit.nn.layout import matrix_layout, mlp_parameter_names
from lit_edit.nn.losses import agreement, locality_kl, masked_nll, token_accuracy
from lit_edit.nn.mend import MENDNetwork
from lit_edit.nn.row_deltas import RowDeltas
from lit_edit.parallel_edits import RowDeltaEdits
from lit_edit.records import EditRecord
from lit_edit.tokenization import pad_token_id, stack_right_padded


def default_inner_params(model: torch.nn.Module, n_blocks: int = 3) -> list[str]:
    """MEND's default edited matrices: every MLP weight matrix of the last ``n_blocks`` blocks.

    Args:
        model: A GPT-2- or LLaMA-layout causal LM.
        n_blocks: Number of last blocks (fewer if the model has fewer).

    Returns:
        Parameter names, e.g. ``transformer.h.{45,46,47}.mlp.{c_fc,c_proj}.weight`` for GPT2-XL.
    """
    n_layers = model.config.num_hidden_layers
    return mlp_parameter_names(model, list(range(max(0, n_layers - n_blocks), n_layers)))


class MENDEditor(EditorModule):
    """MEND (Mitchell et al., ICLR 2022): edit with a learned transform of the edit's gradient.

    **Editing** (:meth:`edit`): one forward/backward of the edit loss on ``prompt + " " +
    target_new`` through the current model gives, for each edited matrix, the rank-1 factors
    ``(u_t, δ_t)`` of its gradient (captured with hooks); the trained network maps them to a
    pseudo-gradient ``ĝ``, and the matrix is changed in place to ``W − α·ĝ`` (sign convention in
    :mod:`lit_edit.nn.mend`; ``descent=False`` for the peer's ``W + α·ĝ``). The handle restores
    the matrices bit-exactly.

    **Training** (``train.py fit``): for a batch of edit records (edited together), the edited
    weights ``θ′ = θ − α·ĝ`` are built differentiably and the edited model is run with
    :func:`torch.func.functional_call` (the backbone's weights are never changed); the loss is
    ``c_edit · NLL(θ′; edit target) + c_loc · KL(p_θ ‖ p_θ′)`` on the locality answer positions.
    The edit target is the rephrase (``edit_loss_on="rephrase"``, the paper), the edit prompt
    itself (``"inner"``, EasyEdit, METHODS.md P1) or both. Only the network and the step sizes
    learn: Adam with two parameter groups, ``lr`` for the transforms and ``lr_lr`` for the step
    sizes (the peer steps the step sizes with both of its optimizers, METHODS.md P6; with
    ``lr ≪ lr_lr`` that differs by ``lr/lr_lr``, here 1%). Accumulation and clipping come from
    the Trainer (``accumulate_grad_batches``, ``gradient_clip_val``); an optimizer step whose
    gradients are not finite is skipped and counted (``train/skipped_steps``). The backbone
    always runs in eval mode (no dropout); the normalisation statistics update only in training.

    Args:
        backbone: Model to edit (see :class:`~lit_edit.methods.base.EditorModule`).
        inner_params: Names of the edited weight matrices (``nn.Linear`` or GPT-2 ``Conv1D``);
            default: all MLP matrices of the last 3 blocks (GPT2-XL:
            ``transformer.h.{45,46,47}.mlp.{c_fc,c_proj}.weight``; LLaMA:
            ``model.layers.{29,30,31}.mlp.{gate_proj,up_proj,down_proj}.weight``).
        rank: Rank of the transform's low-rank layers (paper: 1920).
        n_hidden: Hidden layers of the transform (paper: 1).
        norm: Running normalisation of the gradient factors (paper: on).
        shared: One transform per matrix shape, with per-matrix scale and shift (paper: on).
        output_relu: Clamp the transform's output layer like its hidden ones (MEND's code: on;
            off makes the output layer linear, see :class:`~lit_edit.nn.mend.GradientTransform`).
        edit_lr: Initial per-matrix step size ``α`` (paper: 1e-4).
        descent: Apply ``W − α·ĝ`` (paper's formula) instead of ``W + α·ĝ`` (the peer's code).
        lr: Adam learning rate of the transforms (paper: 1e-6).
        lr_lr: Adam learning rate of the step sizes (paper: 1e-4).
        c_edit: Weight of the edit loss (paper: 0.1).
        c_loc: Weight of the locality KL (paper: 1.0).
        edit_loss_on: ``"rephrase"`` (paper), ``"inner"`` (EasyEdit: the edit prompt itself) or
            ``"both"`` (the mean of the two losses).
        train_rephrases: Rephrases in the edit loss: ``"first"`` of each record (the peer's
            collate) or ``"all"``.
        train_locality: Locality pairs in the KL: the ``"first"`` pair of each record (the
            peer's: its one NQ question) or ``"all"`` of them (e.g. TinyFacts' neighbours and
            the subject's other relations).
        lr_schedule: ``"constant"`` (the peer) or ``"cosine"`` decay of both learning rates to
            zero over the Trainer's ``max_steps``.
        max_length: Longest training/edit sequence in tokens, prompts truncated from the left
            (the peer uses 40; ``None``: no limit).
    """

    needs_training = True

    def __init__(
        self,
        backbone: Backbone | str = "tinyfacts",
        inner_params: list[str] | None = None,
        rank: int = 1920,
        n_hidden: int = 1,
        norm: bool = True,
        shared: bool = True,
        output_relu: bool = True,
        edit_lr: float = 1e-4,
        descent: bool = True,
        lr: float = 1e-6,
        lr_lr: float = 1e-4,
        c_edit: float = 0.1,
        c_loc: float = 1.0,
        edit_loss_on: Literal["rephrase", "inner", "both"] = "rephrase",
        train_rephrases: Literal["first", "all"] = "first",
        train_locality: Literal["first", "all"] = "first",
        lr_schedule: Literal["constant", "cosine"] = "constant",
        max_length: int | None = None,
    ) -> None:
        super().__init__(backbone)
        for name, value, allowed in (
            ("edit_loss_on", edit_loss_on, ("rephrase", "inner", "both")),
            ("train_rephrases", train_rephrases, ("first", "all")),
            ("train_locality", train_locality, ("first", "all")),
            ("lr_schedule", lr_schedule, ("constant", "cosine")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        names = list(inner_params) if inner_params else default_inner_params(self.model)
        if len(set(names)) != len(names):
            raise ValueError(f"inner_params has duplicates: {names}")
        self.inner_names = names
        self.inner = [find_parameter(self.model, n) for n in names]  # plain list: not submodules
        if any(not n.endswith(".weight") for n in names):
            bad = [n for n in names if not n.endswith(".weight")]
            raise ValueError(f"MEND edits weight matrices; not weights: {bad}")
        self._layers = [find_module(self.model, n.removesuffix(".weight")) for n in names]
        matrices = [matrix_layout(n, m) for n, m in zip(names, self._layers, strict=True)]
        self.network = MENDNetwork(
            matrices, rank, n_hidden, norm, shared, edit_lr, descent, output_relu
        )
        self.lr = lr
        self.lr_lr = lr_lr
        self.c_edit = c_edit
        self.c_loc = c_loc
        self.edit_loss_on = edit_loss_on
        self.train_rephrases = train_rephrases
        self.train_locality = train_locality
        self.lr_schedule = lr_schedule
        self.collator = EditCollator(self.tokenizer, padding_side="right", max_length=max_length)
        self.pad_id = pad_token_id(self.tokenizer)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ the edit itself
    def train(self, mode: bool = True) -> MENDEditor:
        """Set the editor's mode; the backbone stays in eval mode (no dropout) either way."""
        super().train(mode)
        if "model" in self._modules:
            self.model.eval()
        return self

    def updates(self, edit: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The additive update of every inner matrix for a tokenized edit batch.

        One forward/backward of the edit NLL through the current weights gives the factors, one
        pass of the network turns them into updates (differentiable with respect to the network;
        the running statistics update if the network is in training mode).

        Args:
            edit: ``input_ids``, ``attention_mask``, ``labels`` (``[B, L]``, right padded).

        Returns:
            One update per inner matrix (float32, weight layout), in ``inner_params`` order.
        """
        factors, _ = capture_factors(
            self.model,
            self.inner_names,
            self._layers,
            lambda logits: masked_nll(logits, edit["labels"]),
            input_ids=edit["input_ids"],
            attention_mask=edit["attention_mask"],
        )
        return self.network(factors)

    def edit_state_keys(self) -> set[str]:
        """The inner matrices (an edit changes nothing else)."""
        return {f"model.{n}" for n in self.inner_names}

    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Edit the inner matrices in place from one gradient and one network pass.

        Args:
            records: Records edited together (their factors are pooled, as in MEND).

        Returns:
            A handle restoring the inner matrices bit-exactly.
        """
        was_training = self.network.training
        batch = self.collator.pairs([r.edit_pair for r in records])
        batch = move_batch_to_device(batch, self.device)
        self.network.eval()  # statistics are frozen outside training
        try:
            with torch.no_grad():
                deltas = self.updates(batch)
        finally:
            self.network.train(was_training)
        handle = WeightsHandle(self.inner)
        with torch.no_grad():
            for param, delta in zip(self.inner, deltas, strict=True):
                param.add_(delta.to(param.dtype))
        return handle

    def parallel_edit(self, records: Sequence[EditRecord]) -> RowDeltaEdits:
        """``K`` independent single edits from one forward/backward and one network pass.

        The edit batch holds one row per record; its loss is the sum of the per-record edit
        NLLs, so each row's factors are those of its record alone; the network transforms every
        factor row, and the updates are summed per record (:meth:`MENDNetwork.grouped`). Row
        ``k`` of later batches runs with record ``k``'s matrices
        (:class:`~lit_edit.nn.row_deltas.RowDeltas`); the backbone's weights are not changed.
        """
        was_training = self.network.training
        batch = move_batch_to_device(self.collator.pairs([r.edit_pair for r in records]),
                                     self.device)
        labels = batch["labels"]  # [K, L]

        def loss(logits: torch.Tensor) -> torch.Tensor:
            """The sum of the per-record mean NLLs (each row's gradient is its own edit's)."""
            return sum(masked_nll(logits[k : k + 1], labels[k : k + 1])
                       for k in range(labels.shape[0]))

        self.network.eval()  # statistics are frozen outside training
        try:
            with torch.no_grad():
                factors, _ = capture_factors(
                    self.model, self.inner_names, self._layers, loss, by_row=True,
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                )
                stacks = self.network.grouped(factors, len(records))
        finally:
            self.network.train(was_training)
        layers = {
            name.removesuffix(".weight"): (layer, matrix)
            for name, layer, matrix in zip(
                self.inner_names, self._layers, self.network.matrices, strict=True
            )
        }
        deltas = {
            name.removesuffix(".weight"): stack.to(param.dtype)
            for name, param, stack in zip(self.inner_names, self.inner, stacks, strict=True)
        }
        return RowDeltaEdits(self, RowDeltas(layers, deltas))

    # ------------------------------------------------------------------ training
    def collate(self, records: Sequence[EditRecord]) -> dict[str, Any]:
        """Tokenize training/validation records (:class:`EditCollator`, right padded).

        With ``train_rephrases``/``train_locality`` set to ``"all"``, the ``"rephrase"`` and
        ``"locality"`` parts hold every rephrase and every locality pair of the records.
        """
        batch = self.collator(records)
        pairs = self.collator.pairs
        if self.train_rephrases == "all" and any(r.rephrase_prompts for r in records):
            batch["rephrase"] = pairs([p for r in records for p in r.rephrase_pairs])
        if self.train_locality == "all" and "locality" in batch:
            rows = [(i, p) for i, r in enumerate(records) for g in r.locality.values() for p in g]
            batch["locality"] = pairs([p for _, p in rows])
            batch["locality"]["record_index"] = torch.tensor([i for i, _ in rows])
        return batch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Tokenize training/validation records with :meth:`collate` (test keeps records)."""
        trainer = self._trainer
        if trainer is None or trainer.testing or trainer.predicting:
            return batch
        return self.collate(batch)

    def _edited_step(self, batch: dict[str, Any], parts: Sequence[str]) -> dict[str, Any]:
        """Edit functionally with ``batch["edit"]`` and run the edited model on ``parts``.

        Returns:
            ``logits`` per part name (``[B_i, L, V]``), plus ``"base_locality"`` logits of the
            unedited model when the batch has locality rows.
        """
        deltas = self.updates(batch["edit"])
        params = {
            name: p + d.to(p.dtype)
            for name, p, d in zip(self.inner_names, self.inner, deltas, strict=True)
        }
        names = [p for p in parts if p in batch]
        stacked, rows = stack_right_padded([batch[p] for p in names], self.pad_id)
        logits = functional_call(
            self.model,
            params,
            args=(),
            kwargs={"input_ids": stacked["input_ids"], "attention_mask": stacked["attention_mask"]},
        ).logits  # [sum B_i, L, V]
        out: dict[str, Any] = {}
        for name, part in zip(names, logits.split(rows), strict=True):
            out[name] = part[:, : batch[name]["input_ids"].shape[1]]
        if "locality" in out:
            with torch.no_grad():
                loc = batch["locality"]
                out["base_locality"] = self.model(
                    input_ids=loc["input_ids"], attention_mask=loc["attention_mask"]
                ).logits
        return out

    def meta_step(self, batch: dict[str, Any], measure: bool = False) -> dict[str, torch.Tensor]:
        """Edit functionally with the batch's edits and compute the meta-training loss.

        Args:
            batch: An :class:`~lit_edit.data.collate.EditCollator` batch (right padded).
            measure: Also run the edited model on the edit prompts and the rephrases and return
                the validation measures.

        Returns:
            ``loss`` (``c_edit · loss_edit + c_loc · loss_loc``), ``loss_edit``, ``loss_loc``,
            ``edit_acc`` (token accuracy on the edit-loss target) and, with locality rows,
            ``locality`` (agreement of edited and unedited predictions on the locality answers);
            with ``measure``, ``reliability`` and ``edit_success`` (token accuracy on the edit
            prompt and on the rephrase).
        """
        targets = {"rephrase": ["rephrase"], "inner": ["edit"], "both": ["edit", "rephrase"]}
        targets = targets[self.edit_loss_on]
        parts = ["edit", "rephrase", "locality"] if measure else [*targets, "locality"]
        out = self._edited_step(batch, parts)
        l_edit = torch.stack([masked_nll(out[t], batch[t]["labels"]) for t in targets]).mean()
        accuracy = [token_accuracy(out[t].detach(), batch[t]["labels"]) for t in targets]
        result = {"loss_edit": l_edit, "edit_acc": torch.cat(accuracy).mean()}
        if "locality" in out:
            labels = batch["locality"]["labels"]
            result["loss_loc"] = locality_kl(out["base_locality"], out["locality"], labels)
            result["locality"] = agreement(
                out["base_locality"], out["locality"].detach(), labels
            ).mean()
        else:
            result["loss_loc"] = l_edit.new_zeros(())
        result["loss"] = self.c_edit * l_edit + self.c_loc * result["loss_loc"]
        if measure:
            for name, part in (("reliability", "edit"), ("edit_success", "rephrase")):
                result[name] = token_accuracy(out[part], batch[part]["labels"]).mean()
        return result

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One meta-training step on a batch of edits applied together (see the class doc).

        Step metrics are logged only on the steps whose metrics the Trainer writes to its loggers
        (every ``log_every_n_steps``): a ``self.log`` call costs about a millisecond, as much as
        a whole step of the tiny TinyFacts model, and values logged in between are never written.
        """
        result = self.meta_step(batch)
        if self._writes_step_logs():
            n = len(batch["records"])
            self.log("train/loss", result["loss"], prog_bar=True, batch_size=n)
            self.log("train/loss_edit", result["loss_edit"], batch_size=n)
            self.log("train/loss_loc", result["loss_loc"], batch_size=n)
            self.log("train/edit_acc", result["edit_acc"], batch_size=n)
            self.log("train/skipped_steps", self.skipped_steps.float(), batch_size=n)
        return result["loss"]

    def _writes_step_logs(self) -> bool:
        """Whether the Trainer writes step metrics to its loggers after the current step."""
        trainer = self._trainer
        if trainer is None:
            return False
        every = trainer.log_every_n_steps
        return bool(trainer.fast_dev_run) or (every > 0 and (trainer.global_step + 1) % every == 0)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Edit with the batch's records and log edit success, reliability and locality.

        ``val/edit_success`` is the edited model's token accuracy on the rephrase (the paper's
        edit success); ``val/reliability`` is on the edit prompt itself; ``val/locality`` is the
        agreement of the edited and unedited models' predictions on the locality answers.
        """
        result = self.meta_step(batch, measure=True)
        keys = ("loss", "loss_edit", "loss_loc", "edit_success", "reliability", "locality")
        values = {f"val/{k}": result[k] for k in keys if k in result}
        self.log_dict(values, batch_size=len(batch["records"]))

    def configure_optimizers(self) -> Any:
        """Adam with two groups: the transforms at ``lr``, the step sizes at ``lr_lr``.

        With ``lr_schedule="cosine"`` both decay to zero over ``max_steps`` (stepped per
        optimizer step).
        """
        transforms = [p for n, p in self.network.named_parameters() if n != "edit_lrs"]
        optimizer = torch.optim.Adam(
            [
                {"params": transforms, "lr": self.lr, "name": "transforms"},
                {"params": [self.network.edit_lrs], "lr": self.lr_lr, "name": "edit_lrs"},
            ]
        )
        if self.lr_schedule == "constant":
            return optimizer
        total = self.trainer.max_steps
        if total is None or total < 1:
            raise ValueError("lr_schedule='cosine' needs the Trainer's max_steps")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip (drop the gradients of) an optimizer step whose gradients are not all finite."""
        grads = [p.grad for p in self.network.parameters() if p.grad is not None]
        if grads and not torch.stack([g.isfinite().all() for g in grads]).all():
            for p in self.network.parameters():
                p.grad = None  # Adam leaves parameters without gradient untouched
            self.skipped_steps += 1
