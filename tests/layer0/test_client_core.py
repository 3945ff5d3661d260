"""The client's sans-I/O core driven by hand: no socket, no event loop, a clock that moves only
when the test says so, and the server's own sans-I/O core (Layer0ServerCore) as the peer in memory.

Every outer request the client core asks for is answered (or lost, or refused) by the test, so
handshake repeats, exchange timeouts, session loss, re-registration of observations and the
close are checked step by step and at exact instants."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from cryptography.hazmat.primitives.asymmetric import ec

from coaplayers import pki
from coaplayers.dtls import (
    CertificateCredentials,
    PskClientCredentials,
    PskStore,
    RawPublicKeyCredentials,
    records,
)
from coaplayers.layer0 import inner
from coaplayers.layer0.clientcore import (
    REFUSED_PAUSE,
    ClientCredentials,
    Closed,
    Connected,
    Event,
    HandshakeDone,
    Layer0ClientCore,
    Layer0Config,
    Notification,
    ObservationEnded,
    OuterAnswer,
    OuterRequest,
    RequestFailed,
    ResponseReceived,
)
from coaplayers.layer0.core import Layer0ServerCore
from coaplayers.layer0.errors import (
    HandshakeFailed,
    Layer0Closed,
    NoAnswer,
    OuterError,
    ResponseRejected,
    ServerBusy,
    SessionLost,
)
from coaplayers.layer0.profile import INNER_BLOCK_SIZE, WELL_KNOWN_PATH
from coaplayers.layer0.server import make_listener

CREDS = PskClientCredentials(b"core-1", b"core-secret-0016")
PEER = ("coap", "192.0.2.7:5683")
BIG = bytes(range(256)) * 6  # three inner blocks


class MemoryServer:
    """A Layer 0 server in memory: Layer0ServerCore plus a few resources rendered on the spot."""

    def __init__(
        self, *, without_cookie: int = 8,
        credentials: PskStore | CertificateCredentials | RawPublicKeyCredentials | None = None,
    ) -> None:
        listener = make_listener(credentials or PskStore({CREDS.identity: CREDS.key}),
                                 without_cookie=without_cookie)
        self.core = Layer0ServerCore(listener)
        self.observers: dict[str, bytes] = {}  # session -> token of its observation
        self.value = 0
        self.received: list[Message] = []
        self.uploaded = bytearray()
        self.peer = PEER
        """The outer address entry requests come from (the cookie binds to it)."""

    def answer(self, request: OuterRequest, now: float) -> OuterAnswer:
        if request.path == WELL_KNOWN_PATH:
            a = self.core.entry(self.peer, request.payload, now)
            return OuterAnswer(a.code, a.payload, a.location or ())
        sid = request.path[-1]
        delete = request.code == Code.DELETE
        a, plaintexts = self.core.datagram(sid, request.payload, now, delete=delete)
        if a.pull:
            a = self.core.queued(sid) or a
        sealed = [self._render(sid, p) for p in plaintexts]
        return OuterAnswer(a.code, a.payload + b"".join(sealed))

    def _render(self, sid: str, plaintext: bytes) -> bytes:
        msg = inner.decode(plaintext)
        request = msg.message
        self.received.append(request)
        if request.code == Code.PING:
            response = Message(code=Code.PONG)
        elif request.opt.uri_path == ("hello",):
            response = Message(code=Code.CONTENT, payload=b"hi")
        elif request.opt.uri_path == ("echo",):
            b1 = request.opt.block1
            if b1 is None:
                response = Message(code=Code.CHANGED, payload=request.payload)
            else:
                self.uploaded += request.payload
                response = Message(code=Code.CONTINUE if b1.more else Code.CHANGED,
                                   block1=b1, payload=b"" if b1.more else b"%d" % len(
                                       self.uploaded))
        elif request.opt.uri_path == ("big",):
            b2 = request.opt.block2 or BlockOption.BlockwiseTuple(0, False, 5)
            start = b2.block_number * INNER_BLOCK_SIZE
            more = start + INNER_BLOCK_SIZE < len(BIG)
            response = Message(code=Code.CONTENT, payload=BIG[start:start + INNER_BLOCK_SIZE],
                               block2=BlockOption.BlockwiseTuple(b2.block_number, more, 5))
        elif request.opt.uri_path == ("obs",):
            if request.opt.observe == 0:
                self.observers[sid] = msg.token
                response = Message(code=Code.CONTENT, observe=self.value,
                                   payload=b"v%d" % self.value)
            else:
                self.observers.pop(sid, None)
                response = Message(code=Code.CONTENT, payload=b"v%d" % self.value)
        else:
            response = Message(code=Code.NOT_FOUND)
        return self.core.seal(sid, inner.encode(msg.token, response))

    def notify(self) -> None:
        """The observed value changes: a notification is queued for every observer."""
        self.value += 1
        for sid, token in list(self.observers.items()):
            note = Message(code=Code.CONTENT, observe=self.value, payload=b"v%d" % self.value)
            if not self.core.enqueue(sid, self.core.seal(sid, inner.encode(token, note))):
                del self.observers[sid]

    def forget(self) -> None:
        """A restart: every session and observation is gone."""
        self.core.close_all()
        self.observers.clear()


Fate = Callable[[OuterRequest], str]  # "answer", "lose" (never answered), "refuse"


@dataclass
class Net:
    """Moves the client core's outer requests to the server and time forward, by hand."""

    client: Layer0ClientCore
    server: MemoryServer
    now: float = 0.0
    events: list[Event] = field(default_factory=list)
    sent: list[OuterRequest] = field(default_factory=list)
    lost: list[OuterRequest] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)  # exchanges the core stopped waiting for
    fate: Fate = lambda request: "answer"

    def collect(self) -> None:
        while (event := self.client.next_event()) is not None:
            self.events.append(event)
        self.cancelled += self.client.exchanges_to_cancel()

    def step(self) -> bool:
        """Deliver what is waiting to be sent; without any, move time to the next timer."""
        self.collect()
        requests = self.client.outer_requests_to_send()
        if not requests:
            timer = self.client.get_timer()
            if timer is None:
                return False
            assert timer >= self.now, "a timer in the past"
            self.now = timer
            self.client.handle_timer(self.now)
            self.collect()
            return True
        for request in requests:
            self.sent.append(request)
            fate = self.fate(request)
            if fate == "lose":
                self.lost.append(request)
            elif fate == "refuse":
                self.client.outer_failed(request.xid, OuterError("refused"), self.now,
                                         refused=True)
            else:
                self.client.outer_answer(request.xid, self.server.answer(request, self.now),
                                         self.now)
        self.collect()
        return True

    def run(self, done: Callable[[], bool], steps: int = 200) -> None:
        for _ in range(steps):
            if done():
                return
            if not self.step():
                break
        assert done(), f"not done after the network went quiet; events: {self.events}"

    def result(self, rid: int) -> Event:
        self.run(lambda: self.outcome(rid) is not None)
        outcome = self.outcome(rid)
        assert outcome is not None
        return outcome

    def outcome(self, rid: int) -> Event | None:
        for event in self.events:
            if isinstance(event, ResponseReceived | RequestFailed | Connected) and (
                    event.request == rid):
                return event
        return None

    def response(self, rid: int) -> Message:
        outcome = self.result(rid)
        assert isinstance(outcome, ResponseReceived), outcome
        return outcome.response

    def notes(self, rid: int) -> list[bytes]:
        return [bytes(e.message.payload) for e in self.events
                if isinstance(e, Notification) and e.request == rid]


def network(config: Layer0Config | None = None, **server: int) -> Net:
    client = Layer0ClientCore("coap://origin.test", CREDS, config or Layer0Config())
    return Net(client, MemoryServer(**server))


def get(path: str, **options: object) -> Message:
    return Message(code=Code.GET, uri_path=[path], **options)


def test_a_request_handshakes_first_and_gets_its_answer() -> None:
    net = network()
    rid = net.client.request(get("hello"), net.now)
    assert net.client.get_timer() == net.client.config.handshake_timeout  # the handshake's
    assert net.response(rid).payload == b"hi"
    assert net.client.handshakes == 1 and net.server.core.stats.handshakes == 1
    assert any(isinstance(e, HandshakeDone) for e in net.events)
    assert net.sent[0].path == WELL_KNOWN_PATH and net.sent[-1].path == net.client.session_path
    assert net.now == 0.0  # nothing waited for a timer
    # A second request reuses the session: one outer exchange.
    before = len(net.sent)
    assert net.response(net.client.request(get("hello"), net.now)).payload == b"hi"
    assert len(net.sent) == before + 1 and net.client.handshakes == 1


def test_one_handshake_serves_requests_made_while_it_runs() -> None:
    net = network()
    rids = [net.client.request(get("hello"), net.now) for _ in range(3)]
    assert [net.response(rid).payload for rid in rids] == [b"hi"] * 3
    assert net.client.handshakes == 1 and net.server.core.stats.handshakes == 1


def test_a_lost_flight_is_sent_again_when_its_exchange_times_out() -> None:
    config = Layer0Config(exchange_timeout=7.0)
    net = network(config)
    first = True

    def lose_first(request: OuterRequest) -> str:
        nonlocal first
        if request.path != WELL_KNOWN_PATH and first:
            first = False  # the client's second flight (after the ServerHello) is lost
            return "lose"
        return "answer"

    net.fate = lose_first
    rid = net.client.request(get("hello"), net.now)
    assert net.response(rid).payload == b"hi"
    assert len(net.lost) == 1 and net.now == 7.0  # repeated at the exchange timeout exactly
    repeat = [r for r in net.sent if r.payload == net.lost[0].payload and r is not net.lost[0]]
    assert repeat, "the lost flight was not sent again"
    assert net.client.handshakes == 1


def test_a_refused_exchange_is_repeated_after_a_growing_pause() -> None:
    net = network()
    refusals = 2

    def refuse_twice(request: OuterRequest) -> str:
        nonlocal refusals
        if refusals:
            refusals -= 1
            return "refuse"
        return "answer"

    net.fate = refuse_twice
    rid = net.client.request(get("hello"), net.now)
    net.step()  # the ClientHello, refused
    assert net.client.get_timer() == REFUSED_PAUSE
    net.step()  # the pause
    net.step()  # the repeat, refused again
    assert net.client.get_timer() == pytest.approx(REFUSED_PAUSE + 2 * REFUSED_PAUSE)
    assert net.response(rid).payload == b"hi"
    assert net.now == pytest.approx(3 * REFUSED_PAUSE)


def test_silence_fails_the_handshake_with_no_answer_at_its_deadline() -> None:
    config = Layer0Config(handshake_timeout=20.0, exchange_timeout=50.0)
    net = network(config)
    net.fate = lambda request: "lose"
    rid = net.client.request(get("hello"), net.now)
    outcome = net.result(rid)
    assert isinstance(outcome, RequestFailed) and isinstance(outcome.error, NoAnswer)
    assert net.now == 20.0 and net.client.get_timer() is None
    assert net.cancelled == [r.xid for r in net.lost]  # nobody waits for them now
    assert not net.client.established


def test_a_server_that_stops_answering_the_last_flight_looks_like_a_wrong_psk() -> None:
    config = Layer0Config(handshake_timeout=100.0, exchange_timeout=1.0, max_flight_repeats=2)
    net = network(config)
    net.fate = lambda request: "answer" if request.path == WELL_KNOWN_PATH else "lose"
    rid = net.client.request(get("hello"), net.now)
    outcome = net.result(rid)
    assert isinstance(outcome, RequestFailed) and isinstance(outcome.error, OuterError)
    assert net.now == 3.0  # the flight and its two repeats, each after one exchange timeout


def test_a_lost_session_means_a_new_handshake_and_an_idempotent_resend() -> None:
    net = network()
    assert net.response(net.client.request(get("hello"), net.now)).payload == b"hi"
    old = net.client.session_path
    before = len(net.sent)
    net.server.forget()
    rid = net.client.request(get("hello"), net.now)
    assert net.response(rid).payload == b"hi"
    assert net.client.handshakes == 2 and net.client.session_path != old
    # The request got 4.04; an inner Ping on the old session (4.04 too) told the session was
    # gone rather than our record refused; then a new handshake, then the resend.
    request, ping, hello = net.sent[before:before + 3]
    assert request.path == ping.path == old and hello.path == WELL_KNOWN_PATH
    assert net.sent[-1].path == net.client.session_path


def test_a_lost_session_fails_a_post_that_is_not_resent() -> None:
    net = network()
    net.response(net.client.request(get("hello"), net.now))
    net.server.forget()
    rid = net.client.request(Message(code=Code.POST, uri_path=["echo"], payload=b"x"), net.now)
    outcome = net.result(rid)
    assert isinstance(outcome, RequestFailed) and isinstance(outcome.error, SessionLost)
    assert not net.client.established
    # the next request handshakes again
    assert net.response(net.client.request(get("hello"), net.now)).payload == b"hi"
    assert net.client.handshakes == 2


def test_block_wise_both_ways_inside_the_tunnel() -> None:
    net = network()
    up = net.client.request(Message(code=Code.POST, uri_path=["echo"], payload=BIG), net.now)
    assert net.response(up).payload == b"%d" % len(BIG)
    assert bytes(net.server.uploaded) == BIG
    down = net.client.request(get("big"), net.now)
    response = net.response(down)
    assert response.payload == BIG and response.opt.block2 is None


def test_notifications_are_pulled_and_acknowledged() -> None:
    config = Layer0Config(poll_pause=2.0)
    net = network(config)
    rid = net.client.request(get("obs", observe=0), net.now)
    assert net.response(rid).payload == b"v0"
    net.step()  # the first pull finds nothing queued: a pause follows
    assert net.client.get_timer() == net.now + 2.0
    net.server.notify()
    net.server.notify()
    net.run(lambda: len(net.notes(rid)) == 2)
    assert net.notes(rid) == [b"v1", b"v2"]
    sid = net.client.session_path
    assert sid is not None
    net.run(lambda: not net.server.core.sessions[sid[0]].outbox)  # the next pull acknowledged
    assert net.notes(rid) == [b"v1", b"v2"]  # and nothing was delivered twice


def test_an_observation_is_registered_again_after_the_session_is_lost() -> None:
    net = network(Layer0Config(poll_pause=1.0))
    rid = net.client.request(get("obs", observe=0), net.now)
    assert net.response(rid).payload == b"v0"
    net.server.notify()
    net.run(lambda: net.notes(rid) == [b"v1"])
    net.server.forget()  # the poll gets 4.04, the Ping tells the session is gone
    net.server.value = 7
    net.run(lambda: len(net.notes(rid)) == 2)
    assert net.notes(rid) == [b"v1", b"v7"]  # the fresh representation after registering again
    assert net.client.reregistrations == 1 and net.client.handshakes == 2
    net.server.notify()
    net.run(lambda: len(net.notes(rid)) == 3)
    assert net.notes(rid)[-1] == b"v8"  # Observe numbers counted afresh on the new session


def test_without_reregistration_a_lost_session_ends_the_observation() -> None:
    net = network(Layer0Config(poll_pause=1.0, reregister_observations=False))
    rid = net.client.request(get("obs", observe=0), net.now)
    net.response(rid)
    net.server.forget()
    net.run(lambda: any(isinstance(e, ObservationEnded) for e in net.events))
    ended = [e for e in net.events if isinstance(e, ObservationEnded)]
    assert len(ended) == 1 and isinstance(ended[0].error, SessionLost)
    assert net.client.reregistrations == 0


def test_cancelling_an_observation_ends_it_and_tells_the_server() -> None:
    net = network(Layer0Config(poll_pause=1.0))
    rid = net.client.request(get("obs", observe=0), net.now)
    net.response(rid)
    sid = net.client.session_path
    assert sid is not None and sid[0] in net.server.observers
    net.client.cancel_observation(rid, net.now)
    net.collect()
    assert ObservationEnded(rid, None) in net.events
    net.run(lambda: sid[0] not in net.server.observers)
    assert net.server.received[-1].opt.observe == 1


def test_close_sends_close_notify_and_fails_what_is_pending() -> None:
    net = network()
    net.response(net.client.request(get("hello"), net.now))
    sid = net.client.session_path
    assert sid is not None and sid[0] in net.server.core.sessions
    net.fate = lambda request: "lose" if request.path == sid else "answer"
    pending = net.client.request(get("hello"), net.now)
    net.step()  # the request is out, its answer lost
    net.fate = lambda request: "answer"
    net.client.close(net.now)
    net.run(lambda: Closed() in net.events)
    outcome = net.outcome(pending)
    assert isinstance(outcome, RequestFailed) and isinstance(outcome.error, Layer0Closed)
    assert net.sent[-1].code == Code.DELETE and sid[0] not in net.server.core.sessions
    assert net.client.get_timer() is None
    with pytest.raises(Layer0Closed):
        net.client.request(get("hello"), net.now)


def test_close_is_bounded_when_the_delete_is_lost() -> None:
    net = network(Layer0Config(close_timeout=3.0))
    net.response(net.client.request(get("hello"), net.now))
    net.fate = lambda request: "lose"
    start = net.now
    net.client.close(net.now)
    net.run(lambda: Closed() in net.events)
    assert net.now == start + 3.0


def test_connect_reports_the_handshake() -> None:
    net = network()
    rid = net.client.connect(net.now)
    outcome = net.result(rid)
    assert isinstance(outcome, Connected) and outcome.handshake is net.client.last_handshake
    assert net.client.established and net.client.kind == "psk"


def test_a_refused_handshake_is_a_handshake_failure() -> None:
    net = network()
    net.fate = lambda request: "answer"
    real = net.server.answer

    def busy(request: OuterRequest, now: float) -> OuterAnswer:
        if request.path == WELL_KNOWN_PATH:
            return OuterAnswer(Code.CREATED, b"", ("~x",))  # no ServerHello
        return real(request, now)

    net.server.answer = busy  # type: ignore[method-assign]
    outcome = net.result(net.client.request(get("hello"), net.now))
    assert isinstance(outcome, RequestFailed) and isinstance(outcome.error, HandshakeFailed)


def test_a_busy_answer_says_who_was_busy() -> None:
    """A 5.03 to a ClientHello may come from a proxy (its diagnostic says why), not only
    from an origin with too many handshakes: the error passes the reason on."""
    net = network()
    net.fate = lambda request: "answer"

    def starting(request: OuterRequest, now: float) -> OuterAnswer:
        return OuterAnswer(Code.SERVICE_UNAVAILABLE, b"proxy starting")

    net.server.answer = starting  # type: ignore[method-assign]
    outcome = net.result(net.client.request(get("hello"), net.now))
    assert isinstance(outcome, RequestFailed) and isinstance(outcome.error, ServerBusy)
    assert "proxy starting" in str(outcome.error)
    assert "too many handshakes" not in str(outcome.error)


def test_a_get_whose_exchange_times_out_is_sent_again() -> None:
    net = network(Layer0Config(exchange_timeout=4.0))
    net.response(net.client.request(get("hello"), net.now))
    sid = net.client.session_path
    lose = [True]

    def lose_once(request: OuterRequest) -> str:
        if request.path == sid and lose[0]:
            lose[0] = False
            return "lose"
        return "answer"

    net.fate = lose_once
    start = net.now
    rid = net.client.request(get("hello"), net.now)
    assert net.response(rid).payload == b"hi"
    assert net.now == start + 4.0 and net.client.handshakes == 1
    assert net.cancelled == [net.lost[0].xid]


def test_an_answer_swapped_into_another_exchange_still_reaches_its_request() -> None:
    """A middle box swaps two outer answers: each request finds its own inner answer in the
    other's exchange (authentic, routed by token) instead of failing."""
    net = network()
    net.response(net.client.request(get("hello"), net.now))
    first = net.client.request(get("hello"), net.now)
    second = net.client.request(Message(code=Code.POST, uri_path=["echo"], payload=b"2"),
                                net.now)
    a, b = net.client.outer_requests_to_send()
    answer_a, answer_b = net.server.answer(a, net.now), net.server.answer(b, net.now)
    net.client.outer_answer(a.xid, answer_b, net.now)  # swapped
    net.collect()
    assert net.outcome(first) is None  # it waits for its own answer a little
    assert net.client.get_timer() == net.now + net.client.config.misrouted_wait
    net.client.outer_answer(b.xid, answer_a, net.now)
    net.collect()
    assert net.response(first).payload == b"hi"
    assert net.response(second).payload == b"2"


def test_a_swapped_answer_that_never_comes_is_rejected_after_the_wait() -> None:
    net = network(Layer0Config(misrouted_wait=2.0))
    net.response(net.client.request(get("hello"), net.now))
    first = net.client.request(get("hello"), net.now)
    net.client.request(get("hello"), net.now)
    a, b = net.client.outer_requests_to_send()
    net.server.answer(a, net.now)  # the server answered both; a middle box kept a's answer
    net.client.outer_answer(a.xid, net.server.answer(b, net.now), net.now)
    net.collect()
    assert net.client.get_timer() == net.now + 2.0
    net.client.handle_timer(net.now + 2.0)
    net.collect()
    outcome = net.outcome(first)
    assert isinstance(outcome, RequestFailed) and isinstance(outcome.error, ResponseRejected)


def test_a_resumed_handshake_carries_the_first_request_with_its_last_flight() -> None:
    ca = pki.make_ca("client core test CA")
    server, device = pki.issue(ca, "origin.test", names=["origin.test"]), pki.issue(ca, "dev")
    client = Layer0ClientCore("coap://origin.test", CertificateCredentials(
        [device.certificate], device.private_key, [ca.certificate], server_name="origin.test"))
    net = Net(client, MemoryServer(credentials=CertificateCredentials(
        [server.certificate], server.private_key, [ca.certificate])))
    assert net.response(client.request(get("hello"), net.now)).payload == b"hi"
    assert client.last_handshake is not None and not client.last_handshake.resumed
    assert net.sent[0].pad_to == client.config.pad_hello_to  # its answer: the certificates
    client.forget_session()  # locally: the next request resumes with the kept session
    before = len(net.sent)
    assert net.response(client.request(get("hello"), net.now)).payload == b"hi"
    assert client.last_handshake.resumed and client.handshakes == 2
    # ClientHello -> ServerHello..Finished; then our Finished and the request in one exchange
    hello, final = net.sent[before:]
    assert hello.path == WELL_KNOWN_PATH and final.path == client.session_path
    assert hello.pad_to == 0  # a resumption offer is not padded


@pytest.fixture(scope="module")
def kinds() -> dict[str, tuple[ClientCredentials, PskStore | CertificateCredentials
                                | RawPublicKeyCredentials]]:
    """Client and server credentials of each kind (PSK: tinydtls, or OpenSSL where the OSCORE
    mode needs the exporter; certificates: OpenSSL; raw public keys: GnuTLS)."""
    ca = pki.make_ca("client core test CA")
    server, device = pki.issue(ca, "origin.test", names=["origin.test"]), pki.issue(ca, "dev")
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    return {
        "psk": (CREDS, PskStore({CREDS.identity: CREDS.key})),
        "psk-exporter": (CREDS, PskStore({CREDS.identity: CREDS.key})),
        "cert": (CertificateCredentials([device.certificate], device.private_key,
                                        [ca.certificate], server_name="origin.test"),
                 CertificateCredentials([server.certificate], server.private_key,
                                        [ca.certificate])),
        "rpk": (RawPublicKeyCredentials(client_key, [server_key.public_key()]),
                RawPublicKeyCredentials(server_key, [client_key.public_key()])),
    }


def moving_client(kind: str, kinds: dict, config: Layer0Config | None = None, *,
                  every: bool) -> Net:
    """A client whose requests reach an origin that always asks for a cookie from a new outer
    address after the first entry request (``every``: after each one), as through a NAT that
    rebinds or a middle box that sends from several sockets."""
    client_creds, server_creds = kinds[kind]
    client = Layer0ClientCore("coap://origin.test", client_creds, config or Layer0Config(),
                              exporter=kind == "psk-exporter")
    net = Net(client, MemoryServer(without_cookie=0, credentials=server_creds))
    real = net.server.answer
    ports = iter(range(40000, 40100))

    def answer(request: OuterRequest, now: float) -> OuterAnswer:
        answer = real(request, now)
        if request.path == WELL_KNOWN_PATH and (every or net.server.peer == PEER):
            net.server.peer = ("coap", f"192.0.2.7:{next(ports)}")
        return answer

    net.server.answer = answer  # type: ignore[method-assign]
    return net


@pytest.mark.parametrize("kind", ["psk", "psk-exporter", "cert", "rpk"])
def test_a_new_cookie_asked_for_starts_the_handshake_over_at_once(kind: str, kinds: dict) -> None:
    """Our cookie-bearing ClientHello reaches the origin from another address than the first
    one, so it gets another HelloVerifyRequest. No engine (tinydtls, OpenSSL, GnuTLS) answers
    a second one, and the cookie is bound to the ClientHello's random: the client starts over
    with a fresh ClientHello at once, instead of repeating the stale one until it gives up."""
    net = moving_client(kind, kinds, every=False)
    rid = net.client.request(get("hello"), net.now)
    assert net.response(rid).payload == b"hi"
    assert net.client.handshakes == 1 and net.server.core.stats.handshakes == 1
    assert net.now == 0.0  # nothing waited for a timer
    hellos = [r.payload for r in net.sent if r.path == WELL_KNOWN_PATH]
    assert len(hellos) == 4  # hello, with the stale cookie, a fresh hello, with its cookie
    randoms = [records.client_hello_random(h) for h in hellos]
    cookies = [records.client_hello_cookie(h) for h in hellos]
    assert randoms[0] == randoms[1] != randoms[2] == randoms[3]
    assert cookies[0] == cookies[2] == b"" and cookies[1] and cookies[3]
    assert cookies[1] != cookies[3]


def test_a_server_that_asks_for_a_new_cookie_every_time_fails_after_the_attempts(
        kinds: dict) -> None:
    """Bounded: each fresh ClientHello counts as one of ``handshake_attempts``."""
    net = moving_client("psk", kinds, Layer0Config(handshake_attempts=2), every=True)
    outcome = net.result(net.client.request(get("hello"), net.now))
    assert isinstance(outcome, RequestFailed) and isinstance(outcome.error, HandshakeFailed)
    assert "new cookie" in str(outcome.error)
    assert [r.path for r in net.sent] == [WELL_KNOWN_PATH] * 4  # two attempts of two hellos
    assert net.now == 0.0 and net.client.get_timer() is None
