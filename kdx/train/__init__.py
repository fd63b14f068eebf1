"""Training runs: `run_training(cfg, run_dir)` (kdx.train.run) and its steps (kdx.train.prepare, kdx.train.build,
kdx.train.fit, kdx.train.record, kdx.train.interrupts; what identifies a run: kdx.train.identity), the pl.Trainer
it drives (kdx.train.trainer), W&B glue (kdx.train.wandb_logging), metrics.csv upkeep (kdx.train.metrics_csv) and
DDP jobs in a process of their own (kdx.train.ddp, kdx.train.ddp_worker)."""
from kdx.train.run import hparams_summary, print_results, run_config_hash, run_identity, run_training

__all__ = ["hparams_summary", "print_results", "run_config_hash", "run_identity", "run_training"]
