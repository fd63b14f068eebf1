"""The InsightFace verification protocol on a hand-worked example."""
import math

import numpy as np
import pytest
import torch

from kdx.errors import DataError
from kdx.metrics.verification import VerificationMetric, kfold_indices, roc_auc, verification_metrics


def _pair(sq_dist, rng_angle):
    """Two unit vectors at squared L2 distance `sq_dist`, rotated by `rng_angle`."""
    phi = math.acos(1 - sq_dist / 2)
    return [math.cos(rng_angle), math.sin(rng_angle)], [math.cos(rng_angle + phi), math.sin(rng_angle + phi)]


def _example():
    """20 pairs (10 folds of 2): folds = (positive, negative); pair 0 is a hard positive (dist 1.7)."""
    emb, same = [], []
    for i in range(20):
        positive = i % 2 == 0
        d = (1.7 if i == 0 else 0.255) if positive else 1.5
        a, b = _pair(d, 0.3 * i)
        scale = 1.0 + i  # norms must not matter
        emb += [[scale * v for v in a], [scale * v for v in b]]
        same.append(positive)
    return np.array(emb), np.array(same)


def test_hand_worked_example():
    emb, same = _example()
    m = verification_metrics(emb, same, nrof_folds=10)
    # fold 0: threshold 0.26 learnt on the other folds misses the hard positive -> 1/2; the 9 others -> 1
    assert m["accuracy"] == pytest.approx(0.95)
    assert m["accuracy_std"] == pytest.approx(0.15)
    assert m["best_threshold"] == pytest.approx(0.26)
    assert m["auc"] == pytest.approx(0.9)  # 9 of 10 positives beat all 10 negatives
    assert m["tar@far=1e-1"] == pytest.approx(0.9)
    assert m["tar@far=1e-3"] == pytest.approx(0.9)
    assert "tar@far=1e-4" not in m  # 10 negatives cannot measure FAR 1e-4
    assert m["num_positive"] == 10 and m["num_negative"] == 10


def test_flipped_embeddings_are_added():
    emb, same = _example()
    assert verification_metrics(emb, same, flipped_embeddings=emb) == verification_metrics(emb, same)
    # flipped embeddings that undo the hard positive's error
    flipped = emb.copy()
    flipped[1] = emb[0] * 100
    assert verification_metrics(emb, same, flipped_embeddings=flipped)["accuracy"] == pytest.approx(1.0)


def test_kfold_like_sklearn():
    folds = kfold_indices(23, 10)
    assert [len(f) for f in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.concatenate(folds).tolist() == list(range(23))


def test_auc_ties_and_errors():
    assert roc_auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    with pytest.raises(DataError, match="interleaved"):
        verification_metrics(np.zeros((5, 2)), [True, False])


def test_metric_accumulates_out_of_order_with_duplicates():
    emb, same = _example()
    emb_t = torch.tensor(emb, dtype=torch.float32)
    per_image = torch.tensor(np.repeat(same, 2))
    metric = VerificationMetric()
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    order = torch.cat([order, order[:3]])  # DistributedSampler-style padding repeats
    for chunk in order.split(7):
        metric.update(emb_t[chunk], per_image[chunk], chunk)
    got = metric.compute()
    assert got["accuracy"] == pytest.approx(0.95) and got["auc"] == pytest.approx(0.9)
    metric.reset()
    metric.update(emb_t[:10], per_image[:10])
    with pytest.raises(DataError, match="not all present"):
        metric.update(emb_t[20:], per_image[20:], torch.arange(20, 40))
        metric.compute()


def _ddp_worker(rank, world, port, result_dir):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    emb, same = _example()
    emb_t, per_image = torch.tensor(emb, dtype=torch.float32), torch.tensor(np.repeat(same, 2))
    indices = torch.cat([torch.arange(40), torch.arange(2)])[rank::world]  # DistributedSampler: padded, strided
    metric = VerificationMetric()
    for chunk in indices.split(5):
        metric.update(emb_t[chunk], per_image[chunk], chunk)
    out = metric.compute()
    with open(f"{result_dir}/{rank}.txt", "w") as f:
        f.write(f"{out['accuracy']} {out['auc']}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_metric_under_ddp_gathers_all_pairs(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        acc, auc = map(float, (tmp_path / f"{rank}.txt").read_text().split())
        assert acc == pytest.approx(0.95) and auc == pytest.approx(0.9)
