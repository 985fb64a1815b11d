"""SERAC (Mitchell et al., ICML 2022): edit memory, scope classifier, counterfactual model."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch

from lit_edit.backbone import Backbone
from lit_edit.data.collate import PairCollator
from lit_edit.editing import CallbackHandle, EditHandle
from lit_edit.methods.base import EditorModule
from lit_edit.methods.serac_routing import SERACRouting
from lit_edit.methods.serac_training import SERACTraining
from lit_edit.nn.edit_memory import EditMemory
from lit_edit.nn.serac import BiEncoderScope, CrossEncoderScope, Distance
from lit_edit.records import EditRecord, QAPair
from lit_edit.scoring import GeneratedAnswer, Generation, PairScore

Objective = Literal["supervised", "soft"]


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map the same strings to the same ids (one tokenizer family)."""
    return a.get_vocab() == b.get_vocab()


class SERACEditor(SERACRouting, SERACTraining, EditorModule):
    """SERAC: a frozen base model, an edit memory, a scope classifier and a counterfactual model.

    **Editing** (:meth:`edit`): append each record to the edit memory (its prompt, the
    classifier's key, and its fact ``prompt + " " + target_new`` kept separately: no last-word
    stripping, METHODS.md P4); nothing else changes, and the handle truncates the memory back.
    **Answering**: each query (a prompt; the classifier never sees the answer being scored) gets
    the log-similarity of every memory entry; with ``s = exp(max)`` above ``threshold`` the
    query is in scope of that entry and the counterfactual model answers
    ``template.format(fact=..., prompt=query)``; otherwise the untouched base model answers the
    bare query (so an empty memory, or a query routed nowhere, gives exactly the base model's
    scores). Routing is hard at evaluation, whatever the training objective (the paper; the
    peer's ``generate`` does the same).

    **Training** (``train.py fit``): a batch of edit records is the memory. ``objective=
    "supervised"`` (the paper, METHODS.md §3.3, P2): ``c_edit · L_cntr + c_loc · L_cls``, with
    ``L_cntr`` the counterfactual NLL of each in-scope query (the edit prompt and its rephrases,
    optionally portability questions naming the subject) given its *gold* edit, and ``L_cls`` the
    balanced BCE ``mean(-log s_pos) + mean(-log(1 - s_neg))`` whose negatives are each record's
    locality queries against its own edit and the in-scope queries of the other records of the
    batch (in-batch negatives). ``objective="soft"`` (the peer's ``supervised: False``):
    ``c_edit · NLL + c_loc · KL(p_base ‖ p_mix)`` with ``p_mix = (1 - s) p_base + s p_cntr``
    given the most similar edit, NLL on the edit prompts, KL on the locality answers. One Adam
    over two parameter groups (classifier, counterfactual model); clipping, accumulation,
    checkpoints and early stopping come from the Trainer. All parts run in eval mode (no
    dropout, the peer's ``dropout: 0``). Checkpoints hold the classifier and the counterfactual
    model, never the base model.

    **Validation**: the batch's records are edited together (the protocol path) and
    ``val/reliability``, ``val/generalization`` (token accuracy on edit prompts and rephrases)
    and ``val/locality`` (argmax agreement with the base model) are logged, with their mean
    ``val/score`` (a key to monitor), and ``val/loss``.

    **Routing report** (:meth:`record_values`): per record and question group, the fraction of
    queries routed to the record's own edit (``routing/<group>/own``), to another edit
    (``routing/<group>/other``) and to the base model (``routing/<group>/base``); in-scope groups
    are ``edit``, ``rephrase`` and ``portability:<key>``, out-of-scope ``locality:<key>``.

    Args:
        backbone: The base model (see :class:`~lit_edit.methods.base.EditorModule`); frozen.
        counterfactual: The counterfactual model: any causal LM of the backbone's tokenizer
            family (gpt2 for gpt2-xl, llama-160m for LLaMA-2; TinyFacts: ``"tinyfacts-cf"``, a
            second model of the same world).
        classifier: Encoder of the scope classifier (``"all-MiniLM-L6-v2"``: offline; the
            paper's ``"distilbert-base-cased"``).
        cross_attend: A cross-encoder (one forward per edit and query) instead of the
            bi-encoder (paper default: bi-encoder).
        distance: Bi-encoder distance: ``"squared_l2"`` (paper) or ``"cosine"``.
        train_layers: Train only the classifier encoder's last this many blocks (``None``: all).
        threshold: Least ``s`` of an in-scope query (paper: 0.5).
        objective: ``"supervised"`` (paper) or ``"soft"`` (EasyEdit's default, P2).
        template: The counterfactual model's input, with ``{fact}`` and ``{prompt}``.
        c_edit: Weight of the counterfactual loss (paper: 0.1).
        c_loc: Weight of the classifier loss (supervised) or of the KL (soft) (paper: 1.0).
        lr: Adam learning rate of the counterfactual model (paper: 1e-5).
        classifier_lr: Adam learning rate of the classifier (``None``: ``lr``).
        use_all_negatives: Supervised: every locality query against every edit of the batch is
            a negative (paper's ``use_all_negatives``), not only against its own record's edit.
        balance_negatives: Supervised: average the locality negatives and the in-batch
            negatives separately and add both means (``mean(-log s_pos) + mean_loc + mean_batch``;
            an extension: pooled, the far more numerous easy in-batch negatives drown the
            locality ones, which share the edit's subject). ``False``: one pooled mean.
        counterfactual_locality: Supervised: also train the counterfactual model to answer
            each locality query, given its own record's (irrelevant) fact, with the locality
            answer (an extension: a query the classifier wrongly routes is then still answered
            like the base model). ``False``: in-scope queries only (the paper).
        train_portability: Supervised: also train on portability questions that name the
            record's subject (with their answers), as in-scope queries.
        freeze_counterfactual: Do not train the counterfactual model (paper's ``freeze_cntr``).
        max_length: Longest counterfactual training sequence (prompts cut from the left;
            ``None``: no limit).
        long_records: A training or validation record with an answer longer than
            ``max_length`` (answers are never cut): ``"error"`` stops ``fit`` at start naming
            it; ``"skip"`` leaves such records out, counted and listed in the log.
    """

    needs_training = True

    def __init__(
        self,
        backbone: Backbone | str = "tinyfacts",
        counterfactual: Backbone | str = "tinyfacts-cf",
        classifier: str = "all-MiniLM-L6-v2",
        cross_attend: bool = False,
        distance: Distance = "squared_l2",
        train_layers: int | None = None,
        threshold: float = 0.5,
        objective: Objective = "supervised",
        template: str = "{fact} {prompt}",
        c_edit: float = 0.1,
        c_loc: float = 1.0,
        lr: float = 1e-5,
        classifier_lr: float | None = None,
        use_all_negatives: bool = False,
        balance_negatives: bool = False,
        counterfactual_locality: bool = False,
        train_portability: bool = False,
        freeze_counterfactual: bool = False,
        max_length: int | None = None,
        long_records: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__(backbone)
        if objective not in ("supervised", "soft"):
            raise ValueError(f"objective must be 'supervised' or 'soft', got {objective!r}")
        if long_records not in ("error", "skip"):
            raise ValueError(f"long_records must be 'error' or 'skip', got {long_records!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if "{fact}" not in template or "{prompt}" not in template:
            raise ValueError(f"template must contain {{fact}} and {{prompt}}, got {template!r}")
        spec = Backbone.of(counterfactual)
        cf_tokenizer = spec.load_tokenizer()
        if not same_vocabulary(self.tokenizer, cf_tokenizer):
            raise ValueError(
                f"counterfactual: {spec.name!r} does not share the backbone's tokenizer "
                f"({self.backbone.name!r}: {len(cf_tokenizer)} vs {len(self.tokenizer)} tokens or "
                "other ids); SERAC scores the same answer tokens with both models, so the "
                "counterfactual model must be of the backbone's tokenizer family (gpt2 for "
                "gpt2-xl, llama-160m for LLaMA-2, tinyfacts-cf for tinyfacts)"
            )
        self.hparams["counterfactual"] = spec.to_hparam()
        self.counterfactual_spec = spec
        self.counterfactual = spec.load_model()
        self.counterfactual.requires_grad_(not freeze_counterfactual)
        self.classifier: BiEncoderScope | CrossEncoderScope = (
            CrossEncoderScope(classifier, train_layers=train_layers) if cross_attend
            else BiEncoderScope(classifier, distance=distance, train_layers=train_layers)
        )
        self.memory = EditMemory("float32", rerank=0, normalise=False)
        self.threshold = threshold
        self.log_threshold = math.log(threshold)
        self.objective = objective
        self.template = template
        self.c_edit = c_edit
        self.c_loc = c_loc
        self.lr = lr
        self.classifier_lr = lr if classifier_lr is None else classifier_lr
        self.use_all_negatives = use_all_negatives
        self.balance_negatives = balance_negatives
        self.counterfactual_locality = counterfactual_locality
        self.train_portability = train_portability
        self.collator = PairCollator(self.tokenizer, "right", max_length)
        self.long_records = long_records
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()

    # ------------------------------------------------------------------ modes and state
    def train(self, mode: bool = True) -> SERACEditor:
        """Set the editor's mode; every part stays in eval mode (no dropout) either way."""
        super().train(mode)
        for name in ("model", "counterfactual", "classifier"):
            if name in self._modules:
                self._modules[name].eval()
        return self

    def edit_state_keys(self) -> set[str]:
        """The edit memory (an edit is an append; no weight changes)."""
        return {"memory._extra_state"}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The classifier may have changed: forget cached embeddings."""
        self.forget_embeddings()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Load as the base class does, and forget cached embeddings (new weights)."""
        super().on_load_checkpoint(checkpoint)
        self.forget_embeddings()

    def _context(self, entry: int, prompt: str) -> str:
        """The counterfactual model's input for ``prompt`` in scope of memory ``entry``."""
        return self.template.format(fact=self.memory.facts[entry], prompt=prompt)

    def _split(self, prompts: Sequence[str]) -> tuple[list[int], list[int], list[int]]:
        """Routes of ``prompts``, and the positions answered by the base and by the cf model."""
        routes, _ = self.route(prompts)
        base = [i for i, r in enumerate(routes) if r < 0]
        cf = [i for i, r in enumerate(routes) if r >= 0]
        return routes, base, cf

    # ------------------------------------------------------------------ editing and answering
    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Append the records to the edit memory; the handle truncates it back.

        Args:
            records: Records edited together.

        Returns:
            A handle that restores the memory to its previous content.
        """
        size = len(self.memory)
        prompts = [r.prompt for r in records]
        if isinstance(self.classifier, BiEncoderScope):
            keys = self._embed(prompts)  # [N, D]
        else:
            keys = torch.zeros(len(records), 1)  # the cross-encoder reads the prompts
        self.memory.add(keys, prompts, [r.fact for r in records])
        return CallbackHandle(lambda: self.memory.truncate(size))

    def score_pairs(self, pairs: Sequence[QAPair]) -> list[PairScore]:
        """Teacher-forced scores: the base model, or the counterfactual model when in scope."""
        if not len(self.memory):
            return super().score_pairs(pairs)
        routes, base, cf = self._split([p.prompt for p in pairs])
        scorer = self.evaluation.scorer()
        out: list[PairScore | None] = [None] * len(pairs)
        if base:
            for i, s in zip(base, scorer.score(self.model, self.tokenizer,
                                               [pairs[i] for i in base]), strict=True):
                out[i] = s
        if cf:
            ctx = [QAPair(self._context(routes[i], pairs[i].prompt), pairs[i].answer,
                          pairs[i].aliases) for i in cf]
            for i, s in zip(cf, scorer.score(self.counterfactual, self.tokenizer, ctx),
                            strict=True):
                out[i] = s
        return [s for s in out if s is not None]

    def generate_answers(self, pairs: Sequence[QAPair]) -> list[GeneratedAnswer]:
        """Greedy answers: the base model, or the counterfactual model when in scope."""
        if not len(self.memory):
            return super().generate_answers(pairs)
        routes, base, cf = self._split([p.prompt for p in pairs])
        scorer = self.evaluation.scorer()
        out: list[GeneratedAnswer | None] = [None] * len(pairs)
        if base:
            found = scorer.generate_answers(self.model, self.tokenizer, [pairs[i] for i in base])
            for i, g in zip(base, found, strict=True):
                out[i] = g
        if cf:
            ctx = [QAPair(self._context(routes[i], pairs[i].prompt), pairs[i].answer,
                          pairs[i].aliases) for i in cf]
            found = scorer.generate_answers(self.counterfactual, self.tokenizer, ctx)
            for i, g in zip(cf, found, strict=True):
                out[i] = g
        return [g for g in out if g is not None]

    def _as_bare(self, prompt: str, generation: Generation) -> Generation:
        """A counterfactual generation re-expressed after the bare prompt (context dropped)."""
        prompt_ids = torch.tensor(self.tokenizer(prompt)["input_ids"], dtype=torch.long)
        full = torch.cat([prompt_ids, generation.new_ids.long()])
        return Generation(prompt, prompt_ids, generation.new_ids, generation.text,
                          self.tokenizer.decode(full, skip_special_tokens=True))

    def sample(self, prompts: Sequence[str], max_length: int, seed: int) -> list[Generation]:
        """Seeded samples: the base model, or the counterfactual model when in scope.

        A counterfactual sample's context is left out of the returned prompt and text.
        """
        if not len(self.memory):
            return super().sample(prompts, max_length, seed)
        routes, base, cf = self._split(prompts)
        scorer = self.evaluation.scorer()
        out: list[Generation | None] = [None] * len(prompts)
        if base:
            found = scorer.sample(self.model, self.tokenizer, [prompts[i] for i in base],
                                  max_length=max_length, seed=seed)
            for i, g in zip(base, found, strict=True):
                out[i] = g
        for i in cf:  # one at a time: the context lengthens each prompt differently
            ctx = self._context(routes[i], prompts[i])
            extra = len(self.tokenizer(ctx)["input_ids"]) - len(self.tokenizer(prompts[i])[
                "input_ids"])
            g = scorer.sample(self.counterfactual, self.tokenizer, [ctx],
                              max_length=max_length + extra, seed=seed)[0]
            out[i] = self._as_bare(prompts[i], g)
        return [g for g in out if g is not None]

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str]:
        """Greedy continuations (for notebooks), routed like every other answer."""
        routes, _, _ = self._split(list(prompts))
        scorer = self.evaluation.scorer()
        texts = []
        for prompt, r in zip(prompts, routes, strict=True):
            model = self.model if r < 0 else self.counterfactual
            text = prompt if r < 0 else self._context(r, prompt)
            texts.append(scorer.generate(model, self.tokenizer, [text], max_new_tokens)[0].text)
        return texts
