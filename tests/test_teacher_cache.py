"""The teacher cache: seeded views, stores that serve exactly what was computed, sharing, damage, and runs."""
from __future__ import annotations

import csv
import io
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kdx.data import SyntheticDataModule
from kdx.data.tensor_images import TensorImageDataset
from kdx.data.views import SeededViewDataset, ViewSampler, view_of
from kdx.distill.cache import (TAG_BYTES, CacheUnavailable, TeacherCache, _compress, _expand, cache_key,
                               check_cache_config, teacher_fingerprint)
from kdx.errors import ConfigError
from kdx.models import build_model

from conftest import compose_train, mount_tmpfs, umount


class CountingTeacher:
    """logits = a fixed linear map of the image; counts the rows it computes."""

    def __init__(self, width: int = 5, in_features: int = 12):
        self.weight = torch.randn(in_features, width, generator=torch.Generator().manual_seed(0)) * 3
        self.rows = 0

    def __call__(self, x):
        self.rows += x.shape[0]
        return {"logits": x.flatten(1) @ self.weight}


def _batch(indices, views, in_features=12):
    x = torch.stack([torch.full((in_features,), float(i) + 0.1 * v) * torch.linspace(-1, 1, in_features)
                     for i, v in zip(indices, views)])
    return x, torch.tensor(indices), torch.tensor(views)


def test_memory_store_serves_hits_and_computes_only_misses():
    teacher = CountingTeacher()
    cache = TeacherCache("k", num_samples=10, num_views=3, outputs={"logits": 5}, mode="memory")
    x, i, v = _batch([0, 1, 2, 3], [0, 0, 1, 2])
    first = cache(x, i, v, teacher)["logits"]
    assert teacher.rows == 4 and cache.stats() == {"hits": 0, "misses": 4, "hit_rate": 0.0}
    torch.testing.assert_close(first, teacher(x)["logits"].half().float())  # fp16 rows, served as float32
    x2, i2, v2 = _batch([2, 9, 0, 3], [1, 0, 0, 1])  # two stored entries, two new (3 is stored for view 2 only)
    second = cache(x2, i2, v2, teacher)["logits"]
    assert teacher.rows == 4 + 4 + 2
    torch.testing.assert_close(second[0], first[2])
    torch.testing.assert_close(second[2], first[0])
    assert cache.hits == 2


def test_a_view_beyond_the_store_is_computed_not_stored():
    teacher = CountingTeacher()
    cache = TeacherCache("k", num_samples=4, num_views=1, outputs={"logits": 5}, mode="memory")
    x, i, v = _batch([0, 1], [0, 3])
    cache(x, i, v, teacher)
    cache(x, i, v, teacher)
    assert teacher.rows == 2 + 1  # (0, 0) is served the second time; (1, view 3) is out of range: computed again


def test_disk_store_is_shared_by_a_second_job(tmp_path):
    teacher = CountingTeacher()
    x, i, v = _batch(list(range(8)), [1] * 8)
    one = TeacherCache("k", 8, 2, {"logits": 5}, mode="disk", root=tmp_path)
    served = one(x, i, v, teacher)["logits"]
    other = TeacherCache("k", 8, 2, {"logits": 5}, mode="disk", root=tmp_path)  # a new process would open the same
    again = other(x, i, v, teacher)["logits"]
    assert teacher.rows == 8 and other.hits == 8  # the second job computes nothing
    torch.testing.assert_close(again, served, rtol=0, atol=0)


def test_a_shorter_schedule_reads_the_store_of_a_longer_one(tmp_path):
    """View v of an image is the same in a 6-epoch and a 3-epoch run: the shorter run is served the longer one's rows."""
    teacher = CountingTeacher()
    x, i, v = _batch(list(range(8)), [2] * 8)
    long = TeacherCache("k", 8, 6, {"logits": 5}, mode="disk", root=tmp_path)
    served = long(x, i, v, teacher)["logits"]
    short = TeacherCache("k", 8, 3, {"logits": 5}, mode="disk", root=tmp_path)
    again = short(x, i, v, teacher)["logits"]
    assert short.num_views == 6 and short.hits == 8 and teacher.rows == 8
    torch.testing.assert_close(again, served, rtol=0, atol=0)
    with pytest.raises(CacheUnavailable, match="was built for another teacher or data"):
        TeacherCache("k", 8, 9, {"logits": 5}, mode="disk", root=tmp_path)  # more views than stored: refused


def test_a_damaged_entry_is_recomputed_never_served(tmp_path):
    teacher = CountingTeacher()
    x, i, v = _batch([0, 1, 2], [0, 0, 0])
    cache = TeacherCache("k", 3, 1, {"logits": 5}, mode="disk", root=tmp_path)
    good = cache(x, i, v, teacher)["logits"]
    path = tmp_path / "k" / "records.bin"
    raw = bytearray(path.read_bytes())  # a torn or flipped write in entry 1: its tag no longer matches
    raw[cache.record_bytes + TAG_BYTES + 2] ^= 0x40
    path.write_bytes(bytes(raw))
    reopened = TeacherCache("k", 3, 1, {"logits": 5}, mode="disk", root=tmp_path)
    before = teacher.rows
    served = reopened(x, i, v, teacher)["logits"]
    assert teacher.rows == before + 1  # only the damaged one
    torch.testing.assert_close(served, good, rtol=0, atol=0)


def test_an_abandoned_claim_is_taken_over(tmp_path):
    teacher = CountingTeacher()
    cache = TeacherCache("k", 3, 1, {"logits": 5}, mode="disk", root=tmp_path)
    gone = 2 ** 22 + 12345  # no such process
    cache._claim_path(0).write_bytes(cache._stamp(pid=gone))
    x, i, v = _batch([0], [0])
    cache(x, i, v, teacher)
    assert teacher.rows == 1 and not cache._claim_path(0).exists()
    assert bool(cache._read([0])[0][0])  # the record was written by the process that took the claim over


def _job(root, order, out):
    teacher = CountingTeacher()
    cache = TeacherCache("k", 64, 1, {"logits": 5}, mode="disk", root=root)
    for start in range(0, 64, 8):
        idx = order[start:start + 8]
        x, i, v = _batch(idx, [0] * len(idx))
        got = cache(x, i, v, teacher)["logits"]
        torch.testing.assert_close(got, teacher(x)["logits"].half().float())
        teacher.rows -= len(idx)  # the reference call above is not cache work
    Path(out).write_text(str(teacher.rows))


def test_parallel_jobs_compute_each_entry_once(tmp_path):
    orders = [list(range(64)), list(range(63, -1, -1))]
    ctx = mp.get_context("fork")
    jobs = [ctx.Process(target=_job, args=(tmp_path / "store", o, tmp_path / f"rows{n}")) for n, o in enumerate(orders)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(120)
        assert j.exitcode == 0
    rows = [int((tmp_path / f"rows{n}").read_text()) for n in range(2)]
    assert sum(rows) == 64, rows  # every entry computed by exactly one of the two jobs


def test_topk_keeps_the_largest_probabilities_and_spreads_the_rest():
    row = np.array([2.0, -1.0, 0.5, 3.0, -2.0, 0.0], dtype=np.float32)
    p = np.exp(row - np.logaddexp.reduce(row))
    packed = _compress(row, 2)
    expanded = _expand(packed, 2, 6)
    q = np.exp(expanded - np.logaddexp.reduce(expanded))
    assert q[3] == pytest.approx(p[3], rel=1e-6) and q[0] == pytest.approx(p[0], rel=1e-6)
    rest = (1 - p[3] - p[0]) / 4
    assert all(q[j] == pytest.approx(rest, rel=1e-5) for j in (1, 2, 4, 5))
    assert q.sum() == pytest.approx(1.0, rel=1e-6)


def test_the_key_changes_with_teacher_data_seed_and_views():
    a, b = build_model("cnn_tiny", 4), build_model("cnn_tiny", 4)
    ha, hb = teacher_fingerprint(a), teacher_fingerprint(b)
    assert ha == teacher_fingerprint(a) and ha != hb
    base = dict(teacher_hash=ha, data={"name": "fmnist", "train_subset": None}, seed=0, views=None, topk=None,
                outputs={"logits": 10})
    key = cache_key(**base)
    for change in ({"teacher_hash": hb}, {"data": {"name": "fmnist", "train_subset": 100}}, {"seed": 1},
                   {"views": 4}, {"topk": 3}):
        assert cache_key(**{**base, **change}) != key, change


def test_cache_settings_are_checked():
    assert check_cache_config(None)["mode"] == "off" and check_cache_config({"mode": False})["mode"] == "off"
    assert check_cache_config("DISK") == {"mode": "disk", "dir": None, "views": None, "topk": None}
    with pytest.raises(ConfigError, match="distill.teacher_cache.mode must be one of off, memory, disk, got 'disc'"):
        check_cache_config({"mode": "disc"})
    with pytest.raises(ConfigError, match="distill.teacher_cache.views must be a whole number >= 1, got 0"):
        check_cache_config({"mode": "memory", "views": 0})
    with pytest.raises(ConfigError, match="distill.teacher_cache.size is not a key of distill.teacher_cache"):
        check_cache_config({"size": 3})


def test_seeded_views_rebuild_the_same_augmented_image_anywhere():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (6, 1, 8, 8), dtype=torch.uint8, generator=g)
    data = SeededViewDataset(TensorImageDataset(images, torch.arange(6), [0.5], [0.25], augment=True), seed=3)
    x1, y1, i1, v1 = data[(4, 2)]
    torch.manual_seed(123)  # whatever the caller's generators hold
    x2, *_ = data[(4, 2)]
    assert torch.equal(x1, x2) and (y1, i1, v1) == (4, 4, 2)
    others = [data[(4, v)][0] for v in range(8)]
    assert len({tuple(o.flatten().tolist()) for o in others}) > 2  # other views are other augmentations
    state = torch.get_rng_state()
    data[(1, 0)]
    assert torch.equal(state, torch.get_rng_state())  # the caller's stream is untouched


def test_view_sampler_advances_views_per_epoch_and_shards_ranks():
    data = list(range(10))
    s = ViewSampler(data, seed=1, views=None, num_replicas=1, rank=0)
    s.set_epoch(3)
    assert {v for _, v in s} == {3} and sorted(i for i, _ in s) == data
    cyc = ViewSampler(data, seed=1, views=2, num_replicas=1, rank=0)
    cyc.set_epoch(5)
    assert {v for _, v in cyc} == {view_of(5, 2)} == {1}
    ranks = [ViewSampler(data, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(0)
    shards = [[i for i, _ in r] for r in ranks]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == data


def test_datamodule_gives_views_when_asked():
    dm = SyntheticDataModule(train_size=16, batch_size=8, seeded_views=True, views=3)
    dm.setup()
    _b = next(iter(dm.train_dataloader()))
    x, y, idx, views = _b["images"], _b["labels"], _b["index"], _b["view"]
    assert x.shape[0] == 8 and views.tolist() == [0] * 8 and len(set(idx.tolist())) == 8


def _metrics(run_dir: Path) -> dict:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return {k: float(v) for r in rows for k, v in r.items() if v and k.startswith("train/teacher_cache")}


def test_a_cached_run_gives_the_metrics_of_a_cold_and_an_uncached_one(synthetic_teacher, tmp_path):
    """Deterministic CPU runs: cold cache == warm cache == cache deleted; no cache differs only by fp16 rounding."""
    import shutil

    from kdx.train import run_training

    base = ["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "trainer.max_epochs=2",
            "trainer.progress_bar=none", "trainer.deterministic=true", "data.train_size=128"]
    cache = [*base, "distill.teacher_cache.mode=disk", f"distill.teacher_cache.dir={tmp_path / 'store'}"]
    cold = run_training(compose_train(cache), tmp_path / "cold")
    warm = run_training(compose_train(cache), tmp_path / "warm")
    shutil.rmtree(tmp_path / "store")
    again = run_training(compose_train(cache), tmp_path / "again")
    plain = run_training(compose_train([*base, "+data.seeded_views=true"]), tmp_path / "plain")
    assert cold["metrics"] == warm["metrics"] == again["metrics"]
    for key, value in plain["metrics"].items():
        assert value == pytest.approx(cold["metrics"][key], abs=1e-3), key
    assert _metrics(tmp_path / "warm")["train/teacher_cache_hit_rate"] == 1.0
    assert _metrics(tmp_path / "cold")["train/teacher_cache_hit_rate"] == 0.0
    # the run's record and closing summary: 128 images x 2 epochs looked up, all computed cold, all served warm
    store = str(tmp_path / "store" / Path(cold["teacher_cache"]["dir"]).name)
    assert cold["teacher_cache"] == {"mode": "disk", "dir": store, "hits": 0, "misses": 256, "hit_rate": 0.0}
    assert warm["teacher_cache"] == {"mode": "disk", "dir": store, "hits": 256, "misses": 0, "hit_rate": 1.0}
    assert "teacher_cache" not in plain
    from kdx.train import print_results

    printed = io.StringIO()
    print_results(warm, file=printed)
    assert f"teacher cache (disk, {store}): 256 hits, 0 misses (the teacher ran on 0.0% of the student's images)" \
        in printed.getvalue().replace("\n", "")


def test_an_unwritable_cache_folder_falls_back_to_computing(synthetic_teacher, tmp_path):
    from kdx.train import run_training

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    cfg = compose_train(["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "trainer.max_epochs=1",
                         "trainer.progress_bar=none", "distill.teacher_cache.mode=disk",
                         f"distill.teacher_cache.dir={blocked}"])
    with pytest.warns(UserWarning, match=r"teacher cache folder .*file/\w+ cannot be written.*computed without a cache"):
        results = run_training(cfg, tmp_path / "run")
    assert results["status"] == "completed"


@pytest.mark.slow
def test_compile_on_the_cpu_trains_and_keeps_checkpoint_names(synthetic_teacher, tmp_path):
    """trainer.compile=true: the networks are compiled in place, so checkpoints keep plain parameter names."""
    from kdx.checkpoints import load_network
    from kdx.train import run_training

    cfg = compose_train(["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "trainer.max_epochs=1",
                         "trainer.progress_bar=none", "trainer.compile=true", "data.train_size=128"])
    results = run_training(cfg, tmp_path / "run")
    assert results["status"] == "completed"
    state = torch.load(results["checkpoints"]["best"], weights_only=False)["state_dict"]
    assert state and not any("_orig_mod" in k for k in state)
    load_network(results["checkpoints"]["best"])


class NumpyAugmented(torch.utils.data.Dataset):
    """A user dataset whose augmentation draws from numpy's and python's global generators."""

    def __len__(self):
        return 100

    def __getitem__(self, i):
        import random

        return torch.tensor([i + np.random.rand(), random.random()]), i


def test_seeded_views_also_seed_python_and_numpy_when_the_dataset_uses_them():
    data = SeededViewDataset(NumpyAugmented(), seed=0)
    first = data[(7, 1)][0]
    np.random.seed(99)
    import random

    random.seed(5)
    assert torch.equal(data[(7, 1)][0], first) and data.seed_numpy and data.seed_python
    assert not torch.equal(data[(7, 2)][0], first)
    plain = SeededViewDataset(TensorImageDataset(torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.arange(4),
                                                 [0.5], [0.5], augment=True))
    plain[(0, 0)]
    assert not plain.seed_numpy and not plain.seed_python  # torch-only augmentation: the cheap path


# --------------------------------------------------------------------------- damage, extreme values, full disks
@pytest.mark.parametrize("content", [b"", b"{\"key\": \"k\", \"num_sam", b"\xff\xfe\x00", b"[1, 2]"])
def test_a_damaged_or_empty_meta_json_rebuilds_the_store_with_one_warning(tmp_path, content):
    teacher = CountingTeacher()
    x, i, v = _batch([0, 1, 2], [0, 0, 0])
    first = TeacherCache("k", 3, 1, {"logits": 5}, mode="disk", root=tmp_path)
    served = first(x, i, v, teacher)["logits"]
    (tmp_path / "k" / "meta.json").write_bytes(content)  # what a crash or a full disk leaves behind
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = TeacherCache("k", 3, 1, {"logits": 5}, mode="disk", root=tmp_path)
        rebuilt = again(x, i, v, teacher)["logits"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "meta.json cannot be read" in messages[0] and "rebuilt" in messages[0], messages
    assert teacher.rows == 6 and again.hits == 0  # nothing of the old store is served
    torch.testing.assert_close(rebuilt, served, rtol=0, atol=0)
    meta = (tmp_path / "k" / "meta.json").read_text()
    assert '"key": "k"' in meta and not list((tmp_path / "k").glob("*.tmp"))
    third = TeacherCache("k", 3, 1, {"logits": 5}, mode="disk", root=tmp_path)  # and the rebuilt store serves
    third(x, i, v, teacher)
    assert third.hits == 3 and teacher.rows == 6


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_finite_teacher_outputs_beyond_float16_range_stay_finite(tmp_path, mode):
    class Huge:
        rows = 0

        def __call__(self, x):
            self.rows += x.shape[0]
            scale = torch.tensor([1.0, -3e5, 7e4, 2e9, 1e-3])  # beyond float16's +-65504, as a face net's outputs
            return {"logits": x[:, :5] * scale}

    teacher = Huge()
    x, i, v = _batch([1, 2, 3], [0, 0, 0])
    truth = teacher(x)["logits"]
    cache = TeacherCache("k", 4, 1, {"logits": 5}, mode=mode, root=tmp_path)
    cold = cache(x, i, v, teacher)["logits"]
    warm = cache(x, i, v, teacher)["logits"]
    assert cache.hits == 3
    for served in (cold, warm):
        assert torch.isfinite(served).all()
        torch.testing.assert_close(served, truth, rtol=1e-3, atol=1e-3)  # float16's relative precision
    torch.testing.assert_close(cold, warm, rtol=0, atol=0)
    small = _batch([0], [0])  # a row within float16's range is stored as before: plain float16
    torch.testing.assert_close(cache(*small, teacher)["logits"], teacher(small[0])["logits"].half().float())
    # the KD loss on cached outputs stays finite (it became NaN when such rows were stored as +-inf)
    from kdx.losses import kd_loss

    assert torch.isfinite(kd_loss(torch.zeros_like(warm), warm, temperature=4.0))


def test_topk_rows_keep_class_indices_beyond_2048_exact():
    width, k = 5000, 3
    logits = torch.full((1, width), -5.0)
    logits[0, [4097, 2049, 4999]] = torch.tensor([9.0, 8.0, 7.0])
    cache = TeacherCache("k", 1, 1, {"logits": width}, mode="memory", topk=k)
    x, i, v = _batch([0], [0])
    cache(x, i, v, lambda _: {"logits": logits})
    served = cache(x, i, v, lambda _: {"logits": logits})["logits"]
    assert cache.hits == 1
    assert served[0].topk(3).indices.tolist() == [4097, 2049, 4999]  # float16 would have stored 4096, 2048, 5000


def test_a_claim_of_a_killed_process_not_yet_reaped_is_taken_over_at_once(tmp_path):
    import time

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        while Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
            time.sleep(0.01)
        cache = TeacherCache("k", 2, 1, {"logits": 5}, mode="disk", root=tmp_path)
        cache._claim_path(0).write_bytes(cache._stamp(pid=pid))
        assert cache._claim_is_stale(cache._claim_path(0))  # the zombie answers os.kill(pid, 0), yet it will never write
        cache._claim_path(1).write_bytes(cache._stamp(pid=os.getppid()))
        assert not cache._claim_is_stale(cache._claim_path(1))  # a live process of this node: waited for
    finally:
        os.waitpid(pid, 0)


FILL_STORE = """
import sys, warnings
import torch
from kdx.distill.cache import TeacherCache

warnings.simplefilter("always")
cache = TeacherCache("k", 2048, 1, {"logits": 1000}, mode="disk", root=sys.argv[1])  # 4 MB of rows, 1 MB disk
g = torch.Generator().manual_seed(0)
for start in range(0, 2048, 64):
    idx = torch.arange(start, start + 64)
    x = torch.randn(64, 1000, generator=g)
    out = cache(x, idx, torch.zeros(64, dtype=torch.long), lambda xs: {"logits": xs * 2})["logits"]
    assert torch.allclose(out, x * 2, rtol=1e-3, atol=1e-3)
print("writable", cache.writable, "served", cache.hits + cache.misses)
"""


def test_a_full_disk_under_the_store_stops_storing_with_one_warning_not_a_sigbus(tmp_path):
    """A real 1 MB tmpfs: rows were stored through a mapping of a sparse file, which killed the process with
    SIGBUS once the filesystem was full; now the writes raise ENOSPC, storing stops and the process goes on."""
    import subprocess
    import sys

    disk = tmp_path / "disk"
    mount_tmpfs(disk, "1m")
    try:
        done = subprocess.run([sys.executable, "-c", FILL_STORE, str(disk)], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        umount(disk)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "writable False served 2048" in done.stdout
    assert done.stderr.count("the disk is full; the teacher is computed from now on without storing") == 1, done.stderr


def test_a_run_whose_cache_disk_is_full_completes_with_one_warning(synthetic_teacher, tmp_path):
    """kdx-train in its own process, its teacher cache on a tmpfs with one page left: the run completes."""
    from conftest import run_cli

    disk = tmp_path / "disk"
    mount_tmpfs(disk, "256k")
    try:
        n = 0
        try:  # fill the filesystem page by page, then free exactly one page (for the store's meta.json)
            while True:
                (disk / f"fill{n}").write_bytes(b"x" * 4096)
                n += 1
        except OSError:
            (disk / f"fill{n}").unlink(missing_ok=True)
        (disk / "fill0").unlink()
        done = run_cli("kdx-train", "experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}",
                       "trainer.max_epochs=1", "trainer.progress_bar=none", "data.train_size=64",
                       "distill.teacher_cache.mode=disk", f"distill.teacher_cache.dir={disk}",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=240)
    finally:
        umount(disk)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert done.stderr.count("the disk is full") == 1, done.stderr[-3000:]
    import json

    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "completed"


# --------------------------------------------------------------------------- the store's identity, as the host builds it
def _image_folder(root: Path, seed: int = 0) -> Path:
    """4 classes x 8 BMP files of 16 px (a fixed file size: a replacement changes only the bytes and the mtime)."""
    from image_files import write_class_folder

    return write_class_folder(root, num_classes=4, per_class=8, size=16, fmt="BMP", seed=seed)


def _folder_args(root: Path) -> list[str]:
    return ["data=image_folder", f"data.root={root}", "data.image_size=16", "data.num_workers=0", "data.batch_size=8"]


def _store_key(teacher: Path, overrides: list[str]) -> str:
    """The key of the store the distillation host opens for this config: compose, validate, set up the real
    datamodule with the run's view settings, build the module through its task (its teacher source's cache)."""
    from kdx.configs import build_datamodule
    from kdx.tasks import validate_config

    cfg = compose_train(["experiment=synthetic/kd", f"teacher.ckpt={teacher}", "distill.teacher_cache.mode=memory",
                         *overrides])
    task = validate_config(cfg)
    dm = build_datamodule(cfg.data, task.data_options())
    dm.setup("fit")
    return task.create(dm).module.teacher_source.cache.key


def test_the_store_key_is_made_of_what_it_always_was_so_existing_stores_stay_valid(synthetic_teacher):
    """The key, rebuilt from its ingredients by hand: the teacher's weights, the data config without its loader
    settings, the datamodule's sizes and contents, the teacher spec, the seed of the views, the view scheme, top-k
    and the stored outputs with their widths (a change to any of them would orphan every store on disk)."""
    from kdx.checkpoints import load_network
    from kdx.configs import build_datamodule, to_dict
    from kdx.tasks import validate_config

    cfg = compose_train(["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "seed=5",
                         "distill.teacher_cache.mode=memory", "distill.teacher_cache.views=3", "data.train_size=32"])
    task = validate_config(cfg)
    assert task.data_options() == {"view_seed": 5, "seeded_views": True, "views": 3}
    dm = build_datamodule(cfg.data, task.data_options())
    dm.setup("fit")
    assert (dm.view_seed, dm.seeded_views, dm.view_count) == (5, True, 3)  # decided by the constructor
    cache = task.create(dm).module.teacher_source.cache
    data = {k: v for k, v in to_dict(cfg.data).items() if k not in
            ("batch_size", "eval_batch_size", "num_workers", "persistent_workers", "pin_memory", "name")}
    identity = {"data": data, "sizes": dm.describe(), "contents": dm.data_fingerprint(), "teacher": to_dict(cfg.teacher)}
    teacher = load_network(str(synthetic_teacher))[0]
    assert cache.key == cache_key(teacher_fingerprint(teacher), identity, 5, 3, None, {"logits": dm.num_classes})
    assert cache.outputs == {"logits": dm.num_classes} and cache.num_samples == 32 and cache.num_views == 3


def test_the_datamodule_gets_its_views_when_it_is_built_or_a_sentence_says_why_not(synthetic_teacher):
    from omegaconf import OmegaConf

    from kdx.configs import build_datamodule
    from kdx.errors import ConfigError
    from kdx.tasks import task_for, validate_config

    base = ["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "seed=2", "data.train_size=32"]
    task = validate_config(compose_train(base))
    assert task.data_options() == {"view_seed": 2}  # without the cache: the seed only
    cached = compose_train([*base, "distill.teacher_cache.mode=memory"])
    task = validate_config(cached)
    plain = build_datamodule(cached.data)  # built without the run's view settings
    plain.setup("fit")
    with pytest.raises(ConfigError, match=r"built with view_seed=0, seeded_views=False, but this run needs "
                                          r"view_seed=2, seeded_views=True; build it with the run's view settings"):
        task.create(plain)
    with pytest.raises(ConfigError, match=r"data.views=4 disagrees with views=None, which this run sets"):
        build_datamodule(compose_train([*base, "distill.teacher_cache.mode=memory", "+data.views=4"]).data,
                         task.data_options())
    foreign = OmegaConf.merge(cached, {"data": {"_target_": "pytorch_lightning.LightningDataModule"}})
    with pytest.raises(ConfigError, match="distill.teacher_cache needs seeded views, which LightningDataModule does "
                                          "not give; use a kdx datamodule or set distill.teacher_cache.mode=off"):
        task_for(foreign).data_options()
    assert task_for(OmegaConf.merge(foreign, {"distill": {"teacher_cache": {"mode": "off"}}})).data_options() == {}


def test_every_data_setting_and_the_files_contents_are_in_the_store_key_loader_settings_are_not(
        synthetic_teacher, tmp_path):
    """Settings that change what the teacher sees (augmentation, noise, split, seed) and the images themselves
    give another store; loader settings (batch size, workers) share it."""
    root = _image_folder(tmp_path / "images")
    folder = _folder_args(root)
    key = _store_key(synthetic_teacher, folder)
    assert _store_key(synthetic_teacher, folder) == key
    for same in (["data.batch_size=4"], ["data.num_workers=1"], ["data.pin_memory=false"]):
        assert _store_key(synthetic_teacher, [*folder, *same]) == key, same
    for change in (["data.augment=none"], ["data.augment=imagenet"], ["data.val_split=0.2"], ["data.seed=3"],
                   ["data.mean=[0.4,0.4,0.4]", "data.std=[0.2,0.2,0.2]"]):
        assert _store_key(synthetic_teacher, [*folder, *change]) != key, change
    synthetic = _store_key(synthetic_teacher, ["data.train_size=32"])
    assert _store_key(synthetic_teacher, ["data.train_size=32", "data.noise=0.3"]) != synthetic
    _image_folder(root, seed=1)  # the same names, counts and sizes; other pixels
    assert _store_key(synthetic_teacher, folder) != key


def test_fingerprints_follow_contents_and_ignore_what_does_not_change_them(tmp_path):
    from torch.utils.data import ConcatDataset, Subset

    from kdx.data.fingerprint import dataset_fingerprint, files_fingerprint

    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4)
    a = TensorImageDataset(images, torch.tensor([0, 1]), [0.5], [0.25])
    assert dataset_fingerprint(a) == dataset_fingerprint(TensorImageDataset(images.clone(), torch.tensor([0, 1]),
                                                                            [0.5], [0.25], augment=True))
    changed = images.clone()
    changed[1, 0, 3, 3] += 1  # one pixel
    assert dataset_fingerprint(TensorImageDataset(changed, torch.tensor([0, 1]), [0.5], [0.25])) != dataset_fingerprint(a)
    assert dataset_fingerprint(TensorImageDataset(images, torch.tensor([1, 0]), [0.5], [0.25])) != dataset_fingerprint(a)
    assert dataset_fingerprint(Subset(a, [1])) != dataset_fingerprint(Subset(a, [0]))
    assert dataset_fingerprint(ConcatDataset([a, a])) != dataset_fingerprint(a)
    assert dataset_fingerprint(object()) is None  # says nothing: the host warns
    from kdx.data.face import FaceImageDataset  # face folders: their (path, identity) samples, not a method

    face = tmp_path / "id0" / "a.png"
    face.parent.mkdir()
    face.write_bytes(b"png?")
    faces = FaceImageDataset([(str(face), 0)], transform=None)
    before = dataset_fingerprint(faces)
    os.utime(face, ns=(1, 10 ** 18))
    assert before is not None and dataset_fingerprint(faces) != before
    f = tmp_path / "x.bin"
    f.write_bytes(b"1234")
    first = files_fingerprint([f])
    os.utime(f, ns=(1, 10 ** 18))
    assert files_fingerprint([f]) != first
    f.unlink()
    assert files_fingerprint([f]) not in (first, files_fingerprint([tmp_path / "y.bin"]))


def test_images_replaced_in_place_get_a_fresh_store_not_the_old_teacher_outputs(synthetic_teacher, tmp_path):
    """Real BMP files, real runs: the second run is served every row (hit rate 1.0); after the images are
    replaced in place (same names, count and file sizes) the third run computes every row (hit rate 0.0)."""
    from kdx.train import run_training

    root = _image_folder(tmp_path / "images")
    args = ["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "trainer.max_epochs=1",
            "trainer.progress_bar=none", *_folder_args(root), "distill.teacher_cache.mode=disk",
            "distill.teacher_cache.views=1", f"distill.teacher_cache.dir={tmp_path / 'store'}"]
    sizes = sorted(p.stat().st_size for p in root.rglob("*.bmp"))
    run_training(compose_train(args), tmp_path / "cold")
    run_training(compose_train(args), tmp_path / "warm")
    _image_folder(root, seed=1)
    assert sorted(p.stat().st_size for p in root.rglob("*.bmp")) == sizes
    results = run_training(compose_train(args), tmp_path / "changed")
    assert results["status"] == "completed"
    rates = {run: _metrics(tmp_path / run)["train/teacher_cache_hit_rate"] for run in ("cold", "warm", "changed")}
    assert rates == {"cold": 0.0, "warm": 1.0, "changed": 0.0}
    assert len([p for p in (tmp_path / "store").iterdir() if p.is_dir()]) == 2
