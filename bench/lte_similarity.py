"""What LTE's retriever can reach: similarity of each question group to its edit question.

    python bench/lte_similarity.py [--n 200] [--encoder all-MiniLM-L6-v2]

For the first ``--n`` TinyFacts test records (the 200 the TinyFacts configs score), embeds each
record's edit question and its other questions with the retriever's sentence encoder and prints,
per question group, the 10/25/50/75/90th percentiles of the cosine similarity to the edit
question. In-scope groups (rephrases, portability) need a similarity above the retrieval
threshold; locality groups need one below it.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def main() -> None:
    """Print the similarity percentiles of every question group."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="test records")
    parser.add_argument("--encoder", default="all-MiniLM-L6-v2", help="sentence encoder")
    parser.add_argument("--world", default="tinyfacts", help="TinyFacts model whose world to use")
    args = parser.parse_args()
    from lit_edit.environment import environment_line

    print(environment_line(), flush=True)

    from lit_edit.data import TinyFactsDataModule
    from lit_edit.nn.retrieval import load_encoder

    data = TinyFactsDataModule(world=args.world, n_test=args.n)
    data.setup("test")
    encoder = load_encoder(args.encoder)
    sims: dict[str, list[float]] = {}
    for r in data.records["test"]:
        groups = {"rephrase": list(r.rephrase_prompts)}
        groups |= {f"portability/{k}": [p.prompt for p in g] for k, g in r.portability.items()}
        groups |= {f"locality/{k}": [p.prompt for p in g] for k, g in r.locality.items()}
        names = [k for k, qs in groups.items() if qs]
        texts = [r.prompt, *(q for k in names for q in groups[k])]
        emb = F.normalize(encoder.encode(texts), dim=-1)  # [1 + Q, D]
        cos = (emb[1:] @ emb[0]).tolist()  # [Q]
        i = 0
        for k in names:
            sims.setdefault(k, []).extend(cos[i : i + len(groups[k])])
            i += len(groups[k])
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    print(f"cosine similarity to the edit question ({args.encoder}, {args.n} test records)")
    print(f"  {'group':<30} {'pairs':>6}  {'p10':>5} {'p25':>5} {'p50':>5} {'p75':>5} {'p90':>5}")
    for k, values in sims.items():
        cells = " ".join(f"{v:5.2f}" for v in torch.quantile(torch.tensor(values), q).tolist())
        print(f"  {k:<30} {len(values):>6}  {cells}")


if __name__ == "__main__":
    main()
