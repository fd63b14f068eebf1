"""Embeddings of a verification dataset: what kdx-eval and the face comparison score."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdx.models.embedding import fit_input, model_input_size
from kdx.models.onnx_teacher import OnnxEmbeddingModel


@torch.no_grad()
def embed_dataset(model: nn.Module, dataset: Dataset, batch_size: int = 64, flip: bool = False,
                  device: str = "cpu", num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, list[bool]]:
    """(embeddings, flipped-image embeddings or None, issame) of an interleaved verification dataset.

    Batches are resized to the model's `input_size` when it has one. A dataset of image paths
    (VerificationPairsDataset) is embedded once per distinct image, however many pairs reuse it.
    """
    model.eval()
    if isinstance(model, nn.Module) and any(True for _ in model.parameters()):
        model.to(device)
    size = None if isinstance(model, OnnxEmbeddingModel) else model_input_size(model)  # ONNX models resize themselves

    def run(images: torch.Tensor) -> torch.Tensor:
        return model(fit_input(images.to(device), size)).float().cpu()

    paths, transform = getattr(dataset, "paths", None), getattr(dataset, "transform", None)
    if paths is not None and transform is not None:  # embed each distinct image once
        unique = list(dict.fromkeys(paths))
        where = {p: i for i, p in enumerate(unique)}
        embs, flips = [], []
        for start in range(0, len(unique), batch_size):
            images = torch.stack([transform(p) for p in unique[start:start + batch_size]])
            embs.append(run(images))
            if flip:
                flips.append(run(images.flip(-1)))
        rows = torch.tensor([where[p] for p in paths])
        emb = torch.cat(embs)[rows]
        return emb, (torch.cat(flips)[rows] if flip else None), list(dataset.issame)
    embs, flips = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, _idx, _same in loader:
        embs.append(run(images))
        if flip:
            flips.append(run(images.flip(-1)))
    return torch.cat(embs), (torch.cat(flips) if flip else None), list(dataset.issame)
