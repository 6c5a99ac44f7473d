"""The 1024-byte TDREPORT_STRUCT returned by TDG.MR.REPORT (Linux TDX_CMD_GET_REPORT0).

Layout (Intel TDX Module ABI spec, TDREPORT_STRUCT): REPORTMACSTRUCT [0,256) — REPORTTYPE
(type, subtype, version, reserved) at 0, CPUSVN at 16, TEE_TCB_INFO_HASH at 32,
TEE_INFO_HASH at 80, REPORTDATA at 128..192, MAC at 224; TEE_TCB_INFO [256,495) — VALID
at 256, TEE_TCB_SVN at 264, MRSEAM at 280, MRSIGNERSEAM at 328, ATTRIBUTES at 376,
TEE_TCB_SVN2 at 384 (TDX 1.5); TDINFO [512,1024) — ATTRIBUTES, XFAM, MRTD, MRCONFIGID,
MROWNER, MROWNERCONFIG, RTMR0..3, SERVTD_HASH (TDX 1.5). No MAC check: only the CPU can.
"""
from __future__ import annotations

from dataclasses import dataclass

from attest.errors import ParseError

TDREPORT_LEN = 1024


@dataclass(frozen=True, slots=True)
class TdReport:
    """A parsed TDREPORT."""

    report_type: int
    report_subtype: int
    report_version: int
    cpu_svn: bytes
    tee_tcb_info_hash: bytes
    tee_info_hash: bytes
    report_data: bytes
    mac: bytes
    tee_tcb_info_valid: bytes
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    tee_tcb_svn2: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    servtd_hash: bytes
    raw: bytes

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)


def parse_tdreport(data: bytes) -> TdReport:
    """Parse a TDREPORT; it must be exactly 1024 bytes with REPORTTYPE.TYPE = 0x81 (TDX)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError(f"TDREPORT must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) != TDREPORT_LEN:
        raise ParseError(f"TDREPORT must be {TDREPORT_LEN} bytes, got {len(data)}")
    if data[0] != 0x81:
        raise ParseError(f"TDREPORT REPORTTYPE.TYPE at offset 0 is {data[0]:#x}, expected 0x81 (TDX)")
    td = 512
    return TdReport(
        report_type=data[0], report_subtype=data[1], report_version=data[2],
        cpu_svn=data[16:32], tee_tcb_info_hash=data[32:80], tee_info_hash=data[80:128],
        report_data=data[128:192], mac=data[224:256],
        tee_tcb_info_valid=data[256:264], tee_tcb_svn=data[264:280], mr_seam=data[280:328],
        mr_signer_seam=data[328:376], seam_attributes=data[376:384], tee_tcb_svn2=data[384:400],
        td_attributes=data[td:td + 8], xfam=data[td + 8:td + 16], mr_td=data[td + 16:td + 64],
        mr_config_id=data[td + 64:td + 112], mr_owner=data[td + 112:td + 160],
        mr_owner_config=data[td + 160:td + 208], rtmr0=data[td + 208:td + 256], rtmr1=data[td + 256:td + 304],
        rtmr2=data[td + 304:td + 352], rtmr3=data[td + 352:td + 400], servtd_hash=data[td + 400:td + 448],
        raw=data,
    )
