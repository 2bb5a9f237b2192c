"""Workers sharing one listening socket balance their accepts by a board of open counts."""

from __future__ import annotations

import os
import warnings

import pytest
import trio

from proxychain.balance import SLACK_DIVISOR, ConnectionBoard
from proxychain.clock import Clock
from proxychain.listen import ACCEPT_BURST, _accept_loop
from proxychain.server import Server
from proxychain.settings import ServerSettings
from tests.test_server import _Answer  # answers every request with one status and body


def test_a_seat_is_ahead_when_some_sibling_has_fewer_connections() -> None:
    board = ConnectionBoard(3)
    first, second, third = (board.seat(i) for i in range(3))
    assert not any(seat.ahead() for seat in (first, second, third))  # all at 0
    first.report(2)
    second.report(1)
    third.report(2)
    assert board.counts() == [2, 1, 2]
    assert (first.ahead(), second.ahead(), third.ahead()) == (True, False, True)
    second.report(2)
    assert not any(seat.ahead() for seat in (first, second, third))


def test_in_a_flood_a_lead_of_a_sixteenth_of_all_connections_is_not_ahead() -> None:
    board = ConnectionBoard(2)
    busier, other = board.seat(0), board.seat(1)
    other.report(30)
    busier.report(30 + (60 + 4) // SLACK_DIVISOR)  # 34 of 64: a lead of 4 = 64 // 16
    assert not busier.ahead()
    busier.report(35)  # 35 of 65: a lead of 5 > 65 // 16
    assert busier.ahead()
    assert not other.ahead()


def test_a_single_worker_is_never_ahead() -> None:
    seat = ConnectionBoard(1).seat(0)
    seat.report(50)
    assert not seat.ahead()


def test_board_bounds() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        ConnectionBoard(0)
    with pytest.raises(IndexError, match="no worker 2"):
        ConnectionBoard(2).seat(2)


def test_a_forked_child_reports_to_the_parents_board() -> None:
    board = ConnectionBoard(2)
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads (trio's thread cache
        # may have some); the child here only writes to the board and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report, and leave without running pytest's exit handlers
        board.seat(1).report(7)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert board.counts() == [0, 7]


async def _open_count_reaches(server: Server, count: int) -> None:
    with trio.fail_after(5):
        while server.open_connections != count:
            await trio.sleep(0.001)


@pytest.mark.loopback
async def test_two_accept_loops_on_one_socket_split_a_burst_evenly() -> None:
    """Without the board the first loop to wake takes a whole burst (here all 8); with it
    neither gets more than one ahead of the other."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    board = ConnectionBoard(2)
    servers = [
        Server(_Answer(200, []), ServerSettings(), Clock(), seat=board.seat(i)) for i in range(2)
    ]
    clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(ACCEPT_BURST)]
    async with trio.open_nursery() as nursery:
        for server in servers:
            nursery.start_soon(_accept_loop, listener, nursery, server)
        with trio.fail_after(5):
            while sum(board.counts()) < len(clients):
                await trio.sleep(0.001)
        assert board.counts() == [ACCEPT_BURST // 2, ACCEPT_BURST // 2]
        assert [s.open_connections for s in servers] == board.counts()
        for client in clients:
            await client.aclose()
        for server in servers:
            await _open_count_reaches(server, 0)
        assert board.counts() == [0, 0]
        nursery.cancel_scope.cancel()
    await listener.aclose()


@pytest.mark.loopback
async def test_a_worker_ahead_still_accepts_when_its_sibling_does_not() -> None:
    """A sibling that never accepts (busy, or gone) delays connections, never strands them."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    board = ConnectionBoard(2)
    server = Server(_Answer(200, []), ServerSettings(), Clock(), seat=board.seat(0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_accept_loop, listener, nursery, server)
        clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
        await _open_count_reaches(server, 3)
        assert board.counts() == [3, 0]
        await clients[0].send_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await clients[0].receive_some(1024)).startswith(b"HTTP/1.1 200 ")
        for client in clients:
            await client.aclose()
        await _open_count_reaches(server, 0)
        nursery.cancel_scope.cancel()
    await listener.aclose()
