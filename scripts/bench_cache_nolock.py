#!/usr/bin/env python
"""What the lock-free teacher cache costs against the locked store it replaced, in one run.

The locked store (state/crc/owner columns under an fcntl lock; kdx/distill/cache.py as of commit LOCKED_COMMIT)
is loaded from git history under another module name, next to today's store (records with a keyed BLAKE2b tag,
claims by exclusive create). Both are driven through TeacherCache's public call, the way a training step calls
it, with a teacher that costs nothing (a table lookup), so the numbers are the stores' own cost:
  - cold write: images/s of one pass over every (sample, view) into a new, empty store (every row a miss: read,
    claim, store);
  - warm read: images/s of a second pass over the same store (every row a hit: read, check, serve).
Each repeat runs old and new one after the other in alternating order, each in a fresh folder; the table shows
medians and the new/old ratio.

    python scripts/bench_cache_nolock.py                          # 20,000 images x 1 view, 10 classes, 5 repeats
    python scripts/bench_cache_nolock.py --dir /mnt/nfs/scratch   # the store where a cluster would keep it
    python scripts/bench_cache_nolock.py --samples 512 --repeats 1   # a quick check that it runs

It ends with two lines: `lock-free / locked, warm read: X` and `lock-free / locked, cold write: Y`.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kdx.distill.cache import TeacherCache  # noqa: E402

LOCKED_COMMIT = "3403b0aeb3b6d8d5a7d196aaa85fe8c889311b28"  # the last commit whose store took fcntl locks


def locked_store_class():
    """TeacherCache of LOCKED_COMMIT, imported from git history as the module kdx_locked_cache."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{LOCKED_COMMIT}:kdx/distill/cache.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"the locked store cannot be read from git commit {LOCKED_COMMIT} ({e}); run this script in a "
                 "clone of kdx with its history (not an archive or a shallow clone)")
    spec = importlib.util.spec_from_loader("kdx_locked_cache", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{LOCKED_COMMIT[:8]}:kdx/distill/cache.py", "exec"), module.__dict__)
    sys.modules["kdx_locked_cache"] = module
    return module.TeacherCache


def one_pass(cache, table: torch.Tensor, images: torch.Tensor, batch: int, views: int) -> float:
    """Images/s of one pass over every (sample, view) through `cache` (the teacher: a lookup in `table`)."""
    n = table.shape[0] // views
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for view in range(views):
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            v = torch.full_like(idx, view)
            cache(images[idx], idx, v, lambda x, rows=table[idx * views + v]: {"logits": rows})
    return n * views / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--classes", type=int, default=10, help="width of a stored row (the teacher's logits)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the stores are made (default: a temporary folder)")
    args = parser.parse_args()
    if min(args.samples, args.views, args.classes, args.batch, args.repeats) < 1:
        sys.exit("--samples, --views, --classes, --batch and --repeats must each be at least 1")
    locked = locked_store_class()
    stores = {"locked": locked, "lock-free": TeacherCache}
    g = torch.Generator().manual_seed(0)
    table = torch.randn(args.samples * args.views, args.classes, generator=g) * 4
    images = torch.zeros(args.samples, 1)  # what the teacher would see: unused by the lookup
    base = Path(tempfile.mkdtemp(prefix="kdx-bench-nolock-", dir=args.dir))
    rates = {(name, kind): [] for name in stores for kind in ("cold", "warm")}
    try:
        for r in range(args.repeats):
            for name in (list(stores) if r % 2 == 0 else list(stores)[::-1]):  # interleaved, alternating order
                root = base / f"{name}-{r}"
                cache = stores[name]("bench", args.samples, args.views, {"logits": args.classes}, mode="disk",
                                     root=root)
                rates[name, "cold"].append(one_pass(cache, table, images, args.batch, args.views))
                cache.close()
                cache = stores[name]("bench", args.samples, args.views, {"logits": args.classes}, mode="disk",
                                     root=root)  # reopened, as a second job would
                rates[name, "warm"].append(one_pass(cache, table, images, args.batch, args.views))
                assert cache.hits == args.samples * args.views, f"the {name} store did not serve its warm pass"
                cache.close()
                shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"teacher cache stores, {args.samples} samples x {args.views} views, {args.classes} classes, batch "
          f"{args.batch}; images/s, medians of {args.repeats} interleaved repeats; stores under {base.parent}")
    print(f"{'':12}{'locked':>12}{'lock-free':>12}{'ratio':>8}")
    for kind, label in (("warm", "warm read"), ("cold", "cold write")):
        print(f"{label:12}{med['locked', kind]:>12,.0f}{med['lock-free', kind]:>12,.0f}"
              f"{med['lock-free', kind] / med['locked', kind]:>8.2f}")
    print(f"lock-free / locked, warm read: {med['lock-free', 'warm'] / med['locked', 'warm']:.2f}")
    print(f"lock-free / locked, cold write: {med['lock-free', 'cold'] / med['locked', 'cold']:.2f}")


if __name__ == "__main__":
    main()
