"""TLS over a socket through memory BIOs: the native MQTT session's transport.

Why not ``ssl.SSLSocket``: its ``recv()`` returns one TLS record per call, and OpenSSL reads each
record from the socket in two ``read()`` calls (header, then body), so a stream of small MQTT
PUBLISHes (one record each) cost two system calls and one Python call per message, plus a third
read that finds the socket empty. Here one ``recv_into()`` takes every byte the kernel holds and
the records are decrypted from memory (``ssl.SSLObject``, as asyncio's own TLS transport does).

Writes encrypt into memory and leave in one ``send()``. Not thread-safe: one I/O thread owns it.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from typing import cast

# One recv_into() takes at most this much; a fuller socket is read again in the same pass.
RECV_SIZE = 256 * 1024


class TlsStream:
    """A client TLS connection on ``raw`` (connected), which it makes non-blocking. Waits for the
    socket (the handshake, a full send buffer) last at most ``timeout_s`` each."""

    def __init__(
        self,
        raw: socket.socket,
        ctx: ssl.SSLContext,
        *,
        server_hostname: str | None,
        timeout_s: float,
    ) -> None:
        raw.setblocking(False)
        self.raw = raw
        self.timeout_s = timeout_s
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        self._buffer = bytearray(RECV_SIZE)
        self._view = memoryview(self._buffer)
        self.closed = False  # the peer closed the connection (TCP EOF or TLS close_notify)

    def handshake(self) -> None:
        """Complete the TLS handshake, blocking; raises ssl.SSLError or OSError (TimeoutError)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush(deadline)
                self._wait(write=False, deadline=deadline)
                if self._receive() == 0:
                    raise ssl.SSLEOFError(
                        "the broker closed the connection during the handshake"
                    ) from None
                continue
            self._flush(deadline)
            return

    def read(self, budget: int) -> bytes:
        """Decrypt what has arrived, reading the socket until it is empty or ``budget`` bytes
        were read, without blocking. Sets :attr:`closed` when the peer has closed."""
        received = 0
        while received < budget and not self.closed:
            count = self._receive()
            if count is None:
                break
            received += count
            if count < RECV_SIZE:
                break  # the kernel had no more: spare the call that would say so
        plain = bytearray()
        tls = self._tls
        view = self._view
        while True:
            try:
                # Into the one buffer: with a buffer, read() returns the count (typeshed says
                # bytes); without, it would allocate RECV_SIZE per record.
                decrypted = cast("int", tls.read(RECV_SIZE, self._buffer))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            if not decrypted:
                break
            plain += view[:decrypted]
        if self._outgoing.pending:
            # Reading can make TLS answer (a TLS 1.3 key update, say).
            self.send(b"")
        return bytes(plain)

    def send(self, data: bytes) -> None:
        """Encrypt ``data`` and write it all, waiting up to ``timeout_s`` for the socket."""
        view = memoryview(data)
        while view:
            view = view[self._tls.write(view) :]
        self._flush(time.monotonic() + self.timeout_s)

    def _receive(self) -> int | None:
        """Move what the socket holds into TLS: bytes read, 0 at EOF, None when none is ready."""
        try:
            count = self.raw.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return None
        if not count:
            self.closed = True
            return 0
        self._incoming.write(self._view[:count])
        return count

    def _flush(self, deadline: float) -> None:
        data = memoryview(self._outgoing.read())
        while data:
            try:
                sent = self.raw.send(data)
            except (BlockingIOError, InterruptedError):
                self._wait(write=True, deadline=deadline)
                continue
            data = data[sent:]

    def _wait(self, *, write: bool, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            what = "writable" if write else "readable"
            raise TimeoutError(f"socket not {what} for {self.timeout_s:g} s")
        watch = [self.raw]
        if write:
            select.select([], watch, [], left)
        else:
            select.select(watch, [], [], left)

    def close(self) -> None:
        self.raw.close()
