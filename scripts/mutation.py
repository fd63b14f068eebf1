"""Mutation testing of kdx's numerical core: `make mutation` (everything, ~45 min on 2 cores) or
`make mutation-quick` (the logit losses: KD, DKD, DIST, BCE, MSE; under 9 minutes from a fresh clone, install included).

mutmut (configured in pyproject.toml's [tool.mutmut]) copies kdx into ./mutants, makes every small change it
can to each function in scope (an operator, a constant, an argument...), and runs the tests that reach that
function against each change. A mutant the tests fail on is *killed*; one they pass is a *survivor*: either a
bug the tests would miss, or a change that cannot alter behaviour (an *equivalent* mutant).

This script runs mutmut over the modules of SCOPE and prints one row per module: mutants, killed,
survivors listed as equivalent in docs/mutation.md, survivors not listed, and the score (killed / mutants).
It exits 1 when a module scores under --min-score or a survivor is neither killed nor listed; a listed entry
whose recorded change no longer matches the mutant (the code moved on) counts as not listed.

    python scripts/mutation.py                  # run everything in scope, then report
    python scripts/mutation.py --quick          # the short version
    python scripts/mutation.py --only kdx.losses.logits --only kdx.metrics.verification
    python scripts/mutation.py --report         # report on the last run without running anything
    python scripts/mutation.py --survivors      # also print each unlisted survivor's diff
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.chdir(Path(__file__).resolve().parents[1])  # mutmut reads ./pyproject.toml when imported

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "mutation.md"

# module -> mutant-name patterns in scope (mutmut names a method's mutants `module.xǁClassǁmethod__mutmut_N`).
# Where a module is more than its numerical core, only the functions that compute a loss or read data count.
SCOPE: dict[str, list[str]] = {
    "kdx.losses.logits": ["*"],
    "kdx.losses.features": ["*"],
    "kdx.losses.relations": ["*"],
    "kdx.losses.contrastive": ["*"],
    "kdx.losses.face": ["*"],
    "kdx.losses.adadistill": ["*"],
    "kdx.losses.margin": ["*"],
    "kdx.models.margin_heads": ["*"],
    "kdx.distill.methods": ["*"],
    "kdx.distill.mix": ["*"],
    "kdx.lit.distill": ["x_check_alpha_*", "xǁDistillationMixinǁdistill_batch_*",
                        "xǁDistillationMixinǁ_run_student_*", "xǁDistillationMixinǁweighed_losses_*",
                        "xǁDistillationModuleǁ_student_outputs_*",
                        "xǁDistillationModuleǁtraining_step_*"],
    "kdx.lit.face": ["xǁFaceModuleǁown_losses_*", "xǁFaceModuleǁtraining_step_*"],
    "kdx.lit.face_distill": ["xǁFaceDistillationModuleǁ_student_outputs_*",
                             "xǁFaceDistillationModuleǁtraining_step_*"],
    "kdx.metrics.verification": ["*"],
    "kdx.data.recordio": ["x_unpack_header_*", "xǁRecordIOReaderǁ*", "x__whole_number_*", "x_read_property_*",
                          "xǁRecordFaceDatasetǁ*"],
}
QUICK = ["kdx.losses.logits"]  # verification would add ~15 min: its mutants run the 2-process DDP test
REFRESH_MUTANT = "kdx.losses.logits.x_check_temperature__mutmut_1"

# mutmut's verdicts that count as killed; every other one (survived, no tests, suspicious, not checked) does not
KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def run_mutmut(modules: list[str], jobs: int, names: list[str] | None = None) -> None:
    """mutmut over the scope of `modules` (or just the mutants `names`), two workers per two cores."""
    patterns = names or [f"{m}.{p}" for m in modules for p in SCOPE[m]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    mutmut = Path(sys.executable).with_name("mutmut")
    cmd = [str(mutmut), "run", "--max-children", str(jobs), *patterns]
    print("$", " ".join(cmd[:4]), f"<{len(patterns)} {'mutants' if names else 'patterns'} over {len(modules)} "
          "modules>", flush=True)
    # mutmut draws a spinner on stdout; keep only its summary lines so a log stays readable
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        for line in proc.stdout:
            line = line.rsplit("\r", 1)[-1].rsplit("⠏", 1)[-1]
            if "done" in line or "mutations/second" in line or "rror" in line or "Traceback" in line:
                print("   ", line.strip(), flush=True)
    if proc.returncode not in (0, None):
        sys.exit(f"mutmut run failed (exit {proc.returncode}); run `.venv/bin/mutmut run` by hand to see why")


def load_results() -> dict[str, str]:
    """mutmut's verdict on every mutant it has run, by mutant name."""
    from mutmut.stats import status_by_exit_code
    results: dict[str, str] = {}
    for meta in (ROOT / "mutants").glob("kdx/**/*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            results[name] = status_by_exit_code[code]
    if not results:
        sys.exit("no mutation results in ./mutants; run `make mutation` first")
    return results


def module_of(name: str) -> str | None:
    for module, patterns in SCOPE.items():
        if name.startswith(module + "."):
            rest = name[len(module) + 1:]
            if module == "kdx.distill.methods":
                rest = rest.split(".", 1)[-1]
            if any(fnmatch.fnmatchcase(rest, p) for p in patterns):
                return module
    return None


def mutant_change(name: str) -> str:
    """The mutated line(s) of a mutant, as `mutmut show` prints them after '+', joined by ' / '."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant  # after chdir: mutmut reads ./pyproject.toml
    diff = get_diff_for_mutant(name)
    return " / ".join(line[1:].strip() for line in diff.splitlines() if line.startswith("+") and
                      not line.startswith("+++"))


def listed_equivalents() -> dict[str, str]:
    """mutant name -> recorded change, from the table rows of docs/mutation.md: | `name` | `change` | why |."""
    listed = {}
    if DOC.exists():
        for m in re.finditer(r"^\|\s*`([^`]+__mutmut_\d+)`\s*\|\s*`(.*?)`\s*\|", DOC.read_text(), re.M):
            listed[m.group(1)] = m.group(2).replace("\\|", "|")
    return listed


def report(modules: list[str], min_score: float, show: bool) -> int:
    results = load_results()
    listed = listed_equivalents()
    rows, unlisted, stale = [], [], []
    for module in modules:
        names = sorted(n for n in results if module_of(n) == module)
        killed = [n for n in names if results[n] in KILLED]
        survivors = [n for n in names if n not in killed]
        equivalent = []
        for n in survivors:
            if n in listed and listed[n] == mutant_change(n):
                equivalent.append(n)
            else:
                (stale if n in listed else unlisted).append(n)
        score = len(killed) / len(names) if names else 1.0
        rows.append((module, len(names), len(killed), len(equivalent), len(survivors) - len(equivalent), score))
    print()
    print(f"| module | mutants | killed | equivalent (docs/mutation.md) | other survivors | score |")
    print(f"|---|---:|---:|---:|---:|---:|")
    for module, n, k, e, s, score in rows:
        print(f"| {module} | {n} | {k} | {e} | {s} | {score:.1%} |")
    total = sum(r[1] for r in rows)
    killed = sum(r[2] for r in rows)
    print(f"| **all** | {total} | {killed} | {sum(r[3] for r in rows)} | {sum(r[4] for r in rows)} | "
          f"{killed / max(total, 1):.1%} |")
    failed = 0
    low = [r[0] for r in rows if r[5] < min_score]
    if low:
        print(f"\nunder {min_score:.0%} killed: {', '.join(low)}")
        failed = 1
    if unlisted or stale:
        print(f"\n{len(unlisted) + len(stale)} survivors are neither killed nor listed as equivalent in "
              f"docs/mutation.md ({len(stale)} listed with a change that no longer matches); "
              "kill each with a test or list it with the reason it cannot change behaviour:")
        for n in unlisted + stale:
            print(f"| `{n}` | `{mutant_change(n)}` | |" if show else f"    {n}")
        failed = 1
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--only", action="append", choices=sorted(SCOPE), help="a module of the scope (repeatable)")
    ap.add_argument("--report", action="store_true", help="report on the last run; run nothing")
    ap.add_argument("--rerun-survivors", action="store_true",
                    help="run again only the mutants that were not killed (or are new): after adding tests")
    ap.add_argument("--survivors", action="store_true", help="print each unlisted survivor as a docs table row")
    ap.add_argument("--min-score", type=float, default=0.90)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    modules = args.only or (QUICK if args.quick else list(SCOPE))
    if args.rerun_survivors:
        # one small mutant first: mutmut regenerates the mutants of changed code (their results reset to "not
        # checked") and maps the new tests; then every in-scope mutant that is not killed runs again
        run_mutmut(modules, args.jobs, [REFRESH_MUTANT])
        results = load_results()
        names = sorted(n for n in results if module_of(n) in modules and results[n] not in KILLED)
        if names:
            run_mutmut(modules, args.jobs, names)
    elif not args.report:
        run_mutmut(modules, args.jobs)
    return report(modules, args.min_score, args.survivors)


if __name__ == "__main__":
    sys.exit(main())
