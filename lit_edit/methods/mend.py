"""MEND: a hypernetwork trained to turn one fine-tuning gradient into a good edit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from lit_edit.backbone import Backbone, find_module, find_parameter
from lit_edit.data.collate import EditCollator
from lit_edit.data.transfer import move_batch_to_device
from lit_edit.editing import EditHandle
from lit_edit.methods.base import EditorModule
from lit_edit.methods.mend_training import MENDTraining
from lit_edit.nn.hooks import capture_factors
from lit_edit.nn.layout import matrix_layout, mlp_parameter_names
from lit_edit.nn.losses import masked_nll
from lit_edit.nn.mend import MENDNetwork
from lit_edit.nn.row_deltas import LowRank, RowDeltas
from lit_edit.parallel_edits import RowDeltaEdits
from lit_edit.records import EditRecord
from lit_edit.tokenization import pad_token_id


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


class MENDEditor(MENDTraining, EditorModule):
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
        long_records: A training or validation record with an answer longer than
            ``max_length`` (answers are never cut): ``"error"`` stops ``fit`` at start naming
            it; ``"skip"`` leaves such records out, counted and listed in the log.
    """

    needs_training = True
    unsupported_strategies: ClassVar[dict[str, str]] = {
        "fsdp": "its training edits whole weight matrices through torch.func.functional_call, "
        "which FSDP's flat parameter shards do not provide; use DDP (configs/trainer/ddp.yaml) "
        "or DeepSpeed stage 2 (configs/trainer/deepspeed_stage2.yaml)",
        "deepspeed_stage_3": "stage 3 partitions the weights MEND's training edits whole; use "
        "DeepSpeed stage 2 (configs/trainer/deepspeed_stage2.yaml) or DDP",
    }

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
        long_records: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__(backbone)
        for name, value, allowed in (
            ("edit_loss_on", edit_loss_on, ("rephrase", "inner", "both")),
            ("train_rephrases", train_rephrases, ("first", "all")),
            ("train_locality", train_locality, ("first", "all")),
            ("lr_schedule", lr_schedule, ("constant", "cosine")),
            ("long_records", long_records, ("error", "skip")),
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
        self.long_records = long_records
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
            A handle restoring the inner matrices bit-exactly (inside an edit sequence, restored
            with the sequence: :meth:`~lit_edit.methods.base.EditorModule.weights_handle`).
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
        handle = self.weights_handle(self.inner)
        with torch.no_grad():
            for param, delta in zip(self.inner, deltas, strict=True):
                param.add_(delta.to(param.dtype))
        return handle

    def parallel_edit(self, records: Sequence[EditRecord]) -> RowDeltaEdits:
        """``K`` independent single edits from one forward/backward and one network pass.

        The edit batch holds one row per record; its loss is the sum of the per-record edit
        NLLs, so each row's factors are those of its record alone; the network transforms every
        factor row, and each record's update is kept as its factors (rank: its tokens;
        :meth:`MENDNetwork.grouped`), never multiplied out where that is cheaper. Row ``k`` of
        later batches runs with record ``k``'s matrices (:class:`~lit_edit.nn.row_deltas.
        RowDeltas`: ``W x + (x u′ᵀ) δ′``); the backbone's weights are not changed.
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
            name.removesuffix(".weight"): LowRank(f.left.to(param.dtype), f.right.to(param.dtype))
            for name, param, f in zip(self.inner_names, self.inner, stacks, strict=True)
        }
        return RowDeltaEdits(self, RowDeltas(layers, deltas))
