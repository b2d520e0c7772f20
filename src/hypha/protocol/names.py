"""Names that come from the wire or a spec and may become part of a path.

Owns the one rule every such name follows (transfer ids, file names, job ids and names,
dataset names): 1 to ``MAX_NAME_LENGTH`` characters from ``A-Z a-z 0-9 . _ -``, not starting
with a dot, and no ``..``. A name that breaks it is refused with ``UnsafeNameError`` saying
why; nothing is silently rewritten. Also the one check of a sha256 digest in hex
(``is_sha256``), which names slices, manifests and transfers. Imports nothing from hypha.
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 100

_ALLOWED = re.compile(r"[A-Za-z0-9._-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class UnsafeNameError(ValueError):
    """A name cannot be used as a path component."""


def check_name(value: str, what: str = "name") -> str:
    """Return ``value`` when it is a safe single path component.

    Args:
        value: the name as received.
        what: what the name is, for the message (``"transfer id"``, ``"job name"``).

    Raises:
        UnsafeNameError: Empty, too long, with a separator or another character outside
            ``A-Z a-z 0-9 . _ -``, starting with a dot, or containing ``..``.
    """
    if not isinstance(value, str) or not value:
        raise UnsafeNameError(f"{what} must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise UnsafeNameError(f"{what} is {len(value)} characters long (at most {MAX_NAME_LENGTH})")
    if _ALLOWED.fullmatch(value) is None:
        bad = sorted({c for c in value if _ALLOWED.fullmatch(c) is None})
        shown = ", ".join(repr(c) for c in bad[:5])
        raise UnsafeNameError(f"{what} {value[:40]!r} has characters other than A-Z a-z 0-9 . _ - ({shown})")
    if value.startswith("."):
        raise UnsafeNameError(f"{what} {value!r} must not start with a dot")
    if ".." in value:
        raise UnsafeNameError(f"{what} {value!r} must not contain '..'")
    return value


def is_safe_name(value: str) -> bool:
    """Whether ``check_name`` would accept ``value``."""
    try:
        check_name(value)
    except UnsafeNameError:
        return False
    return True


def is_sha256(value: str) -> bool:
    """Whether ``value`` is a sha256 digest as Hypha writes it: 64 lowercase hex digits."""
    return _SHA256.fullmatch(value) is not None
