"""task=face_distill: a face student on its own margin loss plus the distillers of `distill`, from a frozen face
teacher (teacher.onnx=PATH|sface, teacher.ckpt=PATH of a task=face run, or teacher.pretrained=WEIGHTS); with
+teacher.head=centroids the teacher also answers with logits over this run's identities (kdx.distill.teachers)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kdx.configs import to_dict
from kdx.data.mixing import check_mix
from kdx.distill import build_distiller_set, require_sample_indices
from kdx.distill.source import face_source, plan_teacher_cache
from kdx.distill.teachers import FaceTeacher, build_face_teacher, check_teacher_head, with_centroid_head
from kdx.errors import ConfigError, KdxError
from kdx.lit import FaceDistillationModule
from kdx.models.onnx_teacher import onnx_parameter_count
from kdx.schemas import ModelSpec
from kdx.tasks.base import Built, count_parameters, register_task
from kdx.tasks.face import FaceOptions, FaceTask
from kdx.tasks.supervised import model_spec


@dataclass
class FaceDistillOptions(FaceOptions):
    """`task.*` of face distillation (the methods' own keys are under `distill`)."""

    name: str = "face_distill"


def probe_teacher(teacher: FaceTeacher, dm, spec: ModelSpec) -> torch.Tensor:
    """Run the teacher once on two images of the data (returned): a shape it cannot take is a ConfigError now."""
    dataset = dm.val_set if getattr(dm, "val_set", None) is not None else dm.train_set
    x = torch.stack([dataset[i][0] for i in range(min(2, len(dataset)))])
    try:
        with torch.no_grad():
            out = teacher(x)
    except KdxError as e:
        raise ConfigError(f"teacher {teacher.source} cannot take this data ({e})") from None
    except Exception as e:  # onnxruntime / torch shape errors
        where = "teacher.onnx" if spec.onnx else "teacher"
        raise ConfigError(f"{where} {teacher.source} fails on the data's {tuple(x.shape[1:])} images "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); set teacher.preprocess.input_size "
                          f"(and channel_order) to the input the model was exported for") from None
    emb = out["embedding"]
    if emb.ndim != 2 or emb.shape[0] != x.shape[0]:
        raise ConfigError(f"teacher {teacher.source} returns shape {tuple(emb.shape)} for a batch of {x.shape[0]}; "
                          "an embedding teacher must return B x D")
    return x


@register_task
class FaceDistillTask(FaceTask):
    """FaceDistillationModule: alpha * sum(weight * method loss) + (1 - alpha) * margin loss."""

    name = "face_distill"
    Options = FaceDistillOptions
    distills = True
    learns_from_mixed = True  # with distill.alpha = 1 only: the margin loss reads one identity per image

    def check(self) -> None:
        super().check()
        alpha = self.distill_section()[0].alpha
        mix = check_mix(self.cfg.data.get("mix"))
        if mix.active and alpha != 1:
            raise ConfigError(f"data.mix.mode={mix.mode} mixes faces, but the margin loss (distill.alpha={alpha} "
                              "< 1) needs one identity per image; set distill.alpha=1 (label-free distillation) or "
                              "data.mix.mode=off")
        if self.cfg.data.get("labels", True) is False and alpha != 1:
            raise ConfigError(f"data.labels=false hides the identity labels, so the margin loss has nothing to learn "
                              f"from (distill.alpha={alpha}); set distill.alpha=1")
        teacher = model_spec(self.cfg, "teacher")
        if not teacher.ckpt and not teacher.pretrained and not teacher.onnx:
            raise ConfigError("face distillation needs a teacher: set teacher.onnx=PATH|sface (an ONNX embedding "
                              "model), teacher.ckpt=PATH (a task=face run) or teacher.pretrained=WEIGHTS")
        check_teacher_head(teacher.head)
        if teacher.head and self.cfg.data.get("labels", True) is False:
            raise ConfigError(f"teacher.head={teacher.head} averages the teacher's embeddings per identity, but "
                              "data.labels=false hides the identities; drop teacher.head or set data.labels=true")

    def unread_sections(self) -> tuple[str, ...]:
        return ()

    def build(self, dm) -> Built:
        net, meta = self.face_network(dm)
        host, methods = self.distill_section()
        distillers = build_distiller_set(methods, task="face")
        require_sample_indices(dm, distillers)
        spec = model_spec(self.cfg, "teacher")
        teacher = build_face_teacher(vars(spec), data_mean=getattr(dm, "mean", 0.5), data_std=getattr(dm, "std", 0.5))
        if spec.head:  # logits over this run's identities from the teacher's centroids of its training images
            clean = getattr(dm.train_set, "without_augmentation", None)
            teacher = with_centroid_head(teacher, spec.head, clean() if clean else dm.train_set,
                                         list(dm.class_names), self.options.margin.s, dm.eval_batch_size)
        example = probe_teacher(teacher, dm, spec)
        shared = bool(teacher.class_names) and teacher.class_names == list(getattr(dm, "class_names", []) or [])
        # the teacher source, built once and completely before the module: network, taps and cache
        cache = plan_teacher_cache(host.teacher_cache.as_dict(), dm, to_dict(self.cfg.data),
                                   self.cfg.trainer.get("max_epochs"), teacher_spec=to_dict(self.cfg.teacher),
                                   teacher_file=str(teacher.net.path) if teacher.is_onnx else None)
        source = face_source(teacher, distillers, net, shared_identities=shared, example=example, cache=cache)
        module = FaceDistillationModule(
            net, source, dm.num_classes, alpha=host.alpha, save_teacher=host.save_teacher,
            example_input=example, num_samples=len(dm.train_set), **self.face_kwargs(meta))
        t_params = onnx_parameter_count(teacher.net.path) if teacher.is_onnx else count_parameters(teacher)
        return Built(module, {"network": count_parameters(net), "teacher": t_params})
