"""Executors: one async function per task type.

An executor receives a :class:`TaskContext` (the task, and ``progress()`` to report
along the way) and returns a JSON-able dict, the task's ``result``. It raises
:class:`TaskPayloadError` when the task's payload is invalid (the task then fails
once, without retries), :class:`TaskConfigError` when the agent is not configured for
the task (likewise once); any other exception is a failed attempt that is retried.

The real executors live in one module per domain (``_testing``, ``_security``,
``_monitoring``, ``_deployment``, ``_database``, ``_llm``); ``_payload`` holds the checks
every payload goes through, ``_workspace`` keeps payload paths inside the workspace and
``_process`` runs configured commands. ``_registry`` maps task types to them;
``_simulated`` holds the placeholders that ``[executors] simulate = true`` runs instead;
``_config`` checks the executors' tables of ``sheri.toml``.
"""

from ._base import Executor as Executor
from ._base import ExecutorRegistry as ExecutorRegistry
from ._base import TaskConfigError as TaskConfigError
from ._base import TaskContext as TaskContext
from ._base import TaskPayloadError as TaskPayloadError
from ._config import EXECUTOR_TABLES as EXECUTOR_TABLES
from ._config import validate_executor_config as validate_executor_config
from ._registry import WORKSPACE_TYPES as WORKSPACE_TYPES
from ._registry import default_registry as default_registry
from ._registry import simulated_registry as simulated_registry
from ._registry import uses_implicit_workspace as uses_implicit_workspace
from ._workspace import agent_state_dir as agent_state_dir
