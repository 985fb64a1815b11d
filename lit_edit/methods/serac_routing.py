"""SERAC's routing: the classifier's embedding cache, the memory scan and the routing report."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lit_edit.nn.serac import BiEncoderScope
from lit_edit.records import EditRecord


class SERACRouting:
    """Routing for :class:`~lit_edit.methods.serac.SERACEditor` (a mixin).

    It reads the editor's classifier, memory, threshold and embedding cache ``_embeddings``.
    """

    def forget_embeddings(self) -> None:
        """Drop the cached query embeddings (call whenever the classifier's weights change)."""
        self._embeddings.clear()

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` classifier embeddings of ``texts`` (no grad; cached per text)."""
        assert isinstance(self.classifier, BiEncoderScope)
        missing = list(dict.fromkeys(t for t in texts if t not in self._embeddings))
        if missing:
            with torch.inference_mode(False), torch.no_grad():
                rows = torch.cat([
                    self.classifier.embed(missing[i : i + 64]).cpu()
                    for i in range(0, len(missing), 64)
                ])
            for text, row in zip(missing, rows, strict=True):
                self._embeddings[text] = row.clone()
        out = torch.stack([self._embeddings[t] for t in texts])
        while len(self._embeddings) > 16384:
            self._embeddings.popitem(last=False)
        return out

    def route(self, queries: Sequence[str]) -> tuple[list[int], torch.Tensor]:
        """The memory entry each query is in scope of.

        Args:
            queries: Prompts (never with the answer being scored).

        Returns:
            Per query the memory index it is routed to, or ``-1`` (the base model), and the
            ``[Q]`` best log-similarities (``-inf`` with an empty memory).
        """
        n = len(self.memory)
        if n == 0 or not queries:
            return [-1] * len(queries), torch.full((len(queries),), -math.inf)
        with torch.inference_mode(False), torch.no_grad():
            if isinstance(self.classifier, BiEncoderScope):
                keys = self.memory.keys  # [N, D]
                q = self._embed(queries)  # [Q, D]
                best = torch.cat([
                    self._chunk_best(keys, q[i : i + 256]) for i in range(0, len(q), 256)
                ])
                values, index = best[:, 0], best[:, 1].long()
            else:
                log_s = self.classifier.log_similarity(list(self.memory.questions),
                                                       list(queries)).cpu()  # [Q, N]
                values, index = log_s.max(-1)
        routes = [int(i) if v > self.log_threshold else -1
                  for v, i in zip(values.tolist(), index.tolist(), strict=True)]
        return routes, values

    def _chunk_best(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``[Q, 2]`` best log-similarity and its key index, over chunks of keys."""
        assert isinstance(self.classifier, BiEncoderScope)
        best_v = torch.full((len(queries),), -math.inf)
        best_i = torch.zeros(len(queries), dtype=torch.long)
        sq_norms = self.memory.sq_norms  # [N]
        for start in range(0, len(keys), 16384):
            log_s = self.classifier.log_similarity_of(keys[start : start + 16384], queries,
                                                      sq_norms[start : start + 16384])
            v, i = log_s.max(-1)  # [Q]
            better = v > best_v
            best_v = torch.where(better, v, best_v)
            best_i = torch.where(better, i + start, best_i)
        return torch.stack([best_v, best_i.float()], dim=1)

    def _latest_entry(self, record: EditRecord) -> int:
        """The newest memory entry holding ``record``'s edit (``-1`` when none does)."""
        for i in range(len(self.memory) - 1, -1, -1):
            if self.memory.questions[i] == record.prompt and self.memory.facts[i] == record.fact:
                return i
        return -1

    def record_values(self, records: Sequence[EditRecord]) -> list[dict[str, float | None]]:
        """Routing of each record's queries per question group (see the class doc).

        Returns:
            Per record ``{"routing/<group>/own", ".../other", ".../base"}`` fractions (empty
            with an empty memory).
        """
        if not len(self.memory):
            return [{} for _ in records]
        groups = [self._groups(r) for r in records]
        flat = [q for g in groups for qs in g.values() for q in qs]
        routes, _ = self.route(flat)
        out, at = [], 0
        for record, g in zip(records, groups, strict=True):
            own = self._latest_entry(record)
            values: dict[str, float | None] = {}
            for name, qs in g.items():
                rs = routes[at : at + len(qs)]
                at += len(qs)
                n = len(rs)
                values[f"routing/{name}/own"] = sum(r == own >= 0 for r in rs) / n
                values[f"routing/{name}/base"] = sum(r < 0 for r in rs) / n
                values[f"routing/{name}/other"] = sum(r >= 0 and r != own for r in rs) / n
            out.append(values)
        return out

    @staticmethod
    def _groups(record: EditRecord) -> dict[str, list[str]]:
        """The record's queries by group (only non-empty groups)."""
        groups = {"edit": [record.prompt], "rephrase": list(record.rephrase_prompts)}
        groups |= {f"portability:{k}": [p.prompt for p in v] for k, v in
                   record.portability.items()}
        groups |= {f"locality:{k}": [p.prompt for p in v] for k, v in record.locality.items()}
        return {k: v for k, v in groups.items() if v}
