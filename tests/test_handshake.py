"""``ObjectStream.handshake``: a keyed session recorded from its first byte and replayed on a
new connection is refused, and so is a server's own handshake relayed between two of its
connections; an unproven peer's messages run nothing and, once the handshake fails, are never
delivered. Real TCP sockets (a socketpair where the bytes must all be there first; in-memory
streams for usage errors); the attacker is a plain socket that records, replays or forges bytes.
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute

import streampickle
from _util import relay
from streampickle import AuthenticationError, Encoder, ObjectStream, ProtocolError, UsageError

pytestmark = pytest.mark.anyio

KEY = b"handshake test secret"
HANG = 20  # seconds: a guard against a hang, never a measurement


async def keyed_listener() -> tuple[Any, int]:
    listener = await streampickle.create_tcp_listener(local_host="127.0.0.1", key=KEY)
    return listener, listener.extra(SocketAttribute.local_port)


async def serve_one(listener: Any, outcome: dict[str, Any], handshake: bool = True) -> None:
    """Accept one connection, hand-shake (as the responder), then collect what arrives, in
    ``outcome``: ``got``, ``error`` (None at a clean end), and ``done`` set at the end."""
    stream = await listener.accept()
    async with stream:
        got: list[Any] = []
        outcome["got"] = got
        try:
            if handshake:
                await stream.handshake(initiator=False)
            async for obj in stream:
                got.append(obj)
        except Exception as exc:  # noqa: BLE001 - the error is the outcome
            outcome["error"] = exc
            try:  # and what a receive after it gives: the error again, never the peer's messages
                outcome["after"] = await stream.receive()
            except Exception as again:  # noqa: BLE001
                outcome["after"] = again
        outcome.setdefault("error", None)
        outcome["done"].set()


async def record_session(session: list[Any], *, handshake: bool) -> bytes:
    """A genuine keyed client session through a recording proxy: the bytes the client sent."""
    listener, port = await keyed_listener()
    recorded = bytearray()
    outcome: dict[str, Any] = {"done": anyio.Event()}
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(serve_one, listener, outcome, handshake)
        proxy = await anyio.create_tcp_listener(local_host="127.0.0.1")
        proxy_port = proxy.extra(SocketAttribute.local_port)

        async def proxy_one() -> None:
            client_side = await proxy.listeners[0].accept()
            server_side = await anyio.connect_tcp("127.0.0.1", port)
            async with client_side, server_side, anyio.create_task_group() as relays:
                relays.start_soon(relay, client_side, server_side, recorded)
                relays.start_soon(relay, server_side, client_side, None)

        async with proxy:
            tg.start_soon(proxy_one)
            client = await streampickle.connect_tcp("127.0.0.1", proxy_port, key=KEY)
            async with client:
                if handshake:
                    await client.handshake(initiator=True)
                for obj in session:
                    await client.send(obj)
    assert (outcome["got"], outcome["error"]) == (session, None)  # the genuine session went through
    return bytes(recorded)


async def replay(recorded: bytes, *, handshake: bool) -> dict[str, Any]:
    """Send ``recorded`` from a plain socket to a new keyed server; what it made of it."""
    listener, port = await keyed_listener()
    outcome: dict[str, Any] = {"done": anyio.Event()}
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(serve_one, listener, outcome, handshake)
        attacker = await anyio.connect_tcp("127.0.0.1", port)
        async with attacker:
            await attacker.send(recorded)
            await attacker.send_eof()
            with anyio.fail_after(HANG):
                await outcome["done"].wait()
    return outcome


SESSION = [{"op": "delete", "what": "everything"}, b"x" * 100_000, ("done", 2)]


async def test_a_genuine_session_hand_shakes_and_runs() -> None:
    listener, port = await keyed_listener()
    async with listener, anyio.create_task_group() as tg:
        async def server() -> None:
            async with await listener.accept() as stream:
                await stream.handshake(initiator=False)
                await stream.send(("echo", await stream.receive()))

        tg.start_soon(server)
        with anyio.fail_after(HANG):
            async with await streampickle.connect_tcp("127.0.0.1", port, key=KEY) as client:
                await client.handshake(initiator=True)
                await client.send([1, 2, 3])
                assert await client.receive() == ("echo", [1, 2, 3])


async def test_a_recorded_session_without_a_handshake_replays_whole() -> None:
    """The gap the handshake closes: the tags, sender and sequence numbers are all genuine."""
    recorded = await record_session(SESSION, handshake=False)
    outcome = await replay(recorded, handshake=False)
    assert outcome["got"] == SESSION


async def test_a_recorded_session_replayed_after_a_handshake_is_refused() -> None:
    recorded = await record_session(SESSION, handshake=True)
    outcome = await replay(recorded, handshake=True)
    assert outcome["got"] == []
    assert isinstance(outcome["error"], AuthenticationError)
    assert "challenge" in str(outcome["error"])
    assert isinstance(outcome["after"], AuthenticationError)  # the rest of the recording is dropped


async def test_a_servers_own_handshake_relayed_between_its_connections_is_refused() -> None:
    """The attacker opens two connections to one keyed server and swaps what the server says
    on each: each server-side stream gets a genuine handshake from another stream of the same
    key holder, answering its challenge. The roles give it away."""
    listener, port = await keyed_listener()
    outcomes: list[dict[str, Any]] = [{"done": anyio.Event()}, {"done": anyio.Event()}]
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(serve_one, listener, outcomes[0])
        first = await anyio.connect_tcp("127.0.0.1", port)
        tg.start_soon(serve_one, listener, outcomes[1])
        second = await anyio.connect_tcp("127.0.0.1", port)
        async with first, second, anyio.create_task_group() as relays:
            relays.start_soon(relay, first, second)
            relays.start_soon(relay, second, first)
            with anyio.fail_after(HANG):
                for outcome in outcomes:
                    await outcome["done"].wait()
            relays.cancel_scope.cancel()
    for outcome in outcomes:
        assert outcome["got"] == []
        assert isinstance(outcome["error"], AuthenticationError)
        assert "role" in str(outcome["error"])


async def test_both_ends_claiming_one_role_are_refused() -> None:
    listener, port = await keyed_listener()
    errors: list[BaseException] = []
    async with listener, anyio.create_task_group() as tg:
        async def server() -> None:
            async with await listener.accept() as stream:
                with pytest.raises(AuthenticationError) as info:
                    await stream.handshake(initiator=True)
                errors.append(info.value)

        tg.start_soon(server)
        with anyio.fail_after(HANG):
            async with await streampickle.connect_tcp("127.0.0.1", port, key=KEY) as client:
                with pytest.raises(AuthenticationError):
                    await client.handshake(initiator=True)
                with pytest.raises(AuthenticationError):  # the stream stays failed
                    await client.receive()
    assert len(errors) == 1


async def test_a_peer_that_skips_the_handshake_is_a_protocol_error() -> None:
    listener, port = await keyed_listener()
    async with listener, anyio.create_task_group() as tg:
        async def server() -> None:
            async with await listener.accept() as stream:
                await stream.send({"not": "a handshake"})
                with anyio.move_on_after(HANG):
                    async for _ in stream:
                        pass

        tg.start_soon(server)
        with anyio.fail_after(HANG):
            async with await streampickle.connect_tcp("127.0.0.1", port, key=KEY) as client:
                with pytest.raises(ProtocolError, match="not a handshake"):
                    await client.handshake(initiator=True)


async def test_a_handshake_needs_a_key_and_must_come_first() -> None:
    left, right = streampickle.testing.memory_stream_pair()
    async with ObjectStream(left) as a, ObjectStream(right):
        with pytest.raises(UsageError, match="key"):
            await a.handshake(initiator=True)
    left, right = streampickle.testing.memory_stream_pair()
    async with ObjectStream(left, key=KEY) as a, ObjectStream(right, key=KEY) as b:
        await a.send("first")
        with pytest.raises(UsageError, match="first"):
            await a.handshake(initiator=True)
        assert await b.receive() == "first"
        with pytest.raises(UsageError, match="first"):
            await b.handshake(initiator=False)


# --- what an unproven peer's messages can do: nothing -----------------------------------------

RAN: list[str] = []


def side_effect(what: str) -> str:
    """Stands for any callable a trusting or allowing receiver would run while unpickling."""
    RAN.append(what)
    return what


class Runs:
    def __reduce__(self) -> Any:
        return (side_effect, ("reduce",))


class Persisted:
    pass


def wire(encoder: Encoder, obj: Any) -> bytes:
    return b"".join(bytes(c) for c in encoder.encode(obj))


async def victim_of(first: list[bytes], rest: list[bytes], *, stall: bool = False,
                    **options: Any) -> tuple[BaseException, Any]:
    """A keyed TCP server (``options`` for its stream) hand-shakes as the responder with an
    attacker that sends ``first``, stalls past the server's handshake deadline if ``stall``,
    then sends ``rest``: the handshake's error, and what a later receive gives."""
    listener = await streampickle.create_tcp_listener(local_host="127.0.0.1", key=KEY, **options)
    port = listener.extra(SocketAttribute.local_port)
    async with listener, await anyio.connect_tcp("127.0.0.1", port) as attacker, await listener.accept() as stream:
        await attacker.send(b"".join(first))
        with pytest.raises(Exception) as info:
            with anyio.fail_after(1 if stall else HANG):
                await stream.handshake(initiator=False)
        await attacker.send(b"".join(rest))
        await attacker.send_eof()
        with anyio.fail_after(HANG):
            try:
                after: Any = await stream.receive()
            except Exception as exc:  # noqa: BLE001 - the error is the outcome
                after = exc
    return info.value, after


@pytest.mark.parametrize("options", [{"trusted": True}, {"allow": [side_effect]}], ids=["trusted", "allow"])
async def test_an_unproven_peers_first_message_runs_nothing(options: dict[str, Any]) -> None:
    """A genuine keyed message 0 of another stream of the key (recorded before both ends
    hand-shook, say) reaches a receiver that trusts or allows what it names: it is loaded
    as plain data, so nothing it names runs, and the messages after it are not delivered."""
    RAN.clear()
    sender = Encoder(key=KEY)
    first, later = wire(sender, Runs()), wire(sender, {"op": "delete"})
    error, after = await victim_of([first], [later], **options)
    assert isinstance(error, streampickle.ForbiddenGlobalError)
    assert isinstance(after, streampickle.StreamPickleError)
    assert RAN == []


async def test_an_unproven_peers_persistent_ids_reach_no_persistent_load() -> None:
    RAN.clear()

    sender = Encoder(key=KEY, persistent_id=lambda obj: "an id" if isinstance(obj, Persisted) else None)
    error, after = await victim_of([wire(sender, (Persisted(),))], [], persistent_load=side_effect)
    assert isinstance(error, streampickle.StreamPickleError)
    assert isinstance(after, streampickle.StreamPickleError)
    assert RAN == []


async def test_an_unproven_peers_first_message_keeps_the_streams_opaque_key_limit() -> None:
    """Loading a handshake as plain data drops what the stream trusts or allows, not the CPU
    bound it set: a hello padded with keys whose hash the verifier can't check is refused by
    the lowered ``max_opaque_keys``, before it is unpickled."""
    import uuid

    hello = ("streampickle-handshake-1", "initiator", b"\0" * 16, {uuid.UUID(int=i): i for i in range(3)})
    error, after = await victim_of([wire(Encoder(key=KEY), hello)], [],
                                   limits=streampickle.Limits(max_opaque_keys=2))
    assert isinstance(error, streampickle.MalformedPickleError)
    assert "max_opaque_keys=2" in str(error)
    assert isinstance(after, streampickle.StreamPickleError)


async def test_a_handshake_cut_short_by_its_deadline_delivers_nothing_after() -> None:
    """The attacker replays a recorded hello, waits out the deadline, then sends the rest of
    the recording: the stream delivers none of it."""
    sender = Encoder(key=KEY)
    hello = wire(sender, ("streampickle-handshake-1", "initiator", b"\0" * 16))
    answer = wire(sender, ("streampickle-handshake-1-answer", "initiator", b"\1" * 16))
    error, after = await victim_of([hello], [answer, wire(sender, {"op": "delete"})], stall=True)
    assert isinstance(error, TimeoutError)
    assert isinstance(after, AuthenticationError)
    assert "did not complete" in str(after)


async def test_a_refused_peer_that_already_closed_is_still_refused_after() -> None:
    """Everything the attacker sends, its end included, is there before the handshake starts:
    after the refusal, a receive raises it again rather than reporting a clean end."""
    sender = Encoder(key=KEY)
    recording = b"".join([
        wire(sender, ("streampickle-handshake-1", "initiator", b"\0" * 16)),
        wire(sender, ("streampickle-handshake-1-answer", "initiator", b"\1" * 16)),
        bytes(sender.encode_end()),
    ])
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(recording)
        theirs.shutdown(socket.SHUT_WR)
        async with ObjectStream.from_socket(ours, key=KEY) as stream:
            with anyio.fail_after(HANG):
                with pytest.raises(AuthenticationError, match="challenge"):
                    await stream.handshake(initiator=False)
                with pytest.raises(AuthenticationError, match="challenge"):
                    await stream.receive()


async def test_a_handshake_while_another_task_receives_fails_the_stream() -> None:
    """That receive would load the unproven peer's first messages with the stream's own
    options: the stream is failed instead, and the waiting receive gets nothing."""
    left, right = streampickle.testing.memory_stream_pair()
    async with ObjectStream(left, key=KEY) as peer, ObjectStream(right, key=KEY, trusted=True) as victim:
        outcome: list[Any] = []

        async def receive() -> None:
            try:
                outcome.append(await victim.receive())
            except Exception as exc:  # noqa: BLE001 - the error is the outcome
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(UsageError, match="another task is receiving"):
                await victim.handshake(initiator=False)
            with anyio.fail_after(HANG):
                await peer.send(Runs())
        assert len(outcome) == 1 and isinstance(outcome[0], streampickle.StreamPickleError)
        assert RAN == []
