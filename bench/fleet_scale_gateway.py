"""`tern gateway` for bench.fleet_scale: the real gateway service, its threads named.

    python -m bench.fleet_scale_gateway GATEWAY-ARGS...

Runs `gateway.__main__.main` unchanged. Python 3.11 does not give its threads' names to
the operating system, so /proc shows every thread as "python"; a side thread writes each
thread's name (its first 15 characters) to /proc/self/task/TID/comm, so the benchmark can
tell the embedded broker's thread ("amqtt-...") from the gateway's own (loop, paho) when
it reads their CPU time (bench.fleet_scale_procs.thread_cpu).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from gateway.__main__ import main as gateway_main

__all__ = ["main", "name_threads"]

_EVERY = 0.2  # seconds between looks at the thread list


def name_threads(stop: threading.Event) -> None:
    """Until `stop`: give every thread's name to the OS (threads come and go)."""
    named: dict[int, str] = {}
    while not stop.wait(_EVERY):
        for thread in threading.enumerate():
            tid = thread.native_id
            if tid is None or named.get(tid) == thread.name:
                continue
            try:
                Path(f"/proc/self/task/{tid}/comm").write_text(thread.name[:15])
            except OSError:  # ended meanwhile, or no /proc here: the figures stay joint
                continue
            named[tid] = thread.name


def main(argv: list[str] | None = None) -> int:
    stop = threading.Event()
    namer = threading.Thread(target=name_threads, args=(stop,), name="thread-names", daemon=True)
    namer.start()
    try:
        return gateway_main(sys.argv[1:] if argv is None else argv)
    finally:
        stop.set()


if __name__ == "__main__":
    raise SystemExit(main())
