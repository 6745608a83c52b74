"""The MQTT layer: sans-IO session, byte transports and the trio client.

Nothing here knows about agents.
"""

from ._api import Client as Client
from ._api import ClientOptions as ClientOptions
from ._api import Subscription as Subscription
from ._api import Will as Will
from ._client import MQTTClient as MQTTClient
from ._errors import AckTimeout as AckTimeout
from ._errors import ClientClosed as ClientClosed
from ._errors import ConnectError as ConnectError
from ._errors import ConnectionLost as ConnectionLost
from ._errors import KeepAliveTimeout as KeepAliveTimeout
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import MQTTError as MQTTError
from ._errors import PacketTooLarge as PacketTooLarge
from ._errors import PublishError as PublishError
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import SessionTakenOver as SessionTakenOver
from ._errors import SubscribeError as SubscribeError
from ._open import open_client as open_client
from ._session import QOS_LEVELS as QOS_LEVELS
from ._session import Message as Message
from ._session import Session as Session
from ._session import check_publish as check_publish
from ._session import check_subscription as check_subscription
from ._session import check_topic_filter as check_topic_filter
from ._session import check_topic_name as check_topic_name
from ._session import topic_matches as topic_matches
from ._streams import BrokerURL as BrokerURL
from ._streams import ByteStream as ByteStream
from ._streams import TLSOptions as TLSOptions
from ._streams import redact as redact
