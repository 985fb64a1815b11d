"""WISE (Wang et al., NeurIPS 2024): a routed side memory for lifelong editing."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from lit_edit.backbone import Backbone, find_module, resolve_model_path
from lit_edit.data.collate import PairCollator
from lit_edit.editing import CallbackHandle, CoveredEdit, EditHandle, HandleStack
from lit_edit.methods.base import EditorModule
from lit_edit.nn.edit_optim import optimise
from lit_edit.nn.fact_tokens import context_prefixes
from lit_edit.nn.frozen_prefix import replay_frozen
from lit_edit.nn.layout import matrix_layout, mlp_out_name
from lit_edit.nn.losses import answer_logits
from lit_edit.nn.wise_memory import ORIGINAL, Mode, SideMemory
from lit_edit.nn.wise_merge import TiesNormalisation
from lit_edit.nn.wise_routing import DistanceKind, margin_loss, sequence_distance
from lit_edit.records import EditRecord, QAPair
from lit_edit.tokenization import IGNORE_INDEX

Irrelevant = Literal["auto", "meta", "world"]


class WISEEditor(EditorModule):
    """WISE: edits go into a masked side copy of one FFN value matrix, behind a router.

    The value layer is wrapped **once** (:class:`~lit_edit.nn.wise_memory.SideMemory`) and its
    state is kept across edits (METHODS.md P7); sharding and merging follow the edit counter,
    never evaluation (P10). Nothing of the backbone changes: an edit changes only the side
    memory's state, and its handle brings all of it back exactly (side copy, shards, merged
    memory, ε's, mask, counters).

    **One edit** (records are edited one after another): rows ``template.format(prompt) + " "
    + target_new`` for the bare prompt and every context prefix (generated once, seeded, from
    the unedited model), plus one out-of-scope row (an irrelevant training sentence, see
    ``irrelevant``), go through the model as **one batch per step**. The loss is the mean
    target NLL of the edit rows plus the margin loss
    ``mean⁺(out - in + γ) + mean⁺(out - α) + mean⁺(β - in)`` on the rows' activation distances
    (:func:`~lit_edit.nn.wise_routing.margin_loss`). Plain SGD on the side copy; after backward
    the gradient is multiplied by the shard's random mask (ρ); after each step the masked
    entries decay by ``edit_lr · weight_decay`` (the peer's SGD weight decay, applied to the
    masked entries only, so the rest stays ``W_v`` exactly) and the copy is clamped to
    ``[W_v - c, W_v + c]``. Early stop once ``loss ≤ stop_loss`` and ``|ΔL| ≤ stop_change``.
    The edit's ``ε`` is then the mean in-scope distance of its edit rows under the final copy.
    What lies below the value matrix (the blocks before its block, the block's attention and
    MLP input) sees the same batch at every step: it runs once per edit and is replayed
    (:func:`~lit_edit.nn.frozen_prefix.replay_frozen`, exact).

    **Routing report** (:meth:`record_values`): per record the fraction of its edit prompt,
    rephrases and locality prompts routed to a side memory (``routing/<group>/side``).

    Checkpoints hold the side memory's state (``wise.*``), not the backbone; an editor loaded
    from one goes on editing where the other stopped.

    Args:
        backbone: Model to edit (see :class:`~lit_edit.methods.base.EditorModule`).
        inner_param: The value matrix (``<module>.weight``); default: the MLP output matrix of
            block ``layer``.
        layer: Block of the default value matrix (negative counts from the end).
        mode: ``"merge"`` (WISE-Merge, the paper's default) or ``"retrieve"`` (WISE-Retrieve,
            the peer's yaml default; METHODS.md P8).
        distance: ``"activated"`` (the peer's ``‖σ(o') - σ(o)‖``) or ``"delta"`` (the paper's
            ``‖A(x)(W' - W)‖``; P9).
        act_ratio: Routing threshold ``ε · act_ratio`` (paper: 0.88 LLaMA-2, 0.8 GPT-2).
        mask_ratio: ρ, fraction of entries each shard trains (paper: 0.2).
        edit_lr: SGD learning rate (paper: 1.0).
        n_iter: Most steps per edit (paper: 70; GPT-2: 40).
        weight_decay: SGD weight decay of the masked entries (paper: 1e-5).
        norm_constraint: L∞ radius around ``W_v`` (paper: 1.0; ``None``: no clamp).
        alpha: Upper margin of out-of-scope distances (paper: 5).
        beta: Lower margin of in-scope distances (paper: 20).
        gamma: Least in/out gap (paper: 10).
        save_freq: Edits per shard (paper: 500).
        merge_freq: Edits per merge, a multiple of ``save_freq`` (paper: 1000).
        density: Ties trim density (paper: 0.53).
        ties_normalise: Ties' disjoint mean: ``"weights"`` (WISE's code) or ``"count"``
            (peft's ``ties``), see :mod:`~lit_edit.nn.wise_merge`.
        stop_loss: Early stop when the loss is at most this (paper: 0.02; ``None``: never).
        stop_change: ... and changed by at most this since the previous step (paper: 1e-4).
        prefix_lengths: ``[n_tokens, count]`` groups of context prefixes (paper: 5 of 5 tokens,
            5 of 10).
        prefix_starts: Start texts of the prefixes (paper: "I", "You", "Because", "Yes", "Q: ").
        prefix_seed: Seed of the prefixes' sampling.
        irrelevant: Source of the out-of-scope row: ``"meta"`` (the record's
            ``meta["loc_prompt"]``, set by the ZsRE reader: an irrelevant training question with
            its answer), ``"world"`` (a sentence of a TinyFacts backbone's pretraining text not
            about the record's subject, drawn by the edit counter) or ``"auto"`` (``meta`` when
            the record has one, else ``world``).
        n_irrelevant: Out-of-scope rows per edit drawn from the world (the paper: 1; an
            extension: more rows teach the router a broader out-of-scope set). A record's
            ``meta["loc_prompt"]`` gives one row.
        template_negatives: Extra out-of-scope rows per edit: the edit prompt with its subject
            replaced by a made-up name (seeded syllables, never a real subject), so that the
            router learns that the prompt's template alone is not the edit (an extension, not
            in the paper; 0: none). Needs records with a ``subject``.
        replay: Earlier edits of the current shard whose bare prompt rows join each step's
            batch as edit rows (an extension, not in the paper: 0 is WISE; ``k > 0`` draws up
            to ``k`` of them per edit, seeded by the edit counter, so that a new edit is
            trained not to overwrite the shard's earlier ones). The rows are part of the
            side memory's state (restored by a handle, saved in checkpoints).
        seed: Seed of the gradient masks, of the out-of-scope and of the replay draws.
        max_length: Longest training row (prompts cut from the left; ``None``: no limit).
    """

    def __init__(
        self,
        backbone: Backbone | str = "tinyfacts",
        inner_param: str | None = None,
        layer: int = -1,
        mode: Mode = "merge",
        distance: DistanceKind = "activated",
        act_ratio: float = 0.88,
        mask_ratio: float = 0.2,
        edit_lr: float = 1.0,
        n_iter: int = 70,
        weight_decay: float = 1e-5,
        norm_constraint: float | None = 1.0,
        alpha: float = 5.0,
        beta: float = 20.0,
        gamma: float = 10.0,
        save_freq: int = 500,
        merge_freq: int = 1000,
        density: float = 0.53,
        ties_normalise: TiesNormalisation = "weights",
        stop_loss: float | None = 0.02,
        stop_change: float | None = 1e-4,
        prefix_lengths: list[list[int]] | None = None,
        prefix_starts: list[str] | None = None,
        prefix_seed: int = 0,
        irrelevant: Irrelevant = "auto",
        n_irrelevant: int = 1,
        template_negatives: int = 0,
        replay: int = 0,
        seed: int = 0,
        max_length: int | None = None,
    ) -> None:
        super().__init__(backbone)
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        if edit_lr <= 0:
            raise ValueError(f"edit_lr must be > 0, got {edit_lr}")
        if irrelevant not in ("auto", "meta", "world"):
            raise ValueError(f"irrelevant must be 'auto', 'meta' or 'world', got {irrelevant!r}")
        self.inner_name = inner_param or f"{mlp_out_name(self.model, layer)}.weight"
        module_name = self.inner_name.removesuffix(".weight")
        value_layer = find_module(self.model, module_name)
        layout = matrix_layout(self.inner_name, value_layer)
        self.wise = SideMemory(
            value_layer, layout, mode=mode, distance=distance,
            activation=_activation(self.model) if distance == "activated" else None,
            act_ratio=act_ratio, mask_ratio=mask_ratio, save_freq=save_freq,
            merge_freq=merge_freq, density=density, ties_normalise=ties_normalise,
            norm_constraint=norm_constraint, seed=seed,
        )
        self.wise.attach(self.model)
        self.edit_lr = edit_lr
        self.n_iter = n_iter
        self.weight_decay = weight_decay
        self.margins = (alpha, beta, gamma)
        self.stop_loss = stop_loss
        self.stop_change = stop_change
        if n_irrelevant < 1:
            raise ValueError(f"n_irrelevant must be >= 1, got {n_irrelevant}")
        self.irrelevant = irrelevant
        self.n_irrelevant = n_irrelevant
        if template_negatives < 0:
            raise ValueError(f"template_negatives must be >= 0, got {template_negatives}")
        self.template_negatives = template_negatives
        if replay < 0:
            raise ValueError(f"replay must be >= 0, got {replay}")
        self.replay = replay
        self.seed = seed
        self.collator = PairCollator(self.tokenizer, "right", max_length)
        lengths = [(5, 5), (10, 5)] if prefix_lengths is None else prefix_lengths
        starts = ["I", "You", "Because", "Yes", "Q: "] if prefix_starts is None else prefix_starts
        # from the unedited model (no edit in effect yet), once: every edit uses the same ones
        self.templates = context_prefixes(self.model, self.tokenizer,
                                          [tuple(x) for x in lengths], seed=prefix_seed,
                                          starts=starts)
        self._world_pairs: list[QAPair] | None = None

    def edit_state_keys(self) -> set[str]:
        """The side memory: its copy and its state (the backbone never changes)."""
        return {"wise.side", "wise._extra_state"}

    # ------------------------------------------------------------------ editing
    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Edit the records one after another; the handle restores the state before them.

        Args:
            records: Records to edit, in order.

        Returns:
            A handle restoring the whole side-memory state exactly (inside an edit sequence,
            restored with the sequence: :meth:`~lit_edit.methods.base.EditorModule.state_handle`).
        """
        handles = []
        for record in records:
            # inside a sequential group: one snapshot at the group's first edit, none after
            handles.append(self.state_handle(self.wise, self._snapshot_handle))
            self._edit_one(record)
        if handles and all(isinstance(h, CoveredEdit) for h in handles):
            return handles[-1]  # the sequence holds the snapshot: nothing to keep per edit
        return HandleStack(handles)

    def _snapshot_handle(self) -> EditHandle:
        """A handle bringing the side memory back to its current state exactly."""
        snapshot = self.wise.snapshot()
        return CallbackHandle(lambda: self.wise.restore(snapshot))

    def _edit_one(self, record: EditRecord) -> None:
        """Train the side copy on one record, then count the edit (sharding, merging)."""
        pairs = [QAPair(t.format(record.prompt), record.target_new) for t in self.templates]
        n_own = len(pairs)
        pairs += self._replayed()
        n_edit = len(pairs)
        out_of_scope = [*self._out_of_scope(record), *self._template_negatives(record)]
        batch = self.collator([*pairs, *out_of_scope])
        batch = {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}
        labels = batch["labels"].clone()
        labels[n_edit:] = IGNORE_INDEX  # the out-of-scope row only enters the margin loss
        mask = batch["attention_mask"]
        alpha, beta, gamma = self.margins
        memory = self.wise

        def loss() -> torch.Tensor:
            """Target NLL of the edit rows plus the routing margin loss."""
            # the output head only where an answer token is predicted (the edit rows' answers)
            logits, target = answer_logits(self.model, batch["input_ids"], mask, labels)
            dist = sequence_distance(memory.last_distance, mask)  # [rows]
            routing = margin_loss(dist[:n_edit], dist[n_edit:], alpha, beta, gamma)
            nll = (torch.nn.functional.cross_entropy(logits.float(), target) if target.numel()
                   else routing.new_zeros(()))  # the mean over the answer tokens
            return nll + routing

        grad_mask = memory.mask.to(memory.side.dtype)
        decay = self.edit_lr * self.weight_decay

        def constrain() -> None:
            """Weight decay of the masked entries, then the L∞ clamp around ``W_v``."""
            if decay:
                memory.side.sub_(memory.side * grad_mask * decay)
            memory.clamp_()

        memory.editing = True
        try:
            with replay_frozen(self.model, self.inner_name):  # the part below: once per edit
                optimise([memory.side], loss, self.n_iter, self.edit_lr, optimizer="sgd",
                         stop_below=self.stop_loss, stop_change=self.stop_change,
                         grad_masks=[grad_mask], project=constrain)
            with torch.no_grad():
                self.model(input_ids=batch["input_ids"][:n_own], attention_mask=mask[:n_own])
                in_scope = sequence_distance(memory.last_distance, mask[:n_own]).mean()
        finally:
            memory.editing = False
            memory.last_distance = None
        if self.replay:
            memory.replay.append((record.prompt, record.target_new))
        memory.finish_edit(float(in_scope))

    def _replayed(self) -> list[QAPair]:
        """Up to ``replay`` earlier edits of the current shard (bare prompts), seeded."""
        earlier = self.wise.replay
        if not self.replay or not earlier:
            return []
        if len(earlier) <= self.replay:
            chosen = list(earlier)
        else:
            rng = random.Random(self.seed * 1_000_003 + 7_919 * self.wise.edits + 1)
            chosen = rng.sample(earlier, self.replay)
        return [QAPair(prompt, answer) for prompt, answer in chosen]

    def _out_of_scope(self, record: EditRecord) -> list[QAPair]:
        """The irrelevant rows of an edit (see ``irrelevant`` and ``n_irrelevant``)."""
        text = record.meta.get("loc_prompt") if self.irrelevant != "world" else None
        if text:
            head, _, last = str(text).rpartition(" ")
            return [QAPair(head, last) if head else QAPair(str(text), ".")]
        if self.irrelevant == "meta":
            raise ValueError(
                f"record {record.index} ({record.prompt!r}) has no meta['loc_prompt'] for WISE's "
                "out-of-scope row: use irrelevant: world (TinyFacts) or data with loc prompts"
            )
        pool = self._world_pool()
        rng = random.Random(self.seed * 1_000_003 + self.wise.edits)
        subject = record.subject
        out: list[QAPair] = []
        for _ in range(100 * self.n_irrelevant):
            pair = pool[rng.randrange(len(pool))]
            if not subject or subject not in pair.prompt:
                out.append(pair)
                if len(out) == self.n_irrelevant:
                    break
        return out or [pair]

    def _template_negatives(self, record: EditRecord) -> list[QAPair]:
        """The edit prompt about made-up subjects (see ``template_negatives``), seeded."""
        if not self.template_negatives:
            return []
        if not record.subject or record.subject not in record.prompt:
            raise ValueError(f"record {record.index} ({record.prompt!r}) has no subject in its "
                             "prompt for WISE's template_negatives: use template_negatives: 0")
        rng = random.Random(self.seed * 1_000_003 + 104_729 * self.wise.edits + 3)

        def name() -> str:
            """Two capitalised words of 2-3 consonant-vowel syllables."""
            return " ".join("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou")
                                    for _ in range(rng.randint(2, 3))).capitalize()
                            for _ in range(2))

        return [QAPair(record.prompt.replace(record.subject, name()), record.target_new)
                for _ in range(self.template_negatives)]

    def _world_pool(self) -> list[QAPair]:
        """The TinyFacts backbone's pretraining pairs (irrelevant training sentences)."""
        if self._world_pairs is None:
            path = Path(resolve_model_path(self.backbone.name))
            if not (path / "world.json").is_file():
                raise ValueError(
                    f"irrelevant: world needs a TinyFacts backbone (a model directory with "
                    f"world.json), not {self.backbone.name!r}: use data whose records carry "
                    "meta['loc_prompt'] (the ZsRE reader sets it) with irrelevant: meta"
                )
            from lit_edit.world import load_world

            self._world_pairs = load_world(path).pretraining_pairs()
        return self._world_pairs

    # ------------------------------------------------------------------ routing report
    def routes(self, pairs: Sequence[QAPair]) -> list[int]:
        """The memory each pair's sequence is routed to (``-1``: the original weights).

        Args:
            pairs: (prompt, answer) pairs, routed as scored (prompt and answer).

        Returns:
            One route per pair: ``-1`` original, ``0`` the side copy, ``i ≥ 1`` the merged
            memory (Merge) or saved memory ``i - 1`` (Retrieve).
        """
        if not pairs:
            return []
        if not self.wise.in_effect():
            return [ORIGINAL] * len(pairs)
        collate = PairCollator(self.tokenizer, "right")  # natural positions
        out: list[int] = []
        with torch.inference_mode():
            for i in range(0, len(pairs), 64):
                batch = collate(list(pairs[i : i + 64]))
                self.model(input_ids=batch["input_ids"].to(self.device),
                           attention_mask=batch["attention_mask"].to(self.device))
                assert self.wise.last_routes is not None
                out.extend(int(r) for r in self.wise.last_routes)
        return out

    def record_values(self, records: Sequence[EditRecord]) -> list[dict[str, float | None]]:
        """Per record: fractions of its prompts routed to a side memory, by group."""
        if not self.wise.in_effect():
            return [{} for _ in records]
        out = []
        for r in records:
            groups = {"edit": [r.edit_pair], "rephrase": list(r.rephrase_pairs),
                      "locality": [p for g in r.locality.values() for p in g]}
            row: dict[str, float | None] = {}
            for name, pairs in groups.items():
                if pairs:
                    routes = self.routes(pairs)
                    row[f"routing/{name}/side"] = sum(x != ORIGINAL for x in routes) / len(routes)
            out.append(row)
        return out


def _activation(model: torch.nn.Module) -> torch.nn.Module:
    """The model's hidden activation (``ACT2FN`` of its config)."""
    from transformers.activations import ACT2FN

    config = model.config
    name = getattr(config, "activation_function", None) or getattr(config, "hidden_act", None)
    if name is None or name not in ACT2FN:
        raise ValueError(
            f"cannot tell the hidden activation of {type(model).__name__} (config has "
            f"activation_function/hidden_act {name!r}): use distance: delta"
        )
    return ACT2FN[name]
