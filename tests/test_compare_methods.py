"""scripts/compare_methods.py on the synthetic data: the method table, its files, and reuse of finished runs."""
import csv
import importlib.util
import json

from conftest import REPO

TINY = ["data.train_size=96", "data.val_size=32", "data.test_size=32", "data.batch_size=32",
        "trainer.progress_bar=none"]


def load_script():
    spec = importlib.util.spec_from_file_location("compare_methods", REPO / "scripts" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of the Markdown table's body rows."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]


def results_mtimes(out):
    return {p: p.stat().st_mtime_ns for p in sorted(out.glob("*/seed*/results.json"))}


def test_method_table_on_synthetic_data_and_rerun_reuses_finished_runs(tmp_path, capsys):
    script = load_script()
    out = tmp_path / "cmp"
    args = ["--data", "synthetic", "--methods", "kd", "dkd", "--seeds", "0", "1", "--epochs", "1",
            "--teacher-epochs", "1", "--out", str(out), "--", *TINY]
    assert script.main(args) == 0
    for name in ("methods.md", "methods.csv", "methods.json", "methods.png"):
        assert (out / name).is_file(), name
    assert (out / "methods.png").read_bytes().startswith(b"\x89PNG")

    markdown = (out / "methods.md").read_text()
    assert markdown in capsys.readouterr().out  # the table is printed at the end
    rows = table_rows(markdown)
    assert [r[0] for r in rows[:2]] == ["teacher (resnet8)", "student alone, CE (cnn_tiny)"]
    assert sorted(r[0] for r in rows[2:]) == ["dkd", "kd"]
    for row in rows:
        assert "±" in row[2], row  # test top-1 mean ± std
    for row in rows[2:]:
        assert "±" in row[3] and row[5] == "2" and row[1].startswith(("Hinton", "Zhao")), row
    means = [float(r[2].split("±")[0]) for r in rows[2:]]
    assert means == sorted(means, reverse=True)  # methods sorted by mean accuracy

    with open(out / "methods.csv", newline="") as fh:
        runs = list(csv.DictReader(fh))
    distilled = [r for r in runs if r["kind"] == "distill"]
    assert len(distilled) == 4 and all(r["status"] == "completed" for r in distilled)
    assert {(r["method"], r["seed"]) for r in distilled} == {(m, s) for m in ("kd", "dkd") for s in ("0", "1")}
    assert [r["kind"] for r in runs].count("student") == 2 and [r["kind"] for r in runs].count("teacher") == 1
    table = json.loads((out / "methods.json").read_text())["table"]
    assert all(0.0 <= r["mean"] <= 1.0 and r["s_per_epoch"] > 0 for r in table)

    # a re-run retrains nothing, and an unknown method is reported as failed without stopping the others
    before = results_mtimes(out)
    assert len(before) == 7
    assert script.main([*args[:5], "nosuch", *args[5:]]) == 0
    assert results_mtimes(out) == {**before, **{p: t for p, t in results_mtimes(out).items() if "nosuch" in str(p)}}
    with open(out / "methods.csv", newline="") as fh:
        runs = list(csv.DictReader(fh))
    assert all(r["reused"] == "True" for r in runs if r["method"] != "nosuch")
    failed = [r for r in runs if r["method"] == "nosuch"]
    assert len(failed) == 2 and all(r["status"] == "failed" and "nosuch" in r["error"] for r in failed)
    rows = table_rows((out / "methods.md").read_text())
    assert rows[-1][0] == "nosuch" and "FAILED 2/2" in rows[-1][-1]
