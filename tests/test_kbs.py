"""Trustee KBS client: the RCAR exchange against a loopback KBS that answers exactly as Trustee's
kbs_attestation_protocol.md and kbs-types describe (cookie, challenge, runtime-data hash in the
evidence, JWE with ECDH-ES+A256KW / RSA-OAEP-256 and A256GCM), plus published vectors (RFC 7518
Appendix C Concat KDF, kbs-types' JWE header AAD) and malformed answers."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from attest.providers import get_evidence
from attest.tdx import parse_quote
from jobs.kbs import (
    ECDH_ES_A256KW,
    RSA_OAEP_256,
    Challenge,
    KbsClient,
    KbsError,
    TeeKeyPair,
    b64url,
    b64url_decode,
    concat_kdf,
    decrypt_response,
    parse_challenge,
    report_data,
    request_body,
)

SECRET = b"model key 0123456789abcdef0123456789abcdef"


def test_concat_kdf_matches_rfc7518_appendix_c() -> None:
    """RFC 7518 Appendix C: ECDH-ES between Alice's ephemeral key and Bob's, A128GCM, apu Alice, apv Bob."""
    def key(d: str, x: str, y: str) -> ec.EllipticCurvePrivateKey:
        return ec.EllipticCurvePrivateNumbers(
            int.from_bytes(b64url_decode(d, "d"), "big"),
            ec.EllipticCurvePublicNumbers(int.from_bytes(b64url_decode(x, "x"), "big"),
                                          int.from_bytes(b64url_decode(y, "y"), "big"), ec.SECP256R1())).private_key()
    alice = key("0_NxaRPUMQoAJt50Gz8YiTr8gRTwyEaCumd-MToTmIo", "gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0",
                "SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps")
    bob = key("VEmDZpDXXK8p8N0Cndsxs924q6nS1RXFASRl6BfUqdw", "weNJy2HscCSM6AEDTDg04biOvhFhyyWvOHQfeF_PxMQ",
              "e8lnCO-AlStT-NJVX-crhB7QRYhiix03illJOVAOyck")
    shared = alice.exchange(ec.ECDH(), bob.public_key())
    assert b64url(concat_kdf(shared, "A128GCM", 128, b"Alice", b"Bob")) == "VqqN6vgjbSBcIijNcacQGg"


def test_request_and_challenge_payloads() -> None:
    body = request_body("tdx")
    assert body["version"] == "0.4.0" and body["tee"] == "tdx"
    assert set(body["extra-params"]["supported-hash-algorithms"]) == {"sha256", "sha384", "sha512"}
    assert parse_challenge(b'{"nonce": "42", "extra-params": ""}') == Challenge("42", "sha384")
    assert parse_challenge(b'{"nonce": "n", "extra-params": {"selected-hash-algorithm": "SHA256"}}').hash_algorithm == "sha256"
    for bad in (b"[]", b"nope", b'{"extra-params": {}}', b'{"nonce": "n", "extra-params": {"selected-hash-algorithm": "md5"}}'):
        with pytest.raises(KbsError):
            parse_challenge(bad)


def test_report_data_is_the_hash_of_canonical_runtime_data() -> None:
    key = TeeKeyPair.generate()
    challenge = Challenge("bm9uY2U", "sha384")
    data = {"nonce": challenge.nonce, "tee-pubkey": key.jwk()}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    assert report_data(challenge, data) == hashlib.sha384(canonical).digest() + bytes(16)
    composite = json.dumps({**data, "additional-evidence": ""}, sort_keys=True, separators=(",", ":")).encode()
    assert report_data(challenge, data, "") == hashlib.sha384(composite).digest() + bytes(16)
    assert report_data(Challenge("n", "sha512"), data) != report_data(Challenge("n", "sha384"), data)
    assert set(key.jwk()) == {"kty", "crv", "alg", "x", "y"} and key.jwk()["alg"] == ECDH_ES_A256KW


def test_kbs_types_header_vector_is_refused_cleanly() -> None:
    """kbs-types' parse_response vector: a fake alg/enc must end in a typed error."""
    vector = (b'{"protected": "eyJhbGciOiJmYWtlYWxnIiwiZW5jIjoiZmFrZWVuYyJ9", "encrypted_key": "ZmFrZWtleQ",'
              b' "iv": "cmFuZG9tZGF0YQ", "ciphertext": "ZmFrZWVuY291dHB1dA", "tag": "ZmFrZXRhZw"}')
    assert json.loads(b64url_decode("eyJhbGciOiJmYWtlYWxnIiwiZW5jIjoiZmFrZWVuYyJ9", "p")) == {"alg": "fakealg", "enc": "fakeenc"}
    with pytest.raises(KbsError, match="only A256GCM"):
        decrypt_response(TeeKeyPair.generate(), vector)


def seal(jwk: dict[str, str], plaintext: bytes) -> dict[str, str]:
    """What a KBS sends: a flattened JWE to the TEE key (built independently of the client's code path)."""
    cek, iv = AESGCM.generate_key(bit_length=256), os.urandom(12)
    if jwk["kty"] == "EC":
        peer = ec.EllipticCurvePublicNumbers(int.from_bytes(b64url_decode(jwk["x"], "x"), "big"),
                                             int.from_bytes(b64url_decode(jwk["y"], "y"), "big"), ec.SECP256R1()).public_key()
        ephemeral = ec.generate_private_key(ec.SECP256R1())
        numbers = ephemeral.public_key().public_numbers()
        header = {"alg": ECDH_ES_A256KW, "enc": "A256GCM",
                  "epk": {"kty": "EC", "crv": "P-256", "x": b64url(numbers.x.to_bytes(32, "big")),
                          "y": b64url(numbers.y.to_bytes(32, "big"))}}
        shared = ephemeral.exchange(ec.ECDH(), peer)
        other = b"".join(len(p).to_bytes(4, "big") + p for p in (ECDH_ES_A256KW.encode(), b"", b"")) + (256).to_bytes(4, "big")
        kek = hashlib.sha256(b"\0\0\0\1" + shared + other).digest()
        wrapped = aes_key_wrap(kek, cek)
    else:
        from cryptography.hazmat.primitives.asymmetric import rsa
        n = int.from_bytes(b64url_decode(jwk["n"], "n"), "big")
        e = int.from_bytes(b64url_decode(jwk["e"], "e"), "big")
        header = {"alg": RSA_OAEP_256, "enc": "A256GCM"}
        wrapped = rsa.RSAPublicNumbers(e, n).public_key().encrypt(
            cek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    protected = b64url(json.dumps(header).encode())
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode())
    return {"protected": protected, "encrypted_key": b64url(wrapped), "iv": b64url(iv),
            "ciphertext": b64url(sealed[:-16]), "tag": b64url(sealed[-16:])}


class FakeTrustee:
    """A KBS speaking the documented exchanges; it checks the runtime-data binding in a (simulated) quote."""

    def __init__(self, resources: dict[str, bytes]) -> None:
        self.resources = resources
        self.sessions: dict[str, dict] = {}
        self.seen: list[dict] = []
        app = web.Application()
        app.router.add_post("/kbs/v0/auth", self.auth)
        app.router.add_post("/kbs/v0/attest", self.attest)
        app.router.add_get("/kbs/v0/resource/{repository}/{type}/{tag}", self.resource)
        self.app = app

    @staticmethod
    def _problem(status: int, kind: str, detail: str) -> web.Response:
        return web.json_response({"type": f"https://github.com/confidential-containers/kbs/errors/{kind}", "detail": detail},
                                 status=status)

    async def auth(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append({"auth": body})
        if body.get("version") != "0.4.0":
            return self._problem(401, "ProtocolVersion", "unsupported protocol version")
        session, nonce = secrets.token_hex(16), base64.b64encode(os.urandom(32)).decode()
        self.sessions[session] = {"nonce": nonce, "tee": body["tee"], "attested": None}
        response = web.json_response({"nonce": nonce, "extra-params": {"selected-hash-algorithm": "sha384"}})
        response.set_cookie("kbs-session-id", session)
        return response

    async def attest(self, request: web.Request) -> web.Response:
        state = self.sessions.get(request.cookies.get("kbs-session-id", ""))
        if state is None:
            return self._problem(401, "UnAuthenticatedCookie", "no session")
        body = await request.json()
        self.seen.append({"attest": body})
        runtime = body["runtime-data"]
        if runtime.get("nonce") != state["nonce"]:
            return self._problem(401, "AttestationFailed", "nonce mismatch")
        quote = parse_quote(base64.b64decode(body["tee-evidence"]["quote"]))
        expected = hashlib.sha384(json.dumps(runtime, sort_keys=True, separators=(",", ":")).encode()).digest()
        if quote.report_data != expected + bytes(16):
            return self._problem(401, "AttestationFailed", "runtime data is not bound into the evidence")
        state["attested"] = runtime["tee-pubkey"]
        return web.json_response({"token": "eyJhbGciOiJSUzI1NiJ9.e30.c2ln"})

    async def resource(self, request: web.Request) -> web.Response:
        state = self.sessions.get(request.cookies.get("kbs-session-id", ""))
        if state is None or state["attested"] is None:
            return self._problem(401, "UnAuthenticatedCookie", "attest first")
        path = "/".join(request.match_info[k] for k in ("repository", "type", "tag"))
        if path not in self.resources:
            return self._problem(404, "ResourceNotFound", f"{path} not found")
        return web.json_response(seal(state["attested"], self.resources[path]))


@pytest.fixture
async def kbs():
    trustee = FakeTrustee({"cdvm/model-key/gemma": SECRET})
    runner = web.AppRunner(trustee.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield trustee, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def sim_quote(report: bytes) -> dict[str, str]:
    return {"quote": base64.b64encode(get_evidence(report, "sim", allow_sim=True).raw).decode()}


@pytest.mark.parametrize("algorithm", [ECDH_ES_A256KW, RSA_OAEP_256])
async def test_full_exchange_with_a_trustee_kbs(kbs, algorithm: str) -> None:
    trustee, url = kbs
    client = KbsClient(url, "sample", sim_quote, key=TeeKeyPair.generate(algorithm))
    assert await client.get_resource("cdvm/model-key/gemma") == SECRET
    assert client.token and [next(iter(step)) for step in trustee.seen] == ["auth", "attest"]
    assert trustee.seen[1]["attest"]["runtime-data"]["tee-pubkey"]["alg"] == algorithm
    assert "init-data" not in trustee.seen[1]["attest"]


async def test_kbs_errors_are_typed(kbs) -> None:
    _, url = kbs
    with pytest.raises(KbsError, match="no such resource: cdvm/model-key/missing not found"):
        await KbsClient(url, "sample", sim_quote).get_resource("cdvm/model-key/missing")

    async def unbound(report: bytes) -> dict[str, str]:
        return await sim_quote(bytes(64))

    with pytest.raises(KbsError, match="unauthorized.*not bound"):
        await KbsClient(url, "sample", unbound).get_resource("cdvm/model-key/gemma")
    with pytest.raises(KbsError, match="cannot talk to the KBS"):
        await KbsClient("http://127.0.0.1:9", "sample", sim_quote, timeout=3).get_resource("a/b/c")


def test_tampered_or_misdirected_responses_are_refused() -> None:
    key = TeeKeyPair.generate()
    sealed = seal(key.jwk(), SECRET)
    assert decrypt_response(key, json.dumps(sealed).encode()) == SECRET
    tampered = {**sealed, "ciphertext": b64url(bytes(len(b64url_decode(sealed["ciphertext"], "c"))))}
    with pytest.raises(KbsError, match="failed authentication"):
        decrypt_response(key, json.dumps(tampered).encode())
    with pytest.raises(KbsError, match="does not unwrap"):
        decrypt_response(TeeKeyPair.generate(), json.dumps(sealed).encode())
    with pytest.raises(KbsError, match="does not use"):
        decrypt_response(TeeKeyPair.generate(RSA_OAEP_256), json.dumps(sealed).encode())
    for broken in ({**sealed, "iv": "!!"}, {**sealed, "protected": b64url(b"[1]")}, {"protected": 3}, []):
        with pytest.raises(KbsError):
            decrypt_response(key, json.dumps(broken).encode())
    assert key.jwk()["x"] not in repr(key)
