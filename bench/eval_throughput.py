"""Batched scorer vs a one-pair-at-a-time loop (the way EasyEdit evaluates), side by side.

Scores every pair (edit, rephrases, portability, locality) of the same TinyFacts edit records
with lit_edit's batched scorer and with a loop that tokenizes and runs one pair per forward,
asserts that every per-record value is identical, and prints the speed ratio.

    python bench/eval_throughput.py [--records 1000] [--batch-size 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lit_edit.backbone import load_causal_lm, load_tokenizer
from lit_edit.data.tinyfacts import TinyFactsDataModule
from lit_edit.metrics import record_token_accuracy
from lit_edit.records import EditRecord, QAPair
from lit_edit.scoring import PairScore, Scorer
from lit_edit.scoring.utils import length_sorted_batches
from lit_edit.tokenization import (
    encode_pair,
    encode_pairs,
    pad_sequences,
    position_ids_from_mask,
)


def record_groups(record: EditRecord) -> dict[str, list[QAPair]]:
    """The scored pairs of a record by kind."""
    return {
        "reliability": [record.edit_pair],
        "generalization": list(record.rephrase_pairs),
        "portability": [p for g in record.portability.values() for p in g],
        "locality": [p for g in record.locality.values() for p in g],
    }


def one_by_one(model, tokenizer, pairs: list[QAPair]) -> list[PairScore]:
    """EasyEdit-style scoring: tokenize and run each pair alone (no padding, no batching)."""
    out = []
    with torch.inference_mode():
        for pair in pairs:
            enc = encode_pair(tokenizer, pair.prompt, pair.answer)
            ids = torch.tensor([enc.input_ids])
            logits = model(input_ids=ids).logits[0]  # [L, V]
            n = len(enc.answer_ids)
            picked = logits[-n - 1 : -1].float().log_softmax(-1)  # [n, V] predicts the answer
            answer = torch.tensor(enc.answer_ids)
            out.append(
                PairScore(answer, picked.argmax(-1), picked.gather(-1, answer[:, None])[:, 0], pair)
            )
    return out


def forwards_only(model, tokenizer, pairs: list[QAPair], batch_size: int) -> float:
    """Seconds of the batched scorer's model forwards alone (same unique pairs and batches)."""
    unique = list(dict.fromkeys((p.prompt, p.answer) for p in pairs))
    encoded = encode_pairs(tokenizer, unique)
    batches = []
    for batch in length_sorted_batches([len(e.input_ids) for e in encoded], batch_size):
        ids, mask = pad_sequences([encoded[i].input_ids for i in batch], 0, "left")
        keep = max(len(encoded[i].answer_ids) for i in batch) + 1
        batches.append((ids, mask, position_ids_from_mask(mask), keep))
    with torch.inference_mode():
        start = time.perf_counter()
        for ids, mask, positions, keep in batches:
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                  logits_to_keep=keep)
        return time.perf_counter() - start


def per_record_values(scores_by_record) -> list[dict[str, float | None]]:
    """Token accuracy of each kind of pair, per record (locality: of the true answers)."""
    return [{k: record_token_accuracy(v) for k, v in g.items()} for g in scores_by_record]


def split(records, flat_scores) -> list[dict[str, list[PairScore]]]:
    """Cut a flat list of scores back into per-record groups."""
    out, i = [], 0
    for r in records:
        groups = {}
        for kind, pairs in record_groups(r).items():
            groups[kind] = flat_scores[i : i + len(pairs)]
            i += len(pairs)
        out.append(groups)
    return out


def main() -> None:
    """Run the benchmark and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_causal_lm("tinyfacts"), load_tokenizer("tinyfacts")
    records = TinyFactsDataModule().all_records()[: args.records]
    pairs = [p for r in records for g in record_groups(r).values() for p in g]
    print(f"{len(records)} records, {len(pairs)} pairs, batch size {args.batch_size}, "
          f"{args.threads} threads")

    one_by_one(model, tokenizer, pairs[:50])  # warm-up
    start = time.perf_counter()
    naive = one_by_one(model, tokenizer, pairs)
    t_naive = time.perf_counter() - start

    scorer = Scorer(batch_size=args.batch_size, padding_side="left")
    scorer.score(model, tokenizer, pairs[:50])  # warm-up
    start = time.perf_counter()
    batched = scorer.score(model, tokenizer, pairs)
    t_batched = time.perf_counter() - start

    t_forwards = forwards_only(model, tokenizer, pairs, args.batch_size)

    v_naive = per_record_values(split(records, naive))
    v_batched = per_record_values(split(records, batched))
    assert v_naive == v_batched, "per-record values differ between batched and one-by-one"
    assert all(torch.equal(a.pred_ids, b.pred_ids) for a, b in zip(naive, batched, strict=True))
    max_dlogp = max(
        float((a.logprobs - b.logprobs).abs().max()) for a, b in zip(naive, batched, strict=True)
    )
    print(f"one-by-one: {t_naive:.2f} s ({len(pairs) / t_naive:.0f} pairs/s)")
    print(f"batched:    {t_batched:.2f} s ({len(pairs) / t_batched:.0f} pairs/s)")
    print(f"per-record values identical: yes; max |log-prob difference| {max_dlogp:.2e}")
    print(f"speed-up: {t_naive / t_batched:.1f}x")
    print(f"the batched model forwards alone: {t_forwards:.2f} s, so no scorer of this model at "
          f"this batch size can beat {t_naive / t_forwards:.1f}x here")


if __name__ == "__main__":
    main()
