"""Dataset batches: byte-identical outputs for any workers/shards/scheduler, kill and resume,
bad inputs, the manifest, NIfTI I/O and options.

Small AbdomenAtlas 1.x phantom datasets (``tests/_datasets.py``, 80 x 64 x 56 voxels) keep
each batch well under a second per sample.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _datasets import write_dataset
from typer.testing import CliRunner

import synthgen
import synthgen.cli as cli
import synthgen.io as sio
from synthgen.batch import (
    BatchOptions,
    is_done,
    parse_shard,
    prepare,
    read_manifest,
    run_batch,
    sample_seed,
)
from synthgen.cli import app
from synthgen.io import gzip_chunks, load_nifti, save_nifti
from synthgen.layouts import discover
from synthgen.presets import LESION_NAMES

runner = CliRunner()
TWO_ORGANS = "liver,kidney"
RECORD_KEYS = {"sample", "case", "seed", "status", "inputs", "time", "elapsed_s"}


# --------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps tables at 80 columns when not on a terminal: keep sample ids on one line."""
    monkeypatch.setattr(cli.console, "_width", 250)


def batch(*args: object):
    return runner.invoke(app, ["batch", *(str(a) for a in args)])


def outputs(out: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every output file (the manifests and batch.json excepted)."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        top = len(rel.parts) == 1
        if not p.is_file() or (top and (p.match("manifest*.jsonl") or p.name == "batch.json")):
            continue
        files[rel.as_posix()] = p.read_bytes()
    return files


def assert_same_outputs(got: Path, want: Path) -> None:
    a, b = outputs(got), outputs(want)
    assert sorted(a) == sorted(b), "the sets of output files differ"
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"bytes differ: {differ}"


def assert_clean(out: Path) -> None:
    """Nothing half-written: no file under .partial, no temporary file anywhere."""
    left = [p for p in (out / ".partial").rglob("*") if p.is_file()]
    assert not left, f"partial files left: {left}"
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def manifest_lines(out: Path) -> list[dict]:
    """Every parseable record of every manifest (a torn line is skipped)."""
    recs = []
    for path in sorted(out.glob("manifest*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
    return recs


def sample_ids(n_cases: int, per_case: int) -> list[str]:
    return [f"BDMAP_{k:08d}_s{i:03d}" for k in range(n_cases) for i in range(per_case)]


@pytest.fixture(scope="module")
def ds4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ds4"), "atlas1", 4)


@pytest.fixture(scope="module")
def ds6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ds6"), "atlas1", 6)


@pytest.fixture(scope="module")
def ref4(ds4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reference: liver + kidney, 2 samples per case, one worker."""
    out = tmp_path_factory.mktemp("ref4") / "out"
    res = batch(ds4, "--out", out, "--organ", TWO_ORGANS, "--per-case", 2, "--workers", 1)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def liver_ref(ds6: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reference: liver only, 6 cases x 2 samples, uninterrupted."""
    out = tmp_path_factory.mktemp("liver_ref") / "out"
    res = batch(ds6, "--out", out, "--organ", "liver", "--per-case", 2)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def dask_cluster():
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    try:
        yield cluster
    finally:
        cluster.close()


# --------------------------------------------------------------------------------------
# 1. the same bytes for any workers, shards or scheduler
# --------------------------------------------------------------------------------------


def test_reference_batch_is_complete(ref4: Path) -> None:
    files = outputs(ref4)
    for sid in sample_ids(4, 2):
        want = {"ct.nii.gz", "label.nii.gz", "tumors.json"}
        for organ in ("liver", "kidney"):
            want |= {f"segmentations/{organ}.nii.gz", f"segmentations/{LESION_NAMES[organ]}.nii.gz"}
        assert {f"{sid}/{w}" for w in want} <= set(files), sid
    assert len(files) == 8 * 7
    # samples differ from each other (each has its own seed)
    cts = {files[f"{sid}/ct.nii.gz"] for sid in sample_ids(4, 2)}
    assert len(cts) == 8
    recs = read_manifest(ref4)
    assert sorted(recs) == sample_ids(4, 2)
    assert all(is_done(r, ref4) for r in recs.values())
    assert_clean(ref4)
    assert not (ref4 / ".partial").exists()


def _input_masks(ds: Path, case: str) -> dict[str, np.ndarray]:
    seg = ds / case / "segmentations"
    kidney = load_nifti(seg / "kidney_left.nii.gz")[0] | load_nifti(seg / "kidney_right.nii.gz")[0]
    return {"liver": load_nifti(seg / "liver.nii.gz")[0] > 0, "kidney": kidney > 0}


def test_reference_labels_match_the_masks(ds4: Path, ref4: Path) -> None:
    for sid in sample_ids(4, 2)[::3]:
        d = ref4 / sid
        masks = _input_masks(ds4, sid.rsplit("_s", 1)[0])
        label = load_nifti(d / "label.nii.gz")[0]
        assert label.dtype == np.uint8
        seg = {n: load_nifti(d / "segmentations" / f"{n}.nii.gz")[0] > 0 for n in masks}
        tumor = {
            n: load_nifti(d / "segmentations" / f"{LESION_NAMES[n]}.nii.gz")[0] > 0 for n in masks
        }
        for n in masks:
            np.testing.assert_array_equal(seg[n], masks[n])
            assert tumor[n].any(), (sid, n)
        any_tumor = tumor["liver"] | tumor["kidney"]
        np.testing.assert_array_equal(label == 2, any_tumor)
        np.testing.assert_array_equal(label == 1, (masks["liver"] | masks["kidney"]) & ~any_tumor)
        assert set(np.unique(label)) == {0, 1, 2}


@pytest.mark.parametrize("mode", ["workers2", "shards", "dask", "dask-local"])
def test_outputs_byte_identical(mode: str, ds4: Path, ref4: Path, tmp_path: Path, request) -> None:
    out = tmp_path / "out"
    base = [ds4, "--out", out, "--organ", TWO_ORGANS, "--per-case", 2]
    if mode == "workers2":
        runs = [["--workers", 2]]
    elif mode == "shards":  # one after the other into the same folder, no --resume needed
        runs = [["--shard", "0/2"], ["--shard", "1/2"]]
    elif mode == "dask-local":  # synthgen starts (and stops) its own LocalCluster
        runs = [["--scheduler", "local", "--workers", 1]]
    else:
        cluster = request.getfixturevalue("dask_cluster")
        runs = [["--scheduler", cluster.scheduler_address]]
    for extra in runs:
        res = batch(*base, *extra)
        assert res.exit_code == 0, res.output
    assert_same_outputs(out, ref4)
    assert_clean(out)
    recs = read_manifest(out)
    assert sorted(recs) == sample_ids(4, 2)
    assert all(is_done(r, out) for r in recs.values())
    if mode == "shards":
        names = sorted(p.name for p in out.glob("manifest*.jsonl"))
        assert names == ["manifest-shard-0-of-2.jsonl", "manifest-shard-1-of-2.jsonl"]
        shard0 = [json.loads(x)["case"] for x in (out / names[0]).read_text().splitlines()]
        assert sorted(set(shard0)) == ["BDMAP_00000000", "BDMAP_00000002"]


def test_dask_workers_in_another_folder_read_and_write_where_the_batch_runs(
    ds4: Path, ref4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dask_cluster
) -> None:
    """Relative input and ``--out`` paths mean the batch's folder, not a Dask worker's (one
    started elsewhere). (Before: every case failed, "file not found"; or, with an absolute
    input, the samples went to the workers' folder while the batch said them written.)"""
    from distributed import Client

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(ds4, tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    with Client(dask_cluster.scheduler_address) as client:
        before = client.run(os.getcwd)
        client.run(os.chdir, str(elsewhere))
        try:
            for src, out in (("ds", "out"), (str(tmp_path / "ds"), "out-abs")):
                res = batch(src, "--out", out, "--organ", TWO_ORGANS, "--per-case", 2,
                            "--scheduler", dask_cluster.scheduler_address)  # fmt: skip
                assert res.exit_code == 0, res.output
                assert_same_outputs(tmp_path / out, ref4)
                assert all(is_done(r, tmp_path / out) for r in read_manifest(out).values())
        finally:
            for addr, cwd in before.items():
                client.run(os.chdir, cwd, workers=[addr])
    assert not list(elsewhere.iterdir())


def test_dask_case_that_kills_its_worker_fails_alone(ds4: Path, tmp_path: Path) -> None:
    """A case whose task kills its Dask worker (out of memory, a crash) until the scheduler
    gives up on it (``KilledWorker``) is that case's failure, recorded; the batch goes on and
    ``--resume`` redoes it. (Before: the batch stopped there with a traceback.)"""
    import dask
    from distributed import Client, LocalCluster

    def crash_on_case_1() -> None:  # (run in the worker: its restart forgets it)
        import synthgen.batch as b

        real = b.load_case

        def load_case(case, opts):
            if case.case_id == "BDMAP_00000001":
                os._exit(1)
            return real(case, opts)

        b.load_case = load_case

    _, cases = discover(ds4, ["liver"])
    opts = BatchOptions(organs=("liver",), per_case=2)
    out = tmp_path / "out"
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
    try:
        with Client(cluster) as client:
            client.run(crash_on_case_1)
        report = run_batch(cases, opts, out, scheduler=cluster.scheduler_address)
    finally:
        cluster.close()
    failed = {r["sample"]: r["error"] for r in report.failed}
    assert {"BDMAP_00000001_s000", "BDMAP_00000001_s001"} <= set(failed), failed
    assert all("Dask worker died" in e for e in failed.values()), failed
    assert report.done + len(failed) == 8
    again = run_batch(cases, opts, out, resume=True)
    assert again.ok and again.done == len(failed)
    assert_clean(out)


def test_unreachable_dask_scheduler_is_a_clean_error(ds4: Path, tmp_path: Path) -> None:
    import dask

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        res = batch(ds4, "--out", tmp_path / "out", "--organ", "liver",
                    "--scheduler", f"tcp://127.0.0.1:{port}")  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1" in res.output


def test_sample_seed_is_stable_and_distinct() -> None:
    s = sample_seed(0, "BDMAP_00000000", 0)
    assert s == sample_seed(0, "BDMAP_00000000", 0)
    assert 0 <= s < 2**63
    others = {
        sample_seed(1, "BDMAP_00000000", 0),
        sample_seed(0, "BDMAP_00000001", 0),
        sample_seed(0, "BDMAP_00000000", 1),
    }
    assert s not in others and len(others) == 3


@pytest.mark.parametrize(
    ("text", "env", "want"),
    [
        ("0/1", {}, (0, 1)),
        ("3/4", {}, (3, 4)),
        ("1/2", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "8"}, (1, 2)),
        (None, {}, (0, 1)),
        (None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (3, 4)),
        (None, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"}, (0, 1)),
        (
            None,
            {
                "SLURM_ARRAY_TASK_ID": "4",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "1",
            },
            (3, 4),
        ),
        (
            None,
            {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_MAX": "5"},
            (3, 4),
        ),
        (None, {"SLURM_ARRAY_TASK_ID": "7"}, (0, 1)),  # not an array job's full set
        (  # --array=0-15:4 runs tasks 0, 4, 8, 12
            None,
            {
                "SLURM_ARRAY_TASK_ID": "8",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": "12",
                "SLURM_ARRAY_TASK_STEP": "4",
            },
            (2, 4),
        ),
    ],
)
def test_parse_shard(text, env, want) -> None:
    assert parse_shard(text, env=env) == want


@pytest.mark.parametrize(
    ("text", "env"),
    [
        ("2/2", {}),
        ("-1/2", {}),
        ("0/0", {}),
        ("1/-1", {}),
        ("a/b", {}),
        ("1", {}),
        ("1/2/3", {}),
        ("1.5/2", {}),
        (None, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"}),
        (
            None,
            {
                "SLURM_ARRAY_TASK_ID": "0",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "1",
            },
        ),
        (None, {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}),
    ],
)
def test_parse_shard_rejects_invalid(text, env) -> None:
    with pytest.raises(ValueError):
        parse_shard(text, env=env)


def test_cli_takes_shard_from_slurm_env(
    ds4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    out = tmp_path / "out"
    res = batch(ds4, "--out", out, "--organ", "liver", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "shard 1/2" in res.output
    assert "BDMAP_00000001_s000" in res.output and "BDMAP_00000003_s000" in res.output
    assert "BDMAP_00000000_s000" not in res.output and "BDMAP_00000002_s000" not in res.output
    assert not out.exists(), "--dry-run wrote something"
    res = batch(ds4, "--out", out, "--organ", "liver")
    assert res.exit_code == 0, res.output
    assert [p.name for p in out.glob("manifest*.jsonl")] == ["manifest-shard-1-of-2.jsonl"]
    assert sorted(read_manifest(out)) == ["BDMAP_00000001_s000", "BDMAP_00000003_s000"]
    # an explicit --shard wins over the environment; a bad one is a usage error
    res = batch(ds4, "--out", out, "--organ", "liver", "--shard", "0/2", "--dry-run")
    assert res.exit_code == 0 and "BDMAP_00000000_s000" in res.output
    assert "BDMAP_00000001_s000" not in res.output
    for bad in ("2/2", "x"):
        res = batch(ds4, "--out", tmp_path / "other", "--organ", "liver", "--shard", bad)
        assert res.exit_code == 2 and "shard" in res.output, res.output


def test_prepare_splits_cases_without_overlap(ds4: Path, tmp_path: Path) -> None:
    _, cases = discover(ds4, ["liver"])
    opts = BatchOptions(organs=("liver",), per_case=2)
    seen: list[str] = []
    for i in range(3):
        todo, total, skipped = prepare(cases, opts, tmp_path / "none", shard=(i, 3))
        seen += [s.sample_id for _, ss in todo for s in ss]
        assert total == sum(len(ss) for _, ss in todo) and skipped == 0
    assert sorted(seen) == sample_ids(4, 2)


def test_nnunet_format_over_two_shards(ds4: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for shard in ("0/2", "1/2"):
        res = batch(
            ds4, "--out", out, "--organ", TWO_ORGANS, "--format", "nnunet", "--shard", shard
        )
        assert res.exit_code == 0, res.output
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 4
    want = {"background": 0, "liver": 1, LESION_NAMES["liver"]: 2}
    want |= {"kidney": 3, LESION_NAMES["kidney"]: 4}
    assert meta["labels"] == want
    ids = [f"BDMAP_{k:08d}_s000" for k in range(4)]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{i}_0000.nii.gz" for i in ids]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in ids]
    assert sorted(p.name for p in (out / "synthgen_tumors").iterdir()) == [f"{i}.json" for i in ids]
    assert all(is_done(r, out) for r in read_manifest(out).values())
    assert_clean(out)
    seen: set[int] = set()
    for sid in ids:
        masks = _input_masks(ds4, sid.rsplit("_s", 1)[0])
        label = load_nifti(out / "labelsTr" / f"{sid}.nii.gz")[0]
        tumor = (label == 2) | (label == 4)
        np.testing.assert_array_equal(label == 1, masks["liver"] & ~tumor)
        np.testing.assert_array_equal(label == 3, masks["kidney"] & ~masks["liver"] & ~tumor)
        assert not (label[~(masks["liver"] | masks["kidney"])] % 2).any()  # no organ label outside
        seen |= set(np.unique(label).tolist())
    assert seen == {0, 1, 2, 3, 4}


# --------------------------------------------------------------------------------------
# 2. kill and resume
# --------------------------------------------------------------------------------------


def _done_count(manifest: Path) -> int:
    try:
        return manifest.read_text(encoding="utf-8").count('"status":"done"')
    except FileNotFoundError:
        return 0


def test_nnunet_sample_that_cannot_be_moved_into_place_leaves_no_file(
    ds4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An nnU-Net sample whose label cannot be moved into ``labelsTr`` (read-only, another
    device) fails whole: its image does not stay in ``imagesTr`` without a label (nnU-Net
    refuses such a dataset), and ``--resume`` writes it once the folder is writable."""
    real = os.replace

    def replace(a, b, *args, **kw):
        if Path(b).parent.name == "labelsTr":
            raise OSError(30, "Read-only file system", str(b))
        return real(a, b, *args, **kw)

    _, cases = discover(ds4, ["liver"])
    opts = BatchOptions(organs=("liver",), per_case=1, format="nnunet")
    out = tmp_path / "out"
    monkeypatch.setattr(os, "replace", replace)
    report = run_batch(cases, opts, out)
    monkeypatch.undo()
    assert report.done == 0 and len(report.failed) == 4
    assert "Read-only file system" in report.failed[0]["error"]
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert left == [], left
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 0
    again = run_batch(cases, opts, out, resume=True)
    assert again.ok and again.done == 4
    assert len(list((out / "imagesTr").iterdir())) == len(list((out / "labelsTr").iterdir())) == 4
    assert_clean(out)


def test_kill_and_resume_gives_the_uninterrupted_bytes(
    ds6: Path, liver_ref: Path, tmp_path: Path
) -> None:
    cmd = [sys.executable, "-m", "synthgen.cli", "batch", str(ds6), "--organ", "liver"]
    cmd += ["--per-case", "2"]
    total = 12
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        proc = subprocess.Popen(
            [*cmd, "--out", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ),
        )
        killed = False
        deadline = time.monotonic() + 180
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if _done_count(out / "manifest.jsonl") >= 1:
                    proc.kill()  # SIGKILL
                    killed = True
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None and not killed:
                proc.kill()
            proc.wait(60)
        done_before = {s for s, r in read_manifest(out).items() if r["status"] == "done"}
        if killed and proc.returncode == -9 and 0 < len(done_before) < total:
            break
    else:
        pytest.fail("the batch finished each time before it could be killed")

    res = batch(ds6, "--out", out, "--organ", "liver", "--per-case", 2, "--resume")
    assert res.exit_code == 0, res.output
    m = re.search(r"resume: (\d+) samples already done", res.output)
    assert m, res.output
    assert int(m.group(1)) == len(done_before) > 0
    # the samples done before the kill were not redone: one done record each
    counts: dict[str, int] = {}
    for rec in manifest_lines(out):
        if rec["status"] == "done":
            counts[rec["sample"]] = counts.get(rec["sample"], 0) + 1
    assert sorted(counts) == sample_ids(6, 2)
    assert all(counts[s] == 1 for s in done_before), counts
    assert_same_outputs(out, liver_ref)
    assert_clean(out)
    recs = read_manifest(out)
    assert sorted(recs) == sample_ids(6, 2) and all(is_done(r, out) for r in recs.values())


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (every thread's children, from /proc)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _run_case_dying_on_case_1(case, samples, opts, out, tag):
    """``run_case`` whose worker process dies on case 1, as one killed for memory."""
    from synthgen.batch import run_case

    if case.case_id == "BDMAP_00000001":
        os._exit(1)
    return run_case(case, samples, opts, out, tag)


def test_case_that_kills_its_pool_worker_fails_alone(
    ds6: Path, liver_ref: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--workers 2``: a case whose worker process dies (out of memory, a crash) is that
    case's failure, recorded; the cases the broken pool held are redone and the batch goes on.
    (Before: the whole batch stopped with BrokenProcessPool.)"""
    import synthgen.batch as sb

    monkeypatch.setattr(sb, "run_case", _run_case_dying_on_case_1)
    _, cases = discover(ds6, ["liver"])
    opts = BatchOptions(organs=("liver",), per_case=2)
    out = tmp_path / "out"
    report = run_batch(cases, opts, out, workers=2)
    assert sorted(r["sample"] for r in report.failed) == sample_ids(6, 2)[2:4]
    assert all("worker process died" in r["error"] for r in report.failed)
    assert report.done == 10
    monkeypatch.undo()
    again = run_batch(cases, opts, out, resume=True)
    assert again.ok and again.done == 2
    assert_same_outputs(out, liver_ref)
    assert_clean(out)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_killed_batch_leaves_no_worker_processes(ds6: Path, tmp_path: Path) -> None:
    """``kill -9`` of a ``--workers 2`` batch: its pool workers end too. (Before: they went on
    writing the cases already queued to them into OUT, beside a resumed run, then waited for
    work for ever.)"""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "synthgen.cli", "batch", str(ds6), "--organ", "liver"]
    cmd += ["--per-case", "3", "--workers", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            kids = [k for k in _children(proc.pid) if "spawn_main" in _cmdline(k)]
            if len(kids) >= 2 and _done_count(out / "manifest.jsonl") >= 1:
                workers = kids
                proc.kill()
                break
            time.sleep(0.01)
        proc.wait(60)
        if not workers:
            pytest.skip("the batch finished before it could be killed")
        deadline = time.monotonic() + 10
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [w for w in workers if _running(w)]
        assert not left, f"pool workers outlived the killed batch: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
        for w in workers:
            if _running(w) and "spawn_main" in _cmdline(w):
                os.kill(w, 9)


@pytest.mark.parametrize("first_done", [False, True])
def test_a_second_batch_on_the_same_shard_is_refused_while_one_runs(
    ds4: Path, tmp_path: Path, first_done: bool
) -> None:
    """Two runs of one shard of OUT at once: the second is refused (it would remove the first's
    partial samples and rewrite its samples: most of both failed, FileNotFoundError), before
    or after the first recorded a sample; the other shard runs beside it; after the first
    ends, ``--resume`` goes on."""
    out = tmp_path / "out"
    _, cases = discover(ds4, ["liver"])
    opts = BatchOptions(organs=("liver",), per_case=2)
    go_on, waiting = threading.Event(), threading.Event()

    def hold(*_):  # the first run waits at its start, or after its first record
        waiting.set()
        assert go_on.wait(60)

    kw = {"on_record": hold} if first_done else {"on_start": hold}
    first: dict = {}

    def run_first() -> None:
        try:
            first["report"] = run_batch(cases, opts, out, shard=(0, 2), **kw)
        except BaseException as e:  # reported below
            first["error"] = e

    th = threading.Thread(target=run_first)
    th.start()
    try:
        assert waiting.wait(120)
        for resume in (False, True):
            with pytest.raises(ValueError, match="another synthgen batch"):
                run_batch(cases, opts, out, shard=(0, 2), resume=resume)
        # another shard count (it would write the same samples): refused, whatever the shard
        for shard in ((0, 1), (1, 3)):
            with pytest.raises(ValueError, match=r"batch in 2 shards now .* --shard I/2"):
                run_batch(cases, opts, out, shard=shard, resume=True)
        # another shard with other options: refused, also before the first recorded a sample
        # (each wrote its own batch.json, and a --resume took the mix as one batch)
        with pytest.raises(ValueError, match="other options"):
            run_batch(cases, BatchOptions(organs=("liver",), per_case=2, seed=6), out, shard=(1, 2))
        other = run_batch(cases, opts, out, shard=(1, 2))  # another shard: not refused
        assert other.ok and other.done == 4
    finally:
        go_on.set()
        th.join(120)
    assert "error" not in first, first.get("error")
    assert first["report"].ok and first["report"].done == 4
    again = run_batch(cases, opts, out, shard=(0, 2), resume=True)  # the lock is gone with the run
    assert again.ok and again.skipped == 4
    again = run_batch(cases, opts, out, resume=True)  # and so is the shard count's
    assert again.ok and again.skipped == 8
    assert_clean(out)


def test_partial_folders_of_killed_runs_are_removed_unless_their_run_is_on(
    ds4: Path, tmp_path: Path
) -> None:
    """A run removes what killed runs of other shards left in .partial (a full-size
    temporary CT stayed there when the batch was finished another way), but not the folder
    of a shard that runs now (it holds its manifest's lock)."""
    import fcntl

    out = tmp_path / "out"
    _, cases = discover(ds4, ["liver"])
    opts = BatchOptions(organs=("liver",))
    assert run_batch(cases, opts, out, shard=(1, 2)).ok
    stale = out / ".partial" / "shard-1-of-3" / "BDMAP_00000001_s000"
    live = out / ".partial" / "shard-1-of-2" / "BDMAP_00000003_s000"
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / ".ct.nii.gz.123.tmp").write_bytes(b"x" * 100)
    with open(out / "manifest-shard-1-of-2.jsonl", "a", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # (shard 1/2 runs now)
        assert run_batch(cases, opts, out, shard=(0, 2)).ok
        assert not stale.parent.exists()
        assert (live / ".ct.nii.gz.123.tmp").exists()
    assert run_batch(cases, opts, out, shard=(0, 2), resume=True).ok
    assert not (out / ".partial").exists()


def test_an_out_holding_other_files_is_refused(ds4: Path, tmp_path: Path) -> None:
    """An OUT with files but no batch there (no batch.json, no manifest): refused before
    anything is written. A batch replaces its samples' folders (a folder of a sample's name
    with the user's files in it was deleted) and nnU-Net's dataset.json (an existing
    dataset's was overwritten). Dot files and an empty OUT are no obstacle."""
    _, cases = discover(ds4, ["liver"])
    opts = BatchOptions(organs=("liver",))
    out = tmp_path / "out"
    mine = out / "BDMAP_00000001_s000" / "mine.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("keep me")
    for o in (opts, BatchOptions(organs=("liver",), format="nnunet")):
        with pytest.raises(ValueError, match="holds files that are not a synthgen batch"):
            run_batch(cases, o, out)
    assert mine.read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == [
        "BDMAP_00000001_s000"
    ]
    res = batch(ds4, "--out", out, "--organ", "liver")
    assert res.exit_code == 2 and "not a synthgen batch" in " ".join(res.output.split())
    empty = tmp_path / "empty"
    (empty / ".cache").mkdir(parents=True)
    # files under other names (a scheduler's log written before the job, lost+found)
    (empty / "slurm-123.out").write_text("log")
    (empty / "lost+found").mkdir()
    assert run_batch(cases, opts, empty).done == 4
    assert (empty / "slurm-123.out").read_text() == "log"
    nn = tmp_path / "nn"
    (nn / "imagesTr").mkdir(parents=True)  # an nnU-Net dataset's
    with pytest.raises(ValueError, match=r"not a synthgen batch \(imagesTr\)"):
        run_batch(cases, BatchOptions(organs=("liver",), format="nnunet"), nn)


def test_an_out_with_only_an_empty_manifest_is_a_batch(ds4: Path, tmp_path: Path) -> None:
    """A batch's OUT has a manifest from its start on: one killed before its first record
    (an empty manifest of another shard, a sample's folder) is not taken for other files."""
    _, cases = discover(ds4, ["liver"])
    out = tmp_path / "out"
    (out / "BDMAP_00000001_s000").mkdir(parents=True)
    (out / "manifest-shard-1-of-2.jsonl").touch()
    assert run_batch(cases, BatchOptions(organs=("liver",)), out).done == 4


def test_resume_redoes_deleted_samples_and_refuses_misuse(
    ds6: Path, liver_ref: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(liver_ref, out)
    victim = "BDMAP_00000002_s001"
    shutil.rmtree(out / victim)
    base = [ds6, "--out", out, "--organ", "liver", "--per-case", 2]
    manifest = (out / "manifest.jsonl").read_bytes()

    res = batch(*base)  # no --resume: refused
    assert res.exit_code == 2, res.output
    assert "--resume" in res.output
    res = batch(*base, "--resume", "--seed", 1)  # other options: refused
    assert res.exit_code == 2, res.output
    assert "other options" in res.output
    assert "seed: 0 there, 1 now" in re.sub(r"\s+", " ", res.output)
    res = batch(*base, "--seed", 1)
    assert res.exit_code == 2, res.output
    assert (out / "manifest.jsonl").read_bytes() == manifest and not (out / victim).exists()

    res = batch(*base, "--resume", "--dry-run")
    assert res.exit_code == 0 and "dry run: 1 samples to write" in res.output, res.output
    assert not (out / victim).exists()

    res = batch(*base, "--resume")
    assert res.exit_code == 0, res.output
    assert "resume: 11 samples already done, 1 to do" in res.output
    new = (out / "manifest.jsonl").read_bytes()[len(manifest) :].decode().splitlines()
    assert [json.loads(x)["sample"] for x in new] == [victim]
    assert_same_outputs(out, liver_ref)
    assert_clean(out)


# --------------------------------------------------------------------------------------
# 3. bad inputs: recorded as failed with a one-line reason, the batch goes on
# --------------------------------------------------------------------------------------

BAD_CASES = {
    "BDMAP_random": ("BDMAP_random/ct.nii.gz", "cannot read"),
    "BDMAP_truncated": ("BDMAP_truncated/ct.nii.gz", "truncated"),
    "BDMAP_farmask": ("BDMAP_farmask/segmentations/liver.nii.gz", "does not overlap"),
    "BDMAP_empty": ("BDMAP_empty/segmentations/liver.nii.gz", "empty"),
    "BDMAP_tiny": ("too small",),
    "BDMAP_nan": ("BDMAP_nan/ct.nii.gz", "NaN"),
}


def _nib_save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


@pytest.fixture(scope="module")
def bad_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_dataset(tmp_path_factory.mktemp("bad"), "atlas1", 7)
    names = ["BDMAP_good", *BAD_CASES]
    for k, name in enumerate(names):
        (root / f"BDMAP_{k:08d}").rename(root / name)
    rng = np.random.default_rng(0)
    (root / "BDMAP_random" / "ct.nii.gz").write_bytes(b"junk" + rng.bytes(20000))
    ct = root / "BDMAP_truncated" / "ct.nii.gz"
    raw = ct.read_bytes()
    ct.write_bytes(raw[: len(raw) // 2])

    liver = nib.load(root / "BDMAP_farmask" / "segmentations" / "liver.nii.gz")
    mask = np.asarray(liver.dataobj)
    far = liver.affine.copy()
    far[:3, 3] += 10_000.0  # 10 m away: lands outside the CT
    _nib_save(root / "BDMAP_farmask" / "segmentations" / "liver.nii.gz", mask, far)
    _nib_save(
        root / "BDMAP_empty" / "segmentations" / "liver.nii.gz", np.zeros_like(mask), liver.affine
    )
    tiny = np.zeros_like(mask)
    i, j, k = np.argwhere(mask)[np.count_nonzero(mask) // 2]
    tiny[i, j, k] = tiny[i + 1, j, k] = 1
    _nib_save(root / "BDMAP_tiny" / "segmentations" / "liver.nii.gz", tiny, liver.affine)
    img = nib.load(root / "BDMAP_nan" / "ct.nii.gz")
    data = np.asarray(img.dataobj).astype(np.float32)
    data[10, 10, 10] = np.nan
    _nib_save(root / "BDMAP_nan" / "ct.nii.gz", data, img.affine)
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_inputs_fail_alone(bad_ds: Path, tmp_path: Path, workers: int) -> None:
    out = tmp_path / "out"
    res = batch(bad_ds, "--out", out, "--organ", "liver", "--workers", workers)
    assert res.exit_code == 1, res.output
    recs = read_manifest(out)
    assert sorted(recs) == sorted(f"{c}_s000" for c in ["BDMAP_good", *BAD_CASES])
    good = recs["BDMAP_good_s000"]
    assert good["status"] == "done" and is_done(good, out)
    table = res.output.split("failed samples", 1)[1]  # the summary's table of failures
    for case, needles in BAD_CASES.items():
        rec = recs[f"{case}_s000"]
        assert rec["status"] == "failed", rec
        err = rec["error"]
        assert "\n" not in err and "\r" not in err, err
        for needle in needles:
            assert needle in err, (case, err)
        assert "outputs" not in rec
        assert f"{case}_s000" in table
        assert not (out / f"{case}_s000").exists()
    assert re.search(r"failed\s*│\s*6\b", res.output), res.output
    assert re.search(r"written now\s*│\s*1\b", res.output), res.output
    assert_clean(out)


# --------------------------------------------------------------------------------------
# 4. the manifest
# --------------------------------------------------------------------------------------


def _check_records(out: Path, organs: list[str]) -> list[dict]:
    text = (out / "manifest.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n")
    recs = [json.loads(line) for line in text.splitlines()]  # every line is valid JSON
    for rec in recs:
        assert RECORD_KEYS <= set(rec), rec.keys()
        assert rec["status"] == "done"
        case, index = rec["sample"].rsplit("_s", 1)
        assert rec["case"] == case and rec["seed"] == sample_seed(0, case, int(index))
        assert rec["inputs"]["case_id"] == case and Path(rec["inputs"]["ct"]).is_file()
        assert isinstance(rec["elapsed_s"], float | int) and rec["elapsed_s"] >= 0
        assert rec["outputs"]
        for f in rec["outputs"]:
            assert not Path(f).is_absolute() and (out / f).is_file(), f
        assert [o["organ"] for o in rec["organs"]] == organs
        for o in rec["organs"]:
            assert o["plan"]["tumors"] and o["tumors"]
            assert len(o["tumors"]) == len(o["plan"]["tumors"])
    return recs


def test_manifest_records_two_organs(ref4: Path) -> None:
    recs = _check_records(ref4, ["liver", "kidney"])
    assert sorted(r["sample"] for r in recs) == sample_ids(4, 2)
    info = json.loads((ref4 / recs[0]["sample"] / "tumors.json").read_text())
    assert info["organs"] == recs[0]["organs"]


def test_manifest_plan_reproduces_the_output(liver_ref: Path) -> None:
    recs = _check_records(liver_ref, ["liver"])
    assert len(recs) == 12
    for rec in recs[::3]:
        organ = rec["organs"][0]
        plan = synthgen.Plan.from_dict(organ["plan"])
        ct, affine, _ = load_nifti(rec["inputs"]["ct"])
        liver = load_nifti(rec["inputs"]["organs"]["liver"][0]["path"])[0] > 0.5
        res = synthgen.render(plan, ct, liver, affine=affine)
        sid = rec["sample"]
        out_ct = load_nifti(liver_ref / sid / "ct.nii.gz")[0]
        out_tm = load_nifti(liver_ref / sid / "segmentations" / "liver_lesion.nii.gz")[0] > 0
        np.testing.assert_array_equal(res.tumor_mask, out_tm)
        assert res.tumor_mask.any()
        np.testing.assert_array_equal(res.image[out_tm], out_ct[out_tm])
        np.testing.assert_array_equal(res.image, out_ct)
        assert (out_ct[out_tm] != ct[out_tm]).any(), "the tumors changed nothing"
        rerendered = json.loads(json.dumps([t.to_dict() for t in res.tumors]))
        assert rerendered == organ["tumors"]


# --------------------------------------------------------------------------------------
# 5. NIfTI I/O
# --------------------------------------------------------------------------------------


def test_gzip_chunks_decompress_to_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    big = rng.integers(0, 40, size=(9 << 20) + 123, dtype=np.uint8)
    mid = rng.integers(-300, 300, size=(2 << 20) + 7, dtype=np.int16)  # 4 MiB + 14 bytes
    small = b"NIfTI header" * 30
    parts = [memoryview(small), memoryview(big), memoryview(b""), memoryview(mid), b"tail"]
    want = small + big.tobytes() + mid.tobytes() + b"tail"
    results = {}
    for threads in ("1", "4"):
        monkeypatch.setenv("SYNTHGEN_IO_THREADS", threads)
        for level in (0, 1):
            data = b"".join(gzip_chunks(parts, level))
            assert gzip.decompress(data) == want
            results[threads, level] = data
    assert results["1", 1] == results["4", 1] and results["1", 0] == results["4", 0]
    for level in (1, 6, 9):
        assert gzip.decompress(b"".join(gzip_chunks([memoryview(small)], level))) == small
    assert gzip.decompress(b"".join(gzip_chunks([]))) == b""
    assert gzip.decompress(b"".join(gzip_chunks([memoryview(b"")]))) == b""


def test_save_nifti_bytes_do_not_depend_on_io_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(2)
    data = np.asfortranarray(rng.integers(-1000, 1000, size=(192, 160, 80), dtype=np.int16))
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    threads_used: list[str] = []
    real = sio._deflate

    def spy(*args):
        threads_used.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(sio, "_deflate", spy)
    blobs = {}
    for n in ("1", "4", "3"):
        monkeypatch.setenv("SYNTHGEN_IO_THREADS", n)
        threads_used.clear()
        save_nifti(tmp_path / f"t{n}.nii.gz", data, affine)
        blobs[n] = (tmp_path / f"t{n}.nii.gz").read_bytes()
        ex = sio._executor()
        if n == "1":
            assert ex is None
            assert not any(t.startswith("synthgen-gzip") for t in threads_used)
        else:
            assert ex is not None and ex._max_workers == int(n)  # rebuilt for the new count
            assert any(t.startswith("synthgen-gzip") for t in threads_used)
        assert len(threads_used) >= 3  # several 4 MiB chunks
    assert blobs["1"] == blobs["4"] == blobs["3"]
    np.testing.assert_array_equal(load_nifti(tmp_path / "t4.nii.gz")[0], data)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_round_trip_keeps_order_affine_and_codes(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(3)
    data = np.asfortranarray(rng.integers(-1024, 3000, size=(13, 11, 7), dtype=np.int16))
    affine = np.array(
        [[0, -0.75, 0, 30.0], [0.75, 0, 0, -12.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]], dtype=float
    )
    ref = nib.Nifti1Image(data, affine)
    ref.set_sform(affine, 4)
    ref.set_qform(affine, 2)
    f_path, c_path = tmp_path / f"f{suffix}", tmp_path / f"c{suffix}"
    save_nifti(f_path, data, affine, header=ref.header)
    save_nifti(c_path, np.ascontiguousarray(data), affine, header=ref.header)
    assert f_path.read_bytes() == c_path.read_bytes()
    arr, aff, hdr = load_nifti(f_path)
    assert arr.flags.f_contiguous and arr.dtype == np.int16
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(aff, affine, atol=1e-6)
    assert int(hdr["sform_code"]) == 4 and int(hdr["qform_code"]) == 2
    img = nib.load(f_path)  # nibabel agrees
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    # a re-save of what was loaded gives the same bytes (no transpose anywhere)
    save_nifti(tmp_path / f"again{suffix}", arr, aff, header=hdr)
    assert (tmp_path / f"again{suffix}").read_bytes() == f_path.read_bytes()
    # bool is stored as uint8
    save_nifti(tmp_path / f"b{suffix}", data > 0, affine)
    b = load_nifti(tmp_path / f"b{suffix}")[0]
    assert b.dtype == np.uint8
    np.testing.assert_array_equal(b, data > 0)


def write_scaled(path: Path, raw: np.ndarray, affine: np.ndarray, slope: float, inter: float):
    """A NIfTI-1 file of ``raw`` (integers) with scl_slope/scl_inter, as scanners write them
    (nibabel's own writer picks its scaling from the data, so the bytes are put together here)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(raw.dtype)
    hdr.set_data_shape(raw.shape)
    hdr.set_slope_inter(slope, inter)
    hdr.set_sform(affine, 1)
    hdr.set_qform(affine, 1)
    hdr["vox_offset"] = 352
    bio = io.BytesIO()
    hdr.write_to(bio)
    data = bio.getvalue().ljust(352, b"\0") + raw.tobytes(order="F")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return hdr


def test_scaled_int16_loads_as_float_and_a_scaled_header_is_honoured(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    raw = np.asfortranarray(rng.integers(-2000, 6000, size=(10, 9, 8), dtype=np.int16))
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    hdr = write_scaled(tmp_path / "scaled.nii", raw, affine, 0.5, -1024.0)
    data, aff, _ = load_nifti(tmp_path / "scaled.nii")
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, raw * 0.5 - 1024.0)
    # a header that carries the scaling: float data goes back to int16 with it
    dst = tmp_path / "out.nii.gz"
    save_nifti(dst, data + 10.0, aff, header=hdr)
    img = nib.load(dst)
    assert img.get_data_dtype() == np.int16
    assert (img.dataobj.slope, img.dataobj.inter) == (0.5, -1024.0)  # the file's scl_*
    np.testing.assert_array_equal(np.asarray(img.dataobj.get_unscaled()), raw + 20)


def test_scaled_int16_input_is_written_back_scaled(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    raw = np.asfortranarray(rng.integers(-2000, 6000, size=(10, 9, 8), dtype=np.int16))
    write_scaled(tmp_path / "scaled.nii.gz", raw, np.diag([0.7, 0.7, 3.0, 1.0]), 0.5, -1024.0)
    data, aff, header = load_nifti(tmp_path / "scaled.nii.gz")
    edited = data + 10.0  # 20 raw steps
    dst = tmp_path / "out.nii.gz"
    save_nifti(dst, edited, aff, header=header)
    img = nib.load(dst)
    assert img.get_data_dtype() == np.int16
    assert (img.dataobj.slope, img.dataobj.inter) == (0.5, -1024.0)  # the file's scl_*
    np.testing.assert_array_equal(np.asarray(img.dataobj.get_unscaled()), raw + 20)
    np.testing.assert_array_equal(load_nifti(dst)[0], edited)


def test_batch_keeps_hu_of_a_uint16_ct_with_intercept(ds4: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(ds4 / "BDMAP_00000000", root / "BDMAP_00000000")
    ct_path = root / "BDMAP_00000000" / "ct.nii.gz"
    img = nib.load(ct_path)
    hu = np.asarray(img.dataobj).astype(np.int32)
    assert hu.min() < -500  # air is there
    write_scaled(ct_path, np.asfortranarray(hu + 1024).astype(np.uint16), img.affine, 1.0, -1024.0)
    np.testing.assert_array_equal(load_nifti(ct_path)[0], hu)
    _, cases = discover(root, ["liver"])
    out = tmp_path / "out"
    report = run_batch(cases, BatchOptions(organs=("liver",)), out)
    assert report.ok, report.failed
    got = load_nifti(out / "BDMAP_00000000_s000" / "ct.nii.gz")[0]
    tumor = load_nifti(out / "BDMAP_00000000_s000" / "segmentations" / "liver_lesion.nii.gz")[0]
    outside = tumor == 0
    np.testing.assert_array_equal(got[outside], hu[outside])


def test_failed_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(parts, level=1):
        yield b"\x1f\x8b\x08\x00" + b"\0" * 100
        raise RuntimeError("disk died mid-write")

    monkeypatch.setattr(sio, "gzip_chunks", broken)
    target = tmp_path / "x.nii.gz"
    with pytest.raises(RuntimeError, match="mid-write"):
        save_nifti(target, np.zeros((4, 4, 4), np.int16), np.eye(4))
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"previous version")
    with pytest.raises(RuntimeError, match="mid-write"):
        save_nifti(target, np.zeros((4, 4, 4), np.int16), np.eye(4))
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]
    assert target.read_bytes() == b"previous version"


# --------------------------------------------------------------------------------------
# 6. options
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"format": "nifti"}, "unknown format"),
        ({"organs": ("spleen",)}, "unknown organ"),
        ({"organs": ("liver", "spleen")}, "unknown organ"),
        ({"organs": ("liver", "pancreas", "liver")}, "more than once: liver"),
        ({"per_case": 0}, "per_case"),
        ({"per_case": -3}, "per_case"),
        ({"compresslevel": 10}, "compression"),
        ({"compresslevel": -1}, "compression"),
    ],
)
def test_batch_options_reject(kw: dict, match: str) -> None:
    args = {"organs": ("liver",), **kw}
    with pytest.raises(ValueError, match=match):
        BatchOptions(**args)


def test_cli_rejects_bad_options(ds4: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for extra in (
        ["--format", "nifti"],
        ["--per-case", "0"],
        ["--compression", "10"],
        ["--organ", "spleen"],
        ["--organ", "liver,liver"],
    ):
        args = [ds4, "--out", out, "--organ", "liver", *extra]
        res = batch(*args)
        assert res.exit_code == 2, (extra, res.output)
    assert not out.exists()


def test_compression_level_changes_sizes_not_voxels(ds4: Path, ref4: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = batch(ds4, "--out", out, "--organ", TWO_ORGANS, "--per-case", 2, "--compression", 0)
    assert res.exit_code == 0, res.output
    got, want = outputs(out), outputs(ref4)
    assert sorted(got) == sorted(want)
    for rel in got:
        if not rel.endswith(".nii.gz"):
            assert got[rel] == want[rel], rel
            continue
        a, b = nib.load(out / rel), nib.load(ref4 / rel)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        assert a.get_data_dtype() == b.get_data_dtype()
        np.testing.assert_array_equal(a.affine, b.affine)
        if rel.endswith("segmentations/liver.nii.gz"):  # the input mask, copied as is
            continue
        assert len(got[rel]) > len(want[rel]), rel
        assert len(got[rel]) >= np.asarray(a.dataobj).nbytes, rel  # stored, not deflated


# --------------------------------------------------------------------------------------
# regressions of bugs found by these tests (fixed)
# --------------------------------------------------------------------------------------


def test_record_after_a_torn_manifest_line_is_kept(ds4: Path, tmp_path: Path) -> None:
    _, cases = discover(ds4, ["liver"])
    cases = cases[:2]
    opts = BatchOptions(organs=("liver",))
    out = tmp_path / "out"
    run_batch(cases, opts, out)
    m = out / "manifest.jsonl"
    first, second = m.read_text().splitlines(keepends=True)
    m.write_text(first + second[: len(second) // 2])  # killed while writing the 2nd record
    assert set(read_manifest(out)) == {"BDMAP_00000000_s000"}
    report = run_batch(cases, opts, out, resume=True)
    assert report.done == 1 and report.skipped == 1
    recs = read_manifest(out)
    assert sorted(recs) == ["BDMAP_00000000_s000", "BDMAP_00000001_s000"]
    assert all(is_done(r, out) for r in recs.values())


def test_too_small_organ_is_skipped_not_fatal(bad_ds: Path, tmp_path: Path) -> None:
    _, cases = discover(bad_ds, ["liver", "kidney"])
    tiny = [c for c in cases if c.case_id == "BDMAP_tiny"]
    report = run_batch(tiny, BatchOptions(organs=("liver", "kidney")), tmp_path / "out")
    rec = read_manifest(tmp_path / "out")["BDMAP_tiny_s000"]
    assert report.ok, rec.get("error")
    assert [o["organ"] for o in rec["organs"]] == ["kidney"]
    assert "too small" in rec["skipped_organs"]["liver"]


def test_failed_write_leaves_no_partial_folder(
    ds4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sio.save_nifti

    def disk_full(path, *args, **kw):
        if Path(path).name == "label.nii.gz" and "BDMAP_00000001" in str(path):
            raise OSError(28, "No space left on device")
        return real(path, *args, **kw)

    monkeypatch.setattr(sio, "save_nifti", disk_full)
    _, cases = discover(ds4, ["liver"])
    out = tmp_path / "out"
    report = run_batch(cases[:2], BatchOptions(organs=("liver",)), out)
    assert [r["sample"] for r in report.failed] == ["BDMAP_00000001_s000"]
    assert "No space left" in report.failed[0]["error"]
    assert_clean(out)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_unusable_mask_dtype_fails_the_case_not_the_batch(ds4: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(ds4, root)
    seg = root / "BDMAP_00000000" / "segmentations" / "liver.nii.gz"
    img = nib.load(seg)
    rgb = np.zeros(img.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.asarray(img.dataobj)
    _nib_save(seg, rgb, img.affine)
    _, cases = discover(root, ["liver"])
    result: dict = {}

    def go() -> None:
        try:
            result["report"] = run_batch(cases[:2], BatchOptions(organs=("liver",)), root / "out")
        except BaseException as e:
            result["error"] = e

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(8)
    assert not th.is_alive(), "run_batch hangs"
    assert "error" not in result, repr(result.get("error"))
    report = result["report"]
    assert report.done == 1
    assert [r["sample"] for r in report.failed] == ["BDMAP_00000000_s000"]
    assert "liver.nii.gz" in report.failed[0]["error"]


def test_summary_shows_sample_ids_with_brackets_verbatim(bad_ds: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    shutil.copytree(bad_ds / "BDMAP_empty", root / "BDMAP_[x]")
    res = batch(root, "--out", tmp_path / "out", "--organ", "liver")
    assert res.exit_code == 1, res.output
    assert "BDMAP_[x]_s000" in read_manifest(tmp_path / "out")
    table = res.output.split("failed samples", 1)[1]
    assert "BDMAP_[x]_s000" in table
    assert "BDMAP_[x]/segmentations/liver.nii.gz" in table


@pytest.mark.parametrize("damage", ["truncated", "empty_nii"])
def test_corrupt_mask_fails_the_case_with_several_organs(
    ds4: Path, tmp_path: Path, damage: str
) -> None:
    """An unreadable organ mask is bad input, whether the batch has one organ or several."""
    root = tmp_path / "ds"
    shutil.copytree(ds4, root)
    seg = root / "BDMAP_00000000" / "segmentations"
    if damage == "truncated":
        bad = seg / "liver.nii.gz"
        bad.write_bytes(bad.read_bytes()[:300])
    else:
        (seg / "liver.nii.gz").unlink()
        bad = seg / "liver.nii"
        bad.write_bytes(b"")
    out = tmp_path / "out"
    res = batch(root, "--out", out, "--organ", "liver,pancreas")
    assert res.exit_code == 1, res.output
    recs = read_manifest(out)
    rec = recs["BDMAP_00000000_s000"]
    assert rec["status"] == "failed" and str(bad) in rec["error"], rec
    assert "outputs" not in rec and not (out / "BDMAP_00000000_s000").exists()
    assert all(recs[f"BDMAP_0000000{k}_s000"]["status"] == "done" for k in (1, 2, 3))
    assert "BDMAP_00000000_s000" in res.output.split("failed samples", 1)[1]
    assert_clean(out)


def test_summary_names_the_organs_skipped(bad_ds: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    for case in ("BDMAP_good", "BDMAP_empty", "BDMAP_tiny"):
        shutil.copytree(bad_ds / case, root / case)
    res = batch(root, "--out", tmp_path / "out", "--organ", "liver,kidney")
    assert res.exit_code == 0, res.output
    assert re.search(r"written with organs skipped\s*│\s*2\b", res.output), res.output
    table = res.output.split("organs skipped, per case", 1)[1]
    lines = {ln.split("│")[1].strip(): ln for ln in table.splitlines() if "BDMAP_" in ln}
    assert sorted(lines) == ["BDMAP_empty", "BDMAP_tiny"]
    assert "liver: " in lines["BDMAP_empty"] and "empty" in lines["BDMAP_empty"]
    assert "liver: " in lines["BDMAP_tiny"] and "too small" in lines["BDMAP_tiny"]


def test_resume_names_exactly_the_options_that_differ(ds4: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = [ds4, "--out", out, "--organ", "liver", "--seed", 5, "--resume"]
    res = batch(*base, "--mass-effect")
    assert res.exit_code == 0, res.output
    res = batch(*base, "--no-mass-effect")
    assert res.exit_code == 2, res.output
    msg = re.sub(r"\s+", " ", res.output)
    assert "(mass_effect: True there, False now)" in msg, msg
    assert "seed" not in msg and "--format" not in msg
    res = batch(*base[:-3], "--seed", 6, "--size", "small", "--resume")  # preset default
    msg = re.sub(r"\s+", " ", res.output)
    assert res.exit_code == 2, res.output
    want = "seed: 5 there, 6 now; size: default there, small now; "
    want += "mass_effect: True there, default now"
    assert want in msg, msg


def test_label_map_lacking_an_organ_id_skips_it_naming_the_ids(tmp_path: Path) -> None:
    """An nnU-Net case whose label map lacks the pancreas id: the pancreas is skipped with a
    reason that names the file and the ids it holds (it used to say "organ mask is empty"),
    the liver still gets its tumors, and the record carries no orientation note."""
    root = write_dataset(tmp_path / "nn", "nnunet", 1)
    lab_path = root / "labelsTr" / "abd_000.nii.gz"
    img = nib.load(lab_path)
    lab = np.asarray(img.dataobj).copy()
    lab[lab == 2] = 0
    nib.save(nib.Nifti1Image(lab, img.affine), lab_path)
    _, cases = discover(root, ["liver", "pancreas"])
    report = run_batch(cases, BatchOptions(organs=("liver", "pancreas")), tmp_path / "out")
    rec = read_manifest(tmp_path / "out")["abd_000_s000"]
    assert report.ok, rec.get("error")
    assert [o["organ"] for o in rec["organs"]] == ["liver"]
    assert rec["skipped_organs"]["pancreas"] == (
        f"{lab_path}: label id 2 is absent from this file (ids present: 1, 3, 4)"
    )
    assert "notes" not in rec


def test_unreadable_vessel_mask_is_noted_and_the_others_kept(tmp_path: Path) -> None:
    """A truncated vessel mask used to drop every vessel mask of the case (the aorta's too)
    without a word: vessel avoidance was silently lost. Now only that file is left out, and
    the samples' records (and the command's warnings) name it."""
    from synthgen.batch import load_case

    root = write_dataset(tmp_path / "ds", "atlas1", 1)
    seg = root / "BDMAP_00000000" / "segmentations"
    aorta = np.asarray(nib.load(seg / "aorta.nii.gz").dataobj) > 0
    raw = (seg / "aorta.nii.gz").read_bytes()
    (seg / "hepatic_vessel.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated
    _, cases = discover(root, ["liver"])
    lc = load_case(cases[0], BatchOptions(organs=("liver",)))
    assert lc.vessels is not None
    np.testing.assert_array_equal(lc.vessels, aorta)
    (note,) = lc.notes
    assert note.startswith(str(seg / "hepatic_vessel.nii.gz")) and "vessel mask not used" in note
    out = tmp_path / "out"
    res = batch(root, "--out", out, "--organ", "liver")
    assert res.exit_code == 0, res.output
    assert "hepatic_vessel.nii.gz" in res.output
    assert read_manifest(out)["BDMAP_00000000_s000"]["notes"] == [note]


def test_a_vessel_mask_on_another_grid_is_noted_like_an_organ_mask(tmp_path: Path) -> None:
    """A vessel mask on another grid is mapped with a GridWarning, which goes to the samples'
    notes as an organ mask's does (it was printed on the loading process's stderr, or a
    worker's, and the records said nothing)."""
    import warnings

    from synthgen.batch import load_case
    from synthgen.layouts import GridWarning

    root = write_dataset(tmp_path / "ds", "atlas1", 1)
    aorta = root / "BDMAP_00000000" / "segmentations" / "aorta.nii.gz"
    img = nib.load(aorta)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.eye(4)), aorta)
    _, cases = discover(root, ["liver"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", GridWarning)  # (none may escape the notes)
        lc = load_case(cases[0], BatchOptions(organs=("liver",)))
    assert lc.vessels is not None
    assert any("aorta.nii.gz" in n and "another grid" in n for n in lc.notes), lc.notes


def test_out_that_is_a_file_is_a_clear_error(ds4: Path, tmp_path: Path) -> None:
    """``--out`` naming an existing file (or a folder below one) crashed with a traceback
    (FileExistsError) in batch, synth and the dry run; now exit 2 with a one-line reason,
    and the file is left as it was."""
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me\n")
    for args in (
        (ds4, "--out", afile, "--organ", "liver"),
        (ds4, "--out", afile, "--organ", "liver", "--dry-run"),
        (ds4, "--out", afile / "sub", "--organ", "liver"),
    ):
        res = batch(*args)
        assert res.exit_code == 2, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
        assert "Traceback" not in res.output and "notes.txt" in res.output
    ct = next(ds4.glob("BDMAP_*/ct.nii.gz"))
    res = CliRunner().invoke(
        app,
        ["synth", str(ct), "--mask", str(ct.parent / "segmentations" / "liver.nii.gz"),
         "--organ", "liver", "--out", str(afile)],
    )  # fmt: skip
    assert res.exit_code == 2 and "the output folder is a file" in res.output, res.output
    assert afile.read_text() == "keep me\n"


def test_refusal_without_resume_counts_done_and_failed_apart(bad_ds: Path, tmp_path: Path) -> None:
    """Rerunning into an OUT without --resume said it 'already holds N samples' counting the
    failed ones as if written: a batch with 1 done and 6 failed read as 7 samples there. The
    message now tells them apart (and that --resume redoes those not done)."""
    out = tmp_path / "out"
    assert batch(bad_ds, "--out", out, "--organ", "liver").exit_code == 1
    res = batch(bad_ds, "--out", out, "--organ", "liver")
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    n = len(read_manifest(out))
    assert f"already holds {n} samples of this run (1 done, {n - 1} failed or incomplete)" in text
    assert "redoes those not done" in text


def test_a_manifest_that_cannot_be_written_stops_with_one_line_then_resumes(
    ds4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk when a record is appended (the sample itself fitted): exit 2 with one line
    naming the manifest, no traceback, the torn line left as a kill leaves it; --resume then
    makes the same files as an uninterrupted run."""
    import synthgen.batch as sb

    ref, out = tmp_path / "ref", tmp_path / "out"
    assert batch(ds4, "--out", ref, "--organ", "liver").exit_code == 0
    real_init = sb.Manifest.__init__

    class Full:  # the manifest's file on a disk that fills up at the third record
        def __init__(self, f) -> None:
            self.f, self.n = f, 0

        def write(self, text: str) -> int:
            self.n += 1
            if self.n == 3:  # part of the line reaches the file
                self.f.write(text[:100])
                self.f.flush()
                raise OSError(28, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name: str):
            return getattr(self.f, name)

    def init(self, path: Path) -> None:
        real_init(self, path)
        self._f = Full(self._f)

    monkeypatch.setattr(sb.Manifest, "__init__", init)
    r = batch(ds4, "--out", out, "--organ", "liver")
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "manifest.jsonl: cannot write (No space left on device)" in " ".join(r.output.split())
    assert "Traceback" not in r.output
    assert len(manifest_lines(out)) == 2
    assert_clean(out)
    monkeypatch.setattr(sb.Manifest, "__init__", real_init)
    assert batch(ds4, "--out", out, "--organ", "liver", "--resume").exit_code == 0
    assert_same_outputs(out, ref)
    done = [r["sample"] for r in manifest_lines(out) if r["status"] == "done"]
    assert sorted(done) == sample_ids(4, 1)


@pytest.mark.parametrize("name", ["batch.json", "dataset.json"])
def test_out_json_that_cannot_be_written_is_one_line(
    ds4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A full disk when OUT's batch.json (at the start) or nnU-Net dataset.json (at the end)
    is written: exit 2 with one line naming the file, no traceback; --resume then ends it."""
    real = sio.save_json

    def save_json(path, obj) -> None:
        if Path(path).name == name and Path(path).parent == out:
            raise OSError(28, "No space left on device")
        real(path, obj)

    out = tmp_path / "out"
    monkeypatch.setattr(sio, "save_json", save_json)
    r = batch(ds4, "--out", out, "--organ", "liver", "--format", "nnunet")
    assert r.exit_code == 2, r.output
    assert f"{name}: cannot write (No space left on device)" in " ".join(r.output.split())
    monkeypatch.setattr(sio, "save_json", real)
    r = batch(ds4, "--out", out, "--organ", "liver", "--format", "nnunet", "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 4


@pytest.mark.parametrize(("layout", "fmt"), [("nnunet", "nnunet"), ("atlas1", "atlas")])
def test_out_that_is_the_input_dataset_is_refused(tmp_path: Path, layout: str, fmt: str) -> None:
    """--out naming the input dataset folder: nnU-Net output would replace the dataset's own
    dataset.json (its label names) and fill its imagesTr, and AbdomenAtlas samples would be
    found as new cases by a --resume (tumors on tumors). Refused before anything is written."""
    root = write_dataset(tmp_path / "in", layout, 2)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    r = batch(root, "--out", root, "--organ", "liver", "--format", fmt)
    assert r.exit_code == 2, r.output
    assert "the output folder is the input dataset" in " ".join(r.output.split())
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before


def test_mass_effect_switch_leaves_wall_presets_alone(tmp_path: Path) -> None:
    """``--mass-effect`` with a hollow organ: its wall tumors push nothing, and a preset with
    ``[wall]`` and mass effect on is refused when a plan's preset is read back, so switching
    it on there failed every sample ('[mass_effect.enabled] wall tumors ...')."""
    ds = write_dataset(tmp_path / "ds", "atlas1", 1)
    out = tmp_path / "out"
    res = batch(ds, "--out", out, "--organ", "liver,colon", "--per-case", 1, "--mass-effect")
    assert res.exit_code == 0, res.output
    (rec,) = [json.loads(s) for s in (out / "manifest.jsonl").read_text().splitlines()]
    assert rec["status"] == "done", rec
    presets = {o["organ"]: o["plan"]["preset"] for o in rec["organs"]}
    assert presets["liver"]["mass_effect"]["enabled"] is True
    assert not presets["colon"].get("mass_effect", {}).get("enabled", False)


def _nfs_like_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    """``flock`` as NFS emulates it (byte-range locks): an exclusive lock needs the file open
    for writing, a shared one open for reading (EBADF otherwise)."""
    import errno
    import fcntl

    real = fcntl.flock

    def flock(fd: int, op: int) -> None:
        mode = os.O_ACCMODE & fcntl.fcntl(fd, fcntl.F_GETFL)
        if op & fcntl.LOCK_EX and mode == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        if op & fcntl.LOCK_SH and mode == os.O_WRONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)


def test_running_shards_are_told_where_flock_is_nfs_emulated(
    ds4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On NFS the probe of another run's manifest (an exclusive lock on a file opened for
    reading) failed with EBADF and was read as 'not running': a starting shard removed the
    running shard's .partial folder, and a run of another shard count was not refused."""
    import fcntl

    out = tmp_path / "out"
    _, cases = discover(ds4, ["liver"])
    opts = BatchOptions(organs=("liver",))
    assert run_batch(cases, opts, out, shard=(1, 2)).ok
    live = out / ".partial" / "shard-1-of-2" / "BDMAP_00000003_s000"
    live.mkdir(parents=True)
    (live / ".ct.nii.gz.123.tmp").write_bytes(b"x" * 100)
    _nfs_like_flock(monkeypatch)
    with open(out / "manifest-shard-1-of-2.jsonl", "a+", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # (shard 1/2 runs now)
        with pytest.raises(ValueError, match="batch in 2 shards now"):
            run_batch(cases, opts, out, resume=True)
        assert run_batch(cases, opts, out, shard=(0, 2)).ok
        assert (live / ".ct.nii.gz.123.tmp").exists()


def test_probes_of_other_runs_are_not_taken_for_runs(ds4: Path, tmp_path: Path) -> None:
    """Runs started together probe each other's manifests: a probe (a lock held for a
    moment) was taken for a run, so a shard was refused as 'being written by another batch'
    or 'by a batch unsharded now' beside a finished unsharded manifest."""
    import fcntl

    out = tmp_path / "out"
    _, cases = discover(ds4, ["liver"])
    opts = BatchOptions(organs=("liver",))
    assert run_batch(cases, opts, out).ok  # manifest.jsonl: a finished unsharded run
    with open(out / "manifest.jsonl", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # (another shard's probe of it, now)
        assert run_batch(cases, opts, out, shard=(0, 2), resume=True).ok
    assert run_batch(cases, opts, out, shard=(1, 2), resume=True).ok
    own = open(out / "manifest-shard-1-of-2.jsonl", encoding="utf-8")
    fcntl.flock(own.fileno(), fcntl.LOCK_SH)  # a probe of shard 1's manifest as it starts
    threading.Timer(0.3, own.close).start()  # (released: probes hold it for a moment)
    assert run_batch(cases, opts, out, shard=(1, 2), resume=True).ok


def test_grid_notes_go_to_their_own_case_when_cases_load_in_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cases load in threads at once (the batch's loader, a Dask worker's threads): the
    GridWarning note of a mask on another grid belongs to its own case. With
    ``warnings.catch_warnings`` (process-wide) around each load, a load that ended while
    another ran restored the state from before both: the other's GridWarning was printed,
    not noted, and that load's end left the first's recorder in place."""
    import nibabel as nib

    import synthgen.batch as sb

    ds = write_dataset(tmp_path / "ds", "atlas1", 2)
    bad = ds / "BDMAP_00000001" / "segmentations" / "liver.nii.gz"
    img = nib.load(bad)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.eye(4)), bad)
    _, cases = discover(ds, ["liver"])
    opts = BatchOptions(organs=("liver",))
    a_in, a_out, b_in = threading.Event(), threading.Event(), threading.Event()
    real = sb.load_organ

    def load_organ(srcs, *a, **kw):
        if threading.current_thread().name == "A":  # A's load ends while B's runs
            a_in.set()
            assert b_in.wait(30)
            return real(srcs, *a, **kw)
        assert a_in.wait(30)
        b_in.set()
        assert a_out.wait(30)
        return real(srcs, *a, **kw)

    monkeypatch.setattr(sb, "load_organ", load_organ)
    got: dict = {}

    def run(name: str, case) -> None:
        got[name] = sb.load_case(case, opts)
        if name == "A":
            a_out.set()

    ths = [
        threading.Thread(target=run, args=a, name=a[0]) for a in (("A", cases[0]), ("B", cases[1]))
    ]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    assert not any("another grid" in n for n in got["A"].notes), got["A"].notes
    assert any("another grid" in n for n in got["B"].notes), got["B"].notes
