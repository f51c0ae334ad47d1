"""tern's MQTT layer: the transport every component talks through, and an embedded broker.

`broker.transport` (paho-mqtt) is all a device or gateway needs; `broker.embedded`
(amqtt) is imported on its own so that clients do not load the broker:

    from broker.embedded import EmbeddedBroker
    from broker.transport import MqttTransport

`python -m broker` (or `tern broker`) runs the embedded broker until SIGINT/SIGTERM.
"""

from broker.errors import (
    BrokerConfigError,
    BrokerError,
    BrokerStartError,
    BrokerStopError,
    ConnectRefused,
    ConnectTimeout,
    PublishError,
    PublishTimeout,
    SubscribeError,
    SubscribeTimeout,
    TransportError,
)
from broker.transport import Handler, Message, MqttTransport, Transport, TransportStats

__all__ = [
    "BrokerConfigError",
    "BrokerError",
    "BrokerStartError",
    "BrokerStopError",
    "ConnectRefused",
    "ConnectTimeout",
    "Handler",
    "Message",
    "MqttTransport",
    "PublishError",
    "PublishTimeout",
    "SubscribeError",
    "SubscribeTimeout",
    "Transport",
    "TransportError",
    "TransportStats",
]
