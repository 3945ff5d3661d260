"""OSCORE keys from the Layer 0 DTLS handshake (this project's reading of ATLS -05 sec. 9.1).

The whole procedure, as Layer 0 runs it (normative text: docs/OSCORE-KEYING.md):

1. The DTLS handshake in Layer 0 completes (OpenSSL backend: it has the exporter).
2. The server picks the parameters (:class:`~coaplayers.oscore.params.OscoreParameters`;
   ``client_id`` from :meth:`coaplayers.oscore.server.ContextStore.allocate_client_id`) and
   sends ``params.to_cbor()`` to the client as DTLS application data inside Layer 0.
3. Both ends call the exporter with :data:`EXPORTER_LABEL`, *no* context value and
   :func:`exporter_length` bytes (:func:`export_keying_material` does this for a pyOpenSSL
   connection), and then :func:`derive_context` with their own :class:`Role`.
4. The client parses the server's bytes with ``OscoreParameters.from_cbor`` (strict).

The first half of the exporter output is the Master Secret, the second half the Master Salt.
Everything here is pure computation on bytes; no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from .context import SecurityContext
from .errors import KeyingError
from .params import OscoreParameters, aead_algorithm

#: TLS exporter label (RFC 5705 / RFC 8446 Section 7.5), from ATLS -05 section 9.1.
EXPORTER_LABEL = b"atls-oscore"


class Role(enum.Enum):
    """Which end of the Layer 0 handshake we are. The DTLS client is the OSCORE client."""

    CLIENT = "client"
    SERVER = "server"


def key_length(params: OscoreParameters) -> int:
    """Key length of the AEAD algorithm in bytes (16 for the default AES-CCM-16-64-128)."""
    return int(aead_algorithm(params.aead).key_bytes)


def exporter_length(params: OscoreParameters) -> int:
    """How many bytes to ask the exporter for: 2 x the AEAD key length (ATLS -05 9.1)."""
    return 2 * key_length(params)


@dataclass(frozen=True)
class KeyMaterial:
    """Master Secret and Master Salt cut from the exporter output. Never printed."""

    master_secret: bytes = field(repr=False)
    master_salt: bytes = field(repr=False)


def split_exporter(exporter_output: bytes, params: OscoreParameters) -> KeyMaterial:
    """First ``key_length`` bytes: Master Secret; last ``key_length`` bytes: Master Salt."""
    n = key_length(params)
    if len(exporter_output) != 2 * n:
        raise KeyingError(
            f"exporter output is {len(exporter_output)} bytes, expected {2 * n}"
            f" for AEAD {params.aead}"
        )
    return KeyMaterial(master_secret=bytes(exporter_output[:n]),
                       master_salt=bytes(exporter_output[n:]))


def derive_context(
    exporter_output: bytes,
    params: OscoreParameters,
    role: Role,
    **context_options: Any,
) -> SecurityContext:
    """Build our end's RFC 8613 security context from the exporter output and parameters.

    :param exporter_output: ``TLS-Exporter("atls-oscore", no context, exporter_length(params))``
        of the Layer 0 session.
    :param params: the parameters the server sent (client: parsed with
        ``OscoreParameters.from_cbor``; server: the ones it sent).
    :param role: our role in the Layer 0 handshake.
    :param context_options: passed on to :class:`SecurityContext` (``peer``,
        ``rekey_threshold``, ``on_rekey_needed``, ``replay_window``, ``store``...).

    The client's Sender ID is ``params.client_id``, the server's is ``params.server_id``.
    """
    material = split_exporter(exporter_output, params)
    if role is Role.CLIENT:
        sender_id, recipient_id = params.client_id, params.server_id
    elif role is Role.SERVER:
        sender_id, recipient_id = params.server_id, params.client_id
    else:  # pragma: no cover - enum exhausted
        raise TypeError(role)
    return SecurityContext(
        master_secret=material.master_secret,
        master_salt=material.master_salt,
        sender_id=sender_id,
        recipient_id=recipient_id,
        id_context=params.id_context,
        aead=params.aead,
        hkdf=params.hkdf,
        **context_options,
    )


class Exporter(Protocol):
    """Anything with an RFC 5705 exporter: a pyOpenSSL ``Connection``, a DTLS engine session."""

    def export_keying_material(
        self, label: bytes, length: int, context: bytes | None = None, /
    ) -> bytes: ...


def export_keying_material(connection: Exporter, params: OscoreParameters) -> bytes:
    """Run the exporter on an established pyOpenSSL ``OpenSSL.SSL.Connection``.

    Passes no context value, which for (D)TLS 1.2 is *not* the same as an empty one (RFC
    5705 Section 4 mixes a context length into the PRF input only when a context is
    given); this profile fixes "no context" (docs/OSCORE-KEYING.md, section "Exporter").
    """
    out = connection.export_keying_material(EXPORTER_LABEL, exporter_length(params), None)
    return bytes(out)
