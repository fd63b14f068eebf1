"""Face verification metrics with the InsightFace / LFW protocol (numpy), and a torchmetrics wrapper.

Protocol (as in insightface `verification.py`): embeddings come interleaved, pair i = rows 2i and
2i+1; flipped-image embeddings, when given, are added to the originals; rows are L2-normalised;
the distance is the squared L2 distance (0..4); thresholds run 0, 0.01, ..., 3.99; pairs are cut
into `nrof_folds` contiguous folds (KFold without shuffle: the first `n % k` folds get one extra
pair); for each fold the threshold with the best accuracy on the other folds (first one on ties)
scores the fold (`distance < threshold` means "same"). `accuracy` is the mean over folds.
AUC and TAR@FAR use all pairs with similarity = -distance.

AUC and TAR@FAR are computed here in float64 rather than with torchmetrics' binary_auroc / binary_roc: those
cast scores to float32 (and squash them with a sigmoid), which merges nearby distances into ties and moves both
numbers by up to ~1e-3 on small pair sets; the protocol's exact rule (TAR above the (floor(FAR * negatives) + 1)-th
highest negative, ties counted half in the AUC) is kept as insightface states it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torchmetrics import Metric

from kdx.errors import DataError

DEFAULT_FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
THRESHOLDS = np.arange(0, 4, 0.01)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def kfold_indices(n: int, n_splits: int) -> list[np.ndarray]:
    """Contiguous test-fold indices, like sklearn KFold(n_splits, shuffle=False)."""
    if n_splits < 2 or n_splits > n:
        raise DataError(f"{n} pairs cannot be cut into {n_splits} folds; use 2 <= nrof_folds <= number of pairs")
    sizes = np.full(n_splits, n // n_splits)
    sizes[: n % n_splits] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(n_splits)]


def _accuracy_per_threshold(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    predict = dist[None, :] < thresholds[:, None]
    return (predict == issame[None, :]).mean(axis=1)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of `scores` (higher = more likely positive), ties counted half (Mann-Whitney U)."""
    scores = np.asarray(scores)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores)  # any order: tied scores get their average rank below
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def tar_at_far(similarity: np.ndarray, issame: np.ndarray, far: float) -> tuple[float, float]:
    """(TAR, achieved FAR) when accepting pairs with similarity above the strictest threshold allowing FAR <= far."""
    sim = np.asarray(similarity)
    issame = np.asarray(issame, dtype=bool)
    neg = np.sort(sim[~issame])[::-1]
    pos = sim[issame]
    if len(neg) == 0 or len(pos) == 0:
        return math.nan, math.nan
    k = int(np.floor(far * len(neg) + 1e-9))  # number of false accepts allowed
    threshold = neg[k] if k < len(neg) else -np.inf
    return float((pos > threshold).mean()), float((neg > threshold).mean())


def far_key(far: float) -> str:
    """Metric name of a FAR target, e.g. 1e-3 -> 'tar@far=1e-3'."""
    exp = np.log10(far)
    if abs(exp - round(exp)) < 1e-9:
        return f"tar@far=1e{int(round(exp))}"
    return f"tar@far={far:g}"


def verification_metrics(embeddings, issame, flipped_embeddings=None, nrof_folds: int = 10,
                         far_targets: Sequence[float] = DEFAULT_FAR_TARGETS) -> dict[str, float]:
    """Accuracy (10-fold), its std, best threshold, AUC and TAR@FAR of interleaved pair embeddings."""
    emb = np.asarray(_as_numpy(embeddings), dtype=np.float64)
    same = _as_numpy(issame).astype(bool).ravel()
    if emb.ndim != 2:
        raise DataError(f"embeddings must be a 2-D (2N x D) array, got shape {emb.shape}")
    if emb.shape[0] != 2 * len(same):
        raise DataError(f"{emb.shape[0]} embeddings do not make {len(same)} interleaved pairs; need exactly 2 per issame flag")
    if flipped_embeddings is not None:
        flipped = np.asarray(_as_numpy(flipped_embeddings), dtype=np.float64)
        if flipped.shape != emb.shape:
            raise DataError(f"flipped embeddings have shape {flipped.shape}, the embeddings {emb.shape}; they must match")
        emb = emb + flipped
    if not np.isfinite(emb).all():
        raise DataError("embeddings contain NaN or inf; the model diverged or the input is broken")
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    dist = ((emb[0::2] - emb[1::2]) ** 2).sum(axis=1)
    folds = kfold_indices(len(same), nrof_folds)
    accuracies, best = [], []
    for test in folds:
        train = np.ones(len(same), dtype=bool)
        train[test] = False
        acc_train = _accuracy_per_threshold(dist[train], same[train], THRESHOLDS)
        t = THRESHOLDS[int(np.argmax(acc_train))]
        best.append(t)
        accuracies.append(float(((dist[test] < t) == same[test]).mean()))
    similarity = -dist
    out: dict[str, float] = {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "best_threshold": float(np.mean(best)),
        "auc": roc_auc(similarity, same),
        "num_pairs": int(len(same)),
        "num_positive": int(same.sum()),
        "num_negative": int((~same).sum()),
    }
    n_neg = int((~same).sum())
    for far in far_targets:
        if far >= 1e-3 - 1e-15 or (n_neg > 0 and far >= 1.0 / n_neg):
            out[far_key(far)] = tar_at_far(similarity, same, far)[0]
    return out


class VerificationMetric(Metric):
    """Accumulates per-image embeddings (+ image index and pair flag) across batches and DDP ranks."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, nrof_folds: int = 10, far_targets: Sequence[float] = DEFAULT_FAR_TARGETS, **kwargs):
        """States are concatenated across processes; `compute` sorts by image index and drops duplicates."""
        super().__init__(**kwargs)
        self.nrof_folds = nrof_folds
        self.far_targets = tuple(far_targets)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("flipped", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")
        self.add_state("issame", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, issame: torch.Tensor, indices: torch.Tensor | None = None,
               flipped: torch.Tensor | None = None) -> None:
        """Add a batch: embeddings B x D, per-image pair flag B, global image index B (2i, 2i+1 = pair i)."""
        if indices is None:  # single process, batches in dataset order
            start = sum(int(e.shape[0]) for e in self.embeddings)
            indices = torch.arange(start, start + embeddings.shape[0], device=embeddings.device)
        self.embeddings.append(embeddings.detach().float())
        self.issame.append(torch.as_tensor(issame, device=embeddings.device).reshape(-1).to(torch.bool))
        self.indices.append(torch.as_tensor(indices, device=embeddings.device).reshape(-1).long())
        if flipped is not None:
            self.flipped.append(flipped.detach().float())

    def compute(self) -> dict[str, float]:
        """The verification_metrics dict of everything accumulated."""
        def cat(x):
            """A list state concatenated (after DDP sync it is already a tensor)."""
            return torch.cat(x) if isinstance(x, list) else x
        if isinstance(self.embeddings, list) and not self.embeddings:
            raise DataError("VerificationMetric.compute() was called before any update(); no embeddings were collected")
        emb, idx, same = cat(self.embeddings), cat(self.indices), cat(self.issame)
        flipped = cat(self.flipped) if (not isinstance(self.flipped, list) or self.flipped) else None
        if flipped is not None and flipped.numel() == 0:  # an empty list state comes back from DDP as a tensor
            flipped = None
        if flipped is not None and flipped.shape != emb.shape:
            raise DataError("flipped embeddings were given for some batches only; pass them with every update() or never")
        order = torch.argsort(idx)  # repeated indices are copies of one image: which copy is kept does not matter
        idx_sorted = idx[order]
        keep = torch.ones_like(idx_sorted, dtype=torch.bool)
        keep[1:] = idx_sorted[1:] != idx_sorted[:-1]  # DistributedSampler pads with repeats
        order = order[keep]
        idx_sorted = idx[order]
        if len(idx_sorted) % 2 or not torch.equal(idx_sorted.cpu(), torch.arange(len(idx_sorted))):
            raise DataError(f"verification images 0..{len(idx_sorted) - 1} are not all present once; "
                            "the evaluation loader must yield every image of the pairs dataset")
        emb = emb[order]
        pair_flags = same[order][0::2]
        flipped = flipped[order] if flipped is not None else None
        return verification_metrics(emb.cpu(), pair_flags.cpu(), flipped.cpu() if flipped is not None else None,
                                    nrof_folds=self.nrof_folds, far_targets=self.far_targets)
