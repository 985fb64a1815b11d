"""Evaluation speed: lit_edit against the peer's measured figure, and against a one-by-one loop.

1. **Against the peer** (``../shared/PEER.md``): EasyEdit evaluates each of 200 ZsRE records
   (rewrite, rephrase, portability, locality) in 41.4 ms on the yardstick model, and a
   single-edit run evaluates every record twice (before and after its edit): 82.8 ms per
   record. This times lit_edit's **protocol path** on a model of the yardstick's shape
   (``bench/yardstick.py``) and the same 200 records: the pre-edit pass of ``SingleEdit`` (all
   records length-bucketed in one pass) plus the post-edit pass (one record per measure, as
   ``SingleEdit`` runs it; and K records at once, as ``SingleEdit(parallel=K)`` runs it), with
   ``NoEdit`` (edit time excluded; no exact match, no fluency: the peer's workload), and prints
   the ms per record, the ratio to the peer, and the physical limit measured the same way (the
   model's forwards alone on the same batches).
2. **Against our own one-pair-per-forward loop** (the way EasyEdit runs each pair), on TinyFacts
   records: every per-record value and argmax token identical, and the speed ratio.

    python bench/eval_throughput.py [--threads 2] [--records 1000] [--batch-size 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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


def peer_workload(threads: int, rounds: int, parallel: int) -> None:
    """Section 1: the protocol path on the yardstick shape, against the peer's 2 x 41.4 ms."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from yardstick import yardstick_dir, zsre_records

    from lit_edit.evaluation import Evaluation, RecordEvaluator
    from lit_edit.methods import NoEdit

    records = zsre_records(200)
    editor = NoEdit(str(yardstick_dir()))
    settings = Evaluation(exact_match=False, fluency=False)
    editor.evaluation = settings
    evaluator = RecordEvaluator(settings)
    scorer = settings.scorer()
    pairs = [[p for g in record_groups(r).values() for p in g] for r in records]

    def pre() -> None:
        """The pre-edit pass: every record in one measure."""
        evaluator.measure(editor, records)

    def post_one() -> None:
        """The post-edit pass as SingleEdit runs it: one record per measure."""
        for r in records:
            evaluator.measure(editor, [r])

    def post_parallel() -> None:
        """The post-edit pass of SingleEdit(parallel=K): K records per measure."""
        for i in range(0, len(records), parallel):
            with editor.parallel_edit(records[i : i + parallel]) as view:
                evaluator.measure(view, records[i : i + parallel], parallel=True)

    def forwards(groups: list[list[QAPair]]) -> float:
        """Seconds of the model's forwards alone on the scorer's batches of each group."""
        total = 0.0
        for group in groups:
            total += forwards_only(editor.model, editor.tokenizer, group, scorer.batch_size)
        return total

    def best(fn) -> float:
        """Best-of-``rounds`` seconds of ``fn()``."""
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        pre()  # warm-up
        t_pre, t_one, t_par = best(pre), best(post_one), best(post_parallel)
        flat = [p for group in pairs for p in group]
        l_pre = min(forwards([flat]) for _ in range(rounds))
        l_one = min(forwards(pairs) for _ in range(rounds))
        l_par = min(forwards([[p for g in pairs[i : i + parallel] for p in g]
                              for i in range(0, len(pairs), parallel)]) for _ in range(rounds))
    n = len(records)
    peer = 2 * 41.4
    print(f"1. the peer's workload: {n} ZsRE records ({len(flat)} pairs), yardstick-shaped GPT-2 "
          f"(4.24M parameters), {threads} thread(s), best of {rounds}")
    print(f"   peer (EasyEdit, PEER.md): 41.4 ms per record per pass, x2 passes = {peer:.1f} ms")
    for name, t_post, l_post in (("one record per post-edit measure (SingleEdit)", t_one, l_one),
                                 (f"{parallel} records per post-edit measure (SingleEdit("
                                  f"parallel={parallel}))", t_par, l_par)):
        ms = 1e3 * (t_pre + t_post) / n
        limit = 1e3 * (l_pre + l_post) / n
        print(f"   {name}: pre {1e3 * t_pre / n:.2f} + post {1e3 * t_post / n:.2f} = {ms:.2f} ms "
              f"per record: {peer / ms:.1f}x the peer (the forwards alone: {limit:.2f} ms, "
              f"{peer / limit:.1f}x)")
    print(f"   one measure() of all {n} records: {1e3 * t_pre / n:.2f} ms per record: "
          f"{41.4 / (1e3 * t_pre / n):.1f}x the peer's 41.4 ms")


def own_loop(threads: int, n_records: int, batch_size: int) -> None:
    """Section 2: the batched scorer against a one-pair-per-forward loop, values identical."""
    model, tokenizer = load_causal_lm("tinyfacts"), load_tokenizer("tinyfacts")
    records = TinyFactsDataModule().all_records()[:n_records]
    pairs = [p for r in records for g in record_groups(r).values() for p in g]
    print(f"2. against our own one-pair-per-forward loop: {len(records)} TinyFacts records, "
          f"{len(pairs)} pairs, batch size {batch_size}, {threads} thread(s)")

    one_by_one(model, tokenizer, pairs[:50])  # warm-up
    start = time.perf_counter()
    naive = one_by_one(model, tokenizer, pairs)
    t_naive = time.perf_counter() - start

    scorer = Scorer(batch_size=batch_size, padding_side="left")
    scorer.score(model, tokenizer, pairs[:50])  # warm-up
    start = time.perf_counter()
    batched = scorer.score(model, tokenizer, pairs)
    t_batched = time.perf_counter() - start

    t_forwards = forwards_only(model, tokenizer, pairs, batch_size)

    v_naive = per_record_values(split(records, naive))
    v_batched = per_record_values(split(records, batched))
    assert v_naive == v_batched, "per-record values differ between batched and one-by-one"
    assert all(torch.equal(a.pred_ids, b.pred_ids) for a, b in zip(naive, batched, strict=True))
    max_dlogp = max(
        float((a.logprobs - b.logprobs).abs().max()) for a, b in zip(naive, batched, strict=True)
    )
    print(f"   one-by-one: {t_naive:.2f} s ({len(pairs) / t_naive:.0f} pairs/s)")
    print(f"   batched:    {t_batched:.2f} s ({len(pairs) / t_batched:.0f} pairs/s)")
    print(f"   per-record values identical: yes; max |log-prob difference| {max_dlogp:.2e}")
    print(f"   speed-up: {t_naive / t_batched:.1f}x (the batched forwards alone: "
          f"{t_forwards:.2f} s, a ceiling of {t_naive / t_forwards:.1f}x)")


def main() -> None:
    """Run both sections and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=32)
    parser.add_argument("--skip-own-loop", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lit_edit.environment import environment_line

    print(environment_line())
    peer_workload(args.threads, args.rounds, args.parallel)
    if not args.skip_own_loop:
        own_loop(args.threads, args.records, args.batch_size)


if __name__ == "__main__":
    main()
