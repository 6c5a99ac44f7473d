"""Exactly-once job claims among workers that share one DVM identity, with Kubernetes Leases.

Several worker replicas subscribe to the same relays and all see every job request. Before
a worker admits a job it **creates** the Lease ``cdvm-job-<request id>``
(``coordination.k8s.io/v1``) with itself as ``holderIdentity``: the API server stores an
object name once, so exactly one create succeeds and every other replica gets
``409 AlreadyExists`` and leaves the job alone. A claim is never taken over, even when its
holder died: like the SQLite journal on one host, a job is run at most once and a crashed
worker's customers are told to resubmit.

Later changes to a claim (:meth:`JobClaims.finish` records the final state in an
annotation) are compare-and-swap writes: the update carries the ``resourceVersion`` that
was read, and a ``409 Conflict`` (someone wrote in between) means read again and retry.
:meth:`JobClaims.collect` deletes claims older than the retention with a
``resourceVersion`` precondition, so a claim touched meanwhile survives.
"""
from __future__ import annotations

import datetime
import logging
import re
from typing import Any

from jobs.coco_manifests import LABEL_COMPONENT, LABEL_MANAGED, MANAGED_BY
from jobs.sandbox_coco import KubeClients, api_error_text, api_status
from jobs.sandbox_errors import SandboxError

log = logging.getLogger(__name__)

CLAIM_COMPONENT = "job-claim"
CLAIM_SELECTOR = f"{LABEL_MANAGED}={MANAGED_BY},{LABEL_COMPONENT}={CLAIM_COMPONENT}"
ANNOTATION_STATE = "cdvm.dev/state"
CAS_ATTEMPTS = 8
_JOB_ID = re.compile(r"[0-9a-f]{64}")


class ClaimError(SandboxError):
    """A job claim could not be made or updated (API unreachable, forbidden, malformed id)."""


def lease_name(job_id: str) -> str:
    """``cdvm-job-<64 hex>``: a valid DNS subdomain name for the request id's claim."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ClaimError(f"job id {job_id!r} must be 64 lowercase hex characters (a Nostr event id)")
    return f"cdvm-job-{job_id}"


def micro_time(moment: datetime.datetime) -> str:
    """A ``MicroTime`` (RFC 3339 with microseconds, UTC)."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def claim_manifest(job_id: str, namespace: str, holder: str, now: datetime.datetime, lease_seconds: int) -> dict[str, Any]:
    """The Lease that claims ``job_id`` for ``holder``."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease_name(job_id),
            "namespace": namespace,
            "labels": {LABEL_MANAGED: MANAGED_BY, LABEL_COMPONENT: CLAIM_COMPONENT},
            "annotations": {ANNOTATION_STATE: "claimed"},
        },
        "spec": {
            "holderIdentity": holder,
            "acquireTime": micro_time(now),
            "renewTime": micro_time(now),
            "leaseDurationSeconds": lease_seconds,
        },
    }


class JobClaims:
    """Claims jobs for one worker (``holder``) in one namespace."""

    def __init__(self, clients: KubeClients, namespace: str, holder: str, *, lease_seconds: int = 3600,
                 timeout: float = 30.0) -> None:
        self._clients = clients
        self.namespace = namespace
        self.holder = holder
        self.lease_seconds = lease_seconds
        self.timeout = timeout

    async def claim(self, job_id: str) -> bool:
        """True when this worker now holds the job; False when another worker claimed it first."""
        body = claim_manifest(job_id, self.namespace, self.holder, datetime.datetime.now(datetime.UTC), self.lease_seconds)
        try:
            await self._clients.coordination.create_namespaced_lease(self.namespace, body, _request_timeout=self.timeout)
        except Exception as error:  # noqa: BLE001 - ApiException or a transport error, told apart by status
            if api_status(error) == 409:
                return False
            raise ClaimError(f"could not claim job {job_id[:12]}: {api_error_text(error)}") from None
        return True

    async def finish(self, job_id: str, state: str) -> None:
        """Record ``state`` (done, failed, rejected) on this worker's claim (compare-and-swap)."""
        name = lease_name(job_id)
        api = self._clients.coordination
        for _ in range(CAS_ATTEMPTS):
            try:
                lease = await api.read_namespaced_lease(name, self.namespace, _request_timeout=self.timeout)
            except Exception as error:  # noqa: BLE001
                raise ClaimError(f"could not read the claim of job {job_id[:12]}: {api_error_text(error)}") from None
            if lease.spec.holder_identity != self.holder:
                raise ClaimError(f"job {job_id[:12]} is held by {lease.spec.holder_identity!r}, not by this worker")
            lease.metadata.annotations = {**(lease.metadata.annotations or {}), ANNOTATION_STATE: state}
            lease.spec.renew_time = datetime.datetime.now(datetime.UTC)
            try:
                await api.replace_namespaced_lease(name, self.namespace, lease, _request_timeout=self.timeout)
            except Exception as error:  # noqa: BLE001
                if api_status(error) == 409:
                    continue
                raise ClaimError(f"could not update the claim of job {job_id[:12]}: {api_error_text(error)}") from None
            return
        raise ClaimError(f"the claim of job {job_id[:12]} kept changing under {CAS_ATTEMPTS} updates")

    async def collect(self, retention_s: float) -> int:
        """Delete claims acquired more than ``retention_s`` ago; return how many."""
        from kubernetes_asyncio.client import V1DeleteOptions, V1Preconditions

        api = self._clients.coordination
        try:
            leases = await api.list_namespaced_lease(self.namespace, label_selector=CLAIM_SELECTOR, _request_timeout=self.timeout)
        except Exception as error:  # noqa: BLE001
            raise ClaimError(f"could not list job claims: {api_error_text(error)}") from None
        cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=retention_s)
        removed = 0
        for lease in leases.items:
            acquired = lease.spec.acquire_time
            if acquired is None or acquired > cutoff:
                continue
            options = V1DeleteOptions(preconditions=V1Preconditions(resource_version=lease.metadata.resource_version))
            try:
                await api.delete_namespaced_lease(lease.metadata.name, self.namespace, body=options,
                                                  _request_timeout=self.timeout)
            except Exception as error:  # noqa: BLE001
                if api_status(error) in (404, 409):
                    continue
                raise ClaimError(f"could not delete the claim {lease.metadata.name}: {api_error_text(error)}") from None
            removed += 1
        if removed:
            log.info("removed %d job claim(s) older than %.0f s", removed, retention_s)
        return removed
