"""Typed errors of the job side (models, generation parameters, retrieval).

Every bad model file, malformed parameter or failed inference ends in one of these, with
a message that names what was wrong — never the prompt, document or answer involved.
"""
from __future__ import annotations

from dvm.errors import CdvmError


class JobError(CdvmError):
    """Base class of every error raised by the ``jobs`` package."""


class ModelError(JobError):
    """A model file is missing, is not a GGUF, does not match its digest, or fails to load or run."""


class ParamError(JobError):
    """A job request parameter is malformed or out of range."""


class RagError(JobError):
    """Documents cannot be chunked, indexed or retrieved, or a prompt cannot fit its budget."""
