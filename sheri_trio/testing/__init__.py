"""Helpers for tests of code that uses :mod:`sheri_trio` (shipped, public).

* :class:`MosquittoBroker` (from :mod:`sheri_trio._mosquitto`): a real, private
  mosquitto on free ports, for integration tests, ``sheri demo`` and the benchmarks;
  :class:`BridgedBrokers`: two of them bridged (no single order of messages).
* :class:`MemoryBus` / :class:`MemoryClient` (:mod:`._bus`): an in-process bus with the
  client interface, for unit tests of the logic above the client (agents).
* :class:`ScriptedBroker` / :class:`MemoryByteStream` (:mod:`._scripted`): an in-memory
  byte stream the real :class:`~sheri_trio.mqtt.MQTTClient` runs over, and the broker
  end of it, decoded, whose every reply the test writes (unit tests of the client).
"""

from .._mosquitto import BridgedBrokers as BridgedBrokers
from .._mosquitto import MosquittoBroker as MosquittoBroker
from .._mosquitto import Scheme as Scheme
from .._mosquitto import bridge_config as bridge_config
from .._redis import RedisServer as RedisServer
from ._bus import BusRecord as BusRecord
from ._bus import MemoryBus as MemoryBus
from ._bus import MemoryClient as MemoryClient
from ._scripted import BrokerConnection as BrokerConnection
from ._scripted import MemoryByteStream as MemoryByteStream
from ._scripted import ScriptedBroker as ScriptedBroker

__all__ = [
    "BridgedBrokers",
    "BrokerConnection",
    "BusRecord",
    "MemoryBus",
    "MemoryByteStream",
    "MemoryClient",
    "MosquittoBroker",
    "RedisServer",
    "Scheme",
    "ScriptedBroker",
    "bridge_config",
]
