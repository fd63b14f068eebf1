#!/usr/bin/env python
"""What one CRD step costs in its memory banks: kdx's scoring against the row-gathering reference, in one run.

CRD scores each sample against K+1 rows of the other network's memory bank. The reference way (and kdx's way
for few negatives) gathers those B (K+1) rows, feat_dim floats each, then multiplies; kdx, when B (K+1) rows are
at least the whole bank, scores every bank row once with one matrix product and picks the drawn columns
(kdx.losses.contrastive.ContrastMemory.bank_dots). Both give the same numbers (float summation order aside).
This times forward + backward of the banks' scoring, the NCE loss and the momentum update, for both ways,
in alternating order; the table shows the median ms per step, images/s and the gather / kdx ratio.

    python scripts/bench_crd_memory.py                        # B 128, feat_dim 128; banks of 10,000 and 50,000
    python scripts/bench_crd_memory.py --repeats 3 --steps 2  # a quick check that it runs

With a GPU the same rows are timed there too (cuda), after the CPU rows.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kdx.losses.contrastive import ContrastMemory, crd_loss  # noqa: E402


class GatherMemory(ContrastMemory):
    """The reference scoring: always gather the drawn rows, then multiply (what kdx did for every K before)."""

    def bank_dots(self, v_s, v_t, contrast_idx):
        b, k1 = contrast_idx.shape
        flat = contrast_idx.reshape(-1)
        w_t = self.memory_teacher.index_select(0, flat).reshape(b, k1, -1).to(v_s.dtype)
        w_s = self.memory_student.index_select(0, flat).reshape(b, k1, -1).to(v_s.dtype)
        return torch.bmm(w_t, v_s.unsqueeze(2)).squeeze(2), torch.bmm(w_s, v_t.unsqueeze(2)).squeeze(2)


def step_seconds(memory: ContrastMemory, batch: int, dim: int, steps: int, device: str) -> float:
    """Seconds per training step of the banks: score, loss, backward to the embeddings, update."""
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = [(F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device),
               F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device),
               torch.randint(memory.num_samples, (batch,), generator=g).to(device)) for _ in range(steps)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for v_s, v_t, idx in inputs:
        v_s.requires_grad_(True)
        v_t.requires_grad_(True)
        out_s, out_t = memory(v_s, v_t, idx)
        crd_loss(out_s, out_t, memory.num_samples).backward()
    sync()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=128, help="feat_dim of the banks (CRD's 128)")
    p.add_argument("--banks", type=int, nargs="+", default=[10_000, 50_000], help="training-set sizes")
    p.add_argument("--steps", type=int, default=5, help="steps timed per repeat")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); batch {args.batch}, feat_dim {args.dim}; "
          f"median of {args.repeats} alternating repeats of {args.steps} steps")
    header = f"{'device':<6} {'bank N':>8} {'K':>7} {'gather ms':>10} {'kdx ms':>9} {'kdx img/s':>10} {'gather/kdx':>11}"
    print(header + "\n" + "-" * len(header))
    for device in devices:
        for n in args.banks:
            for k in sorted({min(16_384, n - 1), n - 1}):
                timings = {"gather": [], "kdx": []}
                for r in range(args.repeats):
                    order = ("gather", "kdx") if r % 2 == 0 else ("kdx", "gather")
                    for name in order:
                        cls = GatherMemory if name == "gather" else ContrastMemory
                        memory = cls(args.dim, n, k, generator=torch.Generator(device=device).manual_seed(1)).to(device)
                        timings[name].append(step_seconds(memory, args.batch, args.dim, args.steps, device))
                gather, ours = statistics.median(timings["gather"]), statistics.median(timings["kdx"])
                print(f"{device:<6} {n:>8,} {k:>7,} {gather * 1e3:>10.1f} {ours * 1e3:>9.1f} "
                      f"{args.batch / ours:>10,.0f} {gather / ours:>10.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
