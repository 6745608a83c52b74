"""The agent layer: protocol, scheduler and dispatcher (sans-IO), runner, start-up and the
trio agent.

Nothing here parses MQTT bytes; everything talks to the broker through
:class:`sheri_trio.mqtt.Client`. The public names are re-exported here; the modules
behind them are private.

The sans-IO modules load with the package. The trio shell (:data:`_SHELL`: the agent,
the dispatcher's shell, the runner, start-up, cancel/retry) loads when one of its names is
first read, so that what needs only the plain data (``sheri_trio.config`` and its
:class:`AgentConfig`, the protocol's checks) does not load the agent runtime. Type checkers
and readers see every name in the ``TYPE_CHECKING`` block (tests/test_exports.py checks it
lists the shell's ``__all__``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

from ._claims import ClaimBook as ClaimBook
from ._claims import ClaimVerdict as ClaimVerdict
from ._claims import Holder as Holder
from ._config import DISPATCH_MODES as DISPATCH_MODES
from ._config import AgentConfig as AgentConfig
from ._config import new_agent_id as new_agent_id
from ._dispatcher import Ack as Ack
from ._dispatcher import DispatchCommand as DispatchCommand
from ._dispatcher import Dispatcher as Dispatcher
from ._dispatcher import DispatchStatistics as DispatchStatistics
from ._dispatcher import ForwardCancel as ForwardCancel
from ._dispatcher import Job as Job
from ._dispatcher import PublishStoredOutcome as PublishStoredOutcome
from ._dispatcher import RecordState as RecordState
from ._dispatcher import RevokeReason as RevokeReason
from ._dispatcher import SendAssignment as SendAssignment
from ._dispatcher import SendRevocation as SendRevocation
from ._dispatcher import StoreAssign as StoreAssign
from ._dispatcher import WriteRecord as WriteRecord
from ._dispatcher import latest_records as latest_records
from ._divergence import DIVERGENCE_FIX as DIVERGENCE_FIX
from ._divergence import DivergenceWatch as DivergenceWatch
from ._divergence import Incident as Incident
from ._divergence import ReportDivergence as ReportDivergence
from ._lifecycle import FINAL_STATES as FINAL_STATES
from ._lifecycle import STATES as STATES
from ._lifecycle import TRANSITIONS as TRANSITIONS
from ._lifecycle import InvalidTransition as InvalidTransition
from ._lifecycle import Lifecycle as Lifecycle
from ._lifecycle import StateChange as StateChange
from ._lifecycle import TaskRecord as TaskRecord
from ._messages import Messages as Messages
from ._messages import encode as encode
from ._messages import new_message_id as new_message_id
from ._messages import now_iso as now_iso
from ._presence import Peer as Peer
from ._presence import PeerTable as PeerTable
from ._presence import PresenceKind as PresenceKind
from ._presence import rendezvous_score as rendezvous_score
from ._protocol import AGENT_ID_RE as AGENT_ID_RE
from ._protocol import CAPABILITIES as CAPABILITIES
from ._protocol import DEFAULT_SWARM as DEFAULT_SWARM
from ._protocol import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from ._protocol import PRIORITIES as PRIORITIES
from ._protocol import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._protocol import REQUEST_ID_RE as REQUEST_ID_RE
from ._protocol import ROLES as ROLES
from ._protocol import SWARM_RE as SWARM_RE
from ._protocol import TASK_ID_RE as TASK_ID_RE
from ._protocol import TASK_ROLES as TASK_ROLES
from ._protocol import TYPE_RE as TYPE_RE
from ._protocol import BadMessage as BadMessage
from ._protocol import CancelRequest as CancelRequest
from ._protocol import Claim as Claim
from ._protocol import Envelope as Envelope
from ._protocol import Outcome as Outcome
from ._protocol import TaskSpec as TaskSpec
from ._protocol import Topics as Topics
from ._protocol import check_task_id as check_task_id
from ._protocol import decode_envelope as decode_envelope
from ._protocol import parse_cancel as parse_cancel
from ._protocol import parse_claim as parse_claim
from ._protocol import parse_outcome as parse_outcome
from ._protocol import parse_task as parse_task
from ._protocol import roles_for as roles_for
from ._protocol import task_types_for as task_types_for
from ._queue import ClaimQueue as ClaimQueue
from ._queue import Placed as Placed
from ._scheduler import AnnounceClaim as AnnounceClaim
from ._scheduler import CancelResult as CancelResult
from ._scheduler import ClearPending as ClearPending
from ._scheduler import Command as Command
from ._scheduler import Entry as Entry
from ._scheduler import FailReason as FailReason
from ._scheduler import Phase as Phase
from ._scheduler import Reannounce as Reannounce
from ._scheduler import ReportError as ReportError
from ._scheduler import RepublishOutcome as RepublishOutcome
from ._scheduler import Scheduler as Scheduler
from ._scheduler import SendCancelReply as SendCancelReply
from ._scheduler import SendClaim as SendClaim
from ._scheduler import SendFailed as SendFailed
from ._scheduler import SendPending as SendPending
from ._scheduler import SendRelease as SendRelease
from ._scheduler import StartTask as StartTask
from ._scheduler import StopReason as StopReason
from ._scheduler import StopTask as StopTask
from ._scheduler import StoreClaim as StoreClaim

if TYPE_CHECKING:
    from ._agent import Agent as Agent
    from ._agent import run_agent as run_agent
    from ._control import RETRYABLE_STATES as RETRYABLE_STATES
    from ._control import CancelOutcome as CancelOutcome
    from ._control import CancelReport as CancelReport
    from ._control import CancelTracker as CancelTracker
    from ._control import RetryOutcome as RetryOutcome
    from ._control import RetryRefused as RetryRefused
    from ._control import RetryReport as RetryReport
    from ._control import request_cancel as request_cancel
    from ._control import request_retry as request_retry
    from ._control import retry_confirmation as retry_confirmation
    from ._control import retry_submission as retry_submission
    from ._dispatching import Candidate as Candidate
    from ._dispatching import DispatcherShell as DispatcherShell
    from ._dispatching import TermEnd as TermEnd
    from ._dispatching import dispatch_client_id as dispatch_client_id
    from ._dispatching import run_candidate as run_candidate
    from ._runner import Outbox as Outbox
    from ._runner import TaskRunner as TaskRunner
    from ._startup import DuplicateAgent as DuplicateAgent
    from ._startup import Startup as Startup
    from ._startup import StartupError as StartupError
    from ._startup import StartupStep as StartupStep
    from ._startup import agent_connection as agent_connection
    from ._startup import check_duplicate as check_duplicate
    from ._startup import read_retained as read_retained
    from ._startup import startup_timeout as startup_timeout

#: the private modules of the trio shell, imported on first use of one of their names
_SHELL: Final = ("_agent", "_control", "_dispatching", "_runner", "_startup")


def _load_shell() -> dict[str, object]:
    """Import the trio shell and bind its public names here; every name of the package."""
    names = globals()
    for sub in _SHELL:
        module = importlib.import_module(f"{__name__}.{sub}")
        names.update({name: getattr(module, name) for name in module.__all__})
    return names


if not TYPE_CHECKING:  # mypy would take every unknown attribute for one of the shell's

    def __getattr__(name: str) -> object:
        names = _load_shell()
        if name not in names:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return names[name]

    def __dir__() -> list[str]:
        return sorted(_load_shell())
