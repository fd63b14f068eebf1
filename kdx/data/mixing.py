"""Seeded batch mixing (mixup, cutmix) and the teacher's view: the data side of consistent teaching.

Consistent teaching (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and consistent",
CVPR; arXiv 2106.05237) shows teacher and student the *same* aggressively augmented image, mixup included, and
matches their outputs (KL at T = 1) over a long schedule. Their ResNet-50 student reached 82.8% ImageNet top-1
from an 83.0% teacher. The paper compares three ways of choosing what the teacher sees (`data.teacher_view`):

- `consistent`: exactly the student's image (mixed, cropped, flipped), so the teacher labels what the student sees;
- `fixed`: the clean image (no augmentation, no mixing), so each image has one fixed target (precomputable);
- `independent`: a second augmented and mixed view of the same sample, drawn independently of the student's.

Here a mix is a function of (seed, view, sample index) alone: the partner image, lambda and the cutmix box of a
sample come from a generator seeded by that triple, not from the batch it lands in. So the mixed image of a
sample is the same on any machine, with any batch size, number of loader workers or ranks, which is what lets
the teacher cache (kdx.distill.cache) serve teacher outputs of mixed images: the step the paper's authors could
not take ("no pre-computed teacher logits"). torchvision's MixUp/CutMix draw one lambda per batch from the
global generator and pair each image with its batch neighbour, which cannot be seeded per sample; the two
operations themselves are a few lines, written here to that rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch

from kdx.errors import ConfigError

MIX_MODES = ("off", "mixup", "cutmix", "both")
TEACHER_VIEWS = ("consistent", "fixed", "independent")
_MIX_STREAM = 0x6D6978  # separates mixing draws from every other seeded stream
TEACHER_STREAM = 1  # the `independent` teacher's views and mixes come from stream 1; the student's from stream 0


@dataclass(frozen=True)
class MixSpec:
    """How images are mixed: `mode`, the Beta(a, a) parameters of lambda, and the share of samples mixed."""

    mode: str = "off"            # off | mixup | cutmix | both (each sample: cutmix with switch_prob, else mixup)
    mixup_alpha: float = 1.0     # mixup lambda ~ Beta(a, a); 1.0 is uniform
    cutmix_alpha: float = 1.0    # cutmix lambda ~ Beta(a, a) before the box is cut (then the box's share is used)
    switch_prob: float = 0.5     # mode=both: probability that a sample is cut-mixed rather than mixed up
    prob: float = 1.0            # probability that a sample is mixed at all (1.0: every image, as in the paper)

    @property
    def active(self) -> bool:
        """True when some images get mixed."""
        return self.mode != "off" and self.prob > 0


def check_mix(cfg: Mapping[str, Any] | MixSpec | None, key: str = "data.mix") -> MixSpec:
    """A MixSpec from a `data.mix` section (None or {} is off); a bad key or value is a ConfigError naming it."""
    if isinstance(cfg, MixSpec):
        return cfg
    cfg = dict(cfg or {})
    known = MixSpec.__dataclass_fields__
    for k in cfg:
        if k not in known:
            raise ConfigError(f"{key}.{k} is not a mixing setting; the settings are {', '.join(known)}")
    mode = cfg.get("mode", "off")
    mode = "off" if mode in (None, False) else mode
    if mode not in MIX_MODES:
        raise ConfigError(f"{key}.mode must be one of {', '.join(MIX_MODES)}, got {mode!r}")
    values = {}
    for name in ("mixup_alpha", "cutmix_alpha", "switch_prob", "prob"):
        v = cfg.get(name, known[name].default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{key}.{name} must be a number, got {v!r}")
        if name.endswith("alpha") and v <= 0:
            raise ConfigError(f"{key}.{name} must be > 0 (the Beta distribution's parameter), got {v}")
        if name.endswith("prob") and not 0 <= v <= 1:
            raise ConfigError(f"{key}.{name} must be a probability in [0, 1], got {v}")
        values[name] = float(v)
    return MixSpec(mode=str(mode), **values)


def check_teacher_view(value: Any, key: str = "data.teacher_view") -> str:
    """`value` if it names one of the three regimes, else a ConfigError listing them."""
    if value not in TEACHER_VIEWS:
        raise ConfigError(f"{key} must be one of {', '.join(TEACHER_VIEWS)} (Beyer et al. 2022), got {value!r}")
    return str(value)


class MixDraws(NamedTuple):
    """One batch's mixing draws: partner index, the share `lam` of the own image, and the cutmix box
    (top, left, bottom, right; empty when the sample is mixed up or not mixed)."""

    partner: torch.Tensor  # long, B
    lam: torch.Tensor      # float32, B; 1.0 for an unmixed sample
    box: torch.Tensor      # long, B x 4
    cut: torch.Tensor      # bool, B: cutmix (True) or mixup (False)


def draw_one(spec: MixSpec, seed: int, view: int, index: int, num_samples: int, hw: tuple[int, int],
             stream: int = 0) -> tuple[int, float, tuple[int, int, int, int], bool]:
    """(partner, lam, box, cut) of one sample: a function of (seed, stream, view, index) alone."""
    rng = np.random.default_rng([_MIX_STREAM, int(stream), int(seed) & 0xFFFFFFFFFFFF, int(view), int(index)])
    u_mix, u_switch = rng.random(2)
    partner = int(rng.integers(num_samples))
    if not spec.active or u_mix >= spec.prob or partner == int(index):
        return int(index), 1.0, (0, 0, 0, 0), False
    cut = spec.mode == "cutmix" or (spec.mode == "both" and u_switch < spec.switch_prob)
    if not cut:
        return partner, float(rng.beta(spec.mixup_alpha, spec.mixup_alpha)), (0, 0, 0, 0), False
    lam = float(rng.beta(spec.cutmix_alpha, spec.cutmix_alpha))
    h, w = hw
    ratio = math.sqrt(1.0 - lam)  # the box covers about 1 - lam of the image (Yun et al. 2019)
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    area = (bottom - top) * (right - left)
    if area == 0:
        return int(index), 1.0, (0, 0, 0, 0), False
    return partner, 1.0 - area / float(h * w), (top, left, bottom, right), True  # lam: the share actually kept


def draw_mix(spec: MixSpec, seed: int, view: int | torch.Tensor, indices: torch.Tensor, num_samples: int,
             hw: tuple[int, int], stream: int = 0) -> MixDraws:
    """The draws of every sample of a batch (`indices`), on the CPU; each as `draw_one` gives it."""
    idx = indices.detach().cpu().long().tolist()
    views = view.detach().cpu().long().tolist() if isinstance(view, torch.Tensor) and view.ndim else [int(view)] * len(idx)
    rows = [draw_one(spec, seed, v, i, num_samples, hw, stream) for v, i in zip(views, idx)]
    return MixDraws(torch.tensor([r[0] for r in rows], dtype=torch.long),
                    torch.tensor([r[1] for r in rows], dtype=torch.float32),
                    torch.tensor([r[2] for r in rows], dtype=torch.long).reshape(-1, 4),
                    torch.tensor([r[3] for r in rows], dtype=torch.bool))


def mix_pair(own: torch.Tensor, partner: torch.Tensor, lam: float, box: tuple[int, int, int, int], cut: bool) -> torch.Tensor:
    """One mixed image (C x H x W): the partner pasted into `box` (cutmix), or lam * own + (1 - lam) * partner."""
    if lam >= 1.0:
        return own
    if cut:
        top, left, bottom, right = box
        out = own.clone()
        out[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        return out
    lam_t = torch.tensor(lam, dtype=own.dtype)  # the same float32 arithmetic as mix_batch
    return own * lam_t + partner * (1 - lam_t)


def mix_batch(own: torch.Tensor, partner: torch.Tensor, draws: MixDraws) -> torch.Tensor:
    """A batch of mixed images (B x C x H x W) from the own and partner images and their draws."""
    lam = draws.lam.to(own.device, own.dtype)
    cut = draws.cut.to(own.device)
    mixed = torch.where(cut[:, None, None, None], own, own * lam[:, None, None, None] + partner * (1 - lam[:, None, None, None]))
    if bool(cut.any()):
        h, w = own.shape[-2:]
        box = draws.box.to(own.device)
        rows = torch.arange(h, device=own.device)[None, :]
        cols = torch.arange(w, device=own.device)[None, :]
        in_rows = (rows >= box[:, 0:1]) & (rows < box[:, 2:3])
        in_cols = (cols >= box[:, 1:2]) & (cols < box[:, 3:4])
        inside = (in_rows[:, :, None] & in_cols[:, None, :] & cut[:, None, None])[:, None]
        mixed = torch.where(inside, partner, mixed)
    return mixed
