"""The mutation gate's own bookkeeping (scripts/mutation.py, docs/mutation.md), without running mutmut."""
import ast
import importlib.util
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    cwd = os.getcwd()
    try:
        spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts" / "mutation.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        os.chdir(cwd)


def _functions(path: Path) -> set[str]:
    """mutmut's names for the functions of a file: x_name, xǁClassǁmethod."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(f"x_{node.name}")
        elif isinstance(node, ast.ClassDef):
            names |= {f"xǁ{node.name}ǁ{f.name}" for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_every_scope_pattern_names_code_that_exists():
    """A renamed function would silently drop out of the gate: each pattern must match a function of its module."""
    m = _script()
    for module, patterns in m.SCOPE.items():
        path = ROOT / Path(*module.split("."))
        files = sorted(path.glob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
        functions = set().union(*(_functions(f) for f in files))
        for pattern in patterns:
            stem = pattern.rstrip("*").rstrip("_")
            assert pattern == "*" or any(f == stem or f.startswith(stem) for f in functions), (module, pattern)


def test_every_listed_survivor_is_in_scope_and_says_why():
    m = _script()
    listed = m.listed_equivalents()
    assert len(listed) > 50
    rows = [r for r in (ROOT / "docs" / "mutation.md").read_text().splitlines() if re.match(r"^\| `kdx\.[^`]*__mutmut_", r)]
    assert len(rows) == len(listed)
    for name, row in zip(sorted(listed), sorted(rows)):
        assert m.module_of(name), f"{name} is listed in docs/mutation.md but is outside SCOPE"
        assert row.rstrip("|").rsplit("|", 1)[-1].strip(), f"{name}: no reason given"


def test_module_of_reads_methods_and_subpackages():
    m = _script()
    assert m.module_of("kdx.lit.distill.xǁDistillationModuleǁtraining_step__mutmut_3") == "kdx.lit.distill"
    assert m.module_of("kdx.lit.distill.xǁDistillationMixinǁconfigure_teacher_cache__mutmut_1") is None  # not in scope
    assert m.module_of("kdx.distill.methods.dkd.xǁDKDǁforward__mutmut_1") == "kdx.distill.methods"
    assert m.module_of("kdx.data.recordio.xǁRecordIOWriterǁwrite__mutmut_1") is None  # the writer is not the reader
