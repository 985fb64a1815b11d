"""MEND's meta-training: the functional edit step, losses, logging and optimiser (a mixin)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.func import functional_call

from lit_edit.data.arrow_tokens import known_encodings
from lit_edit.data.collate import PairCollator
from lit_edit.nn.losses import agreement, locality_kl, masked_nll, token_accuracy
from lit_edit.records import EditRecord
from lit_edit.tokenization import stack_right_padded


class MENDTraining:
    """``fit`` for :class:`~lit_edit.methods.mend.MENDEditor`: its steps, losses and optimiser.

    A mixin: it reads the editor's network, inner parameters, collator and loss settings.
    """

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

    def training_collation(self) -> tuple[Any, PairCollator]:
        """The batch builder of ``fit`` and its pair collator (checked when ``fit`` starts)."""
        return self.collate, self.collator.pairs

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Tokenize training/validation records with :meth:`collate` (test keeps records)."""
        trainer = self._trainer
        if trainer is None or trainer.testing or trainer.predicting:
            return batch
        self.collator.pairs.known = known_encodings(self.token_caches, batch)  # datasets backend
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
        self.log_dict(values, batch_size=len(batch["records"]), sync_dist=True)

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
