"""Collateral: dcap-qvl JSON, raw Intel PCS bodies, TCB Info / QE Identity models, and the
fetcher against a loopback server replaying recorded PCS responses (the vendor endpoint is
the only thing simulated)."""
from __future__ import annotations

import json
import urllib.parse
from datetime import datetime, timezone

import pytest
from aiohttp import web

from attest.collateral import (
    collateral_from_json,
    collateral_from_pcs,
    collateral_fresh_until,
    collateral_to_json,
    fetch_collateral,
    parse_qe_identity,
    parse_tcb_info,
    read_cached_collateral,
    split_signed_body,
)
from attest.errors import CollateralError
from attest.tdx_verify import verify_quote

NOW = datetime(2025, 7, 19, 10, 0, 34, tzinfo=timezone.utc)


def _tdx(vectors, name):
    return vectors / "tee" / "tdx" / name


def _collateral(vectors, name="dcap-qvl/tdx_quote_collateral.json"):
    return collateral_from_json(_tdx(vectors, name).read_text())


def test_dcap_json_fields(vectors):
    c = _collateral(vectors)
    assert c.root_ca_crl[:1] == b"\x30" and c.pck_crl[:1] == b"\x30"
    assert len(c.tcb_info_signature) == 64 and len(c.qe_identity_signature) == 64
    assert c.pck_crl_issuer_chain.startswith("-----BEGIN CERTIFICATE-----")
    assert collateral_from_json(collateral_to_json(c)) == c
    assert "tcb_info=" in repr(c)


def test_tcb_info_v3_model(vectors):
    info = parse_tcb_info(_collateral(vectors).tcb_info)
    assert (info.id, info.version, info.fmspc.hex(), info.pce_id) == ("TDX", 3, "b0c06f000000", b"\0\0")
    assert info.next_update == datetime(2025, 7, 19, 10, 16, 3, tzinfo=timezone.utc)
    assert info.tdx_module is not None and info.tdx_module.attributes_mask == b"\xff" * 8
    assert [m.id for m in info.tdx_module_identities] == ["TDX_03", "TDX_01"]
    first = info.tcb_levels[0]
    assert first.tcb_status == "UpToDate" and first.pce_svn == 11 and len(first.sgx_components) == 16
    assert first.tdx_components[:3] == (5, 0, 2)
    assert any(level.advisory_ids for level in info.tcb_levels)


def test_qe_identity_v2_model(vectors):
    qe = parse_qe_identity(_collateral(vectors).qe_identity)
    assert (qe.id, qe.version, qe.isv_prod_id) == ("TD_QE", 2, 2)
    assert qe.mrsigner.hex().upper().startswith("DC9E2A7C")
    assert qe.miscselect_mask == 0xFFFFFFFF and qe.attributes_mask.hex().upper().startswith("FBFF")
    assert qe.tcb_levels[0].isv_svn == 4 and qe.tcb_levels[0].tcb_status == "UpToDate"


@pytest.mark.parametrize("name,key", [
    ("go-tdx-guest/sample_tcbInfo_response", "tcbInfo"),
    ("go-tdx-guest/sample_tcbinfo_response_v5", "tcbInfo"),
    ("trustee/tcbInfo.json", "tcbInfo"),
    ("go-tdx-guest/sample_qeIdentity_response", "enclaveIdentity"),
    ("trustee/enclaveIdentity.json", "enclaveIdentity"),
])
def test_raw_pcs_bodies(vectors, name, key):
    body = _tdx(vectors, name).read_bytes()
    raw, sig = split_signed_body(body, key)
    assert len(sig) == 64
    assert raw.encode() in body  # the exact signed bytes, not a re-serialization
    parsed = parse_tcb_info(raw) if key == "tcbInfo" else parse_qe_identity(raw)
    assert parsed.version in (2, 3)
    if name == "trustee/tcbInfo.json":
        assert parsed.fmspc.hex().upper() == "00A06D080000"
    if name == "go-tdx-guest/sample_tcbInfo_response":
        assert parsed.fmspc.hex() == "50806f000000"


def test_pcs_crl_files_parse(vectors):
    from attest.x509util import load_crl

    pck = load_crl(_tdx(vectors, "go-tdx-guest/pckcrl").read_bytes(), "PCK CRL")
    root = load_crl(_tdx(vectors, "go-tdx-guest/rootcrl.der").read_bytes(), "root CRL")
    assert "PCK Platform CA" in pck.issuer.rfc4514_string() and "Root CA" in root.issuer.rfc4514_string()


@pytest.mark.parametrize("mutate", [
    lambda o: o.pop("tcbLevels"),
    lambda o: o.update(fmspc="XYZ"),
    lambda o: o.update(version="3"),
    lambda o: o.update(issueDate="yesterday"),
    lambda o: o["tcbLevels"][0].update(tcbStatus="Fine"),
    lambda o: o["tcbLevels"][0]["tcb"]["sgxtcbcomponents"].pop(),
    lambda o: o["tcbLevels"][0]["tcb"]["sgxtcbcomponents"][0].update(svn=256),
    lambda o: o["tdxModuleIdentities"][0].update(mrsigner="00"),
])
def test_malformed_tcb_info_raises_collateral_error(vectors, mutate):
    obj = json.loads(_collateral(vectors).tcb_info)
    mutate(obj)
    with pytest.raises(CollateralError):
        parse_tcb_info(json.dumps(obj))


@pytest.mark.parametrize("text", ["", "[]", "{", '{"tcb_info": 1}', "null"])
def test_malformed_collateral_json(text):
    with pytest.raises(CollateralError):
        collateral_from_json(text)
    with pytest.raises(CollateralError):
        split_signed_body(text, "tcbInfo")
    with pytest.raises(CollateralError):
        parse_qe_identity(text)


def _pcs_app(vectors, hits: list[str], hex_root_crl: bool = False) -> web.Application:
    """Replay the recorded collateral as Intel PCS / a PCCS would serve it."""
    c = _collateral(vectors)
    quote_chain = urllib.parse.quote

    async def tcb(request: web.Request) -> web.Response:
        hits.append(str(request.rel_url))
        assert request.query["fmspc"] == "B0C06F000000"
        body = '{"tcbInfo":%s,"signature":"%s"}' % (c.tcb_info, c.tcb_info_signature.hex())
        return web.Response(text=body, headers={"TCB-Info-Issuer-Chain": quote_chain(c.tcb_info_issuer_chain)})

    async def qe(request: web.Request) -> web.Response:
        hits.append(str(request.rel_url))
        body = '{"enclaveIdentity":%s,"signature":"%s"}' % (c.qe_identity, c.qe_identity_signature.hex())
        return web.Response(text=body, headers={
            "SGX-Enclave-Identity-Issuer-Chain": quote_chain(c.qe_identity_issuer_chain)})

    async def pckcrl(request: web.Request) -> web.Response:
        hits.append(str(request.rel_url))
        assert request.query["ca"] == "platform" and request.query["encoding"] == "der"
        return web.Response(body=c.pck_crl, headers={"SGX-PCK-CRL-Issuer-Chain": quote_chain(c.pck_crl_issuer_chain)})

    async def rootcrl(request: web.Request) -> web.Response:
        hits.append(str(request.rel_url))
        return web.Response(body=c.root_ca_crl.hex().encode() if hex_root_crl else c.root_ca_crl)

    app = web.Application()
    app.router.add_get("/tdx/certification/v4/tcb", tcb)
    app.router.add_get("/tdx/certification/v4/qe/identity", qe)
    app.router.add_get("/sgx/certification/v4/pckcrl", pckcrl)
    app.router.add_get("/sgx/certification/v4/rootcacrl", rootcrl)
    return app


async def _serve(app: web.Application):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("hex_root_crl", [False, True])
async def test_fetch_from_pccs_caches_and_verifies(vectors, tmp_path, hex_root_crl):
    hits: list[str] = []
    runner, url = await _serve(_pcs_app(vectors, hits, hex_root_crl))
    quote = _tdx(vectors, "dcap-qvl/tdx_quote").read_bytes()
    try:
        fetched = await fetch_collateral(quote, pccs_url=url + "/sgx/certification/v4/", cache_dir=tmp_path, now=NOW)
        assert len(hits) == 4
        assert fetched == _collateral(vectors)
        assert (tmp_path / "collateral" / "tdx-B0C06F000000-platform.json").is_file()
        again = await fetch_collateral(quote, pccs_url=url, cache_dir=tmp_path, now=NOW)
        assert again == fetched and len(hits) == 4  # served from the cache while fresh
    finally:
        await runner.cleanup()
    offline = await fetch_collateral(quote, cache_dir=tmp_path, offline=True, now=NOW)
    assert verify_quote(quote, offline, NOW).status == "UpToDate"
    assert read_cached_collateral(bytes.fromhex("b0c06f000000"), "platform", tmp_path) == fetched


async def test_offline_without_cache_is_a_clear_error(vectors, tmp_path):
    quote = _tdx(vectors, "dcap-qvl/tdx_quote").read_bytes()
    with pytest.raises(CollateralError, match="offline and no cached collateral for FMSPC B0C06F000000"):
        await fetch_collateral(quote, cache_dir=tmp_path, offline=True, now=NOW)


async def test_offline_with_expired_cache(vectors, tmp_path):
    from attest.collateral import write_cached_collateral

    quote = _tdx(vectors, "dcap-qvl/tdx_quote").read_bytes()
    c = _collateral(vectors)
    write_cached_collateral(c, bytes.fromhex("b0c06f000000"), "platform", tmp_path)
    assert collateral_fresh_until(c) == datetime(2025, 7, 19, 10, 0, 35, tzinfo=timezone.utc)
    later = datetime(2025, 8, 1, tzinfo=timezone.utc)
    with pytest.raises(CollateralError, match="expired at 2025-07-19T10:00:35Z"):
        await fetch_collateral(quote, cache_dir=tmp_path, offline=True, now=later)


async def test_fetch_errors_are_collateral_errors(vectors, tmp_path):
    app = web.Application()
    runner, url = await _serve(app)  # every path answers 404
    quote = _tdx(vectors, "dcap-qvl/tdx_quote").read_bytes()
    try:
        with pytest.raises(CollateralError, match="HTTP 404"):
            await fetch_collateral(quote, pccs_url=url, cache_dir=tmp_path, now=NOW)
    finally:
        await runner.cleanup()
    with pytest.raises(CollateralError, match="failed"):
        await fetch_collateral(quote, pccs_url=url, cache_dir=tmp_path, now=NOW, timeout=2)


def test_collateral_from_pcs_bodies(vectors):
    c = _collateral(vectors)
    rebuilt = collateral_from_pcs(
        tcb_info_body='{"tcbInfo":%s,"signature":"%s"}' % (c.tcb_info, c.tcb_info_signature.hex()),
        tcb_info_issuer_chain=c.tcb_info_issuer_chain,
        qe_identity_body=('{"enclaveIdentity":%s,"signature":"%s"}' % (c.qe_identity, c.qe_identity_signature.hex())).encode(),
        qe_identity_issuer_chain=c.qe_identity_issuer_chain,
        pck_crl=c.pck_crl, pck_crl_issuer_chain=c.pck_crl_issuer_chain, root_ca_crl=c.root_ca_crl.hex().encode(),
    )
    assert rebuilt == c


def test_crl_with_an_invalid_version_is_a_parse_error(vectors) -> None:
    """Found by `cdvm bench fuzz`: cryptography raises its own InvalidVersion for CRL version 0."""
    from attest.errors import ParseError
    from attest.x509util import load_crl

    der = (vectors / "tee/tdx/go-tdx-guest/rootcrl.der").read_bytes()
    at = der.index(b"\x02\x01\x01")
    with pytest.raises(ParseError, match="not a valid CRL version"):
        load_crl(der[:at] + b"\x02\x01\x00" + der[at + 3:], "root CA CRL")
