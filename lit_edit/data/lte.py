"""LTE alignment data: FastChat/ShareGPT conversations read into (prompt, answer) turns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lit_edit.data.base import BaseReader
from lit_edit.data.fields import ReadNote, json_type
from lit_edit.records import RecordError


@dataclass(frozen=True)
class ConversationPair:
    """One human → assistant exchange of a conversation.

    Attributes:
        prompt: The human turn (for LTE's edited samples, the "Please acknowledge the updated
            information ..." template with the facts and the question).
        answer: The assistant (``gpt``) turn that follows it; the only tokens trained on.
        id: The conversation's ``id`` (its index in the file when the file gives none).
        turn: Index of the exchange in its conversation (0 for the first human/gpt pair).
        history: The conversation's earlier exchanges as ``(prompt, answer)`` tuples.
        source: The file the conversation came from.
        index: Index of the conversation in its file.
    """

    prompt: str
    answer: str
    id: str
    turn: int = 0
    history: tuple[tuple[str, str], ...] = ()
    source: str = ""
    index: int = -1

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "id": self.id,
            "turn": self.turn,
            "history": [list(h) for h in self.history],
            "source": self.source,
            "index": self.index,
        }


class ConversationReader(BaseReader[ConversationPair]):
    """FastChat/ShareGPT: ``{"id", "conversations": [{"from": "human"|"gpt", "value"}, ...]}``.

    Turns must alternate ``human``, ``gpt``, ``human``, ``gpt``, ... (starting with ``human`` and
    ending with ``gpt``), and every ``value`` must be a non-empty string; anything else makes the
    conversation invalid. Each human/gpt exchange becomes one :class:`ConversationPair`, with the
    earlier exchanges as its ``history``.
    """

    format_name = "lte"
    description = "LTE alignment data, FastChat conversations (id, conversations[from, value])"

    used_keys = frozenset(("id", "conversations"))
    nested_used_keys = {"conversations": frozenset(("from", "value"))}

    def matches(self, raw: Mapping[str, Any]) -> bool:
        """Detect the ``conversations`` key."""
        return "conversations" in raw

    def parse_items(
        self, raw: Mapping[str, Any], index: int, source: str, notes: list[ReadNote]
    ) -> list[ConversationPair]:
        """Split one conversation into its human → gpt exchanges.

        Args:
            raw: The decoded conversation object.
            index: Its index in the file.
            source: The file path.
            notes: Unused (conversations have no optional values); kept for the interface.

        Returns:
            One pair per exchange, in order.

        Raises:
            RecordError: naming the field (e.g. ``conversations[3].from``) when it is invalid.
        """
        conv_id = raw.get("id", str(index))
        if isinstance(conv_id, bool) or not isinstance(conv_id, (str, int)):
            raise RecordError("id", f"expected a string, got {json_type(conv_id)}")
        turns = raw.get("conversations")
        if not isinstance(turns, list):
            got = "nothing" if turns is None else json_type(turns)
            raise RecordError("conversations", f"expected a list of turns, got {got}")
        if not turns:
            raise RecordError("conversations", "is empty")
        texts: list[str] = []
        for t, turn in enumerate(turns):
            where = f"conversations[{t}]"
            if not isinstance(turn, Mapping):
                raise RecordError(where, f"expected an object, got {json_type(turn)}")
            expected = "human" if t % 2 == 0 else "gpt"
            role = turn.get("from")
            if role != expected:
                raise RecordError(
                    f"{where}.from",
                    f"expected {expected!r} (turns alternate human, gpt), got {role!r}",
                )
            value = turn.get("value")
            if not isinstance(value, str):
                got = "nothing" if value is None else json_type(value)
                raise RecordError(f"{where}.value", f"expected a string, got {got}")
            if not value.strip():
                raise RecordError(f"{where}.value", "is empty")
            texts.append(value)
        if len(texts) % 2:
            raise RecordError(
                f"conversations[{len(texts) - 1}]", "the last human turn has no gpt answer"
            )
        exchanges = [(texts[i], texts[i + 1]) for i in range(0, len(texts), 2)]
        return [
            ConversationPair(
                prompt=p,
                answer=a,
                id=str(conv_id),
                turn=k,
                history=tuple(exchanges[:k]),
                source=source,
                index=index,
            )
            for k, (p, a) in enumerate(exchanges)
        ]
