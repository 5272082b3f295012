"""Task data generators: formal languages, MQAR, the six MAD tasks, byte-level LM.

    from hqlt.orchestration.tasks import make_task, task_names, TASKS
    task = make_task("parity", {"train_max_len": 40}, "task")
    batch = task.train_batch(256, numpy.random.default_rng(0))      # Batch(inputs, targets, slices)
    evals = task.eval_batches(256)                                  # deterministic, cached

TASKS maps a name to TaskEntry(config, cls, short) (a NamedTuple, so also `config_cls, task_cls, short = TASKS[n]`).
The contract (Batch, Task, metric helpers) is in `base`; definitions in docs/tasks.md §A / §B.
"""
from .base import Batch, IntStream, Task, concat_batches, make_batch, per_example_accuracy, scaled_accuracy, slice_metrics
from .registry import TASKS, TaskEntry, get_entry, make_task, register_task, task_config, task_from_dict, task_names

# importing the modules registers their tasks
from . import formal, mqar, mad, bytelm  # noqa: E402,F401
from .bytelm import lm_metrics  # noqa: E402

__all__ = ["Batch", "IntStream", "TASKS", "Task", "TaskEntry", "concat_batches", "get_entry", "lm_metrics", "make_batch",
           "make_task", "per_example_accuracy", "register_task", "scaled_accuracy", "slice_metrics", "task_config",
           "task_from_dict", "task_names"]
