"""Loop detection: whether a ``Via`` field value names this proxy."""

from __future__ import annotations

import pytest

from proxychain.loops import via_names_node

VIA_CASES = [
    (None, "edge", False),
    ("", "edge", False),
    ("1.1 edge", "edge", True),
    ("1.1 EDGE", "edge", True),
    ("1.1 edge", "Edge", True),
    ("HTTP/1.1 edge:8080", "edge", True),
    ("1.1 edge:8080", "edge:8080", True),
    ("1.1 edge:8080", "edge:9090", False),
    ("1.1 edge", "edge:8080", False),
    ("1.0 fred, 1.1 edge (proxychain/0.1)", "edge", True),
    ("1.0 fred, 1.1 p.example.net", "edge", False),
    ("1.1 fred (see edge, 1.1 edge)", "edge", False),  # only inside a comment
    ("1.1 fred (nested (edge, x) \\) 1.1 edge), 1.0 bob", "edge", False),
    ("1.1 fred (c), , 1.1 edge", "edge", True),
    ("edge", "edge", False),  # malformed: no protocol
    ("1.1 edgewise", "edge", False),
    ("1.1 [::1]:8080", "[::1]", True),
    ("1.1 [::1]:8080", "[::1]:8080", True),
    ("1.1 [::2]:8080", "[::1]", False),
]


@pytest.mark.parametrize(("via", "node", "want"), VIA_CASES)
def test_via_names_node(via: str | None, node: str, want: bool) -> None:
    assert via_names_node(via, node) is want


def test_via_needs_a_node_name() -> None:
    with pytest.raises(ValueError, match="node_name"):
        via_names_node("1.1 edge", " ")
