"""The one shape of a training batch: a dict of named tensors, whatever the loader and the run.

Keys (B = batch size):

| key | always | what |
|---|---|---|
| `images` | yes | B x C x H x W, what the student sees (mixed when `data.mix` is on) |
| `labels` | yes | B, class or identity; -1 for an image without a label (kdx.data.unlabeled) |
| `index` | kdx loaders | B, the sample's index in the training set |
| `view` | seeded views | B, the view (kdx.data.views): with the index and the seed it fixes the augmentation |
| `partner_labels`, `lam` | `data.mix` | the mixed-in image's label and the share `lam` of the own image |
| `teacher_images` | `data.teacher_view` fixed or independent | what the teacher sees instead of `images` |
| `teacher_view` | seeded views | the view under which the teacher's outputs are stored (0 for `fixed`) |

kdx's own loaders yield the dict; `as_train_batch` also takes the tuples of other datamodules
((images, labels), (images, labels, index) or (images, labels, index, view)).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from kdx.errors import DataError

TrainBatch = dict  # str -> torch.Tensor, with the keys above
TUPLE_KEYS = ("images", "labels", "index", "view")


def as_train_batch(batch: Any) -> TrainBatch:
    """The batch as the dict above, from kdx's dict or a tuple of 2-4 tensors."""
    if isinstance(batch, Mapping):
        if "images" not in batch or "labels" not in batch:
            raise DataError(f"a training batch dict needs 'images' and 'labels', got keys {sorted(batch)}")
        return dict(batch)
    items = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    if not 2 <= len(items) <= 4:
        raise DataError(f"a training batch must be (images, labels[, index[, view]]), got {len(items)} items; "
                        "give the datamodule's training loader that shape")
    return {k: v for k, v in zip(TUPLE_KEYS, items) if v is not None}


def batch_images(batch: Any) -> torch.Tensor:
    """The images of a training or evaluation batch (dict or tuple)."""
    return batch["images"] if isinstance(batch, Mapping) else batch[0]
