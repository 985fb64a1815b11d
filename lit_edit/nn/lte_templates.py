"""LTE's prompt templates (exact strings, METHODS.md §5.2) and chat wrapping.

The human turn of an edited sample is :data:`LTE_TEMPLATE` filled with the facts and the question;
an unedited sample's human turn is the bare question. The same wrapping (:class:`ChatWrapper`) is
applied to human turns in training and in evaluation, unlike the peer (METHODS.md P12).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from transformers import PreTrainedTokenizerBase

LTE_TEMPLATE = (
    "Please acknowledge the updated information provided below and respond to the subsequent "
    "question.\n\n[Updated Information]:\n{facts}\n\n[Question]:\n{question}"
)
"""The alignment-data template (``create_train_data``), also used by LTE's retrieval evaluation."""

LTE_QUERY_TEMPLATE = (
    "Please acknowledge the updated information provided below and respond to the subsequent "
    "query.\n\n[Updated Information]:\n{facts}\n\n[Query]:\n{question}"
)
"""The wording of the peer's single-edit evaluation ("query"/"[Query]"), kept for comparisons."""

TemplateName = Literal["question", "query"]


def template_text(name: TemplateName) -> str:
    """The template called ``name``: ``"question"`` (:data:`LTE_TEMPLATE`) or ``"query"``."""
    if name == "question":
        return LTE_TEMPLATE
    if name == "query":
        return LTE_QUERY_TEMPLATE
    raise ValueError(f"template must be 'question' or 'query', got {name!r}")


def format_facts(facts: Sequence[str]) -> str:
    """The ``{facts}`` block: one fact as it is, several numbered one a line (``1. ...``).

    Args:
        facts: Fact sentences, the true (or best-retrieved) one first.

    Raises:
        ValueError: if ``facts`` is empty.
    """
    if not facts:
        raise ValueError("need at least one fact")
    if len(facts) == 1:
        return facts[0]
    return "\n".join(f"{i}. {fact}" for i, fact in enumerate(facts, start=1))


def edit_prompt(facts: Sequence[str], question: str, template: str = LTE_TEMPLATE) -> str:
    """The human turn of an edited sample: ``template`` with the facts and the question.

    Args:
        facts: Fact sentences (see :func:`format_facts`).
        question: The question (a bare prompt).
        template: A string with ``{facts}`` and ``{question}``.
    """
    return template.format(facts=format_facts(facts), question=question)


class ChatWrapper:
    """Wraps a human turn with the tokenizer's own chat template, or leaves it as it is.

    With a chat template the result is ``apply_chat_template([{"role": "user", "content":
    human}], add_generation_prompt=True)`` as text, without a leading BOS string (the tokenizer
    adds its special tokens when the text is encoded, as for every other prompt). The answer then
    follows as ``wrapped + " " + answer`` (the field's joining convention).

    Args:
        tokenizer: The model's tokenizer.
        use_chat_template: ``True`` to require a chat template, ``False`` to never wrap, ``None``
            to wrap when the tokenizer has one.
        system_prompt: System message put first when given (LTE trains with an empty one, i.e.
            none).

    Raises:
        ValueError: if ``use_chat_template`` is ``True`` and the tokenizer has no chat template.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
    ) -> None:
        has = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.enabled = has if use_chat_template is None else use_chat_template
        self.system_prompt = system_prompt

    def __call__(self, human: str) -> str:
        """The prompt the model sees for the human turn ``human``."""
        if not self.enabled:
            return human
        messages = [{"role": "user", "content": human}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos):
            text = text[len(bos) :]
        return text.rstrip(" ")
