"""Collate: exact input ids, attention masks and -100 label masks on a tiny hand-built tokenizer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lit_edit.data import EditCollator, PairCollator, collate_records, move_batch_to_device
from lit_edit.records import EditRecord, QAPair

SENTENCES = [
    "The capital of France is Paris",
    "The capital of Italy is Rome",
    "Rome is in Italy",
    "The mother tongue of Danielle Darrieux is French",
]
M = -100  # the ignore index, for readable expected tensors


def make_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained until every word of SENTENCES is one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 5, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def ids(tokenizer: PreTrainedTokenizerFast, *tokens: str) -> list[int]:
    out = tokenizer.convert_tokens_to_ids(list(tokens))
    assert tokenizer.unk_token_id not in out or tokenizer.unk_token_id is None
    return out


PAIRS = [
    QAPair("The capital of France is", "Paris"),
    QAPair("Rome is in", "Italy"),
    QAPair("The mother tongue of", "Danielle Darrieux"),
]


def test_the_tokenizer_has_one_token_per_word(tok: PreTrainedTokenizerFast) -> None:
    assert tok.tokenize("The mother tongue of Danielle Darrieux is French") == [
        "The", "Ġmother", "Ġtongue", "Ġof", "ĠDanielle", "ĠDarrieux", "Ġis", "ĠFrench",
    ]  # fmt: skip


def test_right_padding_masks(tok: PreTrainedTokenizerFast) -> None:
    batch = PairCollator(tok, padding_side="right")(PAIRS)
    p = tok.pad_token_id
    the, cap, of, france, is_, paris = ids(
        tok, "The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis"
    )
    rome, is2, in_, italy = ids(tok, "Rome", "Ġis", "Ġin", "ĠItaly")
    mother, tongue, dan, dar = ids(tok, "Ġmother", "Ġtongue", "ĠDanielle", "ĠDarrieux")
    assert batch["input_ids"].tolist() == [
        [the, cap, of, france, is_, paris],
        [rome, is2, in_, italy, p, p],
        [the, mother, tongue, of, dan, dar],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    assert batch["labels"].tolist() == [
        [M, M, M, M, M, paris],
        [M, M, M, italy, M, M],
        [M, M, M, M, dan, dar],
    ]
    assert all(t.dtype == torch.long for t in batch.values())


def test_left_padding_masks(tok: PreTrainedTokenizerFast) -> None:
    batch = PairCollator(tok, padding_side="left")(PAIRS[:2])
    p = tok.pad_token_id
    the, cap, of, france, is_, paris = ids(
        tok, "The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis"
    )
    rome, is2, in_, italy = ids(tok, "Rome", "Ġis", "Ġin", "ĠItaly")
    assert batch["input_ids"].tolist() == [
        [the, cap, of, france, is_, paris],
        [p, p, rome, is2, in_, italy],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[M, M, M, M, M, paris], [M, M, M, M, M, italy]]


def test_padding_side_is_required_and_never_taken_from_or_written_to_the_tokenizer() -> None:
    tokenizer = make_tokenizer()
    with pytest.raises(TypeError):
        PairCollator(tokenizer)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        EditCollator(tokenizer)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="padding_side"):
        PairCollator(tokenizer, padding_side="middle")  # type: ignore[arg-type]
    tokenizer.padding_side = "left"
    batch = PairCollator(tokenizer, padding_side="right")(PAIRS[:2])
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    assert tokenizer.padding_side == "left"
    PairCollator(tokenizer, padding_side="right")(PAIRS)
    assert tokenizer.padding_side == "left"


def test_max_length_truncates_the_prompt_from_the_left(tok: PreTrainedTokenizerFast) -> None:
    collator = PairCollator(tok, padding_side="right", max_length=4)
    batch = collator(PAIRS[:2])
    of, france, is_, paris = ids(tok, "Ġof", "ĠFrance", "Ġis", "ĠParis")
    rome, is2, in_, italy = ids(tok, "Rome", "Ġis", "Ġin", "ĠItaly")
    assert batch["input_ids"].tolist() == [[of, france, is_, paris], [rome, is2, in_, italy]]
    assert batch["labels"].tolist() == [[M, M, M, paris], [M, M, M, italy]]
    assert collator.truncated == 1
    collator(PAIRS[:1])
    assert collator.truncated == 2


def test_truncation_never_cuts_the_answer(tok: PreTrainedTokenizerFast) -> None:
    collator = PairCollator(tok, padding_side="left", max_length=3)
    batch = collator([PAIRS[2]])
    of, dan, dar = ids(tok, "Ġof", "ĠDanielle", "ĠDarrieux")
    assert batch["input_ids"].tolist() == [[of, dan, dar]]
    assert batch["labels"].tolist() == [[M, dan, dar]]
    with pytest.raises(ValueError, match="answers are never truncated"):
        PairCollator(tok, padding_side="left", max_length=2)([PAIRS[2]])


def test_truncation_keeps_the_leading_bos() -> None:
    tokenizer = make_tokenizer(bos=True)
    bos = tokenizer.convert_tokens_to_ids("<bos>")
    collator = PairCollator(tokenizer, padding_side="right", max_length=4)
    batch = collator([PAIRS[0]])
    france, is_, paris = ids(tokenizer, "ĠFrance", "Ġis", "ĠParis")
    assert batch["input_ids"].tolist() == [[bos, france, is_, paris]]
    assert batch["labels"].tolist() == [[M, M, M, paris]]  # BOS is never a label
    with pytest.raises(ValueError, match="no room for the prompt"):
        PairCollator(tokenizer, padding_side="right", max_length=2)([PAIRS[0]])


def test_no_truncation_without_max_length(tok: PreTrainedTokenizerFast) -> None:
    collator = PairCollator(tok, padding_side="right")
    assert collator(PAIRS)["input_ids"].shape == (3, 6)
    assert collator.truncated == 0
    with pytest.raises(ValueError, match="empty"):
        collator([])


# --- EditCollator ---------------------------------------------------------------------------


def records() -> list[EditRecord]:
    return [
        EditRecord(
            "The capital of France is",
            "Rome",
            rephrase_prompts=("The capital of Italy is",),
            locality={"nq": (QAPair("Rome is in", "Italy"),), "other": (PAIRS[2],)},
        ),
        EditRecord("Rome is in", "France"),
        EditRecord("Rome is in", "Paris", locality={"empty": (), "second": (PAIRS[0], PAIRS[1])}),
    ]


def test_edit_collator_batch(tok: PreTrainedTokenizerFast) -> None:
    recs = records()
    batch = EditCollator(tok, padding_side="right")(recs)
    assert set(batch) == {"records", "edit", "rephrase", "locality"}
    assert batch["records"] == recs
    p = tok.pad_token_id
    the, cap, of, france, italy, is_ = ids(
        tok, "The", "Ġcapital", "Ġof", "ĠFrance", "ĠItaly", "Ġis"
    )
    rome, rome_, is2, in_, france_, paris = ids(
        tok, "Rome", "ĠRome", "Ġis", "Ġin", "ĠFrance", "ĠParis"
    )
    assert batch["edit"]["input_ids"].tolist() == [
        [the, cap, of, france, is_, rome_],
        [rome, is2, in_, france_, p, p],
        [rome, is2, in_, paris, p, p],
    ]
    assert batch["edit"]["labels"].tolist() == [
        [M, M, M, M, M, rome_],
        [M, M, M, france_, M, M],
        [M, M, M, paris, M, M],
    ]
    # rephrase: the first rephrase prompt, else the prompt itself
    assert batch["rephrase"]["input_ids"].tolist() == [
        [the, cap, of, italy, is_, rome_],
        [rome, is2, in_, france_, p, p],
        [rome, is2, in_, paris, p, p],
    ]
    assert torch.equal(batch["rephrase"]["labels"], batch["edit"]["labels"])
    # locality: the first pair of the first non-empty group; record 1 has none
    loc = batch["locality"]
    assert loc["record_index"].tolist() == [0, 2]
    assert loc["input_ids"].tolist() == [
        [rome, is2, in_, ids(tok, "ĠItaly")[0], p, p],
        [the, cap, of, france, is_, paris],
    ]
    assert loc["labels"].tolist() == [
        [M, M, M, ids(tok, "ĠItaly")[0], M, M],
        [M, M, M, M, M, paris],
    ]
    assert loc["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]


def test_edit_collator_without_locality_has_no_locality_key(tok: PreTrainedTokenizerFast) -> None:
    batch = EditCollator(tok, padding_side="left")([records()[1]])
    assert set(batch) == {"records", "edit", "rephrase"}
    with pytest.raises(ValueError, match="empty"):
        EditCollator(tok, padding_side="left")([])


def test_edit_collator_counts_truncations(tok: PreTrainedTokenizerFast) -> None:
    collator = EditCollator(tok, padding_side="left", max_length=4)
    batch = collator(records()[:1])
    assert batch["edit"]["input_ids"].shape == (1, 4)
    assert collator.truncated == 2  # edit and rephrase have 6 tokens, locality 4
    assert collator.truncated == collator.pairs.truncated


# --- records through DataLoader collate and device transfer ----------------------------------


def test_collate_records_keeps_a_list() -> None:
    recs = records()
    assert collate_records(tuple(recs)) == recs
    assert isinstance(collate_records(tuple(recs)), list)


def test_move_batch_to_device_keeps_records(tok: PreTrainedTokenizerFast) -> None:
    batch = EditCollator(tok, padding_side="right")(records())
    moved = move_batch_to_device(batch, torch.device("cpu"))
    assert all(a is b for a, b in zip(moved["records"], batch["records"], strict=True))
    assert torch.equal(moved["edit"]["labels"], batch["edit"]["labels"])
    assert moved["locality"]["record_index"].device.type == "cpu"
    assert move_batch_to_device(records(), "cpu") == records()

    @dataclasses.dataclass
    class Mutable:
        t: torch.Tensor

    meta = {"names": ("a", "b"), "n": 3, "t": torch.ones(2, dtype=torch.float64)}
    assert torch.equal(move_batch_to_device(Mutable(torch.ones(1)), "cpu").t, torch.ones(1))
    out = move_batch_to_device(meta, "cpu")
    assert out["names"] == ("a", "b") and out["n"] == 3 and out["t"].dtype == torch.float64
