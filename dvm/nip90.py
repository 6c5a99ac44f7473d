"""NIP-90 Data Vending Machines: job requests (5000-5999), results (+1000), feedback (7000).

A request carries ``["i", data, type, relay?, marker?]`` inputs, ``["param", key, value]``
params, an optional ``["output", mime]``, ``["relays", ...]`` and ``["p", dvm]`` targets.
With ``["encrypted"]`` the inputs and params move into the content, encrypted to the
targeted DVM (NIP-04 by most clients, NIP-44 by newer ones) as a JSON array of tags.
Results repeat ``["e", request]`` and ``["p", customer]``; an encrypted request gets an
encrypted result with an ``["encrypted"]`` tag and no copy of the request.

Decryption is not done here: :func:`parse_job_request` keeps the ciphertext, and whoever
holds the key calls :func:`open_encrypted_params` (in cdvm, the sandbox).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from dvm.keys import PrivateKey
from dvm.nip01 import Event, sign_event
from dvm.nostr_errors import NostrError

REQUEST_KINDS = range(5000, 6000)
RESULT_KIND_OFFSET = 1000
FEEDBACK_KIND = 7000
FEEDBACK_STATUSES = ("payment-required", "processing", "error", "success", "partial")
MAX_ENCRYPTED_TAGS = 256


class JobRequestError(NostrError):
    """A job request (or its encrypted params) does not follow NIP-90."""


@dataclass(frozen=True)
class JobInput:
    """One ``["i", data, type, relay, marker]`` input (NIP-90 "Job request")."""

    data: str = field(repr=False)
    type: str
    relay: str | None = None
    marker: str | None = None


@dataclass(frozen=True)
class JobRequest:
    """A parsed job request. ``encryption`` is ``"nip04"``/``"nip44"`` when the inputs and params
    are still sealed in ``event.content`` (see :func:`open_encrypted_params`)."""

    event: Event
    inputs: tuple[JobInput, ...]
    params: tuple[tuple[str, str], ...]
    output: str | None
    targets: tuple[str, ...]
    relays: tuple[str, ...]
    encryption: str | None

    @property
    def id(self) -> str:
        return self.event.id

    @property
    def customer(self) -> str:
        return self.event.pubkey

    @property
    def kind(self) -> int:
        return self.event.kind

    @property
    def result_kind(self) -> int:
        return self.event.kind + RESULT_KIND_OFFSET

    @property
    def sealed(self) -> bool:
        """True while the params are encrypted and not yet opened."""
        return self.encryption is not None and not self.inputs and not self.params

    def param(self, key: str) -> str | None:
        """The last value given for ``key`` (None when absent)."""
        value = None
        for name, param_value in self.params:
            if name == key:
                value = param_value
        return value

    def text_prompt(self) -> str:
        """The text inputs joined by blank lines: the prompt of a text-generation job."""
        return "\n\n".join(item.data for item in self.inputs if item.type == "text")


def _inputs_and_params(tags: Iterable[tuple[str, ...]]) -> tuple[tuple[JobInput, ...], tuple[tuple[str, str], ...]]:
    inputs: list[JobInput] = []
    params: list[tuple[str, str]] = []
    for tag in tags:
        if not tag:
            continue
        if tag[0] == "i":
            if len(tag) < 2:
                raise JobRequestError("an 'i' tag needs at least the input data")
            inputs.append(
                JobInput(
                    data=tag[1],
                    type=tag[2] if len(tag) > 2 and tag[2] else "text",
                    relay=tag[3] if len(tag) > 3 and tag[3] else None,
                    marker=tag[4] if len(tag) > 4 and tag[4] else None,
                )
            )
        elif tag[0] == "param":
            if len(tag) < 3:
                raise JobRequestError("a 'param' tag needs a key and a value")
            params.append((tag[1], tag[2]))
    return tuple(inputs), tuple(params)


def parse_job_request(event: Event) -> JobRequest:
    """Read a (signature-checked) job request event; the encryption scheme is detected from the content."""
    if event.kind not in REQUEST_KINDS:
        raise JobRequestError(f"kind {event.kind} is not a NIP-90 job request (5000-5999)")
    encrypted = event.first_tag("encrypted") is not None
    encryption: str | None = None
    if encrypted:
        encryption = "nip04" if "?iv=" in event.content else "nip44"
        if not event.tag_values("p"):
            raise JobRequestError("an encrypted job request must name its DVM in a 'p' tag")
    inputs, params = _inputs_and_params(event.tags)
    output = event.tag_values("output")
    relays_tag = event.first_tag("relays")
    return JobRequest(
        event=event,
        inputs=inputs,
        params=params,
        output=output[0] if output else None,
        targets=tuple(event.tag_values("p")),
        relays=tuple(relays_tag[1:]) if relays_tag else (),
        encryption=encryption,
    )


def parse_encrypted_tags(plaintext: str) -> list[list[str]]:
    """The decrypted content of an encrypted request: a JSON array of at most
    :data:`MAX_ENCRYPTED_TAGS` arrays of strings (NIP-90 "Encrypted Params")."""
    try:
        tags = json.loads(plaintext)
    except (ValueError, RecursionError):
        raise JobRequestError("encrypted params are not JSON") from None
    if not isinstance(tags, list) or len(tags) > MAX_ENCRYPTED_TAGS:
        raise JobRequestError(f"encrypted params must be a JSON array of at most {MAX_ENCRYPTED_TAGS} tags")
    if not all(isinstance(tag, list) and all(isinstance(item, str) for item in tag) for tag in tags):
        raise JobRequestError("encrypted params must be arrays of strings")
    return tags


def open_encrypted_params(request: JobRequest, plaintext: str) -> JobRequest:
    """Merge the decrypted content (a JSON array of ``i``/``param`` tags) into ``request``."""
    tags = parse_encrypted_tags(plaintext)
    inputs, params = _inputs_and_params(tuple(tag) for tag in tags)
    return replace(request, inputs=request.inputs + inputs, params=request.params + params)


def encrypted_params_plaintext(inputs: Iterable[JobInput], params: Iterable[tuple[str, str]]) -> str:
    """The JSON array a client encrypts into an encrypted request's content."""
    return json.dumps(_input_and_param_tags(inputs, params), ensure_ascii=False, separators=(",", ":"))


def _input_and_param_tags(inputs: Iterable[JobInput], params: Iterable[tuple[str, str]]) -> list[list[str]]:
    tags: list[list[str]] = []
    for item in inputs:
        tag = ["i", item.data, item.type]
        if item.relay or item.marker:
            tag += [item.relay or "", item.marker or ""]
        tags.append(tag)
    return tags + [["param", key, value] for key, value in params]


def build_job_request(
    signer: PrivateKey,
    kind: int,
    *,
    inputs: Iterable[JobInput] = (),
    params: Iterable[tuple[str, str]] = (),
    targets: Iterable[str] = (),
    extra_tags: Iterable[Iterable[str]] = (),
    encrypted_content: str | None = None,
    created_at: int | None = None,
) -> Event:
    """A job request event; with ``encrypted_content`` the inputs/params are already sealed in it."""
    if kind not in REQUEST_KINDS:
        raise JobRequestError(f"kind {kind} is not a NIP-90 job request (5000-5999)")
    tags = _input_and_param_tags(inputs, params) if encrypted_content is None else []
    tags += [["p", target] for target in targets]
    if encrypted_content is not None:
        tags.append(["encrypted"])
    tags += [list(tag) for tag in extra_tags]
    return sign_event(signer, kind, encrypted_content or "", tags, created_at)


def build_result(
    signer: PrivateKey,
    request: JobRequest,
    content: str,
    *,
    encrypted: bool,
    extra_tags: Iterable[Iterable[str]] = (),
) -> Event:
    """A job result (kind request+1000). Encrypted results carry no copy of the request."""
    tags: list[list[str]] = [["e", request.id], ["p", request.customer]]
    if encrypted:
        tags.append(["encrypted"])
    elif request.encryption is None:
        tags.append(["request", request.event.to_json()])
        tags += [["i", item.data, item.type] for item in request.inputs]
    tags += [list(tag) for tag in extra_tags]
    return sign_event(signer, request.result_kind, content, tags)


def build_feedback(
    signer: PrivateKey,
    request_id: str,
    customer: str,
    status: str,
    extra_info: str = "",
    *,
    content: str = "",
    encrypted: bool = False,
    extra_tags: Iterable[Iterable[str]] = (),
) -> Event:
    """A kind 7000 job feedback event with ``["status", status, extra_info]``."""
    if status not in FEEDBACK_STATUSES:
        raise JobRequestError(f"unknown feedback status {status!r}; use one of {', '.join(FEEDBACK_STATUSES)}")
    tags: list[list[str]] = [["status", status, extra_info], ["e", request_id], ["p", customer]]
    if encrypted:
        tags.append(["encrypted"])
    tags += [list(tag) for tag in extra_tags]
    return sign_event(signer, FEEDBACK_KIND, content, tags)


@dataclass(frozen=True)
class Feedback:
    """A parsed kind 7000 event."""

    event: Event
    status: str
    extra_info: str
    request_id: str


def parse_feedback(event: Event) -> Feedback:
    """Read a kind 7000 feedback event."""
    if event.kind != FEEDBACK_KIND:
        raise JobRequestError(f"kind {event.kind} is not job feedback (7000)")
    status_tag = event.first_tag("status")
    request_ids = event.tag_values("e")
    if status_tag is None or len(status_tag) < 2 or not request_ids:
        raise JobRequestError("job feedback needs a 'status' and an 'e' tag")
    return Feedback(event, status_tag[1], status_tag[2] if len(status_tag) > 2 else "", request_ids[0])
