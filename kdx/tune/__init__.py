"""kdx-tune: a budgeted search over distillation methods and their main settings (Optuna >= 4, used directly).

- `kdx.tune.settings`: the `tune` config section (methods, search space, pruner, sampler, budget), checked
  before any work, each bad value one sentence naming its key;
- `kdx.tune.callback`: the Lightning callback that reports the validation metric of each epoch to the trial and
  stops a trial the pruner gives up on; Lightning finds it through kdx's `pytorch_lightning.callbacks_factory`
  entry point, so kdx.train builds its Trainer unchanged;
- `kdx.tune.study`: the study (storage, stale trials, identity), the trial loop (one kdx.train.run_training run per
  trial, in the study's folder), the worker processes of `tune.jobs`;
- `kdx.tune.report`: report.md, trials.png, best.json and the best trial as a kdx-train command;
- `kdx.tune.worker`: `python -m kdx.tune.worker SPEC`, one worker process of a parallel study.

This package is imported by every pl.Trainer through the entry point (kdx.tune.callback), so this file imports
nothing: `from kdx.tune.study import run_study` where the search is wanted.
"""
