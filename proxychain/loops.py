"""Loop detection: does a request's ``Via`` already name this proxy?

Theory of operation
-------------------

Every proxy that forwards a request adds itself to its ``Via`` field (RFC 9110 §7.6.3), and
so does this one, under its node name. A request whose ``Via`` already names this proxy has
therefore been here before: an upstream chain points back at it, directly or through other
proxies, and forwarding it again would only go round once more. :func:`via_names_node` tells
whether that is so, from the field value alone; the shell then answers 508 (RFC 5842 §7.2)
without forwarding anything.
"""

from __future__ import annotations

__all__ = ["via_names_node"]


def via_names_node(via_header: str | None, node_name: str) -> bool:
    """Whether a ``Via`` field value (RFC 9110 §7.6.3) names ``node_name`` as a recipient.

    ``Via: 1.1 name, 1.0 other:8080 (comment, with commas)``: each member is a received
    protocol, a received-by (pseudonym or host, optional port) and an optional comment.
    Names compare case-insensitively; ``node_name`` without a port also matches a received-by
    with one. Malformed members are ignored. Several ``Via`` fields should be joined with ``,``.

    Raises:
        ValueError: if ``node_name`` is empty.
    """
    if not node_name.strip():
        raise ValueError("node_name must not be empty")
    if not via_header:
        return False
    node = node_name.strip().lower()
    for member in _split_via(via_header):
        words = member.split()
        if len(words) < 2:
            continue
        received_by = words[1].lower()
        if received_by == node or _host_of(received_by) == node:
            return True
    return False


def _split_via(value: str) -> list[str]:
    """Split on commas outside comments, and drop the comments (RFC 9110 §5.6.5)."""
    members: list[str] = []
    current: list[str] = []
    depth = 0
    escaped = False
    for ch in value:
        if depth:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
        elif ch == "(":
            depth = 1
            current.append(" ")
        elif ch == ",":
            members.append("".join(current))
            current = []
        else:
            current.append(ch)
    members.append("".join(current))
    return members


def _host_of(received_by: str) -> str:
    if received_by.startswith("["):  # IPv6 literal, RFC 3986 §3.2.2
        return received_by.partition("]")[0] + "]"
    return received_by.partition(":")[0]
