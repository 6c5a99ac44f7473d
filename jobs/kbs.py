"""Client for a Trustee Key Broker Service (confidential-containers KBS attestation protocol, "RCAR").

Trustee's ``kbs/docs/kbs_attestation_protocol.md`` (protocol 0.4.0 as guest-components'
kbs_protocol speaks it), over HTTP(S):

1. **Request** ``POST /kbs/v0/auth`` ``{"version", "tee", "extra-params": {"supported-hash-algorithms"}}``;
2. **Challenge** (response body) ``{"nonce", "extra-params": {"selected-hash-algorithm"?}}`` with a
   ``kbs-session-id`` cookie (the hash defaults to sha384);
3. **Attestation** ``POST /kbs/v0/attest`` ``{"init-data"?, "runtime-data": {"nonce", "tee-pubkey"},
   "tee-evidence"}``: the evidence's report data is the hash of the canonical JSON (RFC 8785:
   sorted keys, no whitespace) of the runtime data, zero-padded to 64 bytes; the answer is an
   attestation token ``{"token"}``;
4. **Response** ``GET /kbs/v0/resource/<repository>/<type>/<tag>``: a JWE in flattened JSON
   serialization (RFC 7516 §7.2.2) ``{"protected", "encrypted_key", "iv", "ciphertext", "tag"}``
   whose content key is wrapped to the TEE key — ``ECDH-ES+A256KW`` (RFC 7518 §4.6, Concat KDF,
   AES key wrap) for an EC P-256 TEE key (the default, as in guest-components), or
   ``RSA-OAEP-256`` for an RSA key — and whose content is ``A256GCM`` with the protected header
   (as sent) as associated data.

Errors are RFC 7807 problem details ``{"type", "detail"}`` with 401/403/404 statuses. With
``additional_evidence`` (a string, guest-components' composite evidence) the hashed runtime data
also carries ``"additional-evidence"`` and the evidence is sent as ``{"primary_evidence",
"additional_evidence"}``. Everything but :class:`KbsClient` (a thin aiohttp shell) is sans-I/O.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.exceptions import InvalidTag

from dvm.errors import CdvmError

KBS_PREFIX = "/kbs/v0"
PROTOCOL_VERSION = "0.4.0"
HASH_ALGORITHMS = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
DEFAULT_HASH = "sha384"
ECDH_ES_A256KW = "ECDH-ES+A256KW"
RSA_OAEP_256 = "RSA-OAEP-256"
A256GCM = "A256GCM"
SESSION_COOKIE = "kbs-session-id"
REPORT_DATA_LEN = 64
TEE_NAMES = {"tdx": "tdx", "snp": "snp", "sim": "sample"}
"""cdvm evidence kinds → kbs-types ``Tee`` names (the simulated TEE maps to ``sample``)."""


class KbsError(CdvmError):
    """The KBS refused, answered outside the protocol, or its response could not be decrypted."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: object, name: str) -> bytes:
    if not isinstance(text, str):
        raise KbsError(f"KBS response field {name} must be a base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise KbsError(f"KBS response field {name} is not base64url") from None


def canonical_json(value: object) -> bytes:
    """RFC 8785 form of the runtime data (string members only): sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise KbsError(f"the KBS {what} is not JSON") from None
    if not isinstance(obj, dict):
        raise KbsError(f"the KBS {what} is not a JSON object")
    return obj


class TeeKeyPair:
    """The ephemeral TEE key whose public half goes into the runtime data (``repr`` hides it)."""

    def __init__(self, private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
        self._private = private

    @classmethod
    def generate(cls, algorithm: str = ECDH_ES_A256KW) -> TeeKeyPair:
        if algorithm == ECDH_ES_A256KW:
            return cls(ec.generate_private_key(ec.SECP256R1()))
        if algorithm == RSA_OAEP_256:
            return cls(rsa.generate_private_key(65537, 2048))
        raise KbsError(f"unsupported TEE key algorithm {algorithm!r} (use {ECDH_ES_A256KW} or {RSA_OAEP_256})")

    def __repr__(self) -> str:
        return f"TeeKeyPair({self.jwk()['alg']})"

    def jwk(self) -> dict[str, str]:
        """The ``tee-pubkey`` JWK (kbs-types ``TeePubKey``)."""
        public = self._private.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            numbers = public.public_numbers()
            return {"kty": "EC", "crv": "P-256", "alg": ECDH_ES_A256KW,
                    "x": b64url(numbers.x.to_bytes(32, "big")), "y": b64url(numbers.y.to_bytes(32, "big"))}
        numbers = public.public_numbers()
        return {"kty": "RSA", "alg": RSA_OAEP_256, "n": b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
                "e": b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))}

    def unwrap_cek(self, header: dict[str, Any], encrypted_key: bytes) -> bytes:
        """The content encryption key from ``encrypted_key`` under the JWE header's ``alg``."""
        alg = header.get("alg")
        if alg == ECDH_ES_A256KW and isinstance(self._private, ec.EllipticCurvePrivateKey):
            epk = header.get("epk")
            if not isinstance(epk, dict) or epk.get("kty") != "EC" or epk.get("crv") != "P-256":
                raise KbsError("the JWE header's epk must be an EC P-256 JWK")
            try:
                peer = ec.EllipticCurvePublicNumbers(int.from_bytes(b64url_decode(epk.get("x"), "epk.x"), "big"),
                                                     int.from_bytes(b64url_decode(epk.get("y"), "epk.y"), "big"),
                                                     ec.SECP256R1()).public_key()
            except ValueError:
                raise KbsError("the JWE header's epk is not a point on P-256") from None
            shared = self._private.exchange(ec.ECDH(), peer)
            kek = concat_kdf(shared, ECDH_ES_A256KW, 256, b64url_decode(header.get("apu", ""), "apu"),
                             b64url_decode(header.get("apv", ""), "apv"))
            try:
                return aes_key_unwrap(kek, encrypted_key)
            except InvalidUnwrap:
                raise KbsError("the KBS response's wrapped key does not unwrap with this TEE key") from None
        if alg == RSA_OAEP_256 and isinstance(self._private, rsa.RSAPrivateKey):
            try:
                return self._private.decrypt(encrypted_key, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
            except ValueError:
                raise KbsError("the KBS response's wrapped key does not decrypt with this TEE key") from None
        raise KbsError(f"the KBS wrapped the key with {alg!r}, which this TEE key ({self.jwk()['alg']}) does not use")


def concat_kdf(shared: bytes, algorithm_id: str, key_bits: int, apu: bytes = b"", apv: bytes = b"") -> bytes:
    """RFC 7518 §4.6.2: Concat KDF (NIST SP 800-56A) with SHA-256 for JWE ECDH-ES key agreement."""
    def length_prefixed(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data

    other = (length_prefixed(algorithm_id.encode()) + length_prefixed(apu) + length_prefixed(apv)
             + key_bits.to_bytes(4, "big"))
    return ConcatKDFHash(hashes.SHA256(), key_bits // 8, other).derive(shared)


def request_body(tee: str) -> dict[str, Any]:
    """Step 1, the ``Request`` (tee: a kbs-types name such as ``tdx``, ``snp``, ``sample``)."""
    return {"version": PROTOCOL_VERSION, "tee": tee, "extra-params": {"supported-hash-algorithms": list(HASH_ALGORITHMS)}}


@dataclass(frozen=True)
class Challenge:
    """Step 2: the KBS nonce and the hash algorithm it selected for the runtime data."""

    nonce: str
    hash_algorithm: str = DEFAULT_HASH


def parse_challenge(body: bytes) -> Challenge:
    obj = _json(body, "challenge")
    nonce = obj.get("nonce")
    if not isinstance(nonce, str) or not nonce:
        raise KbsError("the KBS challenge has no nonce")
    extra = obj.get("extra-params")
    selected = extra.get("selected-hash-algorithm") if isinstance(extra, dict) else None
    algorithm = DEFAULT_HASH if selected is None else str(selected).lower()
    if algorithm not in HASH_ALGORITHMS:
        raise KbsError(f"the KBS selected hash algorithm {selected!r}, not one of {', '.join(HASH_ALGORITHMS)}")
    return Challenge(nonce, algorithm)


def runtime_data(challenge: Challenge, key: TeeKeyPair) -> dict[str, Any]:
    return {"nonce": challenge.nonce, "tee-pubkey": key.jwk()}


def report_data(challenge: Challenge, data: dict[str, Any], additional_evidence: str | None = None) -> bytes:
    """The 64 report-data bytes binding the runtime data (hash of its canonical JSON, zero-padded)."""
    hashed = dict(data) if additional_evidence is None else {**data, "additional-evidence": additional_evidence}
    digest = HASH_ALGORITHMS[challenge.hash_algorithm](canonical_json(hashed)).digest()
    return digest.ljust(REPORT_DATA_LEN, b"\0")


def attestation_body(data: dict[str, Any], tee_evidence: Any, *, additional_evidence: str | None = None,
                     init_data: dict[str, str] | None = None) -> dict[str, Any]:
    """Step 3, the ``Attestation`` payload."""
    evidence = tee_evidence if additional_evidence is None else {
        "primary_evidence": tee_evidence, "additional_evidence": additional_evidence}
    body: dict[str, Any] = {"runtime-data": data, "tee-evidence": evidence}
    if init_data is not None:
        body["init-data"] = init_data
    return body


def decrypt_response(key: TeeKeyPair, body: bytes) -> bytes:
    """Step 4: open the flattened-JSON JWE the KBS returns for a resource."""
    obj = _json(body, "resource response")
    protected = obj.get("protected")
    header = _json(b64url_decode(protected, "protected"), "JWE protected header")
    if header.get("enc") != A256GCM:
        raise KbsError(f"the KBS encrypted the resource with {header.get('enc')!r}; only {A256GCM} is supported")
    cek = key.unwrap_cek(header, b64url_decode(obj.get("encrypted_key"), "encrypted_key"))
    if len(cek) != 32:
        raise KbsError("the KBS content key is not 256 bits")
    iv, tag = b64url_decode(obj.get("iv"), "iv"), b64url_decode(obj.get("tag"), "tag")
    ciphertext = b64url_decode(obj.get("ciphertext"), "ciphertext")
    if len(iv) != 12 or len(tag) != 16:
        raise KbsError("the KBS response's iv or tag has the wrong length for A256GCM")
    try:
        return AESGCM(cek).decrypt(iv, ciphertext + tag, str(protected).encode("ascii"))
    except InvalidTag:
        raise KbsError("the KBS response failed authentication (A256GCM tag)") from None


def problem(status: int, body: bytes) -> KbsError:
    """A :class:`KbsError` from an error status and its RFC 7807 problem details (if any)."""
    try:
        detail = _json(body, "error").get("detail")
    except KbsError:
        detail = None
    meaning = {401: "unauthorized (attestation failed or session expired)", 403: "forbidden by the resource policy",
               404: "no such resource"}.get(status, f"HTTP {status}")
    return KbsError(f"KBS: {meaning}" + (f": {detail}" if isinstance(detail, str) and detail else ""))


EvidenceFn = Callable[[bytes], Awaitable[Any]]
"""Given 64 report-data bytes, produce the ``tee-evidence`` JSON value (format per attestation service)."""


@dataclass
class KbsClient:
    """RCAR handshake and resource fetches over one HTTP session (its cookie jar keeps the session)."""

    url: str
    tee: str
    evidence: EvidenceFn
    key: TeeKeyPair = field(default_factory=TeeKeyPair.generate)
    additional_evidence: str | None = None
    timeout: float = 30.0
    token: str | None = None

    async def get_resource(self, path: str, session: aiohttp.ClientSession | None = None) -> bytes:
        """Attest, then fetch ``<repository>/<type>/<tag>`` and decrypt it.

        The ``kbs-session-id`` cookie is carried by hand (cookie jars drop cookies of IP hosts).
        """
        owned = session is None
        session = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                                   cookie_jar=aiohttp.DummyCookieJar())
        base = self.url.rstrip("/") + KBS_PREFIX
        try:
            async with session.post(f"{base}/auth", json=request_body(self.tee)) as response:
                body = await response.read()
                if response.status != 200:
                    raise problem(response.status, body)
                cookie = response.cookies.get(SESSION_COOKIE)
            if cookie is None:
                raise KbsError(f"the KBS challenge came without a {SESSION_COOKIE} cookie")
            headers = {"Cookie": f"{SESSION_COOKIE}={cookie.value}"}
            challenge = parse_challenge(body)
            data = runtime_data(challenge, self.key)
            tee_evidence = await self.evidence(report_data(challenge, data, self.additional_evidence))
            payload = attestation_body(data, tee_evidence, additional_evidence=self.additional_evidence)
            async with session.post(f"{base}/attest", json=payload, headers=headers) as response:
                body = await response.read()
                if response.status != 200:
                    raise problem(response.status, body)
            token = _json(body, "attestation result").get("token")
            self.token = token if isinstance(token, str) else None
            async with session.get(f"{base}/resource/{path.strip('/')}", headers=headers) as response:
                body = await response.read()
                if response.status != 200:
                    raise problem(response.status, body)
            return decrypt_response(self.key, body)
        except aiohttp.ClientError as error:
            raise KbsError(f"cannot talk to the KBS at {self.url}: {error}") from None
        finally:
            if owned:
                await session.close()
