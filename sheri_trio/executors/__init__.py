"""Executors: one async function per task type.

An executor receives a :class:`TaskContext` (the task, and ``progress()`` to report
along the way) and returns a JSON-able dict, the task's ``result``. It raises
:class:`TaskPayloadError` when the task's payload is invalid (the task then fails
once, without retries); any other exception is a failed attempt that is retried.
"""

from ._base import Executor as Executor
from ._base import ExecutorRegistry as ExecutorRegistry
from ._base import TaskContext as TaskContext
from ._base import TaskPayloadError as TaskPayloadError
from ._base import default_registry as default_registry
