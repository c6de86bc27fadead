"""One printed line per golden comparison, so the README's fidelity table can name the command
that gives each number: ``pytest -q -s tests/test_golden_*.py | grep '\\[fidelity\\]'``."""

from __future__ import annotations


def report(method: str, what: str, value: float | int | str) -> None:
    """Print ``[fidelity] <method>: <what> = <value>`` (floats in short scientific form)."""
    shown = f"{value:.2g}" if isinstance(value, float) else str(value)
    print(f"[fidelity] {method}: {what} = {shown}")
