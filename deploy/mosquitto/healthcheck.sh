#!/bin/sh
# Healthy when the broker answers an MQTT CONNECT with a CONNACK. The CONNECT is anonymous,
# so a fleet's broker refuses it ("not authorised", exit 5): that answer proves the
# listener is up and speaks MQTT (over TLS with --cafile: the handshake is checked too),
# and logging in as nobody never takes over a member's or the observer's session (a
# client's id is its user name). A closed port or a failed handshake exits otherwise.
#   mosquitto-healthcheck [mosquitto_sub options: -p 8883 --cafile /fleet/ca.crt]
mosquitto_sub -h localhost -t healthcheck -E -W 5 "$@" 2>/dev/null
rc=$?
[ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]
