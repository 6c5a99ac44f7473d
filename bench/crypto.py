"""Suite ``crypto``: Nostr cryptography against rust-nostr (nostr-sdk), interleaved round by round.

* NIP-44 v2 encrypt + decrypt of 1 KB and 32 KB messages. Both sides do the same work per
  call: ECDH conversation key, then encrypt; ECDH again, then decrypt (nostr-sdk's
  ``nip44_encrypt``/``nip44_decrypt`` take the keys, so neither side caches the key).
* NIP-59 gift wrap + unwrap of a 1 KB kind-14 rumor (seal, ephemeral key, two NIP-44 layers,
  two signatures; unwrapping checks the seal's signature on both sides and, on ours, the
  wrap's too).
* NIP-01 event verification on one core: ``Event.from_dict(d).verify()`` over a batch of
  pre-signed events from a pool of authors, against bare libsecp256k1 BIP-340 verification
  of the same signatures; and ``Event.from_json`` + ``verify`` against nostr-sdk's.

nostr-sdk is timed through its synchronous uniffi bindings: no Python event loop runs, and
its key/event objects are built before the clock starts, as ours are.
"""
from __future__ import annotations

import random
import string
from types import ModuleType

from bench.harness import BenchError, Context, suite
from dvm import nip44, nip59
from dvm.keys import PrivateKey, PublicKey
from dvm.nip01 import Event, make_rumor, sign_event

NIP44_SIZES = (("1k", 1024), ("32k", 32 * 1024))
EVENT_VERIFY_TARGET_PER_S = 15_000
AUTHORS = 50
_MISSING = "nostr-sdk is not installed (test-only: pip install nostr-sdk==0.45.1); comparison skipped"


def _nostr_sdk() -> ModuleType | None:
    try:
        import nostr_sdk
    except ImportError:
        return None
    return nostr_sdk


def _text(rng: random.Random, size: int) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits + " .,\n", k=size))


def _signed_events(rng: random.Random, count: int) -> list[Event]:
    authors = [PrivateKey.generate() for _ in range(AUTHORS)]
    return [
        sign_event(authors[i % AUTHORS], 1, _text(rng, rng.randint(32, 512)),
                   [["p", authors[(i + 1) % AUTHORS].public_key.hex()], ["e", rng.randbytes(32).hex()], ["t", "bench"]],
                   1_700_000_000 + i)
        for i in range(count)
    ]


@suite("crypto", "Nostr crypto: NIP-44, NIP-59 gift wraps and NIP-01 event verification vs nostr-sdk")
def run(ctx: Context) -> None:
    """Measure and record the crypto metrics (see the module docstring)."""
    ns = _nostr_sdk()
    rng = random.Random(44)
    alice, bob = PrivateKey.generate(), PrivateKey.generate()
    if ns is None:
        ctx.note(_MISSING)
    else:
        ctx.note("nostr-sdk measured through its synchronous bindings (no event loop); "
                 "its keys and events are prepared outside the timed calls, like ours")
    _nip44(ctx, ns, rng, alice, bob)
    _giftwrap(ctx, ns, rng, alice, bob)
    _event_verify(ctx, ns, rng)


def _nip44(ctx: Context, ns: ModuleType | None, rng: random.Random, alice: PrivateKey, bob: PrivateKey) -> None:
    ratios = []
    for name, size in NIP44_SIZES:
        message = _text(rng, size)

        def ours(message: str = message) -> str:
            payload = nip44.encrypt(message, nip44.conversation_key(alice, bob.public_key))
            return nip44.decrypt(payload, nip44.conversation_key(bob, alice.public_key))

        rounds = ctx.n(full=60, quick=15) if size > 4096 else ctx.n(full=150, quick=30)
        label = f"NIP-44 {name} encrypt+decrypt"
        if ns is None:
            ctx.record(f"nip44_{name}_ms", ctx.measure(ours, rounds, label=label), unit="ms")
            ctx.record(f"nip44_{name}_time_ratio_vs_nostr_sdk", None, 1.0, unit="x", note=_MISSING)
            continue
        a_sk, a_pk = ns.SecretKey.parse(alice.secret_hex()), ns.PublicKey.parse(alice.public_key.hex())
        b_sk, b_pk = ns.SecretKey.parse(bob.secret_hex()), ns.PublicKey.parse(bob.public_key.hex())

        def theirs(message: str = message) -> str:
            payload = ns.nip44_encrypt(a_sk, b_pk, message, ns.Nip44Version.V2)
            return str(ns.nip44_decrypt(b_sk, a_pk, payload))

        if ours() != message or theirs() != message:
            raise BenchError(f"NIP-44 {name} round trip does not return the message")
        comparison = ctx.interleaved(ours, theirs, rounds, label=label, names=("cdvm", "nostr-sdk"))
        ratios.append(comparison.ratio.median)
        ctx.record(f"nip44_{name}_time_ratio_vs_nostr_sdk", comparison.ratio, 1.0, unit="x")
        ctx.record(f"nip44_{name}_ms", comparison.a, unit="ms")
        ctx.record(f"nip44_{name}_nostr_sdk_ms", comparison.b, unit="ms")
    ctx.record("nip44_time_ratio_vs_nostr_sdk", max(ratios) if ratios else None, 1.0, unit="x",
               note="worst of the 1 KB and 32 KB ratios" if ratios else _MISSING)


def _giftwrap(ctx: Context, ns: ModuleType | None, rng: random.Random, alice: PrivateKey, bob: PrivateKey) -> None:
    content = _text(rng, 1024)
    rumor = make_rumor(alice.public_key, 14, content, [["p", bob.public_key.hex()]], 1_700_000_000)

    def ours() -> str:
        return nip59.unwrap(bob, nip59.gift_wrap(alice, rumor, bob.public_key)).rumor.content

    rounds = ctx.n(full=80, quick=20)
    label = "NIP-59 gift wrap+unwrap 1 KB"
    if ns is None:
        ctx.record("giftwrap_ms", ctx.measure(ours, rounds, label=label), unit="ms")
        ctx.record("giftwrap_time_ratio_vs_nostr_sdk", None, 1.0, unit="x", note=_MISSING)
        return
    n_alice, n_bob = ns.Keys.parse(alice.secret_hex()), ns.Keys.parse(bob.secret_hex())
    n_bob_pk = n_bob.public_key()
    n_rumor = (ns.EventBuilder(ns.Kind(14), content).tags([ns.Tag.parse(["p", bob.public_key.hex()])])
               .custom_created_at(ns.Timestamp.from_secs(1_700_000_000)).finalize_unsigned(n_alice.public_key()))

    def theirs() -> str:
        return str(ns.UnwrappedGift.from_gift_wrap(n_bob, ns.nip59_make_gift_wrap(n_alice, n_bob_pk, n_rumor))
                   .rumor().content())

    if ours() != content or theirs() != content:
        raise BenchError("gift wrap round trip does not return the rumor")
    comparison = ctx.interleaved(ours, theirs, rounds, label=label, names=("cdvm", "nostr-sdk"))
    ctx.record("giftwrap_time_ratio_vs_nostr_sdk", comparison.ratio, 1.0, unit="x",
               note="seal + wrap, then unwrap with seal checks (ours also verifies the wrap's signature)")
    ctx.record("giftwrap_ms", comparison.a, unit="ms")
    ctx.record("giftwrap_nostr_sdk_ms", comparison.b, unit="ms")


def _event_verify(ctx: Context, ns: ModuleType | None, rng: random.Random) -> None:
    events = _signed_events(rng, ctx.n(full=2000, quick=400))
    dicts = [event.to_dict() for event in events]
    texts = [event.to_json() for event in events]
    raw = [(PublicKey.from_hex(e.pubkey), bytes.fromhex(e.id), bytes.fromhex(e.sig)) for e in events]
    count = len(events)

    def ours() -> None:
        for data in dicts:
            Event.from_dict(data).verify()

    def schnorr() -> None:
        for public_key, digest, signature in raw:
            if not public_key.verify_schnorr(digest, signature):
                raise BenchError("a pre-signed benchmark event does not verify")

    rounds = ctx.n(full=30, quick=8)
    comparison = ctx.interleaved(ours, schnorr, rounds, inner=1, label=f"verify {count} events",
                                 names=("Event.from_dict+verify", "libsecp256k1 schnorr"))
    ctx.note(f"event verification: batches of {count} kind-1 events (32-512 character content, 3 tags) "
             f"signed by {AUTHORS} authors, one core, one batch per round")
    ctx.record("event_verify_per_s", count / comparison.a.median, EVENT_VERIFY_TARGET_PER_S, "higher", unit="/s",
               note="Event.from_dict + verify (id recomputed, BIP-340 signature checked)")
    ctx.record("schnorr_verify_per_s", count / comparison.b.median, better="higher", unit="/s",
               note="bare libsecp256k1 BIP-340 verify of the same signatures (reference ceiling)")
    ctx.record("event_verify_time_ratio_vs_schnorr", comparison.ratio, unit="x",
               note="share of time outside the signature check = 1 - 1/ratio")

    def ours_json() -> None:
        for text in texts:
            Event.from_json(text).verify()

    if ns is None:
        ctx.record("event_verify_json_ratio_vs_nostr_sdk", None, unit="x", note=_MISSING)
        return

    def theirs_json() -> None:
        for text in texts:
            if not ns.Event.from_json(text).verify():
                raise BenchError("nostr-sdk rejects a pre-signed benchmark event")

    comparison = ctx.interleaved(ours_json, theirs_json, rounds, inner=1, label=f"parse+verify {count} JSON events",
                                 names=("cdvm", "nostr-sdk"))
    ctx.record("event_verify_json_ratio_vs_nostr_sdk", comparison.ratio, unit="x",
               note="Event.from_json + verify vs nostr-sdk Event.from_json + verify")
    ctx.record("event_verify_json_per_s", count / comparison.a.median, better="higher", unit="/s")
    ctx.record("nostr_sdk_event_verify_json_per_s", count / comparison.b.median, better="higher", unit="/s")
