"""TlsStream against a real TLS server on loopback (the generated PKI, mutual TLS)."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from ingest.testing.certs import CertBundle
from ingest.tls_stream import RECV_SIZE, TlsStream

DEADLINE_S = 10.0


def _server_context(certs: CertBundle) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    ctx.load_verify_locations(str(certs.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _client_context(certs: CertBundle, *, cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca_file))
    if cert:
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return ctx


@contextmanager
def _server(certs: CertBundle, serve: Callable[[ssl.SSLSocket], None]) -> Iterator[tuple[str, int]]:
    """A one-connection TLS server running ``serve`` on the accepted connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    failures: list[BaseException] = []

    def run() -> None:
        try:
            raw, _ = listener.accept()
            with _server_context(certs).wrap_socket(raw, server_side=True) as conn:
                serve(conn)
        except (OSError, ssl.SSLError) as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()
    finally:
        thread.join(DEADLINE_S)
        listener.close()


def _connect(certs: CertBundle, address: tuple[str, int], *, cert: bool = True) -> TlsStream:
    raw = socket.create_connection(address, DEADLINE_S)
    stream = TlsStream(
        raw, _client_context(certs, cert=cert), server_hostname="localhost", timeout_s=DEADLINE_S
    )
    stream.handshake()
    return stream


def _read_until(stream: TlsStream, size: int) -> bytes:
    received = b""
    while len(received) < size and not stream.closed:
        select.select([stream.raw], [], [], DEADLINE_S)
        received += stream.read(1 << 20)
    return received


def test_one_read_returns_every_record_that_has_arrived(certs: CertBundle) -> None:
    """Many small TLS records (one per server send, as a broker writes PUBLISHes) come back
    from one read() call once they are in the socket, in order."""
    records = [f"record {i:05d};".encode() for i in range(1000)]  # ~50 KB on the wire
    sent = threading.Event()
    release = threading.Event()

    def serve(conn: ssl.SSLSocket) -> None:
        for record in records:
            conn.sendall(record)  # one TLS record each
        sent.set()
        release.wait(DEADLINE_S)

    with _server(certs, serve) as address:
        stream = _connect(certs, address)
        assert sent.wait(DEADLINE_S)
        select.select([stream.raw], [], [], DEADLINE_S)
        time.sleep(0.2)  # loopback: every record is in the client's receive buffer by now
        received = stream.read(1 << 20)
        release.set()
        stream.close()
    assert received == b"".join(records)


def test_a_read_larger_than_the_receive_buffer_arrives_whole(certs: CertBundle) -> None:
    payload = bytes(range(256)) * (3 * RECV_SIZE // 256 + 7)
    done = threading.Event()

    def serve(conn: ssl.SSLSocket) -> None:
        conn.sendall(payload)
        done.wait(DEADLINE_S)

    with _server(certs, serve) as address:
        stream = _connect(certs, address)
        received = _read_until(stream, len(payload))
        done.set()
        stream.close()
    assert received == payload


def test_writes_reach_the_peer_and_a_close_is_seen(certs: CertBundle) -> None:
    echoed: list[bytes] = []

    def serve(conn: ssl.SSLSocket) -> None:
        data = b""
        while len(data) < 3 * 40_000:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        echoed.append(data)
        conn.sendall(b"bye")
        # close_notify, without waiting for the client's: then the socket closes.
        conn.setblocking(False)
        with contextlib.suppress(ssl.SSLWantReadError):
            conn.unwrap()

    with _server(certs, serve) as address:
        stream = _connect(certs, address)
        for index in range(3):
            stream.send(bytes([index]) * 40_000)
        assert _read_until(stream, 3) == b"bye"
        _read_until(stream, 1)  # reads until the close is seen
        stream.close()
    assert echoed == [b"\x00" * 40_000 + b"\x01" * 40_000 + b"\x02" * 40_000]
    assert stream.closed


def test_a_handshake_the_server_refuses_raises_an_ssl_error(certs: CertBundle) -> None:
    """No client certificate: the server rejects the handshake (under TLS 1.3 the client may
    only learn it at its first read), and the error surfaces as ssl.SSLError or a close."""

    def serve(conn: ssl.SSLSocket) -> None:
        conn.recv(1)

    def connect_and_read() -> None:
        stream = _connect(certs, address, cert=False)
        _read_until(stream, 1)
        if stream.closed:
            raise ssl.SSLEOFError("the server closed the connection")

    with _server(certs, serve) as address, pytest.raises((ssl.SSLError, OSError)):
        connect_and_read()


def test_a_handshake_against_a_silent_peer_times_out(certs: CertBundle) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        raw = socket.create_connection(listener.getsockname(), DEADLINE_S)
        stream = TlsStream(raw, _client_context(certs), server_hostname="localhost", timeout_s=0.3)
        with pytest.raises(TimeoutError, match=r"not readable for 0\.3 s"):
            stream.handshake()
        stream.close()
    finally:
        listener.close()
