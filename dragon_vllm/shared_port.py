"""One TCP port for N API server processes (``--api-servers N``), through SO_REUSEPORT.

Each process listens on a socket of its own, bound to the same port; the kernel spreads new
connections over the listening sockets by a hash of the connection's addresses. A device's link
is one WebSocket connection, so it stays with the process that accepted it for its whole life.

The supervisor binds the port first (``reserve``) without listening: that fixes the port (``--port
0`` picks one, written to ``--port-file`` at once) and keeps it ours while the model loads, yet
never takes a connection (only listening sockets receive them). Each API server binds with
``bind_shared`` and starts listening only once its app is ready (asyncio's ``create_server``
listens on the socket it is given), so a connection never waits on a process still loading.
"""

from __future__ import annotations

import socket


def _bound(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # before bind, on every socket of the group
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def reserve(host: str, port: int) -> socket.socket:
    """The supervisor's hold on the port: bound with SO_REUSEPORT, never listening."""
    return _bound(host, port)


def bind_shared(host: str, port: int) -> socket.socket:
    """An API server's socket on the shared port: bound with SO_REUSEPORT; whoever serves on it
    (aiohttp's ``run_app(sock=...)``) makes it listen."""
    sock = _bound(host, port)
    sock.setblocking(False)
    return sock
