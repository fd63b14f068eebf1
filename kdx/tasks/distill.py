"""task=distill: the student learns from the labels and from a frozen teacher (the methods of `distill`)."""
from __future__ import annotations

from dataclasses import dataclass

from kdx.configs import to_dict
from kdx.distill import build_distiller_set, require_sample_indices
from kdx.distill.source import classifier_source, plan_teacher_cache
from kdx.errors import ConfigError
from kdx.lit import DistillationModule
from kdx.schemas import choice
from kdx.tasks.base import Built, count_parameters, example_images, register_task
from kdx.tasks.supervised import ClassifierOptions, SupervisedTask, build_network, model_spec


@dataclass
class DistillOptions(ClassifierOptions):
    """`task.*` of classification distillation (the methods' own keys are under `distill`)."""

    name: str = "distill"
    network: str = choice("student", "teacher", "student")


@register_task
class DistillTask(SupervisedTask):
    """DistillationModule: (1 - alpha) * CE + alpha * sum of weighted distillers, from a frozen teacher."""

    name = "distill"
    Options = DistillOptions
    distills = True
    learns_from_unlabeled = True

    def check(self) -> None:
        teacher = model_spec(self.cfg, "teacher")
        if not teacher.ckpt and not teacher.pretrained:
            raise ConfigError("distillation needs a trained teacher: set teacher.ckpt=PATH (a kdx-train checkpoint) "
                              "or teacher.pretrained=true")
        if teacher.head:
            raise ConfigError(f"teacher.head={teacher.head} gives a face teacher logits over the run's identities; a "
                              "classifier teacher has its own logits, so drop teacher.head")

    def unread_sections(self) -> tuple[str, ...]:
        return ()

    def build(self, dm) -> Built:
        host, methods = self.distill_section()
        distillers = build_distiller_set(methods, task="classification")
        require_sample_indices(dm, distillers)
        net, meta = self.trained_network(dm)
        teacher, _ = build_network(model_spec(self.cfg, "teacher"), dm.num_classes, dm.in_chans)
        example = example_images(dm)
        # the teacher source, built once and completely before the module: network, taps and cache
        cache = plan_teacher_cache(host.teacher_cache.as_dict(), dm, to_dict(self.cfg.data),
                                   self.cfg.trainer.get("max_epochs"), teacher_spec=to_dict(self.cfg.teacher))
        source = classifier_source(teacher, distillers, net, example=example, cache=cache)
        module = DistillationModule(net, source, dm.num_classes, alpha=host.alpha,
                                    save_teacher=host.save_teacher, example_input=example,
                                    num_samples=len(dm.train_set), **self.classifier_kwargs(meta))
        return Built(module, {"network": count_parameters(net), "teacher": count_parameters(teacher)})
