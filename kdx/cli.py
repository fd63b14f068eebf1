"""Console entry points. Thin: compose the config with Hydra, then call into the package."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kdx.errors import KdxError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _fail(error: KdxError) -> None:
    print(f"kdx: error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    from kdx.train import print_results, run_training

    try:
        results = run_training(cfg, _run_dir(), _task_overrides())
    except KdxError as e:
        _fail(e)
    print_results(results)
    return results["metrics"].get(results["monitor"]["metric"])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="pipeline")
def _pipeline(cfg: DictConfig) -> None:
    from hydra import compose

    from kdx.pipeline import compare_classification, run_pipeline

    try:
        run_pipeline(cfg, _run_dir(), _task_overrides(),
                     compose=lambda overrides: compose(config_name="train", overrides=overrides),
                     compare=compare_classification)
    except KdxError as e:
        _fail(e)


def train_main() -> None:
    """kdx-train: one training run (teacher, student, distillation, transfer or probe)."""
    _train()


def pipeline_main() -> None:
    """kdx-pipeline: teacher -> student alone -> student distilled -> comparison."""
    _pipeline()
