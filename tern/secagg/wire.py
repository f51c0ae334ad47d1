"""Opening and sealing the seven secure-aggregation messages of one cohort's round.

A receiver opens a message under caps that follow the cohort (its largest
neighbourhood, its vector length and ring), checks its signature with the sender's
key from the fleet file (the gateway's for server messages), and that it belongs to
this fleet, run, round and model version. Server messages must be addressed to the
receiver. Bodies are then read strictly by `tern.secagg.bodies`.
"""

from __future__ import annotations

from collections.abc import Mapping

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey

from tern.caps import FAILURE_CAPS
from tern.cbor import Caps, head
from tern.envelope import SCHEMA_VERSIONS, Envelope, Kind, canonical, open_envelope, seal
from tern.errors import PayloadTooLarge
from tern.secagg.bodies import MAX_KEYS_MESSAGE, KeysBody
from tern.secagg.crypto import CIPHERTEXT_BYTES, SecAggError
from tern.secagg.graph import Cohort
from tern.secagg.ring import packed_size
from tern.secagg.shamir import SHARE_BYTES

__all__ = [
    "MEMBER_KINDS",
    "SERVER_KINDS",
    "KeysTemplate",
    "check_facts",
    "member_caps",
    "open_keys_advert",
    "open_member_message",
    "open_server_message",
    "seal_message",
    "server_caps",
]

MEMBER_KINDS = frozenset({Kind.SA_KEYS, Kind.SA_SHARES, Kind.SA_MASKED, Kind.SA_REVEAL})
SERVER_KINDS = frozenset({Kind.SA_ROSTER, Kind.SA_INBOX, Kind.SA_SURVIVORS})

# The envelope around any body: 9 keys, ids of up to 64 characters, a 64-byte signature.
_ENVELOPE_BYTES = 512
_ENVELOPE_ITEMS = 19
_ID = 2 + 64  # a text id of up to 64 characters, with its head
_BODY = 32  # a body map's head and short keys


def _caps(body_bytes: int, body_items: int) -> Caps:
    return Caps(_ENVELOPE_BYTES + _BODY + body_bytes, _ENVELOPE_ITEMS + 5 + body_items)


def member_caps(cohort: Cohort) -> dict[Kind, Caps]:
    """The largest valid message of each kind a member sends in this cohort."""
    k = cohort.widest
    return {
        Kind.SA_KEYS: _caps(2 * 34, 4),
        Kind.SA_SHARES: _caps(k * (_ID + 2 + CIPHERTEXT_BYTES), 2 * k),
        Kind.SA_MASKED: _caps(5 + 9 + packed_size(cohort.length, cohort.bits), 4),
        Kind.SA_REVEAL: _caps(2 * (k + 1) * (_ID + 2 + SHARE_BYTES), 4 * (k + 1)),
    }


def server_caps(cohort: Cohort) -> dict[Kind, Caps]:
    """The largest valid message of each kind the gateway sends in this cohort."""
    k = cohort.widest
    return {
        Kind.SA_ROSTER: _caps(_ID + k * (3 + MAX_KEYS_MESSAGE), k + 2),
        Kind.SA_INBOX: _caps(_ID + k * (_ID + 2 + CIPHERTEXT_BYTES), 2 * k + 2),
        Kind.SA_SURVIVORS: _caps(_ID + (k + 1) * _ID, k + 4),
    }


def _union(caps: Mapping[Kind, Caps]) -> Caps:
    return Caps(max(c.max_bytes for c in caps.values()), max(c.max_items for c in caps.values()))


def check_facts(env: Envelope, cohort: Cohort, sender: str) -> None:
    """The envelope is of this cohort's fleet, run, round and model, from `sender`."""
    if env.fleet != cohort.fleet:
        raise SecAggError("a message of another fleet", "wrong_fleet")
    if env.run != cohort.run:
        raise SecAggError(
            "a message of another run", "stale_run" if env.run < cohort.run else "future_run"
        )
    if env.round != cohort.round:
        reason = "stale_round" if env.round < cohort.round else "future_round"
        raise SecAggError("a message of another round", reason)
    if env.model_version != cohort.model_version:
        raise SecAggError("a message about another model version", "wrong_model")
    if env.sender != sender:
        raise SecAggError("a message signed by someone else", "wrong_sender")


def _check_size(data: bytes, kind: Kind, caps: Mapping[Kind, Caps]) -> None:
    if len(data) > caps[kind].max_bytes:
        raise PayloadTooLarge(len(data), caps[kind].max_bytes)


def open_member_message(
    data: bytes, cohort: Cohort, sender: str, *, failures: bool = False
) -> Envelope:
    """A member's stage message, as the gateway receives it on `sender`'s topic; with
    `failures`, also the `failure` a member sends when it could not train (the round
    machines' trust boundary, `tern.admit.admit_stage`, takes both)."""
    if sender not in cohort.graph:
        raise SecAggError("a message from outside the cohort", "not_member")
    caps = member_caps(cohort)
    kinds = MEMBER_KINDS
    if failures:
        caps[Kind.FAILURE] = FAILURE_CAPS
        kinds = kinds | {Kind.FAILURE}
    env = open_envelope(
        data, cohort.keys, fleet=cohort.fleet, kinds=kinds, caps=_union(caps),
        round=cohort.round, run=cohort.run, sender=sender,
    )  # fmt: skip
    _check_size(data, env.kind, caps)
    check_facts(env, cohort, sender)
    return env


def open_server_message(data: bytes, cohort: Cohort, me: str) -> Envelope:
    """The gateway's stage message to member `me`."""
    caps = server_caps(cohort)
    env = open_envelope(
        data, {cohort.server: cohort.server_key}, fleet=cohort.fleet, kinds=SERVER_KINDS,
        caps=_union(caps), round=cohort.round, run=cohort.run, sender=cohort.server,
    )  # fmt: skip
    _check_size(data, env.kind, caps)
    check_facts(env, cohort, cohort.server)
    if not isinstance(env.body, Mapping) or env.body.get("to") != me:
        raise SecAggError("a message addressed to another member", "not_addressed")
    return env


def seal_message(cohort: Cohort, kind: Kind, sender: str, body: object, key: SigningKey) -> bytes:
    env = Envelope(
        kind, cohort.fleet, cohort.round, cohort.model_version, sender, body, run=cohort.run
    )
    return seal(env, key)


class KeysTemplate:
    """The canonical bytes of any SA_KEYS of one cohort's round, but for the signature,
    the two keys and the sender: a member checks hundreds of its neighbours' signed
    advertisements in a roster, and matching them against this costs a tenth of the
    general decoder. Anything that does not match goes through the general path."""

    __slots__ = ("_after_c", "_after_s", "_after_sig", "_before_sig", "cohort")

    def __init__(self, cohort: Cohort) -> None:
        self.cohort = cohort
        self._before_sig = b"".join(
            (head(5, 9), canonical("v"), canonical(SCHEMA_VERSIONS[-1]), canonical("run"),
             canonical(cohort.run), canonical("sig"), head(2, 64))
        )  # fmt: skip
        self._after_sig = canonical("body") + head(5, 2) + canonical("c") + head(2, 32)
        self._after_c = canonical("s") + head(2, 32)
        self._after_s = b"".join(
            (canonical("kind"), canonical(str(Kind.SA_KEYS)), canonical("fleet"),
             canonical(cohort.fleet), canonical("model"), canonical(cohort.model_version),
             canonical("round"), canonical(cohort.round), canonical("sender"))
        )  # fmt: skip

    def match(self, raw: bytes) -> tuple[str, KeysBody, bytes, bytes] | None:
        """(sender, keys, signed bytes, signature) when `raw` is exactly canonical."""
        i = len(self._before_sig)
        if raw[:i] != self._before_sig:
            return None
        sig, i = raw[i : i + 64], i + 64
        n = len(self._after_sig)
        if raw[i : i + n] != self._after_sig:
            return None
        c, i = raw[i + n : i + n + 32], i + n + 32
        n = len(self._after_c)
        if raw[i : i + n] != self._after_c:
            return None
        s_key, i = raw[i + n : i + n + 32], i + n + 32
        n = len(self._after_s)
        if raw[i : i + n] != self._after_s:
            return None
        i += n
        rest = raw[i:]
        if rest[:1] and 0x61 <= rest[0] <= 0x77:
            size, start = rest[0] - 0x60, 1
        elif rest[:1] == b"\x78" and len(rest) > 1 and 24 <= rest[1] <= 64:
            size, start = rest[1], 2
        else:
            return None
        if len(rest) != start + size or not rest[start:].isascii():
            return None
        sender = rest[start:].decode("ascii")
        entry = len(canonical("sig")) + 2 + 64  # the "sig" key, the byte string's head, 64 bytes
        cut = len(self._before_sig) - entry + 64
        signed = head(5, 8) + raw[1:cut] + raw[cut + entry :]
        return sender, KeysBody(c, s_key), signed, sig


def open_keys_advert(raw: bytes, template: KeysTemplate) -> tuple[str, KeysBody]:
    """A member's signed SA_KEYS as relayed in a roster: (sender, its keys), verified
    with the sender's own key; a TernError when refused."""
    cohort = template.cohort
    matched = template.match(raw) if len(raw) <= MAX_KEYS_MESSAGE else None
    if matched is None:
        env = open_envelope(
            raw, cohort.keys, fleet=cohort.fleet, kinds={Kind.SA_KEYS},
            caps=member_caps(cohort)[Kind.SA_KEYS], round=cohort.round, run=cohort.run,
        )  # fmt: skip
        check_facts(env, cohort, env.sender)
        return env.sender, KeysBody.from_body(env.body)
    sender, keys, signed, sig = matched
    key = cohort.keys.get(sender)
    if key is None:
        raise SecAggError("a key advertisement from outside the cohort", "not_member")
    try:
        key.verify(signed, sig)
    except BadSignatureError:
        raise SecAggError(
            "a key advertisement's signature does not verify", "bad_signature"
        ) from None
    return sender, keys
