"""Distributed evaluation: sharded records, gathered rows, the single-process summary.

The end-to-end tests run ``evaluate.py`` with ``--trainer.devices 2 --trainer.strategy ddp`` on
CPU (gloo) in a subprocess (Lightning's DDP re-launches the command, which cannot happen inside
pytest) and compare with one process running the same command in-process.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from torch.utils.data import DistributedSampler, SequentialSampler

from lit_edit.cli import evaluate_main
from lit_edit.cli_errors import one_line_errors
from lit_edit.evaluation import Evaluation
from lit_edit.evaluation_loop import shard_start
from lit_edit.evaluation_run import EvaluationRun
from lit_edit.protocols import BatchEdit, SequentialEdit, SingleEdit
from lit_edit.sharding import ShardingError, ShardSampler, shard_bounds

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ft" / "tinyfacts.yaml"
N_TEST = 21  # odd: a padding sampler would score one record twice
needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available (2-process CPU runs)",
)
SEQUENTIAL = (
    "--evaluation.protocol", "lit_edit.protocols.SequentialEdit",
    "--evaluation.protocol.group_size", "4",
    "--evaluation.protocol.evaluate", "after_each",
)
TWO_PROCESSES = (
    "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
)


# --------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("unit", [1, 2, 3, 5])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_disjoint_contiguous_and_cover_every_record_once(world_size, unit):
    for n in range(0, 24):
        n_units = -(-n // unit)
        if world_size > 1 and n_units < world_size:
            continue
        shards = [
            list(ShardSampler(n, unit, num_replicas=world_size, rank=r)) for r in range(world_size)
        ]
        assert [i for shard in shards for i in shard] == list(range(n))  # each once, in order
        for r, shard in enumerate(shards):
            sampler = ShardSampler(n, unit, num_replicas=world_size, rank=r)
            assert len(sampler) == len(shard) and sampler.total_size == n
            start, stop = shard_bounds(n, world_size, r, unit)
            assert shard == list(range(start, stop))
            if world_size > 1:
                assert start % unit == 0 and shard  # whole units, none empty
        if world_size > 1:  # balanced: shards differ by at most one unit
            sizes = [-(-len(s) // unit) for s in shards]
            assert max(sizes) - min(sizes) <= 1


def test_uneven_records_are_not_padded():
    assert [list(ShardSampler(21, 1, 2, r)) for r in range(2)] == [
        list(range(0, 10)), list(range(10, 21))
    ]
    # batches of 10: whole batches per process (0-9 | 10-19, 20), never a split batch
    assert [shard_bounds(21, 2, r, 10) for r in range(2)] == [(0, 10), (10, 21)]
    assert [shard_bounds(7, 3, r, 1) for r in range(3)] == [(0, 2), (2, 4), (4, 7)]
    assert [shard_bounds(21, 4, r, 4) for r in range(4)] == [(0, 4), (4, 8), (8, 16), (16, 21)]


def test_the_sampler_is_not_rewrapped_by_lightning_and_reads_the_process_group():
    sampler = ShardSampler(5)
    assert isinstance(sampler, DistributedSampler)  # Lightning leaves DistributedSamplers alone
    assert (sampler.num_replicas, sampler.rank) == (1, 0) and list(sampler) == [0, 1, 2, 3, 4]
    assert list(ShardSampler(0)) == []


def test_fewer_groups_than_processes_are_refused_in_one_line():
    with pytest.raises(ShardingError, match=r"3 test record\(s\) in 1 group\(s\) of 4 .* "
                       r"cannot be shared by 2 processes.*--trainer.devices 1,"):
        shard_bounds(3, 2, 0, 4)
    with pytest.raises(ShardingError, match=r"--trainer.devices 2 or fewer"):
        shard_bounds(2, 3, 1)
    with pytest.raises(SystemExit, match=r"^error: 1 test record\(s\) cannot be shared"):
        with one_line_errors():
            shard_bounds(1, 2, 0)


def test_only_rank_zero_prints_the_line(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # what Lightning's launcher sets for rank 1
    with pytest.raises(SystemExit) as exited:
        with one_line_errors(rank_exit_delay=0.0):
            shard_bounds(1, 2, 1)
    assert exited.value.code == 1  # quiet: rank 0 prints the same error


# --------------------------------------------------------------------------- the checks
def test_protocols_keep_their_groups_on_one_process():
    assert SingleEdit().shard_unit == 1
    assert SingleEdit(chunk_size=8, parallel=4).shard_unit == 4
    assert SingleEdit(chunk_size=8, parallel=3).shard_unit == 8
    assert BatchEdit(5).shard_unit == 5
    assert SequentialEdit(4, "after_group").shard_unit == 4


def test_the_loop_refuses_a_padding_or_regrouping_sampler():
    loader = SimpleNamespace
    batch = BatchEdit(4)
    assert shard_start(loader(sampler=SequentialSampler(range(5))), batch, 1) == 0
    padding = DistributedSampler(range(21), num_replicas=2, rank=0, shuffle=False)
    with pytest.raises(ShardingError, match="not sharded by lit_edit.sharding.ShardSampler"):
        shard_start([loader(sampler=padding)], batch, 2)
    with pytest.raises(ShardingError, match="runs of 1 but the batch protocol keeps 4"):
        shard_start([loader(sampler=ShardSampler(21, 1, 2, 1))], batch, 2)
    with pytest.raises(ShardingError, match="exactly one test dataloader"):
        shard_start([loader(sampler=ShardSampler(21, 4, 2, 1))] * 2, batch, 2)
    assert shard_start([loader(sampler=ShardSampler(21, 4, 2, 1))], batch, 2) == 12


def test_a_shard_forms_and_numbers_the_groups_one_process_would():
    def groups(protocol, start, batches):
        run = EvaluationRun(Evaluation(protocol=protocol), start=start)
        seen = []

        def fake_group(editor, records):
            seen.append((run._position // protocol.group_size, list(records)))
            run._position += len(records)
            return {}

        run._run_group = fake_group
        for b in batches:
            run.add(None, b)
        run.flush(None)
        return seen

    # records 11..20 of a single-edit run with chunks of 8: chunks 8-15 and 16-23 as in one run
    assert groups(SingleEdit(chunk_size=8), 11, [list(range(11, 14)), list(range(14, 21))]) == [
        (1, list(range(11, 16))), (2, list(range(16, 21)))
    ]
    assert groups(SequentialEdit(4, "after_each"), 12, [list(range(12, 21))]) == [
        (3, [12, 13, 14, 15]), (4, [16, 17, 18, 19]), (5, [20])
    ]


# --------------------------------------------------------------------------- end to end
def _args(results: Path, *extra: str, logged: bool = False) -> list[str]:
    """The command's arguments; ``logged``: the config's TensorBoard logger under ``results``
    gives the results folder (``<log_dir>/results``, resolved on every process)."""
    where = (
        ["--trainer.logger.init_args.save_dir", str(results)] if logged
        else ["--trainer.logger", "false", "--evaluation.results_dir", str(results)]
    )
    return [
        "--config", str(CONFIG),
        "--threads", "1",
        "--trainer.enable_progress_bar", "false",
        "--evaluation.fluency", "false",
        "--data.init_args.n_test", str(N_TEST),
        "--model.init_args.steps", "10",
        *where,
        *extra,
    ]


def _start_two_processes(
    tmp_path: Path, results: Path, *extra: str, logged: bool = False
) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("LIT_EDIT_TRACEBACK", None)
    return subprocess.Popen(
        [
            sys.executable, str(ROOT / "evaluate.py"), *_args(results, *extra, logged=logged),
            *TWO_PROCESSES,
        ],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        pytest.fail(f"the 2-process evaluation hung:\n{out[-3000:]}")
    return process.returncode, out


def _assert_same(single, sharded, path="summary"):
    """Equal, floats to 1e-12 (the metrics sum per process, then across: another float order)."""
    if isinstance(single, dict):
        assert set(single) == set(sharded), path
        for key in single:
            _assert_same(single[key], sharded[key], f"{path}.{key}")
    elif isinstance(single, float) and isinstance(sharded, float):
        assert math.isclose(single, sharded, rel_tol=0, abs_tol=1e-12), (path, single, sharded)
    else:
        assert single == sharded, (path, single, sharded)


def _compare(tmp_path: Path, *extra: str, logged: bool = False) -> dict:
    """Run on 2 processes and in this one; check the files agree; the 2-process summary."""
    sharded_dir, single_dir = tmp_path / "two", tmp_path / "one"
    # the 2-process run goes on while the reference runs
    process = _start_two_processes(tmp_path, sharded_dir, *extra, logged=logged)
    evaluate_main(_args(single_dir, *extra))
    code, out = _finish(process)
    assert code == 0, out[-3000:]
    if logged:
        sharded_dir = sharded_dir / "ft-tinyfacts" / "version_0" / "results"
        assert f"Results written to {sharded_dir.resolve()}" in out
    single_rows = (single_dir / "records.jsonl").read_text().splitlines()
    sharded_rows = (sharded_dir / "records.jsonl").read_text().splitlines()
    indices = [json.loads(line)["index"] for line in sharded_rows]
    assert len(indices) == N_TEST == len(set(indices))  # every record exactly once
    assert sharded_rows == single_rows  # same rows, same order, same values
    single = json.loads((single_dir / "summary.json").read_text())
    sharded = json.loads((sharded_dir / "summary.json").read_text())
    assert (single["environment"].pop("processes"), sharded["environment"].pop("processes")) == (
        1, 2
    )
    for summary in (single, sharded):
        summary["settings"].pop("results_dir")
    assert sharded["n_records"] == N_TEST
    assert all(c["records"] + c["empty"] == N_TEST for c in sharded["counts"].values())
    _assert_same(single, sharded)
    return sharded


@needs_gloo
def test_two_processes_give_the_single_process_records_and_summary(tmp_path):
    # with the config's logger: the results folder is <log_dir>/results, which every process
    # must ask for (trainer.log_dir is a collective)
    sharded = _compare(tmp_path, logged=True)
    assert sharded["protocol"]["protocol"] == "single"


@needs_gloo
@pytest.mark.slow
def test_sequential_editing_is_sharded_by_whole_groups(tmp_path):
    sharded = _compare(tmp_path, *SEQUENTIAL)
    assert sharded["protocol"] == {
        "protocol": "sequential", "group_size": 4, "evaluate": "after_each"
    }


@needs_gloo
@pytest.mark.slow
def test_fewer_groups_than_devices_are_refused_clearly(tmp_path):
    process = _start_two_processes(
        tmp_path, tmp_path / "two", *SEQUENTIAL[:3], str(N_TEST + 3), *SEQUENTIAL[4:]
    )
    code, out = _finish(process)
    assert code == 1
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {N_TEST} test record(s) in 1 group(s) of {N_TEST + 3} (the editing protocol's "
        "groups, each evaluated whole by one process) cannot be shared by 2 processes: every "
        "process needs at least one; use --trainer.devices 1, or more test records "
        "(LIT_EDIT_TRACEBACK=1 for the traceback)"
    ]
    assert "Traceback" not in out and not (tmp_path / "two").exists()



def test_several_processes_refuse_a_folder_with_an_unfinished_run(tmp_path):
    from lit_edit.evaluation_loop import EvaluationLoop
    from lit_edit.evaluation_resume import ResultsFolderError

    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "resume.pt").write_bytes(b"")  # a killed one-process run's state
    editor = SimpleNamespace(evaluation=Evaluation(results_dir=str(folder)))
    with pytest.raises(ResultsFolderError) as raised:
        EvaluationLoop().on_test_start(SimpleNamespace(world_size=2), editor)
    assert str(raised.value) == (
        f"{folder} holds an unfinished run (resume.pt) and a run on 2 processes does not "
        "continue one: continue it with --trainer.devices 1, or give another "
        "--evaluation.results_dir"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["resume.pt"]  # nothing overwritten
