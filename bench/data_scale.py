"""Reading a full-size edit file: the JSON backend against the ``datasets`` backend.

A synthetic ZsRE (MEND format) file of ``--records`` distinct records (default 163,000, the size
of the full ZsRE MEND train split) is written under ``--dir``; then each case runs in a fresh
process, ``EditDataModule(train_path=FILE, backend=...)``, ``prepare_data()`` then
``setup("fit")``, and reports:

* ``setup s``: the time of ``prepare_data`` and ``setup`` (decode, validate, keep the split;
  with a warm cache: open the table and its kept validation);
* ``held MB``: private resident memory (``RssAnon``) after ``setup`` minus before it: what the
  split keeps in this process;
* ``mapped MB``: file-backed resident memory added by ``setup`` (the memory-mapped table's
  pages read so far: page cache, shared by every process of the machine, reclaimable);
* ``peak MB``: the process's peak resident set size (``ru_maxrss``);
* ``epoch s``: one pass of the training loader (batch 64) building every record;
* with ``--check N``, ``check s`` and ``check MB``: the ``fit``-start ``max_length`` check of a
  MEND editor with ``max_length: N`` (``EditorModule.setup``: every training record through
  the training collation; with the ``datasets`` backend tokenized once through ``Dataset.map``
  and cached with the token ids, :mod:`lit_edit.data.arrow_tokens`), its time and the private
  memory it adds, and ``collate s``: one epoch of MEND's training collation (batches of 64;
  the ``json`` backend tokenizes every pair, the ``datasets`` one reads the cached ids).

The cases: ``json`` (a list of records), ``datasets cold`` (an empty cache: the table is built,
once per machine in a real run, by ``prepare_data``) and ``datasets warm`` (the cache exists:
every later run, and every other process of a multi-process run).

    python bench/data_scale.py                       # 163,000 records
    python bench/data_scale.py --records 20000       # CounterFact-sized
    python bench/data_scale.py --records 20000 --check 64   # + the max_length check
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def write_file(path: Path, n: int) -> None:
    """Write ``n`` distinct ZsRE records (MEND format) to ``path`` as one JSON list."""
    records = [
        {
            "subject": f"Entity {i}",
            "src": f"What is the country of citizenship of Entity {i}?",
            "pred": f"Country {i % 191}",
            "rephrase": f"Which country is Entity {i} a citizen of?",
            "alt": f"Country {(i * 7) % 191}",
            "answers": [f"Country {i % 191}"],
            "loc": f"nq question: who wrote the song number {i}",
            "loc_ans": f"Writer {i % 977}",
            "cond": f"Country {i % 191} >> Country {(i * 7) % 191} || Entity {i}",
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(records), encoding="utf-8")


def rss_mb() -> dict[str, float]:
    """This process's resident memory now, in MB: private (``RssAnon``) and file-backed."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    return {k: int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


def child(backend: str, path: str, cache: str, check: str) -> None:
    """One measurement (in a fresh process); prints its figures as one JSON line."""
    import logging

    import datasets

    from lit_edit.data import EditDataModule

    datasets.disable_progress_bars()
    logging.disable(logging.WARNING)
    dm = EditDataModule(train_path=path, backend=backend, datasets_cache_dir=cache,  # type: ignore[arg-type]
                        batch_size=64)
    before = rss_mb()
    start = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    after = rss_mb()
    start = time.perf_counter()
    n = sum(len(batch) for batch in dm.train_dataloader())
    epoch_s = time.perf_counter() - start
    figures = {"check_s": 0.0, "check_mb": 0.0, "collate_s": 0.0}
    if int(check):
        from types import SimpleNamespace

        import torch

        from lit_edit.methods import MENDEditor

        torch.set_num_threads(1)
        editor = MENDEditor(backbone="tinyfacts", max_length=int(check))
        trainer = SimpleNamespace(datamodule=dm, world_size=1, testing=False, predicting=False)
        editor._trainer = trainer  # type: ignore[assignment]
        held = rss_mb()["RssAnon"]
        start = time.perf_counter()
        editor.setup("fit")
        figures = {"check_s": time.perf_counter() - start,
                   "check_mb": rss_mb()["RssAnon"] - held}
        start = time.perf_counter()
        for batch in dm.train_dataloader():  # the training collation of one epoch
            editor.on_before_batch_transfer(batch, 0)
        figures["collate_s"] = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"records": n, "setup_s": setup_s, "peak_mb": peak, "epoch_s": epoch_s,
                      "held_mb": after["RssAnon"] - before["RssAnon"],
                      "mapped_mb": after["RssFile"] - before["RssFile"], **figures}))


def run(backend: str, path: Path, cache: Path, check: int) -> dict[str, float]:
    """Run :func:`child` in a fresh interpreter and return its figures."""
    out = subprocess.run([sys.executable, __file__, "--child", backend, str(path), str(cache),
                          str(check)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Write the file, run the three cases, print them side by side."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=163_000, help="records in the file")
    parser.add_argument("--dir", default="/tmp/lit_edit_data_scale", help="scratch folder")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="also time the fit-start max_length check of MEND at max_length N")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"zsre_synthetic_{args.records}.json"
    if not path.is_file():
        write_file(path, args.records)
    cache = folder / "hf_cache"
    shutil.rmtree(cache, ignore_errors=True)
    print(f"{path}: {args.records} records, {path.stat().st_size / 2**20:.1f} MB")
    print(f"{'case':<16}{'setup s':>9}{'held MB':>9}{'mapped MB':>11}{'peak MB':>9}"
          f"{'epoch s':>9}{'check s':>9}{'check MB':>10}{'collate s':>11}")
    for name, backend in (("json", "json"), ("datasets cold", "datasets"),
                          ("datasets warm", "datasets")):
        r = run(backend, path, cache, args.check)
        assert r["records"] == args.records, r
        print(f"{name:<16}{r['setup_s']:>9.2f}{r['held_mb']:>9.0f}{r['mapped_mb']:>11.0f}"
              f"{r['peak_mb']:>9.0f}{r['epoch_s']:>9.2f}{r['check_s']:>9.2f}"
              f"{r['check_mb']:>10.0f}{r['collate_s']:>11.2f}")


if __name__ == "__main__":
    main()
