"""What a newcomer met, each reproduced the way it was met (the README's own class, a console command), and fixed
at its cause: a Distiller without `name`, a resumed sweep that refused its finished jobs yet said all completed,
ONNX evaluation without the export's normalisation, an explicit data.root that did not hold the data, the
console line of the previous epoch, raw errors where one sentence with the fix belongs, the loggers and the
end-of-run lines."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO, run_cli

FAST = ["trainer.max_epochs=1", "trainer.progress_bar=none"]


# ---------------------------------------------------------------- a method of one's own, as the README shows it

def _readme_method() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("**A method of your own**", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_own_method_says_name_and_registers(tmp_path, monkeypatch):
    from kdx.distill import build_distiller

    code = _readme_method()
    assert 'name = "' in code  # the paragraph shows the attribute a Distiller cannot do without
    (tmp_path / "readme_method.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    method = build_distiller("readme_method.MyMethod", {"temperature": 2.0})
    import torch

    losses = method({"student_logits": torch.randn(4, 3), "teacher_logits": torch.randn(4, 3)})
    assert set(losses) == {"my_term"} and losses["my_term"].item() >= 0


def test_a_distiller_without_name_is_told_how_to_fix_it(tmp_path, monkeypatch):
    from kdx.errors import ConfigError
    from kdx.distill import build_distiller

    code = _readme_method().replace('name = "my_method"', "pass").replace("MyMethod", "NoName")
    (tmp_path / "nameless_method.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises((ValueError, ConfigError)) as err:
        build_distiller("nameless_method.NoName")
    assert "has no `name`" in str(err.value) and 'name = "noname"' in str(err.value)


# ---------------------------------------------------------------- a resumed sweep whose configs differ

def _hydra_files(job: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((job / ".hydra").glob("*.yaml"))}


@pytest.mark.slow
def test_a_resumed_sweep_with_another_config_fails_names_the_keys_and_leaves_the_jobs(tmp_path, synthetic_teacher):
    sweep = tmp_path / "sweep"
    base = ["-m", "experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", *FAST, "distill.temperature=2,3"]
    first = run_cli("kdx-train", *base, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {job: (_hydra_files(sweep / job), (sweep / job / "results.json").read_bytes()) for job in ("0", "1")}

    refused = run_cli("kdx-train", *base, "distill.alpha=0.25", f"resume={sweep}", cwd=tmp_path)
    assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "0 job(s) completed, 2 failed" in refused.stdout
    assert "distill.alpha (0.9 -> 0.25)" in refused.stderr  # the differing key, old and new value
    for job in ("0", "1"):  # the finished jobs' files are as they were
        assert (_hydra_files(sweep / job), (sweep / job / "results.json").read_bytes()) == before[job]

    again = run_cli("kdx-train", *base, f"resume={sweep}", cwd=tmp_path)  # the settings it was made with
    assert again.returncode == 0 and "2 job(s) completed, 0 failed" in again.stdout, again.stderr[-2000:]
    assert all(_hydra_files(sweep / job) == before[job][0] for job in ("0", "1"))
