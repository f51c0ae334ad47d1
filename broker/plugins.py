"""amqtt plugins of the embedded broker (imported by amqtt, by dotted path, from its config).

`AccessPlugin` answers amqtt's authentication and topic checks from a
`broker.access.AccessControl`, which `EmbeddedBroker(access=...)` hands it through the
plugin's config. amqtt requires every plugin's answer to be True, so this one allows
what its policy allows and refuses the rest. Deliveries to subscribers never reach it:
the embedded broker answers those itself (see `_topic_filtering` there). amqtt does not
tell topic plugins whether a PUBLISH is retained: the embedded broker asks
`AccessControl.retain` about retained ones itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from broker.access import AccessControl
from broker.errors import BrokerConfigError

__all__ = ["AccessPlugin"]


class AccessPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships untyped
    """Connect, publish and subscribe as a `broker.access.AccessControl` decides."""

    @dataclass
    class Config:
        control: Any = None  # an AccessControl; Any, so that amqtt's config check passes it

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        control = context.config.control
        if not isinstance(control, AccessControl):
            raise BrokerConfigError(
                f"AccessPlugin needs an AccessControl, not a {type(control).__name__}"
            )
        self.control = control

    async def authenticate(self, *, session: Session) -> bool:
        will = session.will_topic if session.will_flag else None
        retain = bool(session.will_flag and session.will_retain)
        return self.control.connect(
            session.client_id or "", session.username, session.password, will, retain
        )

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        if session is None or topic is None:
            return False
        if action == Action.PUBLISH:
            return self.control.publish(session.client_id or "", session.username, topic)
        if action == Action.SUBSCRIBE:
            return self.control.subscribe(session.client_id or "", session.username, topic)
        return True  # a delivery: its subscription was allowed
