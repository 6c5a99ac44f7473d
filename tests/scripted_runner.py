"""A stand-in for jobs.runner in worker tests (``[sandbox] runner_module = "tests.scripted_runner"``).

It speaks the same channel protocol (docs/protocol.md §7) without llama.cpp, and does what the
plain job request's text input says — a well-behaved job or a hostile workload:

  echo            publish a result at once (a normal job)
  slow-echo:S     publish a result after S seconds of "generating"
  documents       subscribe to its one-time key and wait for documents until cancelled
  generate        announce the generating phase, then block (a long generation)
  memory          allocate without end              (stopped by the memory limit)
  spin            burn CPU without end              (stopped by the CPU limit)
  fork            fork without end                  (stopped by the process limit)
  network:PORT    connect to 127.0.0.1:PORT and, if that worked, publish what it could
  write:P1,P2     write files outside its tmpfs, then fill the tmpfs
  phase-spam      repeat its phases forever, hoping to extend its deadline
  chatty          ask the worker to publish events without end
  bad-subscribe   ask for a subscription to something other than its own gift wraps
"""
from __future__ import annotations

import os
import socket
import sys
import time

from dvm.keys import PrivateKey
from dvm.nip01 import Event, sign_event
from dvm.nip90 import JobRequest, build_result, parse_job_request
from jobs.channel import BlockingChannel


def _phase(channel: BlockingChannel, name: str) -> None:
    channel.send({"op": "phase", "phase": name})


def _result(channel: BlockingChannel, key: PrivateKey, request: JobRequest, content: str) -> None:
    channel.send({"op": "publish", "event": build_result(key, request, content, encrypted=False).to_dict(),
                  "role": "result", "recipient": None})


def _documents(channel: BlockingChannel, key: PrivateKey) -> None:
    _phase(channel, "attesting")
    channel.send({"op": "subscribe", "filter": {"kinds": [1059], "#p": [key.public_key.hex()]}})
    _phase(channel, "waiting_documents")
    while (message := channel.recv()) is not None and message.get("op") != "cancel":
        pass
    channel.send({"op": "failed", "reason": "no documents arrived"})


def _network(channel: BlockingChannel, key: PrivateKey, request: JobRequest, port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as connection:
        connection.sendall(b"exfiltrated")
    _result(channel, key, request, "connected")


def _write(channel: BlockingChannel, key: PrivateKey, request: JobRequest, paths: list[str]) -> None:
    written = []
    for path in paths:
        try:
            with open(path, "w") as handle:
                handle.write("pwned")
            written.append(path)
        except OSError:
            pass
    if written:
        _result(channel, key, request, "wrote " + ",".join(written))
        return
    with open("/tmp/fill", "wb") as fill:
        while True:
            fill.write(b"\0" * (1 << 20))
            fill.flush()


def serve(channel: BlockingChannel, request: JobRequest) -> None:
    key = PrivateKey.generate()
    script, _, argument = (request.text_prompt() or "echo").partition(":")
    if script == "documents":
        _documents(channel, key)
        return
    _phase(channel, "generating")
    if script in ("echo", "slow-echo"):
        time.sleep(float(argument or 0))
        _result(channel, key, request, "echo")
    elif script == "generate":
        time.sleep(3600)
    elif script == "memory":
        blocks = []
        while True:
            blocks.append(bytearray(16 << 20))
    elif script == "spin":
        while True:
            pass
    elif script == "fork":
        while True:
            os.fork()
    elif script == "network":
        _network(channel, key, request, int(argument))
    elif script == "write":
        _write(channel, key, request, argument.split(","))
    elif script == "phase-spam":
        while True:
            for name in ("attesting", "waiting_documents", "generating"):
                _phase(channel, name)
                time.sleep(0.1)
    elif script == "chatty":
        while True:
            note = sign_event(key, 1, "chatty", [])
            channel.send({"op": "publish", "event": note.to_dict(), "role": "dm", "recipient": None})
    elif script == "bad-subscribe":
        channel.send({"op": "subscribe", "filter": {"kinds": [1], "authors": [key.public_key.hex()]}})
        time.sleep(3600)
    channel.send({"op": "done", "usage": {}, "timings_ms": {}})


def main() -> int:
    frames_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    channel = BlockingChannel(sys.stdin.buffer, frames_out)
    channel.send({"op": "ready", "model": {"name": "scripted", "sha256": "00" * 32}})
    job = channel.recv()
    if job is None or job.get("op") != "job":
        return 0
    serve(channel, parse_job_request(Event.from_dict(job["request"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
