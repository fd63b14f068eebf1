"""Beyond accuracy: calibration (ECE, NLL, reliability bins) and robustness (FGSM, PGD, noise, blur).

Attacks and corruptions work in pixel space: a batch normalised as (pixel - mean) / std is mapped back to
[0, 1] pixels, perturbed there (an L-inf ball of radius `eps` in pixel units, e.g. 2/255, clamped to [0, 1]),
and normalised again before the model sees it, so `eps` means the same for every dataset.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdx.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from kdx.errors import ConfigError

ECE_BINS = 15


def calibration(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, Any]:
    """NLL (mean cross-entropy, nats), ECE over `bins` equal-width confidence bins, and the reliability bins.

    ECE = sum over bins of (bin size / n) * |accuracy in bin - mean confidence in bin|, the confidence being the
    top softmax probability; a bin holds confidences in (lo, hi] (the first also holds 0).
    """
    logits, labels = logits.double(), labels.long()
    probs = logits.softmax(-1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    which = torch.clamp(torch.ceil(confidence * bins).long() - 1, 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        if count:
            acc, conf = correct[inside].mean().item(), confidence[inside].mean().item()
            ece += count / len(labels) * abs(acc - conf)
            table.append({"bin": b, "lo": b / bins, "hi": (b + 1) / bins, "count": count, "accuracy": acc,
                          "confidence": conf})
    return {"nll": F.cross_entropy(logits, labels).item(), "ece": ece, "reliability": table}


class PixelSpace:
    """Maps normalised batches to [0, 1] pixels and back: x = (pixel - mean) / std, per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def to_inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std


def pixel_space_of(dm: Any) -> PixelSpace:
    """The normalisation of a kdx datamodule's test images, or a ConfigError saying it is unknown."""
    for source in (getattr(dm, "test_set", None), getattr(dm, "val_set", None), dm):
        mean, std = getattr(source, "mean", None), getattr(source, "std", None)
        if mean is not None and std is not None:
            mean = mean.flatten().tolist() if torch.is_tensor(mean) else mean
            std = std.flatten().tolist() if torch.is_tensor(std) else std
            mean = [float(mean)] if isinstance(mean, (int, float)) else list(mean)
            std = [float(std)] if isinstance(std, (int, float)) else list(std)
            return PixelSpace(mean, std)
    if type(dm).__name__ == "ImageFolderDataModule":  # its transforms default to ImageNet statistics
        return PixelSpace(IMAGENET_MEAN, IMAGENET_STD)
    raise ConfigError(f"pipeline.compare.robustness needs the pixel normalisation of {type(dm).__name__}, which it "
                      "does not expose (mean/std); set pipeline.compare.robustness.enabled=false")


def _loss_grad(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(net(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, space: PixelSpace) -> torch.Tensor:
    """One signed-gradient step of size `eps` in pixel space (Goodfellow et al. 2015), clamped to [0, 1]."""
    pixels = space.to_pixels(x)
    grad = _loss_grad(net, x, y) / space.std  # d loss / d pixel = d loss / d input * d input / d pixel
    return space.to_inputs((pixels + eps * grad.sign()).clamp(0, 1)).detach()


def pgd(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, space: PixelSpace, steps: int = 10,
        step_size: float | None = None, random_start: bool = True, generator: torch.Generator | None = None
        ) -> torch.Tensor:
    """L-inf projected gradient descent (Madry et al. 2018) in pixel space: `steps` signed steps of `step_size`
    (default 2.5 * eps / steps), each projected back into the eps-ball around the clean pixels and [0, 1]."""
    step_size = 2.5 * eps / steps if step_size is None else step_size
    clean = space.to_pixels(x)
    pixels = clean.clone()
    if random_start:
        noise = torch.rand(clean.shape, generator=generator, dtype=clean.dtype) * 2 - 1
        pixels = (clean + eps * noise).clamp(0, 1)
    for _ in range(int(steps)):
        grad = _loss_grad(net, space.to_inputs(pixels), y) / space.std
        pixels = pixels + step_size * grad.sign()
        pixels = torch.min(torch.max(pixels, clean - eps), clean + eps).clamp(0, 1)
    return space.to_inputs(pixels).detach()


def gaussian_noise(x: torch.Tensor, space: PixelSpace, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Additive Gaussian pixel noise of standard deviation `sigma`, clamped to [0, 1]."""
    pixels = space.to_pixels(x)
    noise = torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype)
    return space.to_inputs((pixels + sigma * noise).clamp(0, 1))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of standard deviation `sigma` pixels (kernel 2 * ceil(2 sigma) + 1, reflect)."""
    radius = max(1, int(torch.ceil(torch.tensor(2.0 * sigma))))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


CORRUPTIONS = ("noise", "blur")


def robustness(net: nn.Module, batches: Iterable, space: PixelSpace, eps: float = 2 / 255, pgd_steps: int = 10,
               corruptions: Sequence[str] = CORRUPTIONS, noise_sigma: float = 0.1, blur_sigma: float = 1.0,
               max_images: int | None = 1000, seed: int = 0) -> dict[str, float]:
    """Top-1 accuracy of `net` (eval mode, CPU) under FGSM and PGD at `eps` and under each corruption, over the
    first `max_images` test images; seeded, so the models of one comparison see the same perturbations."""
    bad = [c for c in corruptions if c not in CORRUPTIONS]
    if bad:
        raise ConfigError(f"pipeline.compare.robustness.corruptions has {bad}; choose from {list(CORRUPTIONS)}")
    net = net.cpu().eval()
    trainable = [p for p in net.parameters() if p.requires_grad]
    for p in trainable:  # gradients flow to the inputs only
        p.requires_grad_(False)
    try:
        return _robust_accuracy(net, batches, space, eps, pgd_steps, corruptions, noise_sigma, blur_sigma,
                                max_images, torch.Generator().manual_seed(int(seed)))
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _robust_accuracy(net, batches, space, eps, pgd_steps, corruptions, noise_sigma, blur_sigma, max_images, g):
    correct: dict[str, int] = {"fgsm": 0, "pgd": 0, **{c: 0 for c in corruptions}}
    seen = 0
    for x, y in batches:
        if max_images is not None and seen >= max_images:
            break
        if max_images is not None:
            x, y = x[: max_images - seen], y[: max_images - seen]
        y = torch.as_tensor(y)
        seen += len(y)
        variants = {"fgsm": fgsm(net, x, y, eps, space), "pgd": pgd(net, x, y, eps, space, pgd_steps, generator=g)}
        if "noise" in corruptions:
            variants["noise"] = gaussian_noise(x, space, noise_sigma, g)
        if "blur" in corruptions:
            variants["blur"] = gaussian_blur(x, blur_sigma)
        with torch.inference_mode():
            for name, xs in variants.items():
                correct[name] += int((net(xs).argmax(-1) == y).sum())
    return {f"acc_{name}": count / max(seen, 1) for name, count in correct.items()}
