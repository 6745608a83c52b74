"""sheri-trio: role-based autonomous agents cooperating over MQTT v5, on trio."""

from .mqtt import BrokerURL as BrokerURL
from .mqtt import ConnectError as ConnectError
from .mqtt import Message as Message
from .mqtt import MQTTError as MQTTError
from .mqtt import TLSOptions as TLSOptions
from .mqtt import Will as Will
from .mqtt import open_client as open_client

__version__ = "0.1.0"
