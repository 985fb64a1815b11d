"""Resumable evaluation: a killed ``evaluate.py`` run is continued by a second run given the same
results folder, and the folder's files are byte-for-byte those of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lit_edit.cli import evaluate_main
from lit_edit.evaluation_resume import ResultsFolderError

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CONFIG = ROOT / "configs/ft/tinyfacts.yaml"
N_TEST = 10
CHUNK = 3  # groups of 3 records: 4 groups, the last one incomplete
PAUSE_AT = 7  # batches of 1 record: groups 0 and 1 (records 0-5) are done when the run stops


def args(results: Path, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIG),
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.n_test", str(N_TEST),
        "--data.init_args.eval_batch_size", "1",
        "--model.init_args.steps", "5",
        "--evaluation.protocol.init_args.chunk_size", str(CHUNK),
        "--evaluation.fluency_max_length", "12",
        "--evaluation.results_dir", str(results),
        *extra,
    ]


def kill_when_paused(tmp_path: Path, results: Path) -> None:
    """Run evaluate.py in a child process, and kill -9 it when it pauses at batch PAUSE_AT."""
    marker = tmp_path / "paused"
    overlay = tmp_path / "pause.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "resume_helpers.PauseAtTestBatch",
        "init_args": {"batch": PAUSE_AT, "marker": str(marker)},
    }]}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "evaluate.py"), *args(results, "--config", str(overlay))],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists():
        if child.poll() is not None:
            pytest.fail(f"the evaluation ended before its pause:\n{child.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the evaluation did not reach its pause in time")
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)


def test_killed_evaluation_continues_to_the_uninterrupted_files(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    evaluate_main(args(whole))
    assert not (whole / "resume.pt").exists()  # a finished run leaves nothing to continue

    killed = tmp_path / "killed"
    kill_when_paused(tmp_path, killed)
    assert (killed / "resume.pt").is_file() and not (killed / "summary.json").exists()
    done = (killed / "records.jsonl").read_text().splitlines()
    assert len(done) == 6  # the two complete groups before batch 7
    assert done == (whole / "records.jsonl").read_text().splitlines()[:6]
    # as if killed while appending the next group (before its state was saved)
    with open(killed / "records.jsonl", "a") as f:
        f.write('{"group": 2, "position": 0, "ind')

    # another run may not continue it
    with pytest.raises(ResultsFolderError, match="hyper_parameters differ"):
        evaluate_main(args(killed, "--model.init_args.steps", "6"))
    with pytest.raises(ResultsFolderError, match="data differ"):
        evaluate_main(args(killed, "--data.init_args.n_test", "11"))

    cli = evaluate_main(args(killed))
    run = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EvaluationLoop").run
    assert run.n_edited == N_TEST and len(run.results) == 4  # only records 6-9 were edited
    for name in ("records.jsonl", "summary.json", "table.md"):
        # summary.json names its folder (settings.results_dir): the one difference
        resumed_bytes = (killed / name).read_bytes().replace(bytes(killed), bytes(whole))
        assert resumed_bytes == (whole / name).read_bytes(), name
    assert not (killed / "resume.pt").exists()
    assert json.loads((killed / "summary.json").read_text())["n_records"] == N_TEST


def test_a_damaged_state_is_refused_in_one_line(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "resume.pt").write_bytes(b"not a torch file")
    with pytest.raises(ResultsFolderError, match="resume.pt: unreadable"):
        evaluate_main(args(results))
