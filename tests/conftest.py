"""Shared test setup: offline everything, and helpers to run kdx's console scripts as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub downloads fail at once instead of retrying for ~46 s
os.environ.setdefault("WANDB_MODE", "offline")  # W&B never goes online or prompts in tests
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
BIN = Path(sys.executable).parent


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a console-script subprocess: offline, and with a W&B service of its own.

    A test process that used W&B in-process exports WANDB_SERVICE; a child inheriting it would share that
    service, which keeps a killed child's run id "in use" and breaks resuming it.
    """
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "HF_HUB_OFFLINE": "1", "CI": "1", **extra}


def run_cli(script: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    """Run `.venv/bin/<script> args` in `cwd`; the CompletedProcess (text stdout/stderr, never a prompt)."""
    full_env = cli_env(**(env or {}))
    return subprocess.run([str(BIN / script), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def mount_tmpfs(path: Path, size: str) -> None:
    """A real small filesystem at `path` (tmpfs of `size`, e.g. "256k"), to fill up; skips where mounting is
    not allowed (not root, or a container without the capability)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the full-disk case is not tested here")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); full disk not tested")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def compose_train(overrides: list[str], return_hydra_config: bool = False):
    """The composed kdx-train config for `overrides` (no run)."""
    from hydra import compose, initialize_config_dir

    import kdx.runs  # noqa: F401  registers ${kdx.run_dir:...}

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)


@pytest.fixture(scope="session")
def synthetic_teacher(tmp_path_factory) -> Path:
    """Best checkpoint of a synthetic teacher trained once per session (in-process, ~3 s)."""
    from kdx.train import run_training

    run_dir = tmp_path_factory.mktemp("synthetic_teacher")
    cfg = compose_train(["experiment=synthetic/teacher", "trainer.max_epochs=2", "trainer.progress_bar=none"])
    results = run_training(cfg, run_dir)
    return Path(results["checkpoints"]["best"])
