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
    for chunk in indices.split(5):  # flipped = the images themselves: the same numbers, but a state to gather too
        metric.update(emb_t[chunk], per_image[chunk], chunk, flipped=emb_t[chunk])
    out = metric.compute()
    with open(f"{result_dir}/{rank}.txt", "w") as f:
        f.write(f"{out['accuracy']} {out['auc']}")
    dist.destroy_process_group()


def test_metric_under_ddp_gathers_all_pairs(tmp_path):
    """Two gloo ranks, each holding every other image (with DistributedSampler's padding): after the states'
    synchronisation both ranks report what one process seeing every image reports."""
    import socket

    import torch.multiprocessing as mp

    emb, same = _example()
    alone = VerificationMetric()
    alone.update(torch.tensor(emb, dtype=torch.float32), torch.tensor(np.repeat(same, 2)),
                 flipped=torch.tensor(emb, dtype=torch.float32))
    assert (alone.compute()["accuracy"], alone.compute()["auc"]) == (pytest.approx(0.95), pytest.approx(0.9))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        acc, auc = map(float, (tmp_path / f"{rank}.txt").read_text().split())
        assert acc == pytest.approx(0.95) and auc == pytest.approx(0.9)


def _protocol_by_hand(emb, same, flipped, k, fars):
    """The whole protocol in plain Python loops, written from its description (not from the code under test)."""
    rows = [[a + b for a, b in zip(r, f)] for r, f in zip(emb, flipped)] if flipped is not None else emb
    rows = [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in rows]
    dist = [sum((a - b) ** 2 for a, b in zip(rows[2 * i], rows[2 * i + 1])) for i in range(len(same))]
    n = len(same)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    starts = [sum(sizes[:i]) for i in range(k)]
    thresholds = [i * 0.01 for i in range(400)]
    accs, best = [], []
    for start, size in zip(starts, sizes):
        test = set(range(start, start + size))
        train = [i for i in range(n) if i not in test]
        train_acc = [sum((dist[i] < t) == same[i] for i in train) / len(train) for t in thresholds]
        t = thresholds[train_acc.index(max(train_acc))]  # the first of the best
        best.append(t)
        accs.append(sum((dist[i] < t) == same[i] for i in test) / size)
    mean = sum(accs) / k
    pos = [-dist[i] for i in range(n) if same[i]]
    neg = [-dist[i] for i in range(n) if not same[i]]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    out = {"accuracy": mean, "accuracy_std": math.sqrt(sum((a - mean) ** 2 for a in accs) / k),
           "best_threshold": sum(best) / k, "auc": wins / (len(pos) * len(neg)),
           "num_pairs": n, "num_positive": len(pos), "num_negative": len(neg)}
    ranked = sorted(neg, reverse=True)
    for far in fars:
        if far >= 1e-3 or far >= 1.0 / len(neg):
            allowed = math.floor(far * len(neg) + 1e-9)
            thr = ranked[allowed] if allowed < len(ranked) else -math.inf
            key = f"tar@far=1e{round(math.log10(far))}" if abs(math.log10(far) - round(math.log10(far))) < 1e-9 \
                else f"tar@far={far:g}"
            out[key] = sum(p > thr for p in pos) / len(pos)
    return out


@pytest.mark.parametrize("k, flipped", [(10, False), (7, True), (3, False)])
def test_protocol_matches_a_brute_force_reading_of_its_description(k, flipped):
    """Random embeddings (no ties, uneven folds, positives closer on average but overlapping) and a few exact
    duplicate pairs (ties): every number equals the brute-force protocol's."""
    g = np.random.default_rng(k)
    n = 53
    same = [bool(v) for v in g.random(n) < 0.45]
    emb = []
    for s in same:
        a = g.normal(size=6)
        b = a + g.normal(size=6) * (0.8 if s else 2.5)
        emb += [list(a * g.uniform(0.5, 3)), list(b * g.uniform(0.5, 3))]
    emb[10:12], emb[30:32] = emb[4:6], emb[4:6]  # tied distances
    same[5], same[15] = same[2], not same[2]
    flips = [list(np.asarray(r) + g.normal(size=6) * 0.3) for r in emb] if flipped else None
    fars = (0.3, 0.1, 0.05, 1e-2, 1e-3, 1e-4)
    expected = _protocol_by_hand(emb, same, flips, k, fars)
    got = verification_metrics(np.array(emb), np.array(same), np.array(flips) if flipped else None,
                               nrof_folds=k, far_targets=fars)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert 0.6 < got["accuracy"] < 1.0 and 0.5 < got["auc"] < 1.0  # a real, imperfect separation


def test_far_keys_and_which_targets_are_reported():
    from kdx.metrics.verification import far_key
    assert [far_key(f) for f in (1e-1, 1e-3, 1e-6, 0.05, 0.25)] == \
        ["tar@far=1e-1", "tar@far=1e-3", "tar@far=1e-6", "tar@far=0.05", "tar@far=0.25"]
    rows = np.eye(4)[[0, 0, 0, 1, 0, 2, 0, 3] * 25]  # 100 pairs: 25 same (identical rows), 75 different
    same = np.array([True, False, False, False] * 25)
    out = verification_metrics(rows, same, far_targets=(1e-2, 1e-3, 1e-4, 0.02))
    # targets under 1e-3 are reported only when the negatives can measure them (FAR >= 1 / 75)
    assert set(k for k in out if k.startswith("tar")) == {"tar@far=1e-2", "tar@far=1e-3", "tar@far=0.02"}


def test_exact_ties_with_the_threshold_count_as_different():
    """`distance < threshold` means same: a pair exactly at the threshold is called different, in tuning and in
    scoring. Fold A (same at d = 2, different at d = 2) tunes the threshold to 0; fold B holds an identical pair
    (d = 0) labelled different, which threshold 0 must call different."""
    e1, e2, z = [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]
    emb = np.array([e1, e2, e1, e2, z, z, e1, e2])  # distances 2, 2, 0, 2 (exact)
    out = verification_metrics(emb, [True, False, False, True], nrof_folds=2)
    assert out["best_threshold"] == 0.0 and out["accuracy"] == 0.5
    # all same pairs at exactly 2 and different ones at 4: the first threshold that separates them is 2.01
    far = np.array([e1, e2, e1, [-1.0, 0.0]] * 4)
    out = verification_metrics(far, [True, False] * 4, nrof_folds=2)
    assert out["accuracy"] == 1.0 and out["best_threshold"] == pytest.approx(2.01, abs=1e-12)


def test_tar_at_far_edges():
    from kdx.metrics.verification import tar_at_far
    sim = np.array([0.9, 0.5, 0.5, 0.2, 0.7, 0.1])
    flags = np.array([1, 1, 0, 0, 0, 0])  # 0/1 integers are flags, not indices
    assert tar_at_far(sim, flags, 0.25) == (0.5, 0.25)  # 1 false accept allowed: threshold 0.5; a tie is rejected
    assert tar_at_far(sim, flags, 1.0) == (1.0, 1.0)  # every negative allowed: accept everything
    assert tar_at_far(sim[:3], flags[:3], 0.5) == (0.5, 0.0)  # one negative: floor(0.5) = 0 false accepts
    assert all(math.isnan(v) for v in tar_at_far(sim[:2], flags[:2], 0.1))  # no negatives
    assert all(math.isnan(v) for v in tar_at_far(sim[2:], flags[2:], 0.1))  # no positives
    assert roc_auc(sim, flags) == pytest.approx((4 + 2.5) / 8)  # 0/1 flags; the tie at 0.5 counts half
    assert math.isnan(roc_auc(sim[2:], flags[2:])) and math.isnan(roc_auc(sim[:2], flags[:2]))


def test_verification_inputs_are_checked_and_folds_default_to_ten():
    rng = np.random.default_rng(0)
    emb, same = rng.normal(size=(40, 3)), rng.random(20) < 0.5
    assert verification_metrics(emb, same) == verification_metrics(emb, same, nrof_folds=10)
    assert verification_metrics(emb, same) != verification_metrics(emb, same, nrof_folds=5)
    with pytest.raises(DataError, match="39 embeddings do not make 20 interleaved pairs"):
        verification_metrics(emb[:39], same)
    with pytest.raises(DataError, match="cannot be cut into 21 folds"):
        verification_metrics(emb, same, nrof_folds=21)
    assert len(kfold_indices(20, 20)) == 20  # one pair per fold is allowed
    with pytest.raises(DataError, match="cannot be cut into 1 folds"):
        kfold_indices(20, 1)


def test_metric_without_indices_with_flips_and_settings_equals_the_function():
    """Batches in order (no indices), flipped embeddings, 5 folds and custom FAR targets reach the protocol."""
    rng = np.random.default_rng(3)
    emb = torch.tensor(rng.normal(size=(30, 4)), dtype=torch.float32)
    flips = emb + torch.tensor(rng.normal(size=(30, 4)) * 0.5, dtype=torch.float32)
    pair_same = rng.random(15) < 0.5
    per_image = torch.tensor(np.repeat(pair_same, 2))
    m = VerificationMetric(nrof_folds=5, far_targets=(0.2, 0.1))
    for lo, hi in ((0, 8), (8, 20), (20, 30)):
        m.update(emb[lo:hi], per_image[lo:hi], flipped=flips[lo:hi])
    got = m.compute()
    want = verification_metrics(emb, pair_same, flips, nrof_folds=5, far_targets=(0.2, 0.1))
    assert got == want and set(k for k in got if k.startswith("tar")) == {"tar@far=0.2", "tar@far=1e-1"}
    assert got != verification_metrics(emb, pair_same, None, nrof_folds=5, far_targets=(0.2, 0.1))
    # after a DDP sync the list states arrive as tensors, an empty one (no flips) as an empty tensor
    synced = VerificationMetric(nrof_folds=5, far_targets=(0.2, 0.1))
    synced.embeddings, synced.issame = emb[[1, 0, *range(2, 30)]], per_image[[1, 0, *range(2, 30)]]
    synced.indices, synced.flipped = torch.tensor([1, 0, *range(2, 30)]), torch.empty(0)
    assert synced.compute() == verification_metrics(emb, pair_same, None, nrof_folds=5, far_targets=(0.2, 0.1))


def test_far_targets_under_one_in_a_thousand_need_enough_negatives():
    """A target below 1e-3 is reported only when the negatives can measure it: FAR >= 1 / negatives, inclusive."""
    rng = np.random.default_rng(5)
    n_pos, n_neg = 300, 2000
    emb = rng.normal(size=(2 * (n_pos + n_neg), 8))
    same = np.array([True] * n_pos + [False] * n_neg)
    out = verification_metrics(emb, same, far_targets=(9e-4, 5e-4, 4e-4), nrof_folds=2)
    assert {k for k in out if k.startswith("tar")} == {"tar@far=0.0009", "tar@far=0.0005"}  # 1/2000 = 5e-4 counts
    only_pos = verification_metrics(emb[:20], same[:10] | True, far_targets=(1e-4, 1e-1), nrof_folds=2)
    assert math.isnan(only_pos["tar@far=1e-1"]) and "tar@far=1e-4" not in only_pos  # no negatives, no division


def test_degenerate_label_sets_give_nan_without_numpy_warnings():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(roc_auc([0.3, 0.2], [True, True])) and math.isnan(roc_auc([0.3, 0.2], [0, 0]))
