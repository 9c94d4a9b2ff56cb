"""Runtimes compute client tasks; the engine decides which."""

from roost.runtime.base import RUNTIMES, Job, Outcome, Runtime, Task, task_seed
from roost.runtime.local import LocalRuntime, LocalRuntimeConfig
from roost.runtime.workers import WorkerFailure, WorkersRuntime, WorkersRuntimeConfig

__all__ = [
    "RUNTIMES",
    "Job",
    "LocalRuntime",
    "LocalRuntimeConfig",
    "Outcome",
    "Runtime",
    "Task",
    "WorkerFailure",
    "WorkersRuntime",
    "WorkersRuntimeConfig",
    "task_seed",
]
