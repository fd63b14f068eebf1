"""The disk teacher cache where file locks are ignored (NFS without lockd, FUSE and object-store mounts).

Every worker here is a separate interpreter (multiprocessing's spawn start method) that first turns fcntl's locks
into no-ops, as such a filesystem does, and names itself another node (so process ids of the others mean nothing
to it, as on a cluster). Rows are 700 wide (records of 1,418 bytes, so records straddle page boundaries) and each
node's teacher answers slightly differently (as a teacher on other hardware does), so a record mixed from two
writers, or torn by a kill, would be a row no teacher gave. Readers check every row they are served, exactly,
against the rows the teachers give.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("KDX_TEST_STORE_WORKER") and "kdx.distill" not in sys.modules:
    # a worker interpreter needs the store module only: skip kdx.distill's __init__ (the training stack, Lightning),
    # whose import takes most of a worker's start-up on a busy machine
    import kdx

    _package = types.ModuleType("kdx.distill")
    _package.__path__ = [str(Path(kdx.__file__).parent / "distill")]
    sys.modules["kdx.distill"] = _package

import kdx.distill.cache as cache_module  # noqa: E402
from kdx.distill.cache import TeacherCache, decode_rows, encode_rows  # noqa: E402

WIDTH, FEATURES, SAMPLES, VIEWS = 700, 16, 24, 2
WAIT_S = 900  # workers start a fresh interpreter each (torch): minutes on a loaded machine


@pytest.fixture
def workers_env(monkeypatch):
    """Spawned workers (and their children) import the store module alone."""
    monkeypatch.setenv("KDX_TEST_STORE_WORKER", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _images(indices, views):
    """The image of (index, view): a different input for every entry."""
    i = torch.tensor(indices, dtype=torch.float32)[:, None]
    v = torch.tensor(views, dtype=torch.float32)[:, None]
    return torch.sin(torch.arange(FEATURES, dtype=torch.float32) * (0.37 * i + 0.11) + 1.3 * v) * (i + 1)


class NodeTeacher:
    """logits = a fixed linear map of the image, shifted by 1e-2 x the node: every node gives other bytes."""

    def __init__(self, node: int):
        self.weight = torch.randn(FEATURES, WIDTH, generator=torch.Generator().manual_seed(0))
        self.node, self.rows = node, 0

    def __call__(self, x):
        self.rows += x.shape[0]
        # row by row: a row's bytes must not depend on which other rows share its batch (BLAS paths differ)
        return {"logits": torch.stack([row @ self.weight for row in x]) + 0.01 * self.node}


def _served_form(node: int, indices, views) -> np.ndarray:
    """The rows a store serves for node `node`'s teacher: its outputs in the stored float16 form."""
    return decode_rows(encode_rows(NodeTeacher(node)(_images(indices, views))["logits"].numpy()))


def _wrong_rows(got: torch.Tensor, indices, views, nodes) -> int:
    """Rows of `got` that equal no node's teacher output for their (index, view)."""
    ok = np.zeros(len(indices), bool)
    for node in nodes:
        ok |= (got.numpy() == _served_form(node, indices, views)).all(axis=1)
    return int((~ok).sum())


def _as_node(node: int, rename: bool = True) -> None:
    """In a worker: locks that do nothing (what a filesystem without lock support gives) and, with `rename`, another
    node's name (its claims then look, to the others, like claims of a process on another machine)."""
    import fcntl

    def ignored(*args, **kwargs):
        return None

    fcntl.flock = fcntl.lockf = ignored
    if rename:
        cache_module.NODE = f"node{node}"
    torch.set_num_threads(1)


def _open(root) -> TeacherCache:
    return TeacherCache("k", SAMPLES, VIEWS, {"logits": WIDTH}, mode="disk", root=root)


def _entries(seed: int) -> list[tuple[int, int]]:
    pairs = [(i, v) for i in range(SAMPLES) for v in range(VIEWS)]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[k] for k in order]


# --------------------------------------------------------------------------- workers (module level: spawn imports them)
def _reader(node: int, teacher_node: int, root: str, nodes: list[int], passes: int, ready, out: str) -> None:
    """Serve every entry `passes` times in its own order through the cache, checking each row served."""
    _as_node(node)
    teacher, cache = NodeTeacher(teacher_node), _open(root)
    ready.wait(WAIT_S)
    wrong = 0
    for n in range(passes):
        entries = _entries(100 * node + n)
        for start in range(0, len(entries), 6):
            idx, vw = zip(*entries[start:start + 6])
            got = cache(_images(idx, vw), torch.tensor(idx), torch.tensor(vw), teacher)["logits"]
            wrong += _wrong_rows(got, idx, vw, nodes)
    Path(out).write_text(json.dumps({"wrong": wrong, "hits": cache.hits, "misses": cache.misses,
                                     "computed": teacher.rows}))


def _rewriter(node: int, root: str, ready, stop, out: str) -> None:
    """Ignore claims and keep overwriting every entry with this node's rows: writes race with reads and with
    the other rewriter's writes of other bytes."""
    _as_node(node)
    teacher, cache = NodeTeacher(node), _open(root)
    positions = list(range(SAMPLES * VIEWS))
    idx, vw = [p // VIEWS for p in positions], [p % VIEWS for p in positions]
    packed = {"logits": encode_rows(teacher(_images(idx, vw))["logits"].numpy())}
    ready.wait(WAIT_S)
    rounds = 0
    while not stop.is_set() and rounds < 2000:
        order = np.random.default_rng(rounds).permutation(len(positions)).tolist()
        cache._store(order, {"logits": packed["logits"][order]})
        rounds += 1
    Path(out).write_text(json.dumps({"rounds": rounds}))


def _creator(node: int, root: str, ready, link_works: bool, out: str) -> None:
    """Create the store at the same moment as the others, then store this node's share of the entries."""
    _as_node(node)
    if not link_works:  # a filesystem without hard links: meta.json is renamed into place
        def no_link(*args, **kwargs):
            raise OSError(1, "Operation not permitted")

        os.link = no_link
    ready.wait(WAIT_S)
    cache = _open(root)
    mine = [(i, v) for i in range(SAMPLES) for v in range(VIEWS) if (i * VIEWS + v) % 4 == node]
    idx, vw = zip(*mine)
    got = cache(_images(idx, vw), torch.tensor(idx), torch.tensor(vw), NodeTeacher(0))["logits"]
    Path(out).write_text(json.dumps({"generation": cache.generation, "num_views": cache.num_views,
                                     "wrong": _wrong_rows(got, idx, vw, [0])}))


TEAR = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_cache_lockfree import NodeTeacher, _as_node, _images, _open
import torch

_as_node(1, rename=False)  # this machine: its claim is known to be dead once the process is gone
cache = _open({root!r})
real = os.pwrite

def torn(fd, data, offset):  # the record of entry {target}: half of it, then the process is killed
    if len(data) == cache.record_bytes and offset == {target} * cache.record_bytes:
        real(fd, bytes(data)[:len(data) // 2], offset)
        print("torn", flush=True)
        time.sleep(600)
    return real(fd, data, offset)

os.pwrite = torn
idx, vw = [0, 1, {target_index}, 3], [0, 0, {target_view}, 0]
cache(_images(idx, vw), torch.tensor(idx), torch.tensor(vw), NodeTeacher(1))
"""


# --------------------------------------------------------------------------- tests
def _spawn(target, *args):
    process = mp.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


def _join(processes, timeout=WAIT_S):
    for p in processes:
        p.join(timeout)
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0, f"worker {p.name} ended with {p.exitcode}"


@pytest.mark.slow
def test_writers_on_several_nodes_without_locks_never_serve_a_wrong_row(tmp_path, workers_env):
    """Two nodes overwrite every record again and again with their own (different) rows, ignoring claims, while
    two readers on two more nodes are served every entry three times: no served row is torn or mixed."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Barrier(5), ctx.Event()
    root = str(tmp_path / "store")
    _open(root).close()
    nodes = [0, 1, 2, 3]
    rewriters = [_spawn(_rewriter, n, root, ready, stop, str(tmp_path / f"w{n}")) for n in (0, 1)]
    readers = [_spawn(_reader, n, n, root, nodes, 3, ready, str(tmp_path / f"r{n}")) for n in (2, 3)]
    ready.wait(WAIT_S)
    try:
        _join(readers)
    finally:
        stop.set()
        _join(rewriters)
    results = [json.loads((tmp_path / f"r{n}").read_text()) for n in (2, 3)]
    assert [r["wrong"] for r in results] == [0, 0], results
    assert all(r["hits"] + r["misses"] == 3 * SAMPLES * VIEWS for r in results), results
    assert sum(r["hits"] for r in results) > 0, results  # the readers were served stored records, not only their own
    assert all(json.loads((tmp_path / f"w{n}").read_text())["rounds"] >= 1 for n in (0, 1))
    # once the writers have stopped, every record is whole: a fresh reader is served every entry, each correct
    teacher, cache = NodeTeacher(9), _open(root)
    idx, vw = zip(*_entries(0))
    got = cache(_images(idx, vw), torch.tensor(idx), torch.tensor(vw), teacher)["logits"]
    assert teacher.rows == 0 and _wrong_rows(got, idx, vw, nodes) == 0


@pytest.mark.slow
def test_jobs_on_three_nodes_without_locks_compute_each_entry_once_and_serve_only_right_rows(tmp_path, workers_env):
    """Three nodes, locks ignored, the same teacher, each served every entry twice in its own order: exclusive
    claim files (O_CREAT|O_EXCL) let one job compute each entry while the others wait for its record."""
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(4)
    root = str(tmp_path / "store")
    readers = [_spawn(_reader, n, 0, root, [0], 2, ready, str(tmp_path / f"r{n}")) for n in (0, 1, 2)]
    ready.wait(WAIT_S)
    _join(readers)
    results = [json.loads((tmp_path / f"r{n}").read_text()) for n in (0, 1, 2)]
    assert [r["wrong"] for r in results] == [0, 0, 0], results
    assert sum(r["computed"] for r in results) == SAMPLES * VIEWS, results  # each entry by exactly one job


def test_a_writer_killed_mid_record_leaves_nothing_that_is_served_torn(tmp_path, workers_env):
    """kill -9 of a real process (locks ignored) halfway through writing a record: the half record is computed
    again, never served, the records it finished are served, and its claim is taken over at once."""
    import subprocess
    import sys

    root = tmp_path / "store"
    target_index, target_view = 2, 1
    target = target_index * VIEWS + target_view
    script = TEAR.format(tests=str(Path(__file__).parent), root=str(root), target=target, target_index=target_index,
                         target_view=target_view)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "KDX_TEST_STORE_WORKER": "1"})
    try:
        assert child.stdout.readline().strip() == "torn"  # (waits for the child's start-up)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(60)
    assert child.returncode == -signal.SIGKILL
    teacher, cache = NodeTeacher(0), _open(root)
    size = cache.record_bytes
    record = (root / "k" / "records.bin").read_bytes()[target * size:(target + 1) * size]
    assert any(record[:size // 2]) and not any(record[size // 2:])  # really torn: half written, half a hole
    # the dead writer's claims of the torn entry and of the one it never reached are left behind (those of the
    # records it finished were released as each was written)
    assert sorted(p.name for p in (root / "k" / "claims").iterdir()) == sorted([str(target), str(3 * VIEWS)])
    idx, vw = [0, 1, target_index, 3], [0, 0, target_view, 0]
    t0 = time.time()
    got = cache(_images(idx, vw), torch.tensor(idx), torch.tensor(vw), teacher)["logits"]
    assert time.time() - t0 < 30  # the claim of a process that is gone is not waited for
    # the two records the child finished are served (its rows); the torn one and the unwritten one are computed
    assert cache.hits == 2 and teacher.rows == 2
    np.testing.assert_array_equal(got[:2].numpy(), _served_form(1, [0, 1], [0, 0]))
    np.testing.assert_array_equal(got[2:].numpy(), _served_form(0, [target_index, 3], [target_view, 0]))
    assert not list((root / "k" / "claims").iterdir())
    again = _open(root)  # and the recomputed records are whole now
    again(_images(idx, vw), torch.tensor(idx), torch.tensor(vw), teacher)
    assert again.hits == 4 and teacher.rows == 2


@pytest.mark.slow
@pytest.mark.parametrize("link_works", [True, False], ids=["hard-links", "renames-only"])
def test_a_store_created_at_once_by_several_processes_without_locks_is_one_valid_store(tmp_path, workers_env,
                                                                                        link_works):
    """Four processes open the same new store at the same moment (locks ignored) and each stores a quarter of the
    entries. With hard links one meta.json wins and all four agree on it, so a fifth process is served every
    entry; with renames only (no hard links) the last meta.json wins, and what is served is still only right."""
    root = str(tmp_path / "store")
    ready = mp.get_context("spawn").Barrier(5)
    workers = [_spawn(_creator, n, root, ready, link_works, str(tmp_path / f"c{n}")) for n in range(4)]
    ready.wait(WAIT_S)
    _join(workers)
    results = [json.loads((tmp_path / f"c{n}").read_text()) for n in range(4)]
    assert all(r["wrong"] == 0 and r["num_views"] == VIEWS for r in results), results
    folder = tmp_path / "store" / "k"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["key"] == "k" and meta["num_views"] == VIEWS and meta["generation"]
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert not list((folder / "claims").iterdir())
    teacher, cache = NodeTeacher(0), _open(root)
    assert cache.generation == meta["generation"]
    idx, vw = zip(*_entries(1))
    got = cache(_images(idx, vw), torch.tensor(idx), torch.tensor(vw), teacher)["logits"]
    assert _wrong_rows(got, idx, vw, [0]) == 0
    if link_works:
        assert {r["generation"] for r in results} == {meta["generation"]}
        assert teacher.rows == 0 and cache.hits == SAMPLES * VIEWS  # every process's rows are in the one store
    else:
        shared = sum(r["generation"] == meta["generation"] for r in results)
        assert cache.hits == shared * SAMPLES * VIEWS // 4  # the rows of the processes that agree with meta.json


def test_records_that_are_half_written_moved_or_of_another_generation_are_not_served(tmp_path):
    """In one process: a half record over a hole, a whole record copied to another entry, and a store whose
    meta.json names another generation are each computed, not served."""
    teacher = NodeTeacher(0)
    cache = _open(tmp_path)
    idx, vw = [0, 1, 2], [0, 0, 0]
    cache(_images(idx, vw), torch.tensor(idx), torch.tensor(vw), teacher)
    path, size = tmp_path / "k" / "records.bin", cache.record_bytes
    raw = bytearray(path.read_bytes())
    raw[3 * VIEWS * size:3 * VIEWS * size + size // 2] = raw[:size // 2]  # half of entry 0's record at entry (3, 0)
    raw[4 * VIEWS * size:4 * VIEWS * size + size] = raw[VIEWS * size:VIEWS * size + size]  # entry (1, 0) at (4, 0)
    path.write_bytes(bytes(raw))
    teacher.rows = 0
    idx, vw = [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]
    got = _open(tmp_path)(_images(idx, vw), torch.tensor(idx), torch.tensor(vw), teacher)["logits"]
    assert teacher.rows == 2 and _wrong_rows(got, idx, vw, [0]) == 0
    meta_path = tmp_path / "k" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "generation": "another"}))
    teacher.rows = 0
    other = _open(tmp_path)
    got = other(_images(idx, vw), torch.tensor(idx), torch.tensor(vw), teacher)["logits"]
    assert other.generation == "another" and teacher.rows == 5 and _wrong_rows(got, idx, vw, [0]) == 0


def test_the_store_takes_no_lock():
    """No fcntl import, so nothing in the store depends on locks a filesystem may ignore."""
    assert "fcntl" not in vars(cache_module)
