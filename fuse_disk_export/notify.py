"""systemd's readiness protocol (sd_notify(3)), for ``Type=notify`` services.

When systemd starts us with ``NOTIFY_SOCKET`` set, it waits for ``READY=1`` before it considers the
unit started; we send it only once every export is live, so that units ordered ``After=`` ours find
the image already raw.  ``STOPPING=1`` says we are reverting.  Without ``NOTIFY_SOCKET`` every
function here does nothing.  Standard library only: this is on the path to live.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return None  # unset, or a vsock address we do not speak
    # A leading '@' names a socket in the abstract namespace.
    return "\0" + address[1:] if address[0] == "@" else address


def notify(*assignments: str) -> bool:
    """Send ``VAR=value`` lines to the service manager; return whether they were sent.

    Failures are logged, never raised: a service manager that went away must not stop an export.
    """
    address = _address()
    if address is None:
        return False
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as e:
        log.warning("cannot notify the service manager on %s: %s", address.lstrip("\0"), e)
        return False
    return True


def ready(status: str) -> bool:
    """Every export is live: ``READY=1``, and our pid (a ``-d`` daemon is not the one started)."""
    return notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS={status}")


def stopping() -> bool:
    """We are reverting."""
    return notify("STOPPING=1", "STATUS=Reverting")
