"""The root of every typed error cdvm raises.

Library code raises subclasses of :class:`CdvmError` with a message a user can act on;
the CLI prints that message on one line and exits non-zero. Any other exception
escaping library code is a bug.
"""
from __future__ import annotations


class CdvmError(Exception):
    """Base class for all errors cdvm reports to users."""
