"""The agent layer: protocol, scheduler (sans-IO), runner, start-up and the trio agent.

Nothing here parses MQTT bytes; everything talks to the broker through
:class:`sheri_trio.mqtt.Client`. The public names are re-exported here; the modules
behind them are private.
"""

from ._agent import Agent as Agent
from ._agent import run_agent as run_agent
from ._claims import ClaimBook as ClaimBook
from ._claims import ClaimVerdict as ClaimVerdict
from ._claims import Holder as Holder
from ._config import AgentConfig as AgentConfig
from ._config import new_agent_id as new_agent_id
from ._lifecycle import FINAL_STATES as FINAL_STATES
from ._lifecycle import STATES as STATES
from ._lifecycle import TRANSITIONS as TRANSITIONS
from ._lifecycle import InvalidTransition as InvalidTransition
from ._lifecycle import Lifecycle as Lifecycle
from ._lifecycle import StateChange as StateChange
from ._lifecycle import TaskRecord as TaskRecord
from ._messages import Messages as Messages
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
from ._protocol import ROLES as ROLES
from ._protocol import SWARM_RE as SWARM_RE
from ._protocol import TASK_ID_RE as TASK_ID_RE
from ._protocol import TASK_ROLES as TASK_ROLES
from ._protocol import TYPE_RE as TYPE_RE
from ._protocol import BadMessage as BadMessage
from ._protocol import Claim as Claim
from ._protocol import Envelope as Envelope
from ._protocol import Outcome as Outcome
from ._protocol import TaskSpec as TaskSpec
from ._protocol import Topics as Topics
from ._protocol import check_task_id as check_task_id
from ._protocol import decode_envelope as decode_envelope
from ._protocol import encode as encode
from ._protocol import parse_claim as parse_claim
from ._protocol import parse_outcome as parse_outcome
from ._protocol import parse_task as parse_task
from ._protocol import roles_for as roles_for
from ._protocol import task_types_for as task_types_for
from ._queue import ClaimQueue as ClaimQueue
from ._queue import Placed as Placed
from ._runner import Outbox as Outbox
from ._runner import TaskRunner as TaskRunner
from ._scheduler import ClearPending as ClearPending
from ._scheduler import Command as Command
from ._scheduler import Entry as Entry
from ._scheduler import FailReason as FailReason
from ._scheduler import Phase as Phase
from ._scheduler import ReportError as ReportError
from ._scheduler import Scheduler as Scheduler
from ._scheduler import SendClaim as SendClaim
from ._scheduler import SendFailed as SendFailed
from ._scheduler import SendPending as SendPending
from ._scheduler import SendRelease as SendRelease
from ._scheduler import StartTask as StartTask
from ._scheduler import StopReason as StopReason
from ._scheduler import StopTask as StopTask
from ._startup import DuplicateAgent as DuplicateAgent
from ._startup import Startup as Startup
from ._startup import StartupError as StartupError
from ._startup import StartupStep as StartupStep
from ._startup import agent_connection as agent_connection
from ._startup import check_duplicate as check_duplicate
from ._startup import read_retained as read_retained
from ._startup import startup_timeout as startup_timeout
