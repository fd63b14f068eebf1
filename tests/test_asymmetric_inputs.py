"""Checks on inputs without accidental symmetry: each case is one a wrong formula would get wrong.

Untied negatives for TAR@FAR, distances beyond 2 for the threshold grid, folds that disagree for the
threshold tuning, non-square non-diagonal margin-head weights, teachers that are not unit length, a
RecordIO record with a one-element label array, and L2-SP next to distillation. Every expected value is
computed here, by hand or with float64 numpy, not with the code under test.
"""
import math

import numpy as np
import pytest
import torch

from kdx.data.recordio import IRHeader, pack_header, unpack_header
from kdx.losses.face import embedding_mse_loss
from kdx.models.margin_heads import CombinedMarginHead
from kdx.metrics.verification import tar_at_far, verification_metrics


def _pairs_at(distances):
    """Interleaved unit-vector pairs whose squared distances are `distances` (d = 2 - 2 cos)."""
    rows = []
    for d in distances:
        phi = math.acos(1 - d / 2)
        rows += [[1.0, 0.0], [math.cos(phi), math.sin(phi)]]
    return np.array(rows)


def test_tar_at_far_allows_at_most_the_target_share_of_untied_negatives():
    negatives = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    positives = [0.95, 0.75, 0.65, 0.5]
    sim = np.array(negatives + positives)
    same = np.array([False] * 10 + [True] * 4)
    # FAR 0.25 of 10 negatives allows floor(2.5) = 2 false accepts: threshold 0.7 (strictly above it accepted)
    tar, far = tar_at_far(sim, same, 0.25)
    assert (tar, far) == (0.5, 0.2)  # a ceil would accept 3 negatives (FAR 0.3 > 0.25) and 3 positives
    assert tar_at_far(sim, same, 0.1) == (0.25, 0.1)


def test_the_threshold_grid_reaches_distances_beyond_two():
    # every pair is far apart (cos < 0), positives at d = 3.0 and negatives at d = 3.9: only a threshold
    # between them separates the pairs, so a grid cut at 2 would call every pair different (accuracy 0.5)
    dist = [3.0, 3.9] * 10
    out = verification_metrics(_pairs_at(dist), [True, False] * 10, nrof_folds=2)
    assert out["accuracy"] == 1.0 and 3.0 < out["best_threshold"] <= 3.9


def test_each_fold_is_scored_with_the_threshold_tuned_on_the_other_folds():
    # fold 0: same at d=1.0, different at 1.5; fold 1: same at 1.7, different at 2.5. Tuned on fold 1 the
    # threshold is about 1.71, which calls fold 0's different pair the same; tuned on fold 0 it is about 1.01,
    # which calls fold 1's same pair different: 0.5 in each fold. A threshold tuned on the test fold too gets 1.
    out = verification_metrics(_pairs_at([1.0, 1.5, 1.7, 2.5]), [True, False, True, False], nrof_folds=2)
    assert out["accuracy"] == 0.5
    assert out["best_threshold"] == pytest.approx((1.71 + 1.01) / 2, abs=1e-9)


def test_margin_head_cosines_normalise_each_class_vector_of_a_non_square_weight():
    torch.manual_seed(0)
    head = CombinedMarginHead(embedding_size=3, num_classes=5, s=1.0, m1=1.0, m2=0.0, m3=0.0)
    with torch.no_grad():
        head.weight.copy_(torch.randn(5, 3) * torch.tensor([[0.2], [1.0], [3.0], [0.5], [7.0]]))
    x = torch.randn(4, 3) * 5
    w = head.weight.detach().double().numpy()
    xn = x.double().numpy()
    expected = (xn / np.linalg.norm(xn, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    assert np.allclose(head.cosine(x).detach().double().numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("easy", [False, True])
def test_arcface_margin_and_its_fallbacks_by_hand(easy):
    m = 0.5
    head = CombinedMarginHead(4, 3, s=1.0, m1=1.0, m2=m, m3=0.0, easy_margin=easy)
    cos = torch.tensor([0.9, 0.3, -0.5, -0.95], dtype=torch.float64)
    margin = [math.cos(math.acos(c) + m) for c in cos.tolist()]
    if easy:  # the margin only where cos > 0
        expected = [margin[0], margin[1], -0.5, -0.95]
    else:  # beyond theta = pi - m: cos - m sin m, which keeps decreasing in theta
        limit = math.cos(math.pi - m)
        expected = [mg if c > limit else c - m * math.sin(m) for c, mg in zip(cos.tolist(), margin)]
        assert expected[3] == pytest.approx(-0.95 - m * math.sin(m))  # -0.95 is past the limit (-0.878)
    assert torch.allclose(head.margin_target(cos), torch.tensor(expected, dtype=torch.float64), atol=1e-9)


def test_sphereface_limit_depends_on_m1():
    # m1 = 2, m2 = 0: cos(2 theta) stops decreasing at theta = pi / 2, i.e. below cos = 0
    head = CombinedMarginHead(4, 3, s=1.0, m1=2.0, m2=0.0, m3=0.1)
    cos = torch.tensor([0.5, -0.8], dtype=torch.float64)
    expected = torch.tensor([math.cos(2 * math.acos(0.5)) - 0.1, -0.8 - 0.0 - 0.1], dtype=torch.float64)
    assert torch.allclose(head.margin_target(cos), expected, atol=1e-9)  # a limit ignoring m1 gives 0.18


def test_normalised_embedding_mse_normalises_the_teacher_too():
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0], [5.0, 5.0]])  # not unit length
    s = student.double() / student.double().norm(dim=1, keepdim=True)
    t = teacher.double() / teacher.double().norm(dim=1, keepdim=True)
    expected = ((s - t) ** 2).mean().item()
    assert embedding_mse_loss(student, teacher, normalize=True).item() == pytest.approx(expected, abs=1e-7)
    assert embedding_mse_loss(student, teacher).item() == pytest.approx(((student - teacher) ** 2).mean().item())


@pytest.mark.parametrize("labels", [[7.0], [3.0, 9.0], [1.0, 2.0, 5.0]])
def test_recordio_headers_with_every_label_count(labels):
    payload = b"\x89PNG-bytes"
    header, rest = unpack_header(pack_header(IRHeader(0, labels, 11, 0), payload))
    assert header.flag == len(labels) and header.label.tolist() == labels and rest == payload
    plain, rest = unpack_header(pack_header(IRHeader(0, 4.0, 12, 0), payload))
    assert plain.flag == 0 and plain.label == 4.0 and rest == payload


def test_l2sp_is_not_scaled_by_one_minus_alpha_when_distilling():
    from kdx.distill import weigh_losses

    own = {"ce": torch.tensor(2.0), "l2sp": torch.tensor(0.5)}
    mixed = weigh_losses(own, {"kd": torch.tensor(3.0)}, {"kd": 0.5}, 0.7)
    assert mixed["ce"].item() == pytest.approx(0.3 * 2.0)  # the hard-label term takes 1 - alpha
    assert mixed["l2sp"].item() == 0.5  # the regulariser stays whole
    assert mixed["kd"].item() == pytest.approx(0.7 * 0.5 * 3.0)  # alpha x the method's weight x the raw term
