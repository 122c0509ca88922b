"""waitress, configured and guarded for a daemon that must keep answering `/health` and `gate`.

waitress reads requests in its event loop, so a client slow to send holds a socket, never a thread
(one that does not read its answers could hold a thread: the third rule frees it); but
every socket counts against `connection_limit`, and its `channel_timeout` only closes connections
that have gone silent, so clients that trickle one byte at a time could hold every slot forever.
Three rules, applied by the event loop: the first two on each pass (`GuardedServer.readable`):

- a connection gets REQUEST_DEADLINE seconds to deliver a whole request (headers and body): from
  its accept for the first, from the first byte of each later one; then it is closed unanswered.
  Idle keep-alive connections between requests stay under `channel_timeout`.
- connections waiting for a request (not being served) may hold all but RESERVE of the slots;
  past that the one waiting longest is closed, those that never completed a request first. A
  request that arrives whole is read as soon as it is accepted, so it always finds room.
- between passes: a connection that a worker thread is waiting on, because more than waitress's
  outbuf_high_watermark of its answers sits unsent, is closed once the client has taken no byte of
  them for STALL_S seconds (`GuardedServer.free_stalled`). waitress parses every request a client
  pipelines in one read and answers them in turn on one thread, which waits for the output to drain
  below the watermark with no timeout; its channel_timeout skips connections with requests. Without
  this, a few clients pipelining requests and never reading held every thread, and /health with them.

Errors waitress writes itself (400 on a malformed request, 413, 431, 501 on an unsupported
Transfer-Encoding, 500 when the app fails outside Falcon) are answered in the API's JSON shape.

The event loop waits in select(), as waitress does by default, while every descriptor it watches
is below FD_SETSIZE, and in poll() once one is not (select() refuses those outright, and the
supervisor holds two pipes per loader): waitress's poll() pass cost about 1.4x the select() one
per request under load on a 2-core machine.
"""

import ctypes
import heapq
import logging
import socket
import time

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from gpu_orchestrator.http.app import error_body
from gpu_orchestrator.http.resources import MAX_BODY
from gpu_orchestrator.loaders.logs import kv

log = logging.getLogger("http")

REQUEST_DEADLINE = 5.0  # seconds to send a whole request; loopback clients need milliseconds
CONNECTION_LIMIT = 512  # well under the default 1024-descriptor limit, with room for loaders' pipes
RESERVE = 64  # slots that connections still waiting for a request may never take
MAX_HEADER_BYTES = 16 * 1024  # request line and headers; ours are a few hundred bytes
IDLE_TIMEOUT = 15  # seconds a keep-alive connection may sit idle between requests
# Seconds a worker thread may wait on a connection whose client takes none of the answers queued
# for it. Only a client with more than outbuf_high_watermark (16 MiB) of answers unread meets this
# rule, so an honest slow reader of one large answer (/models/status for 384 clients, ~400 KB, by
# curl over a slow link) never does, however long it pauses: its answer is queued whole, no thread
# waits, and only IDLE_TIMEOUT applies to it. A reader that is slow but reading takes some bytes
# every round trip (TCP reopens its window as it reads), so 5 s without one means it stopped. The
# same 5 s as REQUEST_DEADLINE: the time a client gets to send a request, it gets to take a byte of
# its answers while it holds one of the daemon's 8 threads. Shorter would spare /health more, but
# risk cutting a reader stalled by a lost packet or two (TCP retransmits after 1 s, then 2 s).
STALL_S = 5.0
GUARD_INTERVAL = 0.1  # seconds between deadline checks while there is room
EVICTION_REPORT_S = 60.0  # under a flood, one summary line a minute instead of one per connection
SELECT_FD_LIMIT = 1024  # FD_SETSIZE: select() takes only descriptors below it
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h
MALLOC_HEAP_BLOCK = 2 * 1024**2  # see keep_heap_for_answers
MALLOC_KEEP_FREE = 4 * 1024**2


class JsonErrorTask(ErrorTask):
    """waitress's own refusals, in the same JSON as the app's errors."""

    def execute(self):
        error = self.request.error
        # waitress states its own limit (MAX_BODY + 1, see create_server); say the route's.
        detail = f"request body exceeds {MAX_BODY} bytes" if error.code == 413 else error.body
        body = error_body(error.reason, error.code, detail)
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class GuardedChannel(HTTPChannel):
    error_task_class = JsonErrorTask

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map)
        self.request_began: float | None = time.monotonic()  # a new connection owes its first request
        self.served = False

    def received(self, data):
        if self.request is None and self.request_began is None:
            self.request_began = time.monotonic()
        result = super().received(data)
        if self.requests:
            self.served = True
        if self.request is None:
            self.request_began = None  # nothing half-received: idle, or being served
        return result

    @property
    def waiting(self) -> bool:
        """Holds a slot without being served: fresh, mid-request or idle."""
        return not (self.requests or self.will_close or self.close_when_flushed)

    def eviction_order(self) -> tuple:
        """Mid-request before idle; never served before served; longest waiting first."""
        return self.request_began is None, self.served, self.request_began or 0.0, self.last_activity


class GuardedServer(TcpWSGIServer):
    channel_class = GuardedChannel

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.closed_late = self.closed_for_room = self.closed_stalled = 0
        self.next_report = self.next_guard = self.next_free = self.next_stall_report = 0.0

    def readable(self):
        # Called on every pass of the event loop, several times a request. The room rule can only
        # close a connection when more than `connection_limit - RESERVE` are open, which len() tells
        # at once; the deadline rule needs the walk over every connection only GUARD_INTERVAL apart
        # (the clock itself is cheap), which closes a late connection at most that much after its
        # deadline.
        now = time.monotonic()
        if now >= self.next_guard or len(self.active_channels) > self.adj.connection_limit - RESERVE:
            self.next_guard = now + GUARD_INTERVAL
            self.guard(now)
        return super().readable()

    def run(self):
        """waitress's loop (BaseWSGIServer.run), choosing select() or poll() on each pass."""
        try:
            while self._map:
                wait = self.asyncore.poll if max(self._map) < SELECT_FD_LIMIT else self.asyncore.poll2
                wait(self.adj.asyncore_loop_timeout, self._map)
                self.free_stalled()
        except (SystemExit, KeyboardInterrupt):
            self.task_dispatcher.shutdown()

    def free_stalled(self) -> None:
        """Close the connections a worker thread waits on while their client reads nothing for STALL_S.

        Relies on waitress's HTTPChannel, the same in 3.0.0 and 3.0.2 (tests/unit/test_http_stall.py
        fails if one of these changes):
        - a thread finishing one of several queued requests (`service`), or writing an answer
          (`write_soon`), waits in `_flush_outbufs_below_high_watermark` on `outbuf_lock` while
          `connected` and `total_outbufs_len > adj.outbuf_high_watermark`, with no timeout;
          `requests` holds the requests queued, the one being served first;
        - `last_activity` (time.time()) moves when bytes are sent, not while the thread waits;
        - `handle_close` sets `connected` False and notifies `outbuf_lock` under it, so the thread
          returns (then ClientDisconnected or the next request dropped), and removes the channel.
        waitress closes a channel marked will_close only once its socket is writable, which a
        client that reads nothing never makes it: hence handle_close here, between passes of the
        loop (called from a readable() a channel closed while poll() lists descriptors could hand
        select() a closed one). Walks this loop's whole map: every listener served from it."""
        now = time.monotonic()
        if now < self.next_free:
            return
        self.next_free = now + GUARD_INTERVAL
        cutoff = time.time() - STALL_S
        stalled = [c for c in self._map.values() if isinstance(c, HTTPChannel) and c.requests
                   and c.total_outbufs_len > c.adj.outbuf_high_watermark and c.last_activity < cutoff]
        for channel in stalled:
            channel.handle_close()
        self.closed_stalled += len(stalled)
        if self.closed_stalled and now >= self.next_stall_report:
            log.warning(kv("closed connections a worker thread waited on while the client read none of "
                           "their answers (a stuck client, or an attempt to hold every thread)",
                           closed=self.closed_stalled, unread_over_bytes=self.adj.outbuf_high_watermark,
                           stall_s=STALL_S))
            self.closed_stalled = 0
            self.next_stall_report = now + EVICTION_REPORT_S

    def guard(self, now: float) -> None:
        waiting = [c for c in self.active_channels.values() if c.waiting]
        for channel in waiting:
            if channel.request_began is not None and now - channel.request_began > REQUEST_DEADLINE:
                channel.will_close = True
                self.closed_late += 1
        waiting = [c for c in waiting if not c.will_close]
        excess = len(waiting) - (self.adj.connection_limit - RESERVE)
        if excess > 0:
            for channel in heapq.nsmallest(excess, waiting, key=GuardedChannel.eviction_order):
                channel.will_close = True
            self.closed_for_room += excess
        if (self.closed_late or self.closed_for_room) and now >= self.next_report:
            log.warning(kv("closed connections that held a slot without sending a whole request "
                           "(a slow or stuck client, or a slow-loris attempt)",
                           late=self.closed_late, for_room=self.closed_for_room, deadline_s=REQUEST_DEADLINE))
            self.closed_late = self.closed_for_room = 0
            self.next_report = now + EVICTION_REPORT_S


def keep_heap_for_answers() -> bool:
    """Ask glibc's malloc to keep freed heap for the next answer; whether it took the setting.

    waitress copies every answer into a buffer of its size. By default glibc serves blocks over
    128 KiB-32 MiB (a moving threshold) with fresh mmaps, and gives heap back to the kernel once
    2x that sits free at the top of an arena, so with 400 KB answers (/models/status for 384
    clients) the pages were faulted in anew on most requests: ~50 minor faults and ~40% of the
    request's kernel time, measured under wrk. Blocks up to MALLOC_HEAP_BLOCK (waitress spills
    bigger bodies to a file) now come from the heap, and up to MALLOC_KEEP_FREE stays with each
    arena: about 10 MiB more resident. Not glibc (musl's mallopt does nothing): the defaults."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MALLOC_HEAP_BLOCK)) and bool(mallopt(M_TRIM_THRESHOLD, MALLOC_KEEP_FREE))


def listen(host: str, port: int) -> socket.socket:
    """A listening socket for create_server or serve_also; OSError when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


def create_server(app, sock, threads: int) -> GuardedServer:
    """Serve `app` on the listening socket `sock`, as waitress.create_server would with our guards."""
    adj = Adjustments(
        sockets=[sock], threads=threads, ident="gpu-orchestrator",
        connection_limit=CONNECTION_LIMIT, channel_timeout=IDLE_TIMEOUT,
        # waitress refuses a body of max_request_body_size bytes or more, from its declared length
        # before reading any of it: one byte over the route's limit answers 413 at once, and a body
        # never grows past inbuf_overflow, so nothing is spooled to a temporary file.
        max_request_body_size=MAX_BODY + 1, max_request_header_size=MAX_HEADER_BYTES)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(threads)
    return GuardedServer(app, dispatcher=dispatcher, adj=adj, _sock=sock, bind_socket=False,
                         sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))


def serve_also(main: GuardedServer, app, sock) -> GuardedServer:
    """Serve `app` on another listening socket from `main`'s event loop and worker threads, under
    the same limits and guards (each listener counts its own connections): `main.run()` serves both."""
    return GuardedServer(app, map=main._map, dispatcher=main.task_dispatcher, adj=main.adj, _sock=sock,
                         bind_socket=False, sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))
