"""A terminal's Ctrl-C must not reach the test broker: its owner stops it, after draining.

Ctrl-C sends SIGINT to the terminal's whole foreground process group. The demo (and any script
using ``MosquittoBroker``) catches it and stops its children in order: the daemon drains first,
and needs the broker for that. So Mosquitto runs in its own session, and only its owner's
``stop()``/``kill()`` (by PID) end it. Here a small parent in a new session stands in for the
terminal's foreground group: the test signals that whole group, as the terminal would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ingest.testing.broker import find_mosquitto

REPO = Path(__file__).resolve().parents[1]

# The parent: starts a broker, waits for Ctrl-C, then reports what it sees and stops the broker
# the way the demo does. The pause after the interrupt stands for the daemon's drain, during
# which the broker must still be there.
PARENT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    from ingest.testing.broker import HOST, MosquittoBroker, port_accepts
    from ingest.testing.certs import make_certs

    work, how = Path(sys.argv[1]), sys.argv[2]
    broker = MosquittoBroker(work / "broker", make_certs(work / "certs"))
    broker.start()
    pid = broker.pid
    try:
        # Inside the try: the test may signal as soon as it has read this line.
        print(json.dumps({"pid": pid, "pgid": os.getpgid(pid), "own_pgid": os.getpgid(0)}),
              flush=True)
        signal.pause()
    except KeyboardInterrupt:
        time.sleep(0.5)
        alive = broker.running and port_accepts(HOST, broker.port)
        getattr(broker, how)()
        try:
            os.kill(pid, 0)
            gone = False
        except ProcessLookupError:
            gone = True
        print(json.dumps({"alive_after_sigint": alive, "gone_after_stop": gone}), flush=True)
    """
)


def _line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, (
        f"the parent printed nothing more; stderr: {proc.stderr.read() if proc.stderr else ''}"
    )
    return dict(json.loads(line))


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_sigint_to_the_owners_process_group_spares_the_broker(tmp_path: Path, how: str) -> None:
    find_mosquitto()
    script = tmp_path / "parent.py"
    script.write_text(PARENT, encoding="utf-8")
    parent = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # The script's own folder is first on its sys.path: import this checkout's ingest.
        env=os.environ | {"PYTHONPATH": str(REPO)},
        start_new_session=True,  # the parent's group stands for a terminal's foreground group
    )
    broker_pid = None
    try:
        started = _line(parent)
        broker_pid = started["pid"]
        assert started["own_pgid"] == parent.pid
        assert started["pgid"] != parent.pid, "mosquitto is in its owner's process group"
        os.killpg(parent.pid, signal.SIGINT)  # what Ctrl-C in the parent's terminal does
        after = _line(parent)
        assert after["alive_after_sigint"], "SIGINT to the owner's group stopped mosquitto"
        assert after["gone_after_stop"], f"{how}() left mosquitto running"
        broker_pid = None  # gone: its PID may belong to someone else from now on
        assert parent.wait(30) == 0
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if broker_pid is not None:
            # Never leave a broker behind, whatever failed above (it has its own session).
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker_pid, signal.SIGKILL)
        for stream in (parent.stdout, parent.stderr):
            if stream is not None:
                stream.close()
