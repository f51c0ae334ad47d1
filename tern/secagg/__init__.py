"""Secure aggregation in every gateway cohort (issue 12; topics.md "Secure aggregation").

Bonawitz et al. 2017 with SecAgg+'s sparse graph (Bell et al. 2020): the gateway learns
only the sum of its members' integer vectors modulo 2^bits, even when members drop out
at any stage, as long as at least the threshold of them survive. Pure protocol, no I/O:
`SecAggClient` and `SecAggServer` take opened messages and return sealed ones.
"""

from tern.secagg.client import SecAggClient
from tern.secagg.crypto import SecAggError, SecAggFailed
from tern.secagg.graph import Cohort, choose_degree
from tern.secagg.server import SecAggServer, Traffic
from tern.secagg.wire import member_caps, open_member_message, open_server_message, server_caps

__all__ = [
    "Cohort",
    "SecAggClient",
    "SecAggError",
    "SecAggFailed",
    "SecAggServer",
    "Traffic",
    "choose_degree",
    "member_caps",
    "open_member_message",
    "open_server_message",
    "server_caps",
]
