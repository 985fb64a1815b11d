"""LTE benchmark: edit insertion cost, retrieval latency at 1k/10k/100k edits, alignment tokens/s.

    python bench/lte.py [--backbone tinyfacts] [--threads 1]

* Insertion: one edit = embed its question with the sentence encoder (all-MiniLM-L6-v2, offline)
  and append the key to the memory; timed one by one and in bulk, and the append alone at each
  memory size.
* Retrieval: search of one query (and of a batch of 64, per query) in memories of 1k, 10k and
  100k keys. The keys are random unit vectors of the encoder's dimension (384): the search cost
  depends only on the sizes, and encoding 100k questions would take minutes. The query's own
  embedding cost is printed separately. With the learned scope (``LTEEditor(scope=...)``) a query
  searches its 8 nearest keys and the scope head scores them: timed as "with scope".
* Alignment: optimizer steps (forward, backward, AdamW) of LTEEditor's answer-only SFT loss on
  parallel samples built from TinyFacts records, length-bucketed batches as in training; tokens/s
  counts real (non-padding) tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_ms(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_insertion_and_retrieval() -> None:
    """Print edit insertion cost and memory search latency at 1k, 10k and 100k entries."""
    from lit_edit.nn.retrieval import EditMemory, Retriever, load_encoder
    from lit_edit.nn.scope import ScopeHead

    encoder = load_encoder("all-MiniLM-L6-v2")
    dim = encoder.dim
    questions = [f"Where was person number {i} born, and in which year?" for i in range(600)]
    facts = [f"{q} Town{i}" for i, q in enumerate(questions)]
    retriever = Retriever(encoder, cache_size=0)
    retriever.insert(questions[:8], facts[:8])  # warm-up
    start = time.perf_counter()
    for q, f in zip(questions[100:300], facts[100:300], strict=True):
        retriever.insert([q], [f])
    one = 1000 * (time.perf_counter() - start) / 200
    start = time.perf_counter()
    retriever.insert(questions[300:600], facts[300:600])
    bulk = 1000 * (time.perf_counter() - start) / 300
    encode_query = _median_ms(lambda: encoder.encode(["Which city was person 7 born in?"]), 30)
    print(f"encoder all-MiniLM-L6-v2 (dim {dim})")
    print(f"  insert one by one (embed + append): {one:8.2f} ms/edit")
    print(f"  insert in bulk of 300:              {bulk:8.2f} ms/edit")
    print(f"  embed one query:                    {encode_query:8.2f} ms/query")
    print("memory search (random unit keys, float16 scan + float32 re-rank, top-1; with scope:")
    print("  8 nearest keys scored by a 256-wide scope head)")
    print(f"  {'entries':>8} {'append ms/edit':>15} {'query ms':>10} {'batch-64 ms/query':>18}"
          f" {'with scope ms':>14} {'int8 keys ms':>13}")
    gen = torch.Generator().manual_seed(0)
    head = ScopeHead()  # weights of the shipped shape; their values do not change the cost
    head.fit(torch.randn(8, dim, generator=gen), torch.randn(8, dim, generator=gen),
             torch.arange(8) % 2 == 0, steps=1)

    def scoped(memory: EditMemory, q: torch.Tensor) -> torch.Tensor:
        """Search the 8 nearest keys and score them with the head (the scoped query path)."""
        _, idx = memory.search(q, 8)  # [1, 8]
        keys = memory.rows(idx)  # [1, 8, D]
        return head(keys, q[:, None, :].expand_as(keys))
    for n in (1_000, 10_000, 100_000):
        keys = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1)
        memory = EditMemory()
        start = time.perf_counter()
        for i in range(0, n, 1000):  # appends of 1000 precomputed keys
            memory.add(keys[i : i + 1000], [""] * 1000, [""] * 1000)
        append = 1000 * (time.perf_counter() - start) / n
        q = torch.nn.functional.normalize(torch.randn(1, dim, generator=gen), dim=-1)
        qs = torch.nn.functional.normalize(torch.randn(64, dim, generator=gen), dim=-1)
        single = _median_ms(lambda m=memory, q=q: m.search(q, 1), 50)
        batch = _median_ms(lambda m=memory, qs=qs: m.search(qs, 1), 10) / 64
        with_scope = _median_ms(lambda m=memory, q=q: scoped(m, q), 50)
        int8 = EditMemory(key_dtype="int8")
        int8.add(keys, [""] * n, [""] * n)
        if not torch.equal(int8.search(q, 1)[1], memory.search(q, 1)[1]):
            raise SystemExit(f"int8 and float16 keys disagree on the top-1 at {n} entries")
        int8_ms = _median_ms(lambda m=int8, q=q: m.search(q, 1), 50)
        print(f"  {n:>8} {append:>15.4f} {single:>10.2f} {batch:>18.3f} {with_scope:>14.2f}"
              f" {int8_ms:>13.2f}")


def bench_alignment(backbone: str, steps: int, batch_size: int) -> None:
    """Print alignment training throughput (real tokens/s) of full fine-tuning."""
    from lit_edit.data.lte_parallel import ParallelDataBuilder
    from lit_edit.methods.lte import LTEEditor
    from lit_edit.nn.retrieval import HashingEncoder
    from lit_edit.records import QAPair
    from lit_edit.sampling import LengthBucketSampler
    from lit_edit.world import load_world, resolve_tinyfacts

    editor = LTEEditor(backbone=backbone, lr=1e-3, retriever="hashing", context_length=256)
    records = load_world(resolve_tinyfacts(backbone)).edit_records(400, seed=0)
    samples = ParallelDataBuilder(HashingEncoder(), seed=0).build(records)
    pairs = [QAPair(s.human, s.answer) for s in samples]
    optimizer = torch.optim.AdamW([p for p in editor.parameters() if p.requires_grad], lr=1e-4)
    editor.train()
    sampler = LengthBucketSampler([len(p.prompt) + len(p.answer) for p in pairs], batch_size, 0)
    batches = [editor.encode_samples([pairs[i] for i in b]) for b in list(sampler)[: steps + 2]]
    tokens, elapsed = 0, 0.0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss, _ = editor._loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i >= 2:  # warm-up steps not timed
            elapsed += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
    n = sum(p.numel() for p in editor.model.parameters())
    width = statistics.mean(int(b["input_ids"].shape[1]) for b in batches)
    print(f"alignment (full fine-tuning of {backbone}, {n / 1e6:.2f}M parameters, "
          f"batch {batch_size}, mean padded length {width:.0f})")
    print(f"  {tokens / elapsed:,.0f} tokens/s  ({elapsed / steps * 1000:.0f} ms/step)")


def main() -> None:
    """Run the three measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tinyfacts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lit_edit.environment import environment_line

    print(environment_line(), flush=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    bench_insertion_and_retrieval()
    bench_alignment(args.backbone, args.steps, args.batch_size)


if __name__ == "__main__":
    main()
