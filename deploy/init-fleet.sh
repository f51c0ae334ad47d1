#!/bin/sh
# Make a fleet once: keys, logins, certificates (tern fleet init), Mosquitto's files for the
# top broker (tern mosquitto-config) and every device's data (tern data). docker-compose.yml
# runs it in its fleet-init service; on a host: FLEET_DIR=./fleet DATA_DIR=./data deploy/init-fleet.sh
#
# Nothing happens once FLEET_DIR holds a whole fleet (.complete, written last): a restart
# keeps the fleet; an interrupted run starts again from scratch.
# Secrets are written 0600, in files only (never in the environment).
set -eu
FLEET_DIR=${FLEET_DIR:-/fleet}
DATA_DIR=${DATA_DIR:-/data}
TERN_FLEET=${TERN_FLEET:-plant}
# gateway=device,device ... (one word per gateway)
TERN_LAYOUT=${TERN_LAYOUT:-gw-1=dev-01,dev-02 gw-2=dev-03,dev-04}
# broker=name,name ... : the names clients use to reach each broker (its certificate's SANs)
TERN_BROKER_HOSTS=${TERN_BROKER_HOSTS:-coordinator=mosquitto gw-1=gateway-1 gw-2=gateway-2}
TERN_MQTT_PORT=${TERN_MQTT_PORT:-8883}
# the top broker's listeners: MQTT over TLS on TERN_MQTT_PORT, MQTT over secure WebSockets
TERN_MOSQUITTO_ARGS=${TERN_MOSQUITTO_ARGS:---tls --ws-port 9001}
# and, when set, plain WebSockets for a browser on the Docker host (whose browser does not
# know the fleet CA): the same logins and rights; docker-compose.yml publishes it on the
# host's loopback only
TERN_BROWSER_WS_PORT=${TERN_BROWSER_WS_PORT:-}
# gateway=board,board ... : simulated ESP32 boards (the firmware under CPython), each
# registered in its gateway's boards file (FLEET_DIR/GATEWAY.boards.json); "" for none
TERN_BOARDS=${TERN_BOARDS-gw-1=esp-1 gw-2=esp-2}
TERN_GATEWAY_PORT=${TERN_GATEWAY_PORT:-8884}
TERN_BOARD_SIM=${TERN_BOARD_SIM:-$(dirname "$0")/board_sim.py}
TERN_SAMPLES=${TERN_SAMPLES:-4000}
TERN_SEED=${TERN_SEED:-0}

if [ -f "$FLEET_DIR/.complete" ]; then
    echo "init-fleet: $FLEET_DIR holds fleet $(sed -n 's/.*"fleet": *"\([^"]*\)".*/\1/p' "$FLEET_DIR/fleet.json"); keeping it"
    exit 0
fi
umask 077
gateways="" hosts="" devices=0
for spec in $TERN_LAYOUT; do
    gateways="$gateways --gateway $spec"
    devices=$((devices + $(echo "${spec#*=}" | tr ',' '\n' | grep -c .)))
done
for spec in $TERN_BROKER_HOSTS; do hosts="$hosts --broker-host $spec"; done
# shellcheck disable=SC2086  # one word per flag
tern fleet init --fleet "$TERN_FLEET" $gateways $hosts --out "$FLEET_DIR" --force
# the dashboard's own read-only login: on Mosquitto one login holds one connection, so the
# page and `tern watch` (observer.json) must not share one
tern fleet add-observer --fleet-dir "$FLEET_DIR" dashboard
# shellcheck disable=SC2086
tern mosquitto-config --fleet-file "$FLEET_DIR/fleet.json" --port "$TERN_MQTT_PORT" \
    $TERN_MOSQUITTO_ARGS --out "$FLEET_DIR/mosquitto"
if [ -n "$TERN_BROWSER_WS_PORT" ]; then
    cat >>"$FLEET_DIR/mosquitto/mosquitto.conf" <<EOF
# Added by init-fleet.sh: plain WebSockets for the dashboard's page in a browser on the
# Docker host (docker-compose.yml publishes it on 127.0.0.1 only).
listener $TERN_BROWSER_WS_PORT 0.0.0.0
protocol websockets
use_username_as_clientid true
max_connections 64
EOF
fi
mkdir -p "$FLEET_DIR/mosquitto/data"
tern data mnist1d --devices "$devices" --seed "$TERN_SEED" --samples "$TERN_SAMPLES" \
    --out "$DATA_DIR"
n=0
for spec in $TERN_BOARDS; do
    gateway=${spec%%=*} host=$gateway
    for names in $TERN_BROKER_HOSTS; do  # the first name given for its broker
        [ "${names%%=*}" = "$gateway" ] && host=${names#*=} && host=${host%%,*}
    done
    for board in $(echo "${spec#*=}" | tr ',' ' '); do
        n=$((n + 1))
        python3 "$TERN_BOARD_SIM" windows "$DATA_DIR/test.npz" "$FLEET_DIR/boards/$board.windows" \
            200 "$((TERN_SEED + n))"
        # the board reaches its gateway's broker by its first name, over TLS
        tern firmware provision --dry-run --device "$board" --fleet "$TERN_FLEET" \
            --gateway "mqtts://$host:$TERN_GATEWAY_PORT" --port none \
            --boards "$FLEET_DIR/$gateway.boards.json" --gateway-id "$gateway" \
            --sensor replay --replay-file "$FLEET_DIR/boards/$board.windows" \
            --fleet-dir "$FLEET_DIR" --out "$FLEET_DIR/boards/$board" >/dev/null
    done
done
# The CA's key signs the fleet's certificates: off the shared fleet volume when TERN_CA_DIR
# is given (docker-compose.yml: a volume only this service mounts).
if [ -n "${TERN_CA_DIR:-}" ]; then
    mv "$FLEET_DIR/ca.key" "$TERN_CA_DIR/ca.key"
fi
chmod 0755 "$FLEET_DIR/mosquitto"
chmod 0644 "$DATA_DIR"/*.npz
touch "$FLEET_DIR/.complete"
echo "init-fleet: fleet $TERN_FLEET in $FLEET_DIR ($devices devices' data in $DATA_DIR, $n boards)"
