"""The agent layer: protocol, claims, lifecycle, start-up and the trio agent.

Nothing here parses MQTT bytes; everything talks to the broker through
:class:`sheri_trio.mqtt.Client`.
"""

from ._agent import run_agent as run_agent
from ._startup import DuplicateAgent as DuplicateAgent
from ._startup import Startup as Startup
from ._startup import StartupError as StartupError
from ._startup import StartupStep as StartupStep
from ._startup import agent_connection as agent_connection
from ._startup import check_duplicate as check_duplicate
from ._startup import read_retained as read_retained
from ._startup import startup_timeout as startup_timeout
