"""The teacher source: the one object a distillation host asks for the teacher's answer.

`source(x, index=None, view=None) -> (outputs, features)` gives the frozen teacher's named outputs (`logits`,
`embedding`; B x D tensors without a graph) and the outputs of the teacher layers the distillers read
(`features`, by module path). Behind that one call sit

- the frozen network: a torch classifier, or a face teacher (kdx.distill.teachers.FaceTeacher, torch or ONNX),
  kept in eval mode, without gradients, run under no_grad;
- its layer taps (kdx.distill.taps.LayerTaps): the layers the distillers read, and the input of the classifier
  (read as the embedding) when a method reads embeddings;
- the optional teacher cache (kdx.distill.cache.TeacherCache): given each image's sample index and view, stored
  outputs are served and the others computed, then stored. Layers are never stored, so a source whose
  distillers read teacher layers has no cache (a ConfigError says so).

A source is built once and completely, before the LightningModule that uses it: `classifier_source` and
`face_source` bind the DistillerSet to both networks, hook the layers it reads and, given a `CachePlan`
(`plan_teacher_cache`: the `distill.teacher_cache` settings, the datamodule's identity and the seed of its views),
probe the teacher's output widths on example images and open the store. It is not an `nn.Module`: the host keeps
it outside its registered children (never trained, never wrapped by DDP, not in checkpoints unless
`distill.save_teacher`) and moves its network along with itself.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from kdx.data.base import KdxDataModule
from kdx.distill.cache import CacheUnavailable, TeacherCache, cache_key, check_cache_config, teacher_fingerprint
from kdx.distill.mix import DistillerSet
from kdx.distill.taps import LayerTaps
from kdx.distill.teachers import FaceTeacher
from kdx.errors import ConfigError
from kdx.models import classifier_path

# data settings that change how images are loaded, not which images the teacher sees: left out of the store's key
LOADER_KEYS = ("batch_size", "eval_batch_size", "num_workers", "persistent_workers", "pin_memory", "name")


@dataclass(frozen=True)
class CachePlan:
    """What a run's teacher cache is opened with (`plan_teacher_cache` builds it from the config and the
    datamodule; the source adds the teacher's weights and its output widths to the store's key)."""

    settings: Mapping[str, Any]  # distill.teacher_cache, checked (mode memory or disk)
    identity: Mapping[str, Any]  # data source and transforms, the datamodule's sizes and contents, the teacher spec
    seed: int  # the seed of the datamodule's views
    num_samples: int  # training images
    max_epochs: int | None  # views per sample when distill.teacher_cache.views is null (a new view every epoch)
    teacher_file: str | None = None  # an ONNX teacher's model file (its weights are in no state dict)
    fixed_teacher: bool = False  # data.teacher_view=fixed: the teacher sees one clean image per sample (one view)


def plan_teacher_cache(settings: Mapping[str, Any] | str | None, dm: Any, data_cfg: Mapping[str, Any],
                       max_epochs: int | None, teacher_spec: Mapping[str, Any] | None = None,
                       teacher_file: str | None = None) -> CachePlan | None:
    """The CachePlan of `distill.teacher_cache` for the (set-up) datamodule `dm`, or None when the cache is off.

    The store's identity is the data config without its loader settings (source, subset, transforms), the
    datamodule's sizes, what its training set holds today (`dm.data_fingerprint()`: file sizes and modification
    times, or a hash of in-memory images) and the teacher spec (ONNX preprocessing); the seed is the one the
    datamodule's views follow. Images replaced in place therefore get a new store, never the outputs of the old
    ones. The datamodule must have been built with seeded views (kdx.tasks.Task.data_options).
    """
    settings = check_cache_config(settings)
    if settings["mode"] == "off":
        return None
    if not isinstance(dm, KdxDataModule):
        raise ConfigError(f"distill.teacher_cache needs seeded views, which {type(dm).__name__} does not give; "
                          "use a kdx datamodule or set distill.teacher_cache.mode=off")
    if not dm.seeded_views:
        raise ConfigError(f"distill.teacher_cache needs seeded views, but this {type(dm).__name__} was built without "
                          "them; build it with the run's view settings, kdx.configs.build_datamodule(cfg.data, "
                          "task.data_options()), as kdx-train does")
    fingerprint = dm.data_fingerprint()
    if fingerprint is None:
        warnings.warn(f"the teacher cache cannot tell whether the images of {type(dm).__name__} change (its training "
                      "set has no fingerprint() or samples list); after changing them, set a new "
                      "distill.teacher_cache.dir or distill.teacher_cache.mode=off")
    identity = {"data": {k: v for k, v in dict(data_cfg).items() if k not in LOADER_KEYS},
                "sizes": dm.describe(), "contents": fingerprint, "teacher": dict(teacher_spec or {})}
    return CachePlan(settings, identity, int(dm.view_seed), len(dm.train_set), max_epochs, teacher_file,
                     fixed_teacher=dm.teacher_view == "fixed")


class TeacherSource:
    """The frozen teacher behind one call: `source(x, index=None, view=None) -> (outputs, features)`.

    `network` answers a batch with a tensor (a classifier's logits) or a mapping of named outputs (a FaceTeacher);
    `layer_network` is the torch network the distillers' teacher layer paths name (the network itself for a
    classifier, a face teacher's `.net`, None for an ONNX model); `embedding_input` a module of it whose input is
    the embedding (tapped only when a method reads embeddings); `outputs` the names kept (None: all). The
    `distillers` must already be bound to both networks (`classifier_source` and `face_source` do it). With a
    `cache` plan the source probes its output widths on `example` images and opens the store.
    """

    def __init__(self, network: nn.Module, distillers: DistillerSet, *, layer_network: nn.Module | None,
                 embedding_input: str | None = None, outputs: Iterable[str] | None = None,
                 cache: CachePlan | None = None, example: torch.Tensor | None = None) -> None:
        network.eval()
        for p in network.parameters():
            p.requires_grad_(False)
        self.network, self.layer_network, self.distillers = network, layer_network, distillers
        self.keep = frozenset(outputs) if outputs is not None else None
        self.layers = distillers.teacher_layers()
        if self.layers and layer_network is None:
            raise ConfigError(f"distill.method reads teacher layers {self.layers}, but this teacher has no inspectable "
                              "layers (an ONNX model); choose a method on outputs only, or a torch teacher")
        self.embedding_input = embedding_input if "embedding" in distillers.needs else None
        inputs = [self.embedding_input] if self.embedding_input else []
        self.taps = LayerTaps(layer_network, self.layers, inputs, role="teacher") if layer_network is not None \
            else LayerTaps(nn.Identity())
        self.cache: TeacherCache | None = None
        if cache is not None:
            if example is None:
                raise ValueError("a teacher source with a cache needs example images to probe its output widths")
            self.cache = self._open_cache(cache, example)

    def __call__(self, x: torch.Tensor, index: torch.Tensor | None = None,
                 view: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(outputs, features) of the teacher for the batch `x`; from the cache when it has one and the batch names
        each image's sample (`index`) and `view` (features are then empty: the cache holds outputs only)."""
        if self.cache is not None and index is not None and view is not None:
            return self.cache(x, index, view, self.outputs), {}
        return self.compute(x)

    @torch.no_grad()
    def compute(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Run the network (eval mode, no graph): its kept outputs, with the embedding read at the classifier's
        input when it is tapped and the network gives none, and the tapped layers' outputs."""
        if self.network.training:
            self.network.eval()
        with self.taps.recording():
            answer = self.network(x)
        outputs = dict(answer) if isinstance(answer, Mapping) else {"logits": answer}
        if self.keep is not None:
            outputs = {k: v for k, v in outputs.items() if k in self.keep}
        features, inputs = self.taps.take()
        if self.embedding_input in inputs and "embedding" not in outputs:
            outputs["embedding"] = inputs[self.embedding_input].flatten(1)
        return outputs, features

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's outputs for `x`, computed (what the cache stores for the images it does not hold)."""
        return self.compute(x)[0]

    def output_widths(self, example: torch.Tensor) -> dict[str, int]:
        """Width of each B x D output, probed on `example` images (the rows a cache stores)."""
        return {name: int(value.shape[1]) for name, value in self.outputs(example).items()
                if isinstance(value, torch.Tensor) and value.ndim == 2}

    def _open_cache(self, plan: CachePlan, example: torch.Tensor) -> TeacherCache | None:
        """The store of `plan` for this teacher; a store that cannot be used is a warning, never a stop."""
        settings = check_cache_config(plan.settings)
        if self.layers:
            raise ConfigError(f"distill.teacher_cache stores outputs only, but the methods read teacher layers "
                              f"{self.layers}; set distill.teacher_cache.mode=off")
        views = 1 if plan.fixed_teacher else settings["views"]
        if not views and not (plan.max_epochs and plan.max_epochs > 0):
            raise ConfigError("distill.teacher_cache with a new view every epoch needs trainer.max_epochs; set it, "
                              "or set distill.teacher_cache.views=K")
        widths = self.output_widths(example)
        key = cache_key(teacher_fingerprint(self.network, plan.teacher_file), plan.identity, plan.seed, views,
                        settings["topk"], widths)
        try:
            return TeacherCache(key, plan.num_samples, views or int(plan.max_epochs), widths, mode=settings["mode"],
                                root=settings["dir"], topk=settings["topk"],
                                meta={"data": dict(plan.identity), "seed": plan.seed, "views": views})
        except CacheUnavailable as e:  # never a reason to stop: the teacher is simply computed
            warnings.warn(f"{e}; the teacher is computed without a cache")
            return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher network's weights on the CPU (a checkpoint's `teacher_state_dict` with save_teacher)."""
        return {k: v.cpu() for k, v in self.network.state_dict().items()}


def classifier_source(teacher: nn.Module, distillers: DistillerSet, student: nn.Module, *,
                      example: torch.Tensor | None = None, cache: CachePlan | None = None) -> TeacherSource:
    """The source of a torch classifier teacher: `distillers` bound to `student` and `teacher`, the teacher
    layers they read tapped, and the input of the teacher's classifier read as its embedding when a method reads
    embeddings."""
    distillers.bind(student, teacher)
    embedding = classifier_path(teacher) if "embedding" in distillers.needs else None
    return TeacherSource(teacher, distillers, layer_network=teacher, embedding_input=embedding, cache=cache,
                         example=example)


def face_source(teacher: FaceTeacher, distillers: DistillerSet, student: nn.Module, *,
                shared_identities: bool = False, example: torch.Tensor | None = None,
                cache: CachePlan | None = None) -> TeacherSource:
    """The source of a face teacher (torch or ONNX): its embedding, and its margin-head logits when a method reads
    them, which needs a head trained on this run's identities (`shared_identities`); a method that reads what
    this teacher cannot give is a ConfigError saying why."""
    offers_logits = teacher.head is not None and bool(shared_identities)
    provided = {"embedding", "labels", "indices"} | ({"logits"} if offers_logits else set())
    why = "the teacher has no margin head (an ONNX model or a bare network)" if teacher.head is None else \
        "the teacher's training identities differ from this run's"
    distillers.check_support(provided, "face distillation", why={
        "logits": f"{why}; logits need a teacher trained on the same identity set (teacher.ckpt of a task=face "
                  "run on this data), or +teacher.head=centroids (a cosine head over the teacher's identity "
                  "centroids of this run's training images)"})
    layer_network = None if teacher.is_onnx else teacher.net
    distillers.bind(student, layer_network)
    # with tens of thousands of identities the head's logits are a large matmul: kept only when a method reads them
    kept = ("embedding", "logits") if "logits" in distillers.needs else ("embedding",)
    return TeacherSource(teacher, distillers, layer_network=layer_network, outputs=kept, cache=cache, example=example)
