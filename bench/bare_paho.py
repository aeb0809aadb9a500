"""A bare paho consumer, run as its own process by drain_bench.py so its CPU and RSS are its own.

    python bench/bare_paho.py HOST PORT CA CERT KEY TOPIC COUNT

Connects with a persistent session (clean_session=False), auto-acks, does no work per message and
exits after COUNT messages, printing one JSON line: messages, seconds (connect to last message),
CPU seconds of the same span and its peak RSS (VmHWM). With COUNT 0 it only subscribes (creating
the session) and exits.
"""

from __future__ import annotations

import ssl
import sys
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

CLIENT_ID = "bench-bare-paho"


def main(argv: list[str]) -> int:
    host, port, ca, cert, key, topic, count_text = argv
    total = int(count_text)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=CLIENT_ID, clean_session=False
    )
    client.tls_set_context(ctx)
    done = threading.Event()
    count = 0

    def on_connect(c: paho.Client, _u: object, flags: paho.ConnectFlags, *_: object) -> None:
        if not flags.session_present:
            c.subscribe(topic, qos=1)
        elif total == 0:
            done.set()

    def on_subscribe(*_: object) -> None:
        if total == 0:
            done.set()

    def on_message(_c: object, _u: object, _m: object) -> None:
        nonlocal count
        count += 1
        if count >= total:
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    cpu0 = time.process_time()
    started = time.perf_counter()
    client.connect(host, int(port))
    client.loop_start()
    done.wait(1800)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    client.disconnect()
    client.loop_stop()
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1]) * 1024
    report = {"messages": count, "seconds": elapsed, "cpu": cpu, "rss": rss}
    print(orjson.dumps(report).decode())
    return 0 if count >= total else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
