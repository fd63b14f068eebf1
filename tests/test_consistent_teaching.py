"""Consistent teaching (Beyer et al. 2022): seeded mixup/cutmix and the three teacher views.

The mixing draws are checked against their definition (a function of (seed, view, index) alone, lambda the kept
share of the own image), the mixed images against torchvision's MixUp and a hand-built cutmix, the regimes
against what the teacher is actually fed, and the teacher cache against runs without it.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import compose_train
from kdx.data import SyntheticDataModule
from kdx.data.device_batches import DeviceBatches
from kdx.data.mixing import MixDraws, MixSpec, check_mix, draw_mix, draw_one, mix_batch, mix_pair
from kdx.data.tensor_images import TensorImageDataset
from kdx.data.views import ViewRecords, ViewSampler
from kdx.errors import ConfigError

BOTH = MixSpec(mode="both")


def _images(n=12, size=8, chans=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 255, (n, chans, size, size), dtype=torch.uint8, generator=g)


def test_draws_are_a_function_of_seed_view_and_index_not_of_the_batch():
    a = draw_mix(BOTH, 5, 2, torch.tensor([3, 7, 1]), 50, (16, 16))
    b = draw_mix(BOTH, 5, 2, torch.tensor([9, 7, 3, 0]), 50, (16, 16))
    for field in MixDraws._fields:
        x, y = getattr(a, field), getattr(b, field)
        assert torch.equal(x[0], y[2]) and torch.equal(x[1], y[1]), field
    other_view = draw_mix(BOTH, 5, 3, torch.tensor([3, 7, 1]), 50, (16, 16))
    other_seed = draw_mix(BOTH, 6, 2, torch.tensor([3, 7, 1]), 50, (16, 16))
    other_stream = draw_mix(BOTH, 5, 2, torch.tensor([3, 7, 1]), 50, (16, 16), stream=1)
    for other in (other_view, other_seed, other_stream):
        assert not torch.equal(other.lam, a.lam)


def test_lambda_is_the_kept_share_of_the_own_image():
    n, hw = 4000, (16, 20)
    d = draw_mix(BOTH, 0, 0, torch.arange(n), n, hw)
    mixed = d.partner != torch.arange(n)
    assert float(mixed.float().mean()) > 0.99  # prob=1: every image mixed (but for partner == itself)
    cut = d.cut & mixed
    assert 0.45 < float(cut[mixed].float().mean()) < 0.55  # switch_prob 0.5
    area = (d.box[:, 2] - d.box[:, 0]) * (d.box[:, 3] - d.box[:, 1])
    assert torch.allclose(d.lam[cut], 1 - area[cut].float() / (hw[0] * hw[1]))
    assert abs(float(d.lam[mixed & ~d.cut].mean()) - 0.5) < 0.03  # Beta(1, 1) is uniform: mean 0.5
    assert bool((d.box[~cut] == 0).all()) and bool((d.lam[~mixed] == 1).all())
    assert bool((d.box[:, 0] >= 0).all() & (d.box[:, 2] <= hw[0]).all() & (d.box[:, 3] <= hw[1]).all())
    skewed = draw_mix(MixSpec(mode="mixup", mixup_alpha=0.2), 0, 0, torch.arange(n), n, hw)
    extreme = ((skewed.lam < 0.1) | (skewed.lam > 0.9)).float().mean()
    assert float(extreme) > 0.5  # Beta(0.2, 0.2) puts most of its mass near 0 and 1
    none = draw_mix(MixSpec(mode="cutmix", prob=0.0), 0, 0, torch.arange(50), 50, hw)
    assert bool((none.lam == 1).all()) and torch.equal(none.partner, torch.arange(50))


def test_mixup_equals_torchvisions_for_the_same_lambda_and_partner(monkeypatch):
    from torchvision.transforms import v2

    x = torch.rand(6, 3, 8, 8)
    labels = torch.arange(6)
    mixup = v2.MixUp(num_classes=6, alpha=1.0)
    monkeypatch.setattr(mixup._dist, "sample", lambda *a: torch.tensor(0.3))
    reference, _ = mixup(x, labels)  # pairs each image with the one before it (a roll by one)
    partner = torch.roll(torch.arange(6), 1)
    draws = MixDraws(partner, torch.full((6,), 0.3), torch.zeros(6, 4, dtype=torch.long), torch.zeros(6, dtype=torch.bool))
    assert torch.allclose(mix_batch(x, x[partner], draws), reference, atol=1e-6)


def test_cutmix_pastes_the_partners_box_and_one_image_equals_the_batch():
    own, other = torch.rand(2, 3, 10, 12), torch.rand(2, 3, 10, 12)
    draws = MixDraws(torch.tensor([1, 0]), torch.tensor([1 - 12 / 120, 0.25]), torch.tensor([[2, 3, 5, 7], [0, 0, 0, 0]]),
                     torch.tensor([True, False]))
    out = mix_batch(own, other, draws)
    expected = own[0].clone()
    expected[:, 2:5, 3:7] = other[0, :, 2:5, 3:7]
    assert torch.equal(out[0], expected)
    assert torch.allclose(out[1], 0.25 * own[1] + 0.75 * other[1])
    for i in range(2):  # the per-image path (loader workers) gives the same bits
        one = mix_pair(own[i], other[i], float(draws.lam[i]), tuple(draws.box[i].tolist()), bool(draws.cut[i]))
        assert torch.equal(one, out[i])


def test_mix_settings_are_checked_by_name():
    assert not check_mix(None).active and check_mix({"mode": "cutmix"}).mode == "cutmix"
    with pytest.raises(ConfigError, match="data.mix.mode must be one of off, mixup, cutmix, both, got 'mixupp'"):
        check_mix({"mode": "mixupp"})
    with pytest.raises(ConfigError, match="data.mix.mixup_alpha must be > 0"):
        check_mix({"mode": "mixup", "mixup_alpha": 0})
    with pytest.raises(ConfigError, match="data.mix.prob must be a probability in"):
        check_mix({"mode": "mixup", "prob": 1.5})
    with pytest.raises(ConfigError, match="data.mix.alpha is not a mixing setting"):
        check_mix({"alpha": 1.0})
    with pytest.raises(ConfigError, match="data.teacher_view must be one of consistent, fixed, independent"):
        SyntheticDataModule(teacher_view="clean")


def _records(teacher_view: str, mix=BOTH, seed=3):
    images = _images()
    data = TensorImageDataset(images, torch.arange(12) % 3, [0.5], [0.25], augment=True)
    return ViewRecords(data, seed, mix, teacher_view, clean=data.without_augmentation()), data


def test_records_follow_the_regime_and_rebuild_the_same_views_anywhere():
    consistent, data = _records("consistent")
    r = consistent[(4, 2)]
    assert "teacher_images" not in r and set(r) >= {"images", "labels", "index", "view", "partner_labels", "lam"}
    partner, lam, box, cut = draw_one(BOTH, 3, 2, 4, 12, (8, 8))
    assert float(r["lam"]) == pytest.approx(lam) and int(r["partner_labels"]) == partner % 3
    again, _ = _records("consistent")
    assert torch.equal(again[(4, 2)]["images"], r["images"])  # a fresh process rebuilds the same mixed image
    assert not torch.equal(consistent[(4, 3)]["images"], r["images"])  # another view, another image

    fixed, clean_data = _records("fixed")
    f = fixed[(4, 2)]
    assert torch.equal(f["images"], r["images"])  # the student's image does not depend on the regime
    assert torch.equal(f["teacher_images"], clean_data.without_augmentation()[4][0]) and int(f["teacher_view"]) == 0

    independent, _ = _records("independent")
    i = independent[(4, 2)]
    assert torch.equal(i["images"], r["images"]) and not torch.equal(i["teacher_images"], r["images"])
    assert torch.equal(_records("independent")[0][(4, 2)]["teacher_images"], i["teacher_images"])


def test_loader_workers_and_ranks_see_the_same_mixed_images():
    records, _ = _records("independent")
    sampler = ViewSampler(records, seed=3, num_replicas=1, rank=0)
    one = list(DataLoader(records, sampler=sampler, batch_size=4))
    two = list(DataLoader(records, sampler=sampler, batch_size=4, num_workers=2))
    for a, b in zip(one, two):
        assert all(torch.equal(a[k], b[k]) for k in a)
    ranks = [list(DataLoader(records, sampler=ViewSampler(records, seed=3, num_replicas=2, rank=r), batch_size=3))
             for r in (0, 1)]
    by_index = {int(i): img for batches in ranks for b in batches for i, img in zip(b["index"], b["images"])}
    for b in one:
        for i, img in zip(b["index"], b["images"]):
            assert torch.equal(by_index[int(i)], img)


def test_device_batches_mix_with_the_same_draws():
    images, labels = _images(), torch.arange(12) % 3
    kw = dict(mean=[0.5], std=[0.25], batch_size=5, train=True, augment=True, seed=1, mix=BOTH)
    for regime in ("consistent", "fixed", "independent"):
        batches = list(DeviceBatches(images, labels, teacher_view=regime, **kw))
        b = batches[0]
        draws = draw_mix(BOTH, 1, 0, b["index"], 12, (8, 8))
        assert torch.equal(b["lam"], draws.lam) and torch.equal(b["partner_labels"], labels[draws.partner])
        plain = DeviceBatches(images, labels, **{**kw, "mix": None})
        own = plain._augment(b["index"], 1, 0)
        assert torch.equal(b["images"], mix_batch(own, plain._augment(draws.partner, 1, 0), draws))
        if regime == "fixed":
            assert torch.equal(b["teacher_images"], (images[b["index"]].float() / 255 - 0.5) / 0.25)
        elif regime == "independent":
            assert not torch.equal(b["teacher_images"], b["images"])
        else:
            assert "teacher_images" not in b


def _teacher_inputs(module):
    """The batches the teacher network is run on (the teacher source's network, recorded by a pre-hook)."""
    seen = []
    module.teacher.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    return seen


@pytest.mark.parametrize("regime", ["consistent", "fixed", "independent"])
def test_the_teacher_is_fed_what_the_regime_says_to_the_bit(synthetic_teacher, regime):
    from kdx.data.base import KdxDataModule  # noqa: F401
    from kdx.tasks import task_for
    from kdx.configs import build_datamodule

    cfg = compose_train(["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "data.mix.mode=both",
                         f"data.teacher_view={regime}", "data.train_size=32"])
    task = task_for(cfg)
    dm = build_datamodule(cfg.data, task.data_options())
    dm.setup("fit")
    module = task.create(dm).module
    module.log = lambda *a, **k: None
    seen = _teacher_inputs(module)
    batch = next(iter(dm.train_dataloader()))
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and len(seen) == 1
    expected = batch["images"] if regime == "consistent" else batch["teacher_images"]
    assert torch.equal(seen[0], expected)
    assert (regime == "consistent") == torch.equal(seen[0], batch["images"])


def test_mixed_cross_entropy_is_the_lambda_weighted_sum_and_skips_unlabeled():
    from torch.nn import functional as F

    from kdx.losses import mixed_cross_entropy

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, -3.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]])
    y, y2 = torch.tensor([0, 2, 1, -1]), torch.tensor([1, 2, -1, 0])
    lam = torch.tensor([0.7, 0.4, 1.0, 0.5])
    ce = lambda i, c: float(-F.log_softmax(logits[i], 0)[c])  # noqa: E731
    expected = (0.7 * ce(0, 0) + 0.3 * ce(0, 1) + 0.4 * ce(1, 2) + 0.6 * ce(1, 2) + ce(2, 1)) / 3
    assert float(mixed_cross_entropy(logits, y, y2, lam)) == pytest.approx(expected, abs=1e-6)
    none = mixed_cross_entropy(logits, torch.full((4,), -1), y2, lam)
    assert float(none) == 0.0 and none.requires_grad is False  # no graph on plain tensors, but no error either


@pytest.mark.slow
def test_cold_warm_and_no_cache_runs_of_consistent_kd_agree(synthetic_teacher, tmp_path):
    """The cache serves mixed views: cold == warm == deleted store exactly; no cache only by fp16 rounding."""
    import shutil

    from kdx.train import run_training

    base = ["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "trainer.max_epochs=2",
            "trainer.progress_bar=none", "trainer.deterministic=true", "data.train_size=128", "data.mix.mode=both",
            "distill.temperature=1"]
    cache = [*base, "distill.teacher_cache.mode=disk", f"distill.teacher_cache.dir={tmp_path / 'store'}"]
    cold = run_training(compose_train(cache), tmp_path / "cold")
    warm = run_training(compose_train(cache), tmp_path / "warm")
    shutil.rmtree(tmp_path / "store")
    again = run_training(compose_train(cache), tmp_path / "again")
    plain = run_training(compose_train(base), tmp_path / "plain")
    assert cold["metrics"] == warm["metrics"] == again["metrics"]
    for key, value in plain["metrics"].items():
        assert value == pytest.approx(cold["metrics"][key], abs=1e-3), key
    other = run_training(compose_train([*cache, "data.mix.mode=mixup"]), tmp_path / "other")
    assert other["metrics"] != cold["metrics"]  # another mix opens another store (else it would serve wrong rows)


def test_fixed_teacher_stores_one_view_per_image(synthetic_teacher):
    from kdx.configs import build_datamodule
    from kdx.tasks import task_for

    cfg = compose_train(["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "data.teacher_view=fixed",
                         "distill.teacher_cache.mode=memory", "trainer.max_epochs=5", "data.train_size=32"])
    task = task_for(cfg)
    dm = build_datamodule(cfg.data, task.data_options())
    dm.setup("fit")
    module = task.create(dm).module
    cache = module.teacher_source.cache
    assert cache.num_views == 1 and dm.view_count is None  # the student still gets a view per epoch


@pytest.mark.parametrize("overrides, message", [
    (["experiment=synthetic/teacher", "data.mix.mode=mixup", "task=probe"], "data.mix.mode=mixup mixes images"),
    (["experiment=synthetic/teacher", "data.teacher_view=fixed"], "task=supervised has no teacher"),
])
def test_regimes_a_task_cannot_use_are_refused_by_name(overrides, message):
    from kdx.tasks import task_for

    cfg = compose_train(overrides)
    with pytest.raises(ConfigError, match=message):
        task_for(cfg).check()


@pytest.mark.slow
def test_compare_regimes_script_writes_its_table_and_reuses_finished_runs(tmp_path):
    """scripts/compare_regimes.py on the synthetic data: two regimes, one seed, one schedule; a rerun trains nothing."""
    import csv
    import importlib.util
    import json

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("compare_regimes", REPO / "scripts" / "compare_regimes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--data", "synthetic", "--epochs", "1", "--seeds", "0", "--regimes", "fixed", "consistent",
            "--no-student", "--out", str(tmp_path), "--", "trainer.progress_bar=none", "data.num_workers=0"]
    assert script.main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "regimes.csv")))
    assert [r["method"] for r in rows] == ["fixed", "consistent"] and all(r["status"] == "completed" for r in rows)
    assert all(r["command"].startswith("kdx-train experiment=synthetic/consistent") for r in rows)
    assert (tmp_path / "regimes.png").is_file() and "| consistent |" in (tmp_path / "regimes.md").read_text()
    assert script.main(argv) == 0
    again = json.loads((tmp_path / "regimes.json").read_text())["runs"]
    assert all(r["reused"] for r in again)
