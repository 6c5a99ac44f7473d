"""Hostile input to the job side, fuzzed: NIP-90 job request tags and encrypted params,
generation params, cdvm messages (attestation, chunk, manifest, run), document assembly,
and the host↔sandbox channel framing.

Every input ends in a result or a typed :class:`dvm.errors.CdvmError` (see tests/fuzzing.py);
accepted inputs must keep the module's promises: params in range, documents that assemble
only when every byte arrived, frames that decode to exactly what was sent.
"""
from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from attest import sim
from attest.binding import build_report_data
from attest.collateral import collateral_from_json, collateral_to_json
from attest.evidence import Evidence
from dvm import nip04, nip44
from dvm.keys import PrivateKey
from dvm.nip01 import Event
from dvm.nip90 import JobInput, build_job_request, encrypted_params_plaintext, open_encrypted_params, parse_job_request
from fuzzing import (
    Rejected,
    attempt,
    deep_json,
    dumps,
    fuzz_settings,
    json_values,
    long_strings,
    mutated_bytes,
    mutated_json,
    mutated_json_text,
    mutated_text,
    ok,
)
from jobs.channel import HEADER, FrameDecoder, encode_frame
from jobs.messages import (
    Attestation,
    DocumentAssembler,
    DocumentEntry,
    Limits,
    RunRequest,
    chunk_message,
    error_message,
    manifest_message,
    parse_message,
    run_message,
    split_document,
)
from jobs.params import SEED_MAX, parse_params

CUSTOMER = PrivateKey.from_hex("44" * 32)
DVM = PrivateKey.from_hex("55" * 32)
ENCLAVE = PrivateKey.from_hex("66" * 32)
WHEN = 1_700_000_000
JOB = hashlib.sha256(b"job").hexdigest()
NONCE = hashlib.sha256(b"nonce").hexdigest()
MODEL_SHA = hashlib.sha256(b"model").hexdigest()

# ---------------------------------------------------------------------------- job requests

_INPUTS = (JobInput("what is in the document?", "text"), JobInput("https://example.com/a.txt", "url", "wss://r", "doc"))
_PARAMS = (("max_tokens", "64"), ("temperature", "0.7"), ("top_k", "20"), ("top_p", "0.9"), ("seed", "42"),
           ("model", "gemma3-270m"), ("ignore_eos", "false"))


@cache
def job_requests() -> tuple[Event, ...]:
    """Real signed requests: plain, NIP-44-encrypted and NIP-04-encrypted to the DVM, and a cdvm one."""
    plaintext = encrypted_params_plaintext(_INPUTS, _PARAMS)
    sealed44 = nip44.encrypt(plaintext, nip44.conversation_key(CUSTOMER, DVM.public_key))
    sealed04 = nip04.encrypt(CUSTOMER, DVM.public_key, plaintext)
    target = [DVM.public_key.hex()]
    return (
        build_job_request(CUSTOMER, 5050, inputs=_INPUTS, params=_PARAMS, targets=target, created_at=WHEN),
        build_job_request(CUSTOMER, 5050, targets=target, encrypted_content=sealed44, created_at=WHEN),
        build_job_request(CUSTOMER, 5050, targets=target, encrypted_content=sealed04, created_at=WHEN),
        build_job_request(CUSTOMER, 5050, params=(("max_tokens", "16"),), targets=target,
                          extra_tags=[["cdvm", "1", NONCE], ["relays", "wss://a", "wss://b"], ["output", "text/plain"]],
                          created_at=WHEN),
    )


def _tag_lists() -> st.SearchStrategy[Any]:
    """Tag lists: mutated tags of the real requests, or random tags with the names NIP-90 reads."""
    names = st.sampled_from(("i", "param", "p", "encrypted", "output", "relays", "e", "cdvm", "", "x"))
    random_tags = st.lists(st.tuples(names, st.lists(st.text(max_size=12), max_size=5)).map(lambda t: [t[0], *t[1]]),
                           max_size=8)
    real = st.integers(0, 3).flatmap(lambda i: mutated_json([list(t) for t in job_requests()[i].tags]))
    return real | random_tags


@fuzz_settings(250)
@given(event=st.integers(0, 3).flatmap(lambda i: mutated_json(job_requests()[i].to_dict())),
       tags=st.none() | _tag_lists())
def test_parse_job_request(event: Any, tags: Any) -> None:
    if tags is not None and isinstance(event, dict):
        event["tags"] = tags
    parsed = attempt(Event.from_dict, event)
    if not ok(parsed):
        return
    request = attempt(parse_job_request, parsed)
    if ok(request):
        assert 5000 <= request.kind <= 5999 and request.result_kind == request.kind + 1000
        assert isinstance(request.text_prompt(), str)
        assert all(isinstance(key, str) and isinstance(value, str) for key, value in request.params)
        if request.encryption is not None:
            assert request.targets
        attempt(parse_params, parsed.tags)


@fuzz_settings(250)
@given(plaintext=st.text(max_size=200) | json_values.map(dumps)
       | mutated_json_text(lambda: json.loads(encrypted_params_plaintext(_INPUTS, _PARAMS))))
@example(plaintext=deep_json(3000))
@example(plaintext="[" + ",".join(["[]"] * 300) + "]")
def test_open_encrypted_params(plaintext: str) -> None:
    sealed = parse_job_request(job_requests()[1])
    opened = attempt(open_encrypted_params, sealed, plaintext)
    if ok(opened):
        assert len(opened.inputs) + len(opened.params) <= len(json.loads(plaintext))
        attempt(parse_params, [["param", key, value] for key, value in opened.params])


@fuzz_settings(200)
@given(which=st.sampled_from((1, 2)), content=st.none() | st.integers(1, 2).flatmap(
    lambda i: mutated_text(lambda: job_requests()[i].content)))
def test_encrypted_request_end_to_end(which: int, content: str | None) -> None:
    """What the DVM does with a sealed request: detect the scheme, decrypt, open, validate params."""
    real = job_requests()[which]
    event = Event(real.id, real.pubkey, real.created_at, real.kind, real.tags,
                  real.content if content is None else content, real.sig)
    request = attempt(parse_job_request, event)
    if not ok(request):
        return
    if request.encryption == "nip04":
        plaintext = attempt(nip04.decrypt, DVM, CUSTOMER.public_key, event.content)
    else:
        plaintext = attempt(nip44.decrypt, event.content, nip44.conversation_key(DVM, CUSTOMER.public_key))
    if not ok(plaintext):
        return
    opened = attempt(open_encrypted_params, request, plaintext)
    if ok(opened):
        params = attempt(parse_params, [["param", key, value] for key, value in opened.params])
        if content is None:
            assert ok(params) and params.max_tokens == 64 and opened.text_prompt() == _INPUTS[0].data


# ---------------------------------------------------------------------------- generation params


def _check_params(params: Any) -> None:
    assert 1 <= params.max_tokens <= 1024
    assert 0.0 <= params.temperature <= 2.0 and 0.0 <= params.top_p <= 1.0 and 0 <= params.top_k <= 1000
    assert params.seed is None or 0 <= params.seed <= SEED_MAX
    assert isinstance(params.ignore_eos, bool)


_PARAM_VALUES = st.sampled_from(("1", "0", "-1", "1e3", "0.5", ".5", "5.", "+7", " 8 ", "1e999", "nan", "inf",
                                 "1_000", "１", "0x10", "true", "yes", "", "a/b:c", "../../etc/passwd"))


@fuzz_settings(300)
@given(source=mutated_json([["param", key, value] for key, value in _PARAMS])
       | st.lists(st.lists(st.sampled_from(("param", "max_tokens", "temperature", "top-p", "seed", "model",
                                            "ignore-eos", "top_k")) | _PARAM_VALUES, max_size=4), max_size=6)
       | st.dictionaries(st.sampled_from(("max_tokens", "temperature", "top_p", "seed", "model", "ignore_eos", "x")),
                         json_values | _PARAM_VALUES, max_size=5)
       | json_values)
@example(source=[["param", "temperature", "1e999"]])
@example(source={"seed": 2**32 - 1})
def test_parse_params(source: Any) -> None:
    params = attempt(parse_params, source)
    if ok(params):
        _check_params(params)


# ---------------------------------------------------------------------------- cdvm messages

LIMITS = Limits(max_documents=3, max_total_bytes=4096, max_chunks=12)
DOCUMENTS = (("a.txt", b"alpha " * 90), ("b.md", "béta\n".encode() * 7), ("empty", b""))
CHUNK = 200


@cache
def attestation_content() -> str:
    report_data = build_report_data(ENCLAVE.public_key.raw, JOB, NONCE, MODEL_SHA)
    evidence = Evidence(tee="sim", raw=sim.make_quote(report_data), provider="sim")
    return Attestation(job=JOB, nonce=NONCE, pubkey=ENCLAVE.public_key.hex(), evidence=json.loads(evidence.to_json()),
                       model_name="gemma3-270m", model_sha256=MODEL_SHA, gpu_evidence_sha256=None, limits=Limits(),
                       collateral=json.loads(collateral_to_json(sim.sim_collateral()))).to_content()


@cache
def customer_messages() -> tuple[str, ...]:
    """The customer's real message stream for DOCUMENTS: every chunk, the manifest, the run."""
    messages, entries = [], []
    for index, (name, data) in enumerate(DOCUMENTS):
        pieces = split_document(data, CHUNK)
        messages += [chunk_message(JOB, index, seq, piece) for seq, piece in enumerate(pieces)]
        entries.append(DocumentEntry(name, len(data), hashlib.sha256(data).hexdigest(), len(pieces)))
    return (*messages, manifest_message(JOB, entries), run_message(JOB, "summarize", {"max_tokens": "32"}))


def _all_messages() -> tuple[str, ...]:
    return (attestation_content(), *customer_messages(), error_message(JOB, "out of memory"))


@fuzz_settings(250)
@given(content=st.text(max_size=200) | json_values.map(dumps)
       | st.integers(0, 8).flatmap(lambda i: mutated_json_text(lambda: json.loads(_all_messages()[i]))))
@example(content=deep_json(3000))
def test_parse_message(content: str) -> None:
    obj = attempt(parse_message, content, JOB)
    if not ok(obj):
        return
    assert obj["cdvm"] == 1 and obj["job"] == JOB and isinstance(obj["type"], str)
    if obj["type"] == "attestation":
        attestation = attempt(Attestation.from_message, obj)
        if ok(attestation):
            again = Attestation.from_message(parse_message(attestation.to_content(), JOB))
            assert again.to_content() == attestation.to_content()
    else:
        attempt(DocumentAssembler(JOB, LIMITS).feed, obj)


@fuzz_settings(100)
@given(message=mutated_json(lambda: json.loads(attestation_content()), max_ops=2))
def test_attestation_reaches_the_verifier(message: Any) -> None:
    """The client's path for a (hostile) enclave's attestation: message → evidence → collateral."""
    if not isinstance(message, dict):
        return
    attestation = attempt(Attestation.from_message, message)
    if ok(attestation):
        attempt(Evidence.from_json, json.dumps(attestation.evidence))
        if attestation.collateral is not None:
            attempt(collateral_from_json, json.dumps(attestation.collateral))


@st.composite
def message_streams(draw: st.DrawFn) -> tuple[list[str], bool]:
    """The real customer stream reordered, with duplicates, drops and (sometimes) mutations;
    also says whether the stream is still complete and intact."""
    real = list(customer_messages())
    stream = draw(st.permutations(real))
    intact = True
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(("duplicate", "drop", "mutate", "mutate_text", "foreign")))
        index = draw(st.integers(0, len(stream) - 1))
        if op == "duplicate":
            stream.insert(draw(st.integers(0, len(stream))), stream[index])
        elif op == "drop" and len(stream) > 1:
            dropped = stream.pop(index)
            intact = intact and dropped in stream
        elif op == "mutate" and stream[index] in real:
            stream[index] = dumps(draw(mutated_json(json.loads(stream[index]))))
            intact = False
        elif op == "mutate_text":
            stream[index] = draw(mutated_text(stream[index]))
            intact = False
        else:
            stream.insert(index, dumps(draw(json_values)))
    return stream, intact and all(message in stream for message in real)


@fuzz_settings(200)
@given(streams=message_streams())
def test_document_assembly(streams: tuple[list[str], bool]) -> None:
    stream, intact = streams
    assembler = DocumentAssembler(JOB, LIMITS)
    ready: RunRequest | None = None
    for content in stream:
        obj = attempt(parse_message, content, JOB)
        if not ok(obj):
            continue
        result = attempt(assembler.feed, obj)
        if isinstance(result, RunRequest):
            ready = ready or result
        assert assembler._bytes <= LIMITS.max_total_bytes
    if ready is not None:
        originals = {hashlib.sha256(data).hexdigest(): data for _, data in DOCUMENTS}
        for name, data in ready.documents:
            digest = hashlib.sha256(data).hexdigest()
            assert digest not in originals or originals[digest] == data
        if intact:
            assert ready.documents == list(DOCUMENTS) and ready.prompt == "summarize"
    elif intact:
        raise AssertionError("an intact stream did not assemble")


# ---------------------------------------------------------------------------- host↔sandbox channel

MAX_FRAME = 2048
_CHANNEL_OBJECTS = ({"op": "phase", "phase": "generating"}, {"op": "publish", "event": {"kind": 1, "tags": [["p", "x"]]}},
                    {"op": "event", "event": {"content": "ü" * 100}}, {"op": "cancel", "reason": None})


def _feed(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[dict[str, Any]] | Rejected:
    """Feed ``data`` in pieces cut at ``cuts``; stop at the first typed error (the host closes the channel)."""
    frames: list[dict[str, Any]] = []
    positions = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for start, end in zip(positions, positions[1:]):
        got = attempt(decoder.feed, data[start:end])
        if not ok(got):
            return got
        frames += got
        assert decoder.pending <= HEADER.size + MAX_FRAME + (end - start)
    return frames


@fuzz_settings(200)
@given(objects=st.lists(st.sampled_from(_CHANNEL_OBJECTS) | st.dictionaries(st.text(max_size=6), json_values, max_size=3),
                        max_size=5),
       cuts=st.lists(st.integers(0, 4096), max_size=8))
def test_channel_round_trip(objects: list[dict[str, Any]], cuts: list[int]) -> None:
    encoded = [attempt(encode_frame, obj, max_frame=MAX_FRAME) for obj in objects]
    sent = [obj for obj, frame in zip(objects, encoded) if ok(frame)]
    stream = b"".join(frame for frame in encoded if ok(frame))
    decoder = FrameDecoder(max_frame=MAX_FRAME)
    frames = _feed(decoder, stream, cuts)
    assert frames == json.loads(json.dumps(sent)) and decoder.pending == 0


@fuzz_settings(300)
@given(data=st.binary(max_size=300) | mutated_bytes(
           lambda: b"".join(encode_frame(obj) for obj in _CHANNEL_OBJECTS), hot=(0, 1, 2, 3)),
       cuts=st.lists(st.integers(0, 4096), max_size=8))
@example(data=b"\xff\xff\xff\xff", cuts=[])
@example(data=HEADER.pack(8) + b'{"a":NaN', cuts=[])
@example(data=HEADER.pack(3) + b"\xff\xfe\xfd", cuts=[])
def test_channel_hostile_stream(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame=MAX_FRAME)
    frames = _feed(decoder, data, cuts)
    if ok(frames):
        assert all(isinstance(frame, dict) for frame in frames)
        attempt(decoder.close)


# ---------------------------------------------------------------------------- long values

_LONG_VALUE_INPUTS = {
    "param value": lambda v: attempt(parse_params, [["param", "ignore_eos", v]]),
    "param number": lambda v: attempt(parse_params, [["param", "temperature", v]]),
    "param model": lambda v: attempt(parse_params, {"model": v}),
    "message type": lambda v: attempt(DocumentAssembler(JOB, LIMITS).feed, parse_message(
        dumps({"cdvm": 1, "job": JOB, "type": v[:60_000]}), JOB)),
    "manifest name": lambda v: attempt(DocumentAssembler(JOB, LIMITS).feed, parse_message(
        dumps({"cdvm": 1, "job": JOB, "type": "manifest", "docs": [{"name": v, "size": 1, "sha256": "0" * 64,
                                                                     "chunks": 1}]}), JOB)),
}


@fuzz_settings(60)
@given(where=st.sampled_from(sorted(_LONG_VALUE_INPUTS)), value=long_strings)
@example(where="param value", value="y" * 5000)
@example(where="message type", value="t" * 5000)
def test_long_values_give_short_messages(where: str, value: str) -> None:
    """Errors name the bad value, but never echo thousands of characters of it (attempt checks)."""
    _LONG_VALUE_INPUTS[where](value)

# ---------------------------------------------------------------------------- the long run


def test_bench_fuzz_suite_runs_every_property_tiny(vectors: Path) -> None:
    """``cdvm bench fuzz`` loads these same properties and runs them; at a tiny scale it takes seconds."""
    from bench.harness import Context, run_suites

    report = run_suites(["fuzz"], Context(quick=True, scale=0.01, vectors=vectors), argv=["bench", "fuzz"])
    assert [(r.status, r.message) for r in report.results] == [("ok", "")]
    values = {metric.key: metric.value for metric in report.metrics}
    assert values["fuzz_failures"] == 0, report.context.notes
    assert values["fuzz_properties"] >= 40 and values["fuzz_examples"] >= values["fuzz_properties"]
    assert values["fuzz_examples_per_s"] > 0
