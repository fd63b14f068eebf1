"""trainer.channels_last and trainer.compile reach every task's module, not only the classifier's."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_train
from kdx.configs import build_datamodule
from kdx.tasks import task_for


def _module(overrides):
    cfg = compose_train(overrides)
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    return task_for(cfg).create(dm).module, dm


def _first_conv(module):
    return next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("overrides", [
    ["experiment=synthetic/student"],
    ["experiment=synthetic/probe", "TEACHER"],
    ["experiment=synthetic/consistent", "TEACHER"],
    ["experiment=orl/student", "data.num_val_pairs=20", "data.num_test_pairs=20"],
])
def test_channels_last_and_compile_are_set_on_every_task(synthetic_teacher, overrides):
    overrides = [f"teacher.ckpt={synthetic_teacher}" if o == "TEACHER" else o for o in overrides]
    module, dm = _module([*overrides, "trainer.channels_last=true", "trainer.compile=true"])
    assert module.channels_last and module.compile_networks
    compiled = []
    for net in module.compiled_networks():
        net.compile = lambda net=net: compiled.append(net)  # record instead of compiling (a minute on a CPU)
    module.on_fit_start()
    assert compiled and all(isinstance(n, torch.nn.Module) for n in compiled)
    conv = _first_conv(module)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    batch = module.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["images"].is_contiguous(memory_format=torch.channels_last)
    evaluation = module.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert evaluation[0].is_contiguous(memory_format=torch.channels_last)


def test_off_by_default_leaves_layout_alone():
    module, dm = _module(["experiment=orl/student", "data.num_val_pairs=20", "data.num_test_pairs=20"])
    assert not module.channels_last and not module.compile_networks
    batch = next(iter(dm.train_dataloader()))
    assert module.on_after_batch_transfer(batch, 0) is batch
