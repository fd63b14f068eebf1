"""@register_task: used as documented it registers the task; each way of misusing it is one sentence with the fix."""
from dataclasses import dataclass

import pytest

from kdx.tasks import available_tasks, task_class
from kdx.tasks.base import _TASKS, Task, register_task
from kdx.tasks.supervised import ClassifierOptions


@pytest.fixture
def clean_registry():
    before = dict(_TASKS)
    yield
    _TASKS.clear()
    _TASKS.update(before)


def test_a_task_registered_as_documented_is_found_by_name(clean_registry):
    @dataclass
    class MyOptions(ClassifierOptions):
        name: str = "my_task"

    @register_task
    class MyTask(Task):
        name = "my_task"
        Options = MyOptions

    assert task_class("my_task") is MyTask and "my_task" in available_tasks()


def test_misuses_are_one_sentence_naming_the_fix(clean_registry):
    with pytest.raises(TypeError, match=r"takes no arguments .* write @register_task on the class"):
        register_task("my_task")

    class NoName(Task):
        Options = ClassifierOptions

    with pytest.raises(TypeError, match=r"NoName has no `name`: add the class attribute name = \"my_task\""):
        register_task(NoName)

    class NoOptions(Task):
        name = "no_options"

    with pytest.raises(TypeError, match=r"NoOptions.Options must be a @dataclass of its task.\* keys"):
        register_task(NoOptions)

    class Twin(Task):
        name = "distill"
        Options = ClassifierOptions

    with pytest.raises(ValueError, match=r"task name 'distill' is already registered by DistillTask; give Twin another"):
        register_task(Twin)
