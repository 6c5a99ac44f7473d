"""dvm.keys: BIP-340 vectors, key parsing, ECDH, and that secrets never leak through repr."""

from __future__ import annotations

import pytest

from dvm.keys import PrivateKey, PublicKey
from dvm.nostr_errors import InvalidKey, NostrError

# BIP-340 test vectors 0 and 1 (bips/bip-0340/test-vectors.csv): secret, pubkey, aux_rand, message, signature.
BIP340 = [
    (
        "0000000000000000000000000000000000000000000000000000000000000003",
        "f9308a019258c31049344f85f89d5229b531c845836f99b08601f113bce036f9",
        "00" * 32,
        "00" * 32,
        "e907831f80848d1069a5371b402410364bdf1c5f8307b0084c55f1ce2dca8215"
        "25f66a4a85ea8b71e482a74f382d2ce5ebeee8fdb2172f477df4900d310536c0",
    ),
    (
        "b7e151628aed2a6abf7158809cf4f3c762e7160f38b4da56a784d9045190cfef",
        "dff1d77f2a671c5f36183726db2341be58feae1da2deced843240f7b502ba659",
        "00" * 31 + "01",
        "243f6a8885a308d313198a2e03707344a4093822299f31d0082efa98ec4e6c89",
        "6896bd60eeae296db48a229ff71dfe071bde413e6d43f917dc8dcf8c78de3341"
        "8906d11ac976abccb20b091292bff4ea897efcb639ea871cfa95f6de339e4b0a",
    ),
]
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@pytest.mark.parametrize(("secret", "pubkey", "aux", "msg", "sig"), BIP340)
def test_bip340_vectors(secret: str, pubkey: str, aux: str, msg: str, sig: str) -> None:
    key = PrivateKey.from_hex(secret)
    assert key.public_key.hex() == pubkey
    signature = key.sign_schnorr(bytes.fromhex(msg), bytes.fromhex(aux))
    assert signature.hex() == sig
    assert PublicKey.from_hex(pubkey).verify_schnorr(bytes.fromhex(msg), signature)


def test_bip340_rejects_off_curve_key_and_bad_signatures() -> None:
    # BIP-340 vector 5: public key not on the curve.
    with pytest.raises(InvalidKey, match="not a point"):
        PublicKey.from_hex("eefdea4cdb677750a420fee807eacf21eb9898ae79b9768766e4faa04a2d4a34")
    key = PrivateKey.generate()
    msg = bytes(range(32))
    sig = key.sign_schnorr(msg)
    assert key.public_key.verify_schnorr(msg, sig)
    assert not key.public_key.verify_schnorr(msg, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not key.public_key.verify_schnorr(bytes(32), sig)
    assert not key.public_key.verify_schnorr(msg, sig[:63])
    assert not key.public_key.verify_schnorr(msg[:31], sig)
    assert not PrivateKey.generate().public_key.verify_schnorr(msg, sig)


def test_default_aux_rand_is_fresh() -> None:
    key = PrivateKey.generate()
    assert key.sign_schnorr(bytes(32)) != key.sign_schnorr(bytes(32))


def test_round_trips() -> None:
    key = PrivateKey.generate()
    assert PrivateKey.from_hex(key.secret_hex()) == key
    assert PrivateKey.from_bytes(key.secret_bytes()) == key
    assert PrivateKey.from_nsec_or_hex(key.nsec()) == key
    assert PrivateKey.from_nsec_or_hex("  " + key.secret_hex().upper() + "\n") == key
    pub = key.public_key
    assert PublicKey.from_hex(pub.hex()) == pub
    assert PublicKey.from_npub_or_hex(pub.npub()) == pub
    assert PublicKey.from_npub_or_hex("nostr:" + pub.npub()) == pub
    assert PublicKey.from_npub_or_hex(pub.hex().upper()) == pub
    assert PublicKey(pub.raw) == pub
    assert len(pub.raw) == 32


def test_npub_nsec_spec_examples() -> None:
    # NIP-19 examples.
    key = PrivateKey.from_nsec_or_hex("nsec1vl029mgpspedva04g90vltkh6fvh240zqtv9k0t9af8935ke9laqsnlfe5")
    assert key.secret_hex() == "67dea2ed018072d675f5415ecfaed7d2597555e202d85b3d65ea4e58d2d92ffa"
    pub = PublicKey.from_npub_or_hex("npub10elfcs4fr0l0r8af98jlmgdh9c8tcxjvz9qkw038js35mp4dma8qzvjptg")
    assert pub.hex() == "7e7e9c42a91bfef19fa929e5fda1b72e0ebc1a4c1141673e2794234d86addf4e"


def test_repr_and_str_hide_the_secret() -> None:
    key = PrivateKey.generate()
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert key.secret_hex() not in text
        assert key.secret_hex().upper() not in text
        assert key.nsec() not in text
    assert key.public_key.hex() in repr(key)


@pytest.mark.parametrize(
    "secret",
    [
        "00" * 32,
        format(N, "064x"),
        format(N + 1, "064x"),
        "ff" * 32,
        "00" * 31,
        "zz" * 32,
        "",
        "01" * 33,
    ],
)
def test_invalid_secret_keys(secret: str) -> None:
    with pytest.raises(InvalidKey):
        PrivateKey.from_hex(secret)
    with pytest.raises(InvalidKey):
        PrivateKey.from_nsec_or_hex(secret)


@pytest.mark.parametrize("bad", [None, 5, "01" * 32, bytearray(32), b"\x01" * 31, bytes(32)])
def test_invalid_secret_bytes(bad: object) -> None:
    with pytest.raises(InvalidKey):
        PrivateKey.from_bytes(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, 5, b"\x01" * 32])
def test_invalid_secret_hex_types(bad: object) -> None:
    with pytest.raises(InvalidKey):
        PrivateKey.from_hex(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        PrivateKey.from_nsec_or_hex(bad)  # type: ignore[arg-type]


def test_key_kind_mixups_are_refused() -> None:
    key = PrivateKey.generate()
    with pytest.raises(InvalidKey, match="expected an nsec"):
        PrivateKey.from_nsec_or_hex(key.public_key.npub())
    with pytest.raises(InvalidKey, match="expected an npub"):
        PublicKey.from_npub_or_hex(key.nsec())
    with pytest.raises(InvalidKey):
        PublicKey.from_npub_or_hex("npub1garbage")
    with pytest.raises(InvalidKey):
        PublicKey.from_npub_or_hex(12)  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        PublicKey.from_hex("00" * 32)
    with pytest.raises(InvalidKey):
        PublicKey(b"\x02" * 33)


def test_shared_x_is_symmetric_and_keyed() -> None:
    a, b, c = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    assert a.shared_x(b.public_key) == b.shared_x(a.public_key)
    assert len(a.shared_x(b.public_key)) == 32
    assert a.shared_x(c.public_key) != a.shared_x(b.public_key)


def test_public_keys_hash_and_order() -> None:
    keys = [PrivateKey.generate().public_key for _ in range(5)]
    assert sorted(keys) == sorted(keys, key=lambda k: k.raw)
    assert len({*keys, *(PublicKey.from_hex(k.hex()) for k in keys)}) == 5
    assert keys[0] != keys[0].hex()


def test_errors_are_typed() -> None:
    assert issubclass(InvalidKey, NostrError)
    with pytest.raises(InvalidKey):
        PrivateKey.generate().sign_schnorr(b"short")
    with pytest.raises(InvalidKey):
        PrivateKey.generate().sign_schnorr(bytes(32), b"short")
