"""``cdvm keys`` and ``cdvm dm``: the CLI run as a subprocess against a real relay, read and
written by rust-nostr (nostr-sdk) on the other side."""
from __future__ import annotations

import asyncio
import datetime
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from dvm.cli import main
from dvm.keys import PrivateKey, PublicKey
from dvm.keystore import read_key_file
from dvm.localrelay import LocalRelay
from dvm.nip01 import sign_event
from dvm.nip17 import dm_relay_list, open_dm
from dvm.nip19 import nprofile_encode
from dvm.relay import Relay
from dvm.wire import Filter

ns = pytest.importorskip("nostr_sdk")

REPO = Path(__file__).resolve().parents[1]
SECONDS = datetime.timedelta(seconds=5)
Factory = Callable[..., Awaitable[LocalRelay]]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An isolated environment: state/config dirs under tmp_path, no inherited key or relay config;
    the subprocess imports this checkout (PYTHONPATH) although it runs in tmp_path."""
    monkeypatch.chdir(tmp_path)
    values = {
        "CDVM_STATE_DIR": str(tmp_path / "state"),
        "CDVM_CONFIG_DIR": str(tmp_path / "config"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    for name in ("CDVM_NSEC", "CDVM_RELAYS"):
        monkeypatch.delenv(name, raising=False)
    return {**os.environ, **values}


async def cdvm(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dvm.cli ARGS`` without blocking the event loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dvm.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    return subprocess.CompletedProcess(args, process.returncode or 0, stdout.decode(), stderr.decode())


# --- keys (in process: fast) ----------------------------------------------------------


def test_keys_new_and_show(env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new"]) == 0
    out, err = capsys.readouterr()
    npub = out.strip()
    key_file = tmp_path / "state" / "identity.key"
    assert npub.startswith("npub1") and str(key_file) in err
    key = read_key_file(key_file)
    assert key.public_key.npub() == npub and key.nsec() not in out + err
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    assert main(["keys", "new"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["keys", "new", "--force"]) == 0
    replaced = capsys.readouterr().out.strip()
    assert replaced != npub

    assert main(["keys", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["npub"] == replaced and shown["hex"] == PublicKey.from_npub_or_hex(replaced).hex()
    assert "nsec" not in shown


def test_keys_show_sources_and_refusals(env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    key = PrivateKey.generate()
    monkeypatch.setenv("CDVM_NSEC", key.nsec())
    assert main(["keys", "show"]) == 0
    out = capsys.readouterr().out
    assert key.public_key.npub() in out and "$CDVM_NSEC" in out and key.nsec() not in out

    assert main(["keys", "show", "--nsec"]) == 1  # stdout is not a terminal here
    captured = capsys.readouterr()
    assert "only to a terminal" in captured.err and key.nsec() not in captured.out + captured.err

    other = tmp_path / "other.key"
    assert main(["keys", "new", "--key-file", str(other)]) == 0
    capsys.readouterr()
    other.chmod(0o644)
    assert main(["keys", "show", "--key-file", str(other)]) == 1
    assert "chmod 600" in capsys.readouterr().err


def test_keys_show_without_identity(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "show"]) == 1
    assert "cdvm keys new" in capsys.readouterr().err


# --- dm (subprocess, against nostr-relay, rust-nostr on the other side) ---------------------


async def sdk_fetch(url: str, sdk_filter) -> list:  # type: ignore[no-untyped-def]
    client = ns.Client()
    await client.add_relay(ns.RelayUrl.parse(url))
    await client.connect(SECONDS)
    try:
        return await client.fetch_events(ns.ReqTarget.single(ns.RelayUrl.parse(url), [sdk_filter]), SECONDS)
    finally:
        await client.shutdown()


async def sdk_send(url: str, event) -> None:  # type: ignore[no-untyped-def]
    client = ns.Client()
    await client.add_relay(ns.RelayUrl.parse(url))
    await client.connect(SECONDS)
    try:
        output = await client.send_event(event)
        assert output.success, output.failed
    finally:
        await client.shutdown()


async def test_dm_send_nip17_read_by_nostr_sdk(env: dict[str, str], relay: LocalRelay) -> None:
    sender = PrivateKey.generate()
    rust_keys = ns.Keys.generate()
    recipient = rust_keys.public_key().to_bech32()
    result = await cdvm({**env, "CDVM_NSEC": sender.nsec()}, "dm", "send", "--to", recipient,
                        "--relay", relay.url, "grüße, rust")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sent nip17 message ") and relay.url in result.stdout
    assert sender.nsec() not in result.stdout + result.stderr

    wraps = await sdk_fetch(relay.url, ns.Filter().kind(ns.Kind(1059)).pubkey(rust_keys.public_key()))
    assert len(wraps) == 1
    gift = ns.UnwrappedGift.from_gift_wrap(rust_keys, wraps[0])
    assert gift.rumor().content() == "grüße, rust"
    assert gift.sender().to_hex() == sender.public_key.hex()
    own_copies = await sdk_fetch(relay.url, ns.Filter().kind(ns.Kind(1059)).pubkey(ns.PublicKey.parse(sender.public_key.hex())))
    assert len(own_copies) == 1  # the sender's copy went to our DM relays


async def test_dm_send_nip04_read_by_nostr_sdk(env: dict[str, str], relay: LocalRelay, tmp_path: Path) -> None:
    key_file = tmp_path / "sender.key"
    made = await cdvm(env, "keys", "new", "--key-file", str(key_file))
    assert made.returncode == 0, made.stderr
    sender = read_key_file(key_file)
    rust_keys = ns.Keys.generate()
    result = await cdvm(env, "dm", "send", "--nip04", "--key-file", str(key_file), "--to",
                        rust_keys.public_key().to_hex(), "--relay", relay.url, "legacy hello")
    assert result.returncode == 0, result.stderr
    events = await sdk_fetch(relay.url, ns.Filter().kind(ns.Kind(4)).pubkey(rust_keys.public_key()))
    assert len(events) == 1 and events[0].author().to_hex() == sender.public_key.hex()
    plain = ns.nip04_decrypt(rust_keys.secret_key(), events[0].author(), events[0].content())
    assert plain == "legacy hello"


async def test_dm_send_uses_recipient_dm_relays(env: dict[str, str], relay_factory: Factory) -> None:
    ours, inbox = await relay_factory(), await relay_factory()
    recipient = PrivateKey.generate()
    async with Relay(ours.url, timeout=5) as client:
        await client.publish(dm_relay_list(recipient, [inbox.url]))
    sender = PrivateKey.generate()
    result = await cdvm({**env, "CDVM_NSEC": sender.nsec()}, "dm", "send", "--to",
                        recipient.public_key.npub(), "--relay", ours.url, "to your inbox")
    assert result.returncode == 0, result.stderr
    assert inbox.url in result.stdout and ours.url not in result.stdout
    to_recipient = Filter(kinds=[1059], tags={"p": [recipient.public_key.hex()]})
    async with Relay(inbox.url, timeout=5) as client:
        sub = await client.subscribe([to_recipient])
        wrap = await sub.get(timeout=5)
    assert open_dm(recipient, wrap).content == "to your inbox"
    async with Relay(ours.url, timeout=5) as client:
        sub = await client.subscribe([to_recipient])
        await asyncio.wait_for(sub.eose.wait(), 5)
        assert sub.drain() == []


async def test_dm_send_to_nprofile_uses_hints(env: dict[str, str], relay: LocalRelay) -> None:
    recipient = PrivateKey.generate()
    nprofile = nprofile_encode(recipient.public_key.hex(), [relay.url])
    result = await cdvm({**env, "CDVM_NSEC": PrivateKey.generate().nsec()}, "dm", "send", "--to", nprofile,
                        "--relay", relay.url, "hint")
    assert result.returncode == 0, result.stderr


async def test_dm_send_fails_cleanly_when_no_relay_accepts(env: dict[str, str], unused_tcp_port: int) -> None:
    result = await cdvm({**env, "CDVM_NSEC": PrivateKey.generate().nsec()}, "dm", "send", "--to",
                        PrivateKey.generate().public_key.npub(), "--relay", f"ws://127.0.0.1:{unused_tcp_port}",
                        "--timeout", "3", "nobody home")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdvm: error:") and "no relay accepted" in lines[0]


async def test_dm_send_bad_recipient_and_missing_key(env: dict[str, str], relay: LocalRelay) -> None:
    bad = await cdvm({**env, "CDVM_NSEC": PrivateKey.generate().nsec()}, "dm", "send", "--to", "npub1nope",
                     "--relay", relay.url, "x")
    assert bad.returncode == 1 and bad.stderr.startswith("cdvm: error:")
    nokey = await cdvm(env, "dm", "send", "--to", PrivateKey.generate().public_key.npub(), "--relay", relay.url, "x")
    assert nokey.returncode == 1 and "cdvm keys new" in nokey.stderr


async def test_dm_listen_prints_nostr_sdk_messages(env: dict[str, str], relay: LocalRelay) -> None:
    me = PrivateKey.generate()
    my_pub = ns.PublicKey.parse(me.public_key.hex())
    rust_keys = ns.Keys.generate()
    since = int(time.time()) - 1
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dvm.cli", "dm", "listen", "--json", "--count", "2", "--timeout", "30",
        "--since", str(since), "--relay", relay.url,
        env={**env, "CDVM_NSEC": me.nsec()}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    await sdk_send(relay.url, ns.nip17_make_private_msg(rust_keys, my_pub, "gift-wrapped hello"))
    stranger = PrivateKey.generate()  # a wrap to us that is not a valid DM: skipped, not fatal
    await sdk_send(relay.url, ns.Event.from_json(
        sign_event(stranger, 1059, "not encrypted", tags=[["p", me.public_key.hex()]]).to_json()))
    legacy = ns.EventBuilder(ns.Kind(4), ns.nip04_encrypt(rust_keys.secret_key(), my_pub, "legacy hello")) \
        .tags([ns.Tag.parse(["p", me.public_key.hex()])]).finalize(rust_keys)
    await sdk_send(relay.url, legacy)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    messages = sorted((json.loads(line) for line in stdout.decode().splitlines()), key=lambda m: m["protocol"])
    sender = PublicKey.from_hex(rust_keys.public_key().to_hex()).npub()
    assert messages == [
        {"from": sender, "content": "legacy hello", "kind": 4, "protocol": "nip04",
         "created_at": legacy.created_at().as_secs()},
        {"from": sender, "content": "gift-wrapped hello", "kind": 14, "protocol": "nip17",
         "created_at": messages[1]["created_at"]},
    ]
    assert messages[1]["created_at"] >= since


async def test_dm_listen_timeout_exits_1(env: dict[str, str], relay: LocalRelay) -> None:
    result = await cdvm({**env, "CDVM_NSEC": PrivateKey.generate().nsec()}, "dm", "listen", "--count", "1",
                        "--timeout", "1", "--relay", relay.url)
    assert result.returncode == 1
    assert "timed out after 1s with 0 of 1 messages" in result.stderr
    quiet = await cdvm({**env, "CDVM_NSEC": PrivateKey.generate().nsec()}, "dm", "listen", "--timeout", "1",
                       "--relay", relay.url)
    assert quiet.returncode == 0 and quiet.stdout == ""
