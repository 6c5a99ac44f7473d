"""``cdvm dm``: send and receive direct messages (NIP-17 by default, NIP-04 on request).

``dm send`` wraps the text as NIP-17 gift wraps: the recipient's copy goes to the relays of
the recipient's kind 10050 list when one is found on our read relays (or the nprofile's
relay hints), else to our write relays; our own copy goes to our DM relays (best effort).
``--nip04`` sends a kind 4 event to the write relays instead. It exits 1 with one line if
no relay accepted the message.

``dm listen`` prints the DMs addressed to us (kind 1059 gift wraps and kind 4 events
p-tagged with our key) from ``--since`` (default: now) on, one per line (``--json``: an
object with ``from``, ``content``, ``kind``, ``protocol``, ``created_at``). Messages that do
not open are logged at debug level and skipped. With ``--count N`` it exits 0 after N
messages; with ``--timeout S`` it stops after S seconds, exiting 1 if fewer than ``--count``
messages arrived (0 when no count was asked).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from dvm import nip04, nip17
from dvm.cli import run_async
from dvm.config import RelaysConfig, load_relays_config
from dvm.errors import CdvmError
from dvm.keys import PrivateKey, PublicKey
from dvm.keystore import load_identity
from dvm.nip01 import Event, sign_event
from dvm.nip19 import decode
from dvm.nip59 import GIFT_WRAP_KIND, MAX_TIME_TWEAK
from dvm.nostr_errors import NostrError
from dvm.pool import RelayPool
from dvm.relay import GIFT_WRAP_RESUME_MARGIN, RelayError
from dvm.wire import Filter

log = logging.getLogger(__name__)

NIP04_KIND = 4
LOOKUP_TIMEOUT = 5.0


class DmError(CdvmError):
    """A direct message could not be sent or the listener ended without what was asked."""


def _recipient(text: str) -> tuple[PublicKey, list[str]]:
    """The recipient's key and any relay hints an nprofile carries."""
    public = PublicKey.from_npub_or_hex(text)
    stripped = text.strip()
    hints: list[str] = []
    if stripped.removeprefix("nostr:").startswith("nprofile1"):
        hints = [url for url in decode(stripped).relays if url.startswith(("ws://", "wss://"))]
    return public, hints


async def _dm_relays_of(pool: RelayPool, recipient: PublicKey, hints: list[str], timeout: float) -> list[str]:
    """The newest kind 10050 relay list of ``recipient`` found on our read relays and the hints."""
    urls = list(dict.fromkeys(pool.read_urls + hints))
    if not urls:
        return []
    events = await pool.query(
        [Filter(authors=[recipient.hex()], kinds=[nip17.DM_RELAYS_KIND], limit=5)], urls=urls, timeout=timeout
    )
    for event in sorted(events, key=lambda e: e.created_at, reverse=True):
        try:
            relays = nip17.parse_dm_relay_list(event)
        except NostrError:
            continue
        if relays:
            return relays
    return []


async def send_dm(
    key: PrivateKey, config: RelaysConfig, to: str, text: str, *, nip04_mode: bool = False, timeout: float | None = None
) -> tuple[str, list[str]]:
    """Send ``text`` to ``to`` (npub, hex or nprofile); returns the event id and accepting relays."""
    recipient, hints = _recipient(to)
    async with RelayPool.from_config(config, private_key=key) as pool:
        if nip04_mode:
            event = sign_event(key, NIP04_KIND, nip04.encrypt(key, recipient, text), [["p", recipient.hex()]])
            targets = list(dict.fromkeys(config.write_urls + hints))
            result = await pool.publish(event, urls=targets, timeout=timeout)
            return event.id, result.accepted
        inbox = await _dm_relays_of(pool, recipient, hints, min(timeout or LOOKUP_TIMEOUT, LOOKUP_TIMEOUT))
        if inbox:
            log.info("sending to %s's DM relays: %s", recipient.npub(), ", ".join(inbox))
        wraps = nip17.build_dm(key, recipient, text)
        result = await pool.publish(wraps[0], urls=inbox or list(dict.fromkeys(config.write_urls + hints)), timeout=timeout)
        if len(wraps) > 1:
            try:
                await pool.publish(wraps[1], urls=config.dm_urls, timeout=timeout)
            except RelayError as error:
                log.warning("our own copy of the message was not stored: %s", error)
        return wraps[0].id, result.accepted


def _open(key: PrivateKey, event: Event) -> dict[str, Any] | None:
    """Decrypt one DM event addressed to us, or ``None`` (logged at debug) if it does not open."""
    try:
        if event.kind == GIFT_WRAP_KIND:
            message = nip17.open_dm(key, event)
            return {
                "from": message.sender.npub(),
                "content": message.content,
                "kind": message.kind,
                "protocol": "nip17",
                "created_at": message.created_at,
            }
        sender = PublicKey.from_hex(event.pubkey)
        return {
            "from": sender.npub(),
            "content": nip04.decrypt(key, sender, event.content),
            "kind": event.kind,
            "protocol": "nip04",
            "created_at": event.created_at,
        }
    except NostrError as error:
        log.debug("skipped event %s that does not open: %s", event.id, error)
        return None


async def listen_dms(key: PrivateKey, config: RelaysConfig, since: int) -> AsyncIterator[dict[str, Any]]:
    """Decrypted DMs to ``key`` with a real ``created_at`` >= ``since``, as they arrive."""
    me = key.public_key.hex()
    filters = [
        Filter(kinds=[GIFT_WRAP_KIND], tags={"p": [me]}, since=max(0, since - MAX_TIME_TWEAK)),
        Filter(kinds=[NIP04_KIND], tags={"p": [me]}, since=since),
    ]
    urls = list(dict.fromkeys(config.read_urls + config.dm_urls))
    async with RelayPool.from_config(config, private_key=key) as pool:
        subscription = await pool.subscribe(filters, urls=urls, resume_margin=GIFT_WRAP_RESUME_MARGIN)
        try:
            async for event in subscription:
                message = _open(key, event)
                if message is not None and message["created_at"] >= since:
                    yield message
        finally:
            await subscription.close()


def _read_text(value: str) -> str:
    return sys.stdin.read() if value == "-" else value


async def _send_async(args: argparse.Namespace) -> int:
    key = load_identity(args.key_file)
    config = load_relays_config(args.relays_config, args.relay or ())
    event_id, accepted = await send_dm(
        key, config, args.to, _read_text(args.text), nip04_mode=args.nip04, timeout=args.timeout
    )
    print(f"sent {'nip04' if args.nip04 else 'nip17'} message {event_id} to {', '.join(accepted)}")
    return 0


async def _listen_async(args: argparse.Namespace) -> int:
    key = load_identity(args.key_file)
    config = load_relays_config(args.relays_config, args.relay or ())
    since = int(time.time()) if args.since is None else args.since
    received = 0

    async def consume() -> None:
        nonlocal received
        async for message in listen_dms(key, config, since):
            if args.json:
                print(json.dumps(message, ensure_ascii=False), flush=True)
            else:
                print(f"{message['created_at']} {message['from']} [{message['protocol']}]: {message['content']}", flush=True)
            received += 1
            if args.count is not None and received >= args.count:
                return

    try:
        await asyncio.wait_for(consume(), args.timeout)
    except TimeoutError:
        if args.count is not None:
            raise DmError(f"timed out after {args.timeout:g}s with {received} of {args.count} messages") from None
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--relay", action="append", metavar="URL", help="use this relay for every role (repeatable)")
    parser.add_argument("--relays-config", metavar="FILE", help="relays.toml to use")
    parser.add_argument("--key-file", metavar="FILE", help="our key file (default: $CDVM_NSEC, else STATE_DIR/identity.key)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cdvm dm send|listen``."""
    dm = subparsers.add_parser("dm", help="send or receive encrypted direct messages")
    actions = dm.add_subparsers(dest="dm_command", metavar="ACTION", required=True)

    send = actions.add_parser("send", help="send a DM (NIP-17 gift wrap; --nip04 for legacy kind 4)")
    send.add_argument("--to", required=True, metavar="NPUB|HEX|NPROFILE", help="recipient")
    send.add_argument("--nip04", action="store_true", help="send a legacy NIP-04 kind 4 DM instead")
    send.add_argument("--timeout", type=_positive_float, metavar="S", help="seconds to wait for each relay's OK")
    _common(send)
    send.add_argument("text", metavar="TEXT", help="message text ('-' reads standard input)")
    send.set_defaults(handler=lambda args: run_async(_send_async(args)))

    listen = actions.add_parser("listen", help="print DMs addressed to us as they arrive")
    listen.add_argument("--count", type=_positive_int, metavar="N", help="exit after N messages")
    listen.add_argument("--timeout", type=_positive_float, metavar="S", help="stop after S seconds (exit 1 if --count not reached)")
    listen.add_argument("--since", type=int, metavar="TS", help="unix time of the oldest message to show (default: now)")
    listen.add_argument("--json", action="store_true", help="one JSON object per line")
    _common(listen)
    listen.set_defaults(handler=lambda args: run_async(_listen_async(args)))
