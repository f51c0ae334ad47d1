# One image for every role of a tern fleet: the command picks it
#   tern coordinator ... | tern gateway ... | tern device ... | tern dashboard ... | tern health ...
#
# Docker users:  docker build -t tern .
#   (python:3.11-slim-bookworm from the public registry; tern and its dependencies from PyPI)
# Without a registry (CI, .ci/containers): a Debian base image made with debootstrap and
# wheels built on the host, installed without reaching any index:
#   podman build --build-arg BASE_IMAGE=localhost/tern-base:bookworm \
#                --build-arg WHEELS=build/wheels -t localhost/tern:latest .
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# WHEELS: a directory of the build context holding a wheel for tern and for every
# dependency (pip wheel '.[demo]' -w build/wheels); empty: install from the package index.
ARG WHEELS=
# demo = broker + fleet + dashboard + the data set generator: every role of the compose
# stack. A device-only image can pass EXTRAS= (the core: no broker, no plotting).
ARG EXTRAS=demo
COPY . /src
RUN set -eu; \
    python3 -m venv /opt/tern; \
    spec="tern"; [ -z "$EXTRAS" ] || spec="tern[$EXTRAS]"; \
    if [ -n "$WHEELS" ]; then \
        /opt/tern/bin/pip install --no-cache-dir --no-index --find-links "/src/$WHEELS" "$spec"; \
    else \
        src="/src"; [ -z "$EXTRAS" ] || src="/src[$EXTRAS]"; \
        /opt/tern/bin/pip install --no-cache-dir "$src"; \
    fi; \
    /opt/tern/bin/pip uninstall -y -q pip setuptools; \
    # umqtt.simple for simulated boards (the firmware under CPython): built offline, the
    # wheel directory carries it; else fetched now (sha256-pinned), or when a board starts
    if [ -n "$WHEELS" ] && [ -d "/src/$WHEELS/firmware-deps" ]; then \
        cp -r "/src/$WHEELS/firmware-deps" /opt/tern/firmware-deps; \
    else \
        /opt/tern/bin/tern firmware deps --cache-dir /opt/tern/firmware-deps \
            || echo "umqtt.simple not fetched: a simulated board fetches it when it starts"; \
    fi; \
    chmod -R a+rX /opt/tern

FROM ${BASE_IMAGE}
COPY --from=build /opt/tern /opt/tern
COPY deploy/init-fleet.sh /usr/local/bin/tern-init-fleet
COPY deploy/board_sim.py /usr/local/lib/tern/board_sim.py
# A fixed uid, so mounted fleet files and volumes can be owned by it on the host.
RUN groupadd --gid 10001 tern \
    && useradd --uid 10001 --gid tern --create-home --home-dir /var/lib/tern tern \
    && mkdir -p /var/lib/tern/state /fleet /fleet-ca /data \
    && chown tern:tern /var/lib/tern/state /fleet /fleet-ca /data
ENV PATH=/opt/tern/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    XDG_STATE_HOME=/var/lib/tern/state \
    XDG_CACHE_HOME=/var/lib/tern/cache \
    TERN_BOARD_SIM=/usr/local/lib/tern/board_sim.py \
    TERN_FIRMWARE_DEPS=/opt/tern/firmware-deps
USER tern
WORKDIR /var/lib/tern
ENTRYPOINT ["tern"]
CMD ["--help"]
