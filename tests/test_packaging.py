"""kdx as a library: the wheel carries every config, and its CLIs run from any folder with only the wheel's files.

The wheel is built from this checkout and unpacked with `pip install --no-deps --target`; the job then runs in
a python started with -S (no site processing), so the editable install of the checkout (a .pth finder) is not
seen, and kdx, kdx.conf and the Hydra launcher plugin can only come from the unpacked wheel.
"""
import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("kdx-*.whl")
    return found


def test_the_wheel_carries_every_config_of_the_checkout(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"kdx/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert {"kdx/conf/train.yaml", "kdx/conf/pipeline.yaml", "kdx/conf/experiment/fmnist_fewlabels.yaml",
            "kdx/conf/__init__.py"} <= names
    assert expected <= names, sorted(expected - names)[:5]
    assert any(n.startswith("hydra_plugins/kdx_launcher/") for n in names)
    assert not any(n.startswith(("tests/", "conf/")) for n in names)  # configs live inside the package only


def test_a_job_runs_from_another_folder_with_only_the_wheels_files(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir = elsewhere / "run"
    deps = sysconfig.get_paths()["purelib"]  # torch, hydra, ... (but no .pth files, so not the checkout)
    script = (
        "import sys\n"
        f"sys.path[:0] = [{str(site)!r}, {deps!r}]\n"
        "import kdx, kdx.conf\n"
        "print('KDX_FROM', kdx.__file__, kdx.conf.__file__)\n"
        "from kdx.cli import train_main\n"
        "sys.argv = ['kdx-train', 'experiment=synthetic/teacher', 'trainer.max_epochs=1', 'trainer.progress_bar=none',"
        " 'data.train_size=64', 'data.val_size=16', 'data.test_size=16', 'logger=csv',"
        f" 'hydra.run.dir={run_dir}']\n"
        "train_main()\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-S", "-c", script], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    origin = next(line for line in proc.stdout.splitlines() if line.startswith("KDX_FROM")).split()[1:]
    assert all(Path(p).is_relative_to(site) for p in origin), origin  # not the checkout's kdx
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["metrics"]["test/acc1"] >= 0
