"""A TCP proxy for tests that cuts, resets and freezes connections on command.

Put it between a client and a server (the daemon and Mosquitto) and break the network at will::

    with FaultyProxy(broker.host, broker.port) as proxy:
        ...  # point the client at proxy.port
        proxy.drop_all()   # close every connection with FIN, as a peer going away does
        proxy.reset_all()  # abort every connection with RST, as a crashed middlebox does
        proxy.freeze()     # stop moving bytes both ways; connections stay open (a stall)
        proxy.thaw()
        proxy.refuse(True) # new connections are closed as soon as they are accepted

TLS passes through untouched (the proxy only copies bytes), so the client still verifies the
server's certificate; connect to ``127.0.0.1`` when the certificate names that address.

The proxy runs its own asyncio loop on a daemon thread; every method may be called from any
thread and returns once the loop has applied it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

HOST = "127.0.0.1"
# How long a control call waits for the proxy's loop to apply it.
CONTROL_TIMEOUT_S = 10.0


class _Pipe(asyncio.Protocol):
    """One direction's receiving end: what arrives on this transport goes to ``peer``."""

    def __init__(self, link: _Link, side: str) -> None:
        self.link = link
        self.side = side
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.side == "client":
            self.link.proxy._client_connected(self.link)

    def data_received(self, data: bytes) -> None:
        peer = self.link.peer_of(self.side)
        if peer is not None and not peer.is_closing():
            peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close_both()


@dataclass(eq=False)
class _Link:
    """A client connection and its upstream connection."""

    proxy: FaultyProxy
    client: _Pipe | None = None
    upstream: _Pipe | None = None
    closed: bool = field(default=False)

    def peer_of(self, side: str) -> asyncio.Transport | None:
        pipe = self.upstream if side == "client" else self.client
        return pipe.transport if pipe is not None else None

    def transports(self) -> list[asyncio.Transport]:
        return [
            pipe.transport
            for pipe in (self.client, self.upstream)
            if pipe is not None and pipe.transport is not None
        ]

    def pause(self) -> None:
        for transport in self.transports():
            if not transport.is_closing():
                transport.pause_reading()

    def resume(self) -> None:
        for transport in self.transports():
            if not transport.is_closing():
                transport.resume_reading()

    def close_both(self) -> None:
        if self.closed:
            return
        self.closed = True
        for transport in self.transports():
            transport.close()
        self.proxy._links.discard(self)

    def reset_both(self) -> None:
        self.closed = True
        for transport in self.transports():
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Linger on, timeout 0: close() sends RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        self.proxy._links.discard(self)


class FaultyProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``; breaks it on command."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._requested_port = port
        self.port = 0
        self.accepted = 0  # client connections accepted so far
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._frozen = False
        self._refusing = False
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._call(self._listen())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_S)
        self._loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults ---------------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._links)

    def drop_all(self) -> int:
        """Close every open connection on both sides (FIN); returns how many."""
        return self._call(self._each(_Link.close_both))

    def reset_all(self) -> int:
        """Abort every open connection on both sides with a TCP RST; returns how many."""
        return self._call(self._each(_Link.reset_both))

    def freeze(self) -> None:
        """Stop forwarding in both directions; new connections are accepted but frozen too."""
        self._call(self._set_frozen(True))

    def thaw(self) -> None:
        """Forward again, including whatever queued up while frozen."""
        self._call(self._set_frozen(False))

    def refuse(self, refusing: bool) -> None:
        """While true, new connections are closed right after they are accepted."""
        self._refusing = refusing

    # -- the loop -------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, int | None]) -> int:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(CONTROL_TIMEOUT_S) or 0

    async def _listen(self) -> None:
        self._server = await self._loop.create_server(
            self._accept, HOST, self._requested_port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _accept(self) -> _Pipe:
        link = _Link(self)
        pipe = _Pipe(link, "client")
        link.client = pipe
        self.accepted += 1
        return pipe

    def _client_connected(self, link: _Link) -> None:
        task = self._loop.create_task(self._open_upstream(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_upstream(self, link: _Link) -> None:
        client = link.client
        assert client is not None
        assert client.transport is not None
        if self._refusing:
            client.transport.close()
            return
        # Hold the client's bytes until upstream exists to take them.
        client.transport.pause_reading()
        try:
            _, upstream = await self._loop.create_connection(
                lambda: _Pipe(link, "upstream"), self.target_host, self.target_port
            )
        except OSError:
            client.transport.close()
            return
        link.upstream = upstream
        if client.transport.is_closing():
            link.close_both()
            return
        self._links.add(link)
        if self._frozen:
            link.pause()
        else:
            link.resume()

    async def _each(self, action: Callable[[_Link], None]) -> int:
        links = list(self._links)
        for link in links:
            action(link)
        return len(links)

    async def _set_frozen(self, frozen: bool) -> None:
        self._frozen = frozen
        for link in list(self._links):
            if frozen:
                link.pause()
            else:
                link.resume()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close_both()
