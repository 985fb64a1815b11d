"""SERAC's training: the supervised and soft objectives, validation and optimisers (a mixin)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lit_edit.data.arrow_tokens import known_encodings
from lit_edit.data.collate import PairCollator
from lit_edit.editor import apply_edit
from lit_edit.nn.losses import masked_nll
from lit_edit.nn.scope import in_scope_questions
from lit_edit.nn.serac import balanced_bce
from lit_edit.records import EditRecord, QAPair
from lit_edit.tokenization import IGNORE_INDEX


class SERACTraining:
    """``fit`` for :class:`~lit_edit.methods.serac.SERACEditor`: its losses, steps and optimiser.

    A mixin: it reads the editor's classifier, counterfactual model, memory and settings.
    """

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Keep batches as lists of records (the losses tokenize what they need)."""
        self.collator.known = known_encodings(self.token_caches, batch)  # datasets backend
        return batch

    def training_collation(self) -> tuple[Any, PairCollator]:
        """The batch builder of ``fit`` and its pair collator (checked when ``fit`` starts)."""
        return self._training_pairs, self.collator

    def _training_pairs(self, records: Sequence[EditRecord]) -> dict[str, torch.Tensor]:
        """The base-model batch of ``records``' training queries (in scope and locality)."""
        return self.collator([p for _, p in self._in_scope(records) + self._locality(records)])

    def _in_scope(self, records: Sequence[EditRecord]) -> list[tuple[int, QAPair]]:
        """(record position, pair) of every in-scope training query of ``records``."""
        out = []
        for k, r in enumerate(records):
            pairs = [r.edit_pair, *r.rephrase_pairs]
            if self.train_portability:
                named = set(in_scope_questions(r, named_only=True))
                pairs += [p for g in r.portability.values() for p in g if p.prompt in named]
            out += [(k, p) for p in dict.fromkeys(pairs)]
        return out

    @staticmethod
    def _locality(records: Sequence[EditRecord]) -> list[tuple[int, QAPair]]:
        """(record position, pair) of every locality query of ``records``."""
        return [(k, p) for k, r in enumerate(records) for g in r.locality.values() for p in g]

    def _counterfactual_batch(self, entries: Sequence[str], pairs: Sequence[QAPair]
                              ) -> dict[str, torch.Tensor]:
        """Tokenized counterfactual inputs ``template(fact, prompt) + " " + answer``."""
        ctx = [QAPair(self.template.format(fact=f, prompt=p.prompt), p.answer)
               for f, p in zip(entries, pairs, strict=True)]
        return {k: v.to(self.device) for k, v in self.collator(ctx).items()}

    def _logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def supervised_loss(self, records: Sequence[EditRecord]) -> dict[str, torch.Tensor]:
        """The paper's objective on a batch of edits (see the class doc).

        Returns:
            ``loss``, ``loss_cntr``, ``loss_cls``.
        """
        pos = self._in_scope(records)
        loc = self._locality(records)
        keys = [r.prompt for r in records]
        queries = [p.prompt for _, p in pos] + [p.prompt for _, p in loc]
        log_s = self.classifier.log_similarity(keys, queries)  # [P + M, N]
        gold = torch.tensor([k for k, _ in pos], device=log_s.device)
        p_rows = log_s[: len(pos)]  # [P, N]
        positive = p_rows.gather(1, gold[:, None]).squeeze(1)  # [P]
        others = torch.ones_like(p_rows, dtype=torch.bool)
        others[torch.arange(len(pos)), gold] = False
        negative = [p_rows[others]]  # in-batch negatives
        if loc:
            l_rows = log_s[len(pos):]  # [M, N]
            if self.use_all_negatives:
                negative.append(l_rows.reshape(-1))
            else:
                owner = torch.tensor([k for k, _ in loc], device=log_s.device)
                negative.append(l_rows.gather(1, owner[:, None]).squeeze(1))
        if self.balance_negatives and len(negative) == 2:
            l_cls = balanced_bce(positive, negative[1]) + balanced_bce(
                positive[:0], negative[0])
        else:
            l_cls = balanced_bce(positive, torch.cat(negative))
        trained = pos + (loc if self.counterfactual_locality else [])
        batch = self._counterfactual_batch([records[k].fact for k, _ in trained],
                                           [p for _, p in trained])
        l_cntr = masked_nll(self._logits(self.counterfactual, batch), batch["labels"])
        return {"loss": self.c_edit * l_cntr + self.c_loc * l_cls, "loss_cntr": l_cntr,
                "loss_cls": l_cls}

    def soft_loss(self, records: Sequence[EditRecord]) -> dict[str, torch.Tensor]:
        """The peer's objective: soft mixture, NLL on the edit prompts, KL on locality.

        Returns:
            ``loss``, ``loss_edit``, ``loss_loc``.
        """
        edit = [r.edit_pair for r in records]
        loc = [p for _, p in self._locality(records)]
        queries = edit + loc
        keys = [r.prompt for r in records]
        log_s = self.classifier.log_similarity(keys, [q.prompt for q in queries])  # [Q, N]
        best, index = log_s.max(-1)  # [Q]
        base_batch = {k: v.to(self.device) for k, v in self.collator(queries).items()}
        cf_batch = self._counterfactual_batch([records[i].fact for i in index.tolist()], queries)
        with torch.no_grad():
            base = self._logits(self.model, base_batch)
        cf = self._logits(self.counterfactual, cf_batch)
        base_lp, rows = _answer_log_probs(base, base_batch["labels"])  # [T, V], [T]
        cf_lp, cf_rows = _answer_log_probs(cf, cf_batch["labels"])
        if not torch.equal(rows, cf_rows):
            raise RuntimeError("the answer tokens differ between the base and the cf inputs")
        s = best.exp()[rows][:, None]  # [T, 1]
        mix = torch.logaddexp(torch.log1p(-s.clamp(max=1 - 1e-6)) + base_lp, s.log() + cf_lp)
        target = base_batch["labels"][:, 1:][base_batch["labels"][:, 1:] != IGNORE_INDEX]
        is_edit = rows < len(edit)
        nll = -mix.gather(1, target[:, None]).squeeze(1)  # [T]
        l_edit = nll[is_edit].mean()
        kl = (base_lp.exp() * (base_lp - mix)).sum(-1)  # [T]
        l_loc = kl[~is_edit].mean() if (~is_edit).any() else l_edit.new_zeros(())
        return {"loss": self.c_edit * l_edit + self.c_loc * l_loc, "loss_edit": l_edit,
                "loss_loc": l_loc}

    def training_step(self, batch: list[EditRecord], batch_idx: int) -> torch.Tensor:
        """One step of the chosen objective on a batch of records (the batch is the memory)."""
        result = (self.supervised_loss(batch) if self.objective == "supervised"
                  else self.soft_loss(batch))
        for key, value in result.items():
            self.log(f"train/{key}", value, prog_bar=key == "loss", batch_size=len(batch))
        return result["loss"]

    def validation_step(self, batch: list[EditRecord], batch_idx: int) -> None:
        """Edit with the batch's records (the protocol path) and log the measures."""
        with torch.inference_mode(False), torch.no_grad():
            result = (self.supervised_loss(batch) if self.objective == "supervised"
                      else self.soft_loss(batch))
        edit = [r.edit_pair for r in batch]
        rephrase = [p for r in batch for p in r.rephrase_pairs]
        loc = [p for r in batch for g in r.locality.values() for p in g]
        pre = self.score_pairs(loc) if loc else []
        with apply_edit(self, batch):
            rel = [s.token_accuracy for s in self.score_pairs(edit)]
            gen = [s.token_accuracy for s in self.score_pairs(rephrase)] if rephrase else rel
            post = self.score_pairs(loc) if loc else []
        agree = [float((a.pred_ids == b.pred_ids).float().mean()) for a, b in
                 zip(pre, post, strict=True)] or [1.0]
        values = {
            "val/loss": result["loss"],
            "val/reliability": sum(rel) / len(rel),
            "val/generalization": sum(gen) / len(gen),
            "val/locality": sum(agree) / len(agree),
        }
        values["val/score"] = (values["val/reliability"] + values["val/generalization"]
                               + values["val/locality"]) / 3
        self.log_dict({k: float(v) for k, v in values.items()}, batch_size=len(batch),
                      sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over two groups: the classifier at ``classifier_lr``, the cf model at ``lr``."""
        groups = [
            {"params": [p for p in self.classifier.parameters() if p.requires_grad],
             "lr": self.classifier_lr, "name": "classifier"},
            {"params": [p for p in self.counterfactual.parameters() if p.requires_grad],
             "lr": self.lr, "name": "counterfactual"},
        ]
        return torch.optim.Adam([g for g in groups if g["params"]])


def _answer_log_probs(logits: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at the positions predicting answer tokens, and their rows.

    Args:
        logits: ``[B, L, V]``.
        labels: ``[B, L]`` (``-100`` off the answer).

    Returns:
        ``[T, V]`` log-probabilities (``logits[:, t]`` predicts ``labels[:, t + 1]``) and ``[T]``
        the batch row of each, in row then position order.
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # [B, L-1]
    rows = mask.nonzero()[:, 0]  # [T]
    return logits[:, :-1][mask].float().log_softmax(-1), rows

