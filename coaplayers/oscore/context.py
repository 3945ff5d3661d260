"""The project's RFC 8613 security context: aiocoap's OSCORE, plus what this project needs.

:class:`SecurityContext` reuses aiocoap's unprotect code (COSE, AAD, replay window) and its
algorithms, and changes four things:

* **Outer options.** aiocoap 0.4.17 drops Proxy-Scheme and Uri-Port when it builds the outer
  message of a request; RFC 8613 Section 4.1.3.3 keeps them outer (Class U), and a forward
  proxy needs them. :meth:`SecurityContext._split_message` puts them back. They are not
  part of the AAD, so this changes nothing in the ciphertext.
* **Sequence numbers.** They are never reused: a hard limit raises
  :class:`~coaplayers.oscore.errors.SequenceNumbersExhausted` before the space runs out,
  a lower ``rekey_threshold`` fires ``on_rekey_needed`` once so that Layer 0 can run a new
  handshake in time, and with a :class:`~coaplayers.oscore.persistence.ContextFile` the
  high-water mark is stored ahead (RFC 8613 Appendix B.1.1) before a number is used.
* **Identity.** ``peer`` names the authenticated Layer 0 peer the keys came from; resources
  see it as ``request.remote.authenticated_claims`` and the context as
  ``request.remote.security_context``.
* **No secrets in repr or logs.**

For speed, protecting (:meth:`SecurityContext.protect`, :meth:`~SecurityContext._split_message`,
:meth:`~SecurityContext._construct_nonce`) is written out for this non-group context instead
of going through aiocoap's general code; the bytes are the same (tests/oscore compare them
with aiocoap's and with the RFC 8613 Appendix C vectors). So is unprotecting
(:meth:`SecurityContext.unprotect`) for the usual message; Echo recovery and the rarer forms
go through aiocoap's code.

It is sans-I/O except for the optional persistence hook, which writes synchronously on
purpose: a sequence number must be on disk before it is on the wire.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import cbor2
from aiocoap import Message
from aiocoap import oscore as _aiooscore
from aiocoap.message import Direction
from aiocoap.numbers import OptionNumber
from aiocoap.numbers.codes import FETCH, POST
from aiocoap.options import Options
from aiocoap.optiontypes import OpaqueOption as _OpaqueOption
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import aead as _crypto_aead

from .. import _aiocoap
from .errors import KeyingError, SequenceNumbersExhausted
from .params import (
    DEFAULT_AEAD,
    DEFAULT_HKDF,
    AeadAlgorithm,
    aead_algorithm,
    hkdf_hash,
    max_id_length,
)

if TYPE_CHECKING:
    from .persistence import ContextFile

_Aead = _crypto_aead.AESCCM | _crypto_aead.AESGCM

#: Highest sender sequence number RFC 8613 allows (Partial IV is at most 5 bytes).
MAX_SEQUENCE_NUMBER = _aiooscore.MAX_SEQNO

#: Options that aiocoap's split keeps out of a request's plaintext (Class U / Proxy-Uri).
_OUTER_ONLY = frozenset({
    OptionNumber.URI_HOST, OptionNumber.URI_PORT, OptionNumber.PROXY_URI,
    OptionNumber.PROXY_SCHEME,
})

_OBSERVE = OptionNumber.OBSERVE
_OSCORE = OptionNumber.OSCORE

#: The fixed start of the AAD's Enc_structure (array of 3, "Encrypt0", empty protected
#: header) and the empty byte string that ends the external AAD (see SecurityContext._aad).
_ENC0_HEAD = b"\x83" + cbor2.dumps("Encrypt0") + cbor2.dumps(b"")
_EMPTY_BSTR = cbor2.dumps(b"")

#: OSCORE option flags whose messages unprotect through aiocoap's general code.
_ODD_FLAGS = _aiooscore.COMPRESSION_BITS_RESERVED | _aiooscore.COMPRESSION_BIT_GROUP

#: Replay window size (RFC 8613 Section 7.4 suggests 32 as the default).
DEFAULT_REPLAY_WINDOW = 32


class SecurityContext(  # aiocoap's OSCORE classes carry no types
    _aiooscore.CanProtect, _aiooscore.CanUnprotect, _aiooscore.SecurityContextUtils  # type: ignore[misc]
):
    """One RFC 8613 security context (one peer, one role), usable with aiocoap.

    Usually built by :func:`coaplayers.oscore.keying.derive_context` from a Layer 0
    handshake; built directly for static keys (tests, pre-provisioned peers).

    :param master_secret: RFC 8613 Master Secret.
    :param master_salt: RFC 8613 Master Salt (``b""`` is the RFC's default).
    :param sender_id: our Sender ID; :param recipient_id: the peer's Sender ID.
    :param id_context: RFC 8613 ID Context, or None.
    :param aead: COSE AEAD algorithm (default 10, AES-CCM-16-64-128).
    :param hkdf: HKDF parameter (-10: SHA-256, -11: SHA-512).
    :param sender_sequence_number: first sequence number to use.
    :param replay_window: size of the replay window for received requests.
    :param replay_window_known: False after a restart from persisted state: the window is
        then unknown and requests are answered with 4.01 + Echo (RFC 8613 Appendix B.1.2)
        until a fresh request proves liveness.
    :param sequence_limit: highest sequence number this context may use (hard limit).
    :param rekey_threshold: at this sequence number, ``on_rekey_needed(self)`` is called once
        and :attr:`needs_rekey` becomes true; protection goes on until ``sequence_limit``.
    :param on_rekey_needed: callback for the above.
    :param peer: name of the authenticated peer the keys belong to (e.g. its certificate
        subject); exposed to resources as the request's authenticated claims.
    :param store: persistence for the sequence number high-water mark (see
        :class:`~coaplayers.oscore.persistence.ContextFile`).
    """

    @property
    def alg_signature(self) -> None:
        """Not a group context: there is no signature algorithm.

        aiocoap 0.4.17's ``unprotect`` reads this for a message whose OSCORE option carries
        the group flag, and turns only ``NameError`` into its ``DecodeError`` ("Group messages
        can not be decoded with this non-group context"); an absent attribute would raise
        ``AttributeError`` past every caller that expects ``ProtectionInvalid`` (found by
        tests/fuzz/test_fuzz_oscore.py).
        """
        raise NameError("not a group OSCORE context")

    def __init__(
        self,
        *,
        master_secret: bytes,
        sender_id: bytes,
        recipient_id: bytes,
        master_salt: bytes = b"",
        id_context: bytes | None = None,
        aead: int = DEFAULT_AEAD,
        hkdf: int = DEFAULT_HKDF,
        sender_sequence_number: int = 0,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
        replay_window_known: bool = True,
        sequence_limit: int = MAX_SEQUENCE_NUMBER,
        rekey_threshold: int | None = None,
        on_rekey_needed: Callable[[SecurityContext], None] | None = None,
        peer: str | None = None,
        store: ContextFile | None = None,
    ) -> None:
        self._set_identity(sender_id, recipient_id, id_context, aead, hkdf)
        self.derive_keys(bytes(master_salt), bytes(master_secret))
        self._set_state(
            sender_sequence_number=sender_sequence_number,
            replay_window=replay_window,
            replay_window_known=replay_window_known,
            sequence_limit=sequence_limit,
            rekey_threshold=rekey_threshold,
            on_rekey_needed=on_rekey_needed,
            peer=peer,
            store=store,
        )

    @classmethod
    def from_derived_keys(
        cls,
        *,
        sender_key: bytes,
        recipient_key: bytes,
        common_iv: bytes,
        sender_id: bytes,
        recipient_id: bytes,
        id_context: bytes | None = None,
        aead: int = DEFAULT_AEAD,
        hkdf: int = DEFAULT_HKDF,
        **state: Any,
    ) -> SecurityContext:
        """Rebuild a context from its derived keys (what a persisted context file holds,
        so that the Master Secret need not outlive the derivation)."""
        self = cls.__new__(cls)
        self._set_identity(sender_id, recipient_id, id_context, aead, hkdf)
        key_bytes = self.alg_aead.key_bytes
        if len(sender_key) != key_bytes or len(recipient_key) != key_bytes:
            raise KeyingError("key length does not match the AEAD algorithm")
        if len(common_iv) != self.alg_aead.iv_bytes:
            raise KeyingError("Common IV length does not match the AEAD algorithm")
        self.sender_key = bytes(sender_key)
        self.recipient_key = bytes(recipient_key)
        self.common_iv = bytes(common_iv)
        self._set_state(**state)
        return self

    def _set_identity(
        self,
        sender_id: bytes,
        recipient_id: bytes,
        id_context: bytes | None,
        aead: int,
        hkdf: int,
    ) -> None:
        self.alg_aead = aead_algorithm(aead)
        self.hashfun = hkdf_hash(hkdf)
        self.aead_value = aead
        self.hkdf_value = hkdf
        limit = max_id_length(aead)
        if len(sender_id) > limit or len(recipient_id) > limit:
            raise KeyingError(f"Sender/Recipient ID longer than {limit} bytes")
        if sender_id == recipient_id:
            raise KeyingError("Sender ID and Recipient ID must differ")
        self.sender_id = bytes(sender_id)
        self.recipient_id = bytes(recipient_id)
        self.id_context = None if id_context is None else bytes(id_context)

    def _set_state(
        self,
        *,
        sender_sequence_number: int = 0,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
        replay_window_known: bool = True,
        sequence_limit: int = MAX_SEQUENCE_NUMBER,
        rekey_threshold: int | None = None,
        on_rekey_needed: Callable[[SecurityContext], None] | None = None,
        peer: str | None = None,
        store: ContextFile | None = None,
    ) -> None:
        if not 0 <= sender_sequence_number <= MAX_SEQUENCE_NUMBER:
            raise KeyingError("sender sequence number out of range")
        self.sender_sequence_number = sender_sequence_number
        self.sequence_limit: int = min(sequence_limit, MAX_SEQUENCE_NUMBER)
        # Per-context constants of protecting and unprotecting, computed on first use:
        # AEAD objects by key, nonce bases by Partial IV generator, AAD heads by kid.
        self._aeads: dict[bytes, _Aead | Literal[False]] = {}
        self._nonce_bases: dict[bytes, tuple[bytes, int]] = {}
        self._aad_heads: dict[bytes, bytes] = {}
        self.rekey_threshold = rekey_threshold
        self.on_rekey_needed = on_rekey_needed
        self._rekey_signalled = False

        self.recipient_replay_window = _aiooscore.ReplayWindow(replay_window, lambda: None)
        if replay_window_known:
            self.recipient_replay_window.initialize_empty()
            # aiocoap's unprotect consults this only while the window is uninitialized.
            self.echo_recovery: bytes | None = None
        else:
            self.echo_recovery = secrets.token_bytes(8)

        self.peer = peer
        self.authenticated_claims = [peer] if peer is not None else []
        self.store = store
        if store is not None:
            store.attach(self)

    def __repr__(self) -> str:
        # Never the keys: repr ends up in aiocoap's debug logs.
        return (
            f"<{type(self).__name__} sender_id={self.sender_id.hex()!r}"
            f" recipient_id={self.recipient_id.hex()!r}"
            f" id_context={None if self.id_context is None else self.id_context.hex()!r}"
            f" peer={self.peer!r} seq={self.sender_sequence_number}>"
        )

    # -- sequence numbers ------------------------------------------------------------

    @property
    def needs_rekey(self) -> bool:
        """True once the rekey threshold is reached: Layer 0 should run a new handshake."""
        return (
            self.rekey_threshold is not None
            and self.sender_sequence_number >= self.rekey_threshold
        )

    @property
    def remaining_sequence_numbers(self) -> int:
        """How many more messages this context can protect with a fresh Partial IV."""
        return max(0, self.sequence_limit + 1 - self.sender_sequence_number)

    def new_sequence_number(self) -> int:
        """Hand out the next sender sequence number, exactly once.

        The store (if any) is asked to cover the number *before* it is returned, so that no
        crash can lead to the same number being used again after a restart.
        """
        number = self.sender_sequence_number
        if number > self.sequence_limit:
            raise SequenceNumbersExhausted(self)
        if self.store is not None:
            self.store.reserve(number)
        self.sender_sequence_number = number + 1
        if self.needs_rekey and not self._rekey_signalled:
            self._rekey_signalled = True
            if self.on_rekey_needed is not None:
                self.on_rekey_needed(self)
        return number

    def post_seqnoincrease(self) -> None:
        """Required by aiocoap's CanProtect; the work is done in :meth:`new_sequence_number`."""

    # -- protection --------------------------------------------------------------------

    def protect(self, message: Message, request_id: Any = None, *,
                kid_context: Any = True) -> tuple[Message, Any]:
        """RFC 8613 Section 8.1 / 8.3: the protected (outer) message and the request's
        identifiers. A request also remembers the Partial IV it went out with
        (``message.oscore_request_piv``), so that a refusal of it can be checked with the
        server (:class:`~coaplayers.oscore.mode.OscoreRequester`).

        The steps of aiocoap's ``CanProtect.protect`` for a non-group context, written out:
        aiocoap's general version (group modes, signatures, deterministic requests) builds
        the COSE header twice and formats a dozen debug strings whether or not debug
        logging is on; this one costs about half as much per message (docs/BENCHMARKS.md;
        in coap-bench each runs cache-cold between datagrams). The
        output is byte-identical (tests/oscore/test_oscore_fastpaths.py compares it with
        aiocoap's for requests and responses; the RFC 8613 Appendix C vectors pass). The
        AEAD is aiocoap's algorithm object (the ``cryptography`` library), unchanged.
        """
        is_request = message.code.is_request()
        if (request_id is None) != is_request:
            raise ValueError("a request is protected without, a response with request_id")
        outer, plaintext = self._split_message(message, request_id)
        outer.direction = Direction.OUTGOING
        outer.transport_tuning = message.transport_tuning
        alg = self.alg_aead

        generated_by: bytes | None = None
        piv = b""  # set below: the request's (reused) or a fresh Partial IV
        if request_id is not None:
            generated_by, piv = request_id.get_reusable_kid_and_piv()
        if generated_by is None:
            # A fresh Partial IV: every request, and responses that may not reuse the
            # request's nonce (Observe notifications after the first, Echo answers).
            seqno = self.new_sequence_number()
            piv = seqno.to_bytes(5, "big").lstrip(b"\0") or b"\0"
            generated_by = self.sender_id
            option_piv = piv
        else:
            option_piv = b""
        nonce = self._construct_nonce(piv, generated_by, alg)

        # The OSCORE option (RFC 8613 Section 6.1): flags, Partial IV, kid context, kid.
        flags = len(option_piv)
        kid = b""
        s_kid_context = b""
        if is_request:
            request_id = _aiooscore.RequestIdentifiers(
                self.sender_id, piv, can_reuse_nonce=None, request_code=outer.code
            )
            flags |= _aiooscore.COMPRESSION_BIT_K
            kid = self.sender_id
            if kid_context is True:
                context_value = self.id_context
            elif kid_context is False:
                context_value = None
            else:
                context_value = kid_context
            if context_value is not None:
                if len(context_value) > 255:
                    raise ValueError("KID Context too long")
                flags |= _aiooscore.COMPRESSION_BIT_H
                s_kid_context = bytes((len(context_value),)) + context_value
        # (What the ``oscore`` setter stores, made directly: cheaper than the setter.)
        _aiocoap.option_lists(outer.opt)[_OSCORE] = [_OpaqueOption(
            _OSCORE, bytes((flags,)) + option_piv + s_kid_context + kid if flags else b""
        )]

        aad = self._exchange_aad(alg, request_id)
        outer.payload = self._seal(alg, self.sender_key, nonce, plaintext, aad)
        if is_request:
            message.oscore_request_piv = piv
        return outer, request_id

    def _construct_nonce(
        self, partial_iv_short: bytes, piv_generator_id: bytes, alg: AeadAlgorithm
    ) -> bytes:
        """aiocoap's nonce (RFC 8613 Section 5.2), XORed as one integer and without its
        debug line, whose three hex strings were built even with debug logging off (two
        nonces per message; the saving: docs/BENCHMARKS.md). The Common IV XOR the ID
        part is a constant per Partial IV generator, kept after its first use. Same inputs,
        same bytes (tests/oscore/test_oscore_fastpaths.py and the RFC 8613 vectors check it).
        """
        if len(partial_iv_short) <= 5:
            entry = self._nonce_bases.get(piv_generator_id)
            if entry is None or entry[0] is not self.common_iv:
                base = int.from_bytes(
                    self._construct_nonce_slowly(b"", piv_generator_id, alg), "big"
                )
                if len(self._nonce_bases) >= 8:
                    self._nonce_bases.clear()
                entry = self._nonce_bases[piv_generator_id] = (self.common_iv, base)
            return (entry[1] ^ int.from_bytes(partial_iv_short, "big")).to_bytes(
                alg.iv_bytes, "big"
            )
        return self._construct_nonce_slowly(partial_iv_short, piv_generator_id, alg)

    def _construct_nonce_slowly(
        self, partial_iv_short: bytes, piv_generator_id: bytes, alg: AeadAlgorithm
    ) -> bytes:
        components = (
            bytes((len(piv_generator_id),))
            + b"\0" * (alg.iv_bytes - 6 - len(piv_generator_id))
            + piv_generator_id
            + b"\0" * (5 - len(partial_iv_short))
            + partial_iv_short
        )
        size = len(components)
        common = self.common_iv[:size]
        if len(common) != size:
            raise ValueError("Common IV shorter than the nonce")
        value = int.from_bytes(common, "big") ^ int.from_bytes(components, "big")
        return value.to_bytes(size, "big")

    def _exchange_aad(self, alg: AeadAlgorithm, request_id: Any) -> bytes:
        """The AAD of a request and of every response to it: it names the request's kid and
        Partial IV (RFC 8613 Section 5.4), so it is computed once per exchange and kept on
        the request's identifiers (aiocoap's ``RequestIdentifiers``, a plain object)."""
        fields = request_id.__dict__
        aad = fields.get("_coaplayers_aad")
        if aad is None:
            aad = fields["_coaplayers_aad"] = self._aad(alg, request_id.kid,
                                                        request_id.partial_iv)
        return aad  # type: ignore[no-any-return]

    def _aad(self, alg: AeadAlgorithm, kid: bytes, partial_iv: bytes) -> bytes:
        """The AAD (RFC 8613 Section 5.4; no Class I options, one algorithm, non-group):
        ``Enc_structure ["Encrypt0", h'', external_aad]`` with ``external_aad = [1,
        [alg], kid, piv, h'']``, each a definite-length CBOR array, so its encoding is the
        array head followed by the items' encodings (cbor2 encodes each). All but the
        Partial IV is fixed per kid, so that part is kept; the bytes equal
        ``cbor2.dumps`` of the whole structure (tests/oscore/test_oscore_fastpaths.py)."""
        head = self._aad_heads.get(kid)
        if head is None:
            head = b"\x85" + cbor2.dumps(1) + cbor2.dumps([alg.value]) + cbor2.dumps(kid)
            if len(self._aad_heads) >= 8:
                self._aad_heads.clear()
            self._aad_heads[kid] = head
        return _ENC0_HEAD + cbor2.dumps(head + cbor2.dumps(partial_iv) + _EMPTY_BSTR)

    def _aead(self, alg: AeadAlgorithm, key: bytes) -> _Aead | None:
        """A reusable ``cryptography`` AEAD object for ``key`` (aiocoap's AES-CCM and
        AES-GCM build one per message), or None for the algorithms left to aiocoap."""
        aead: _Aead | Literal[False] | None = self._aeads.get(key)
        if aead is None:
            if isinstance(alg, _aiooscore.AES_CCM):
                aead = _crypto_aead.AESCCM(key, alg.tag_bytes)
            elif isinstance(alg, _aiooscore.AES_GCM):
                aead = _crypto_aead.AESGCM(key)
            else:
                aead = False
            if len(self._aeads) >= 4:
                self._aeads.clear()
            self._aeads[key] = aead
        return aead or None

    def _seal(
        self, alg: AeadAlgorithm, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes
    ) -> bytes:
        aead = self._aead(alg, key)
        if aead is None:
            return alg.encrypt(plaintext, aad, key, nonce)
        return aead.encrypt(nonce, plaintext, aad)

    def _open(
        self, alg: AeadAlgorithm, key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes
    ) -> bytes:
        aead = self._aead(alg, key)
        if aead is None:
            return alg.decrypt(ciphertext, aad, key, nonce)
        try:
            return aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise _aiooscore.ProtectionInvalid("Tag invalid") from None

    # -- unprotection -------------------------------------------------------------------

    def unprotect(self, protected_message: Message, request_id: Any = None) -> tuple[Message, Any]:
        """RFC 8613 Section 8.2 / 8.4: the inner message and the request's identifiers.

        The steps of aiocoap's ``CanUnprotect.unprotect`` for the usual message of this
        non-group context with a known replay window, written out as :meth:`protect` is:
        aiocoap's general version parses the OSCORE option into a COSE header map, builds
        the external AAD through its group-aware code and evaluates about ten debug calls
        per message (this costs less than half of it: docs/BENCHMARKS.md). The checks, their
        order and the exceptions are aiocoap's (tests/oscore/test_oscore_fastpaths.py
        compares both on valid, forged, replayed and malformed messages). Everything else
        goes to aiocoap's code unchanged: a replay window not yet known (Echo recovery,
        RFC 8613 Appendix B.1.2), the group flag, reserved bits, truncated fields.
        """
        option = protected_message.opt.oscore
        if option and option[0] & _aiooscore.COMPRESSION_BITS_N > 5:
            # RFC 8613 section 6.1 reserves the lengths 6 and 7; the nonce has room for 5
            # bytes (both paths below would fail building it with a bare ValueError).
            raise _aiooscore.DecodeError("Partial IV length is reserved (6 or 7)")
        is_response = protected_message.code.is_response()
        if (
            option is None
            or (request_id is not None) != is_response
            or protected_message.direction is not Direction.INCOMING
            or self.echo_recovery is not None
            or not self.recipient_replay_window.is_initialized()
        ):
            return super().unprotect(protected_message, request_id)  # type: ignore[no-any-return]
        flags = option[0] if option else 0
        if flags & _ODD_FLAGS:
            return super().unprotect(protected_message, request_id)  # type: ignore[no-any-return]
        tail = option[1:]
        piv_length = flags & _aiooscore.COMPRESSION_BITS_N
        partial_iv = tail[:piv_length]
        tail = tail[piv_length:]
        if flags & _aiooscore.COMPRESSION_BIT_H:
            if not tail or len(tail) - 1 < tail[0] or len(partial_iv) < piv_length:
                return super().unprotect(protected_message, request_id)  # type: ignore[no-any-return]
            size = tail[0]
            if tail[1:1 + size] != self.id_context:
                raise _aiooscore.ProtectionInvalid("Sender ID context does not match")
            tail = tail[1 + size:]
        elif len(partial_iv) < piv_length:
            return super().unprotect(protected_message, request_id)  # type: ignore[no-any-return]
        if flags & _aiooscore.COMPRESSION_BIT_K and tail != self.recipient_id:
            raise _aiooscore.ProtectionInvalid("Sender ID does not match")

        seqno = None
        if not piv_length:
            if not is_response:
                raise _aiooscore.ProtectionInvalid("No sequence number provided in request")
            partial_iv = request_id.partial_iv
            generated_by = request_id.kid
        else:
            generated_by = self.recipient_id
            seqno = int.from_bytes(partial_iv, "big")
            if not is_response:
                if not self.recipient_replay_window.is_valid(seqno):
                    raise _aiooscore.ReplayError("Sequence number was reused")
                request_id = _aiooscore.RequestIdentifiers(
                    generated_by, partial_iv, can_reuse_nonce=True,
                    request_code=protected_message.code,
                )
        if request_id.request_hash is not None:  # deterministic requests: aiocoap's code
            return super().unprotect(protected_message, request_id)  # type: ignore[no-any-return]

        alg = self.alg_aead
        ciphertext = protected_message.payload
        if len(ciphertext) < alg.tag_bytes + 1:  # +1: the plaintext holds at least the code
            raise _aiooscore.ProtectionInvalid("Ciphertext too short")
        aad = self._exchange_aad(alg, request_id)
        nonce = self._construct_nonce(partial_iv, generated_by, alg)
        plaintext = self._open(alg, self.recipient_key, nonce, ciphertext, aad)

        if not is_response:
            self.recipient_replay_window.strike_out(seqno)
        inner = Message(code=plaintext[0])
        inner.payload = inner.opt.decode(plaintext[1:])
        inner.direction = Direction.INCOMING
        if not is_response:
            if protected_message.opt.observe != 0:
                inner.opt.observe = None
        elif protected_message.opt.observe is not None:
            # As aiocoap: -1 sorts before every sequence number in reordering checks.
            inner.opt.observe = -1 if seqno is None else seqno
        return inner, request_id

    # -- RFC 8613 outer options --------------------------------------------------------

    def _split_message(self, message: Message, request_id: Any) -> tuple[Message, bytes]:
        """aiocoap's split, plus the Class U options it drops (Proxy-Scheme, Uri-Port).

        RFC 8613 Section 4.1.3.3: Uri-Host, Uri-Port and Proxy-Scheme are outer options
        (Proxy-Uri is split into them plus inner Uri-Path/Uri-Query, which aiocoap already
        does). They are not authenticated, so the ciphertext is the same either way.

        Without Proxy-Uri (every request of this project's clients, and every response) the
        split is done here without aiocoap's ``message.copy()``, whose ``deepcopy`` of the
        options was the largest single cost of protecting a message (docs/BENCHMARKS.md,
        "Costs behind the code"). The result is the
        same: the inner options are the message's minus Uri-Host, Uri-Port, Proxy-Uri and
        Proxy-Scheme (responses: all of them), encoded after the code, then 0xFF and the
        payload; the outer message carries the code POST / FETCH (Observe) or the response
        code, Uri-Host, Observe, Proxy-Scheme and Uri-Port (tests/oscore check both paths
        against each other and the RFC 8613 vectors).
        """
        opt = message.opt
        is_request = message.code.is_request()
        if is_request and opt.proxy_uri is not None:
            outer, plaintext = super()._split_message(message, request_id)
        else:
            if is_request:
                # One pass; the outer message reuses the request's (immutable) option
                # objects: Uri-Host, Proxy-Scheme and Uri-Port outer only, Observe both.
                observe = opt.observe
                outer = Message(code=POST if observe is None else FETCH)
                inner = Options()
                options = _aiocoap.option_lists(opt)
                _aiocoap.set_option_lists(
                    inner, {n: v for n, v in options.items() if n not in _OUTER_ONLY})
                _aiocoap.set_option_lists(outer.opt, {
                    n: list(v) for n, v in options.items() if n in _OUTER_ONLY or n == _OBSERVE
                })  # (Proxy-Uri never gets here)
                encoded = inner.encode()
            else:
                outer = Message(code=request_id.code_style.response)
                encoded = opt.encode()
            payload = message.payload
            plaintext = bytes((message.code,)) + encoded
            if payload:
                plaintext += b"\xff" + payload
            return outer, plaintext
        if is_request:
            if opt.proxy_scheme is not None and outer.opt.proxy_scheme is None:
                outer.opt.proxy_scheme = opt.proxy_scheme
            if opt.uri_port is not None and outer.opt.uri_port is None:
                outer.opt.uri_port = opt.uri_port
        return outer, plaintext

    # -- server-side lookup (aiocoap credentials interface) ----------------------------

    @property
    def lookup_key(self) -> tuple[bytes, bytes | None]:
        """(Recipient ID, ID Context): what identifies this context in an incoming request."""
        return (self.recipient_id, self.id_context)
