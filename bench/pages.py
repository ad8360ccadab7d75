"""Shared bits of the docs-page generators (bench/*_page.py): a table block rewritten in place, mean ± std cells.

A page holds blocks `<!-- table:NAME -->` … `<!-- /table -->`; a generator replaces what is between the markers
and leaves the prose alone, and writes the page atomically (`umec_lightning.io.write_text`).
"""

from __future__ import annotations

import statistics


def mean_sd(values: list[float], digits: int = 4, sign: bool = False) -> str:
    """`mean ± sample std` (std 0 for one value; `–` for none); `sign` writes the mean with its sign."""
    if not values:
        return "–"
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.{digits}f} ± {sd:.{digits}f}" if sign else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def fill_block(page: str, name: str, table: str) -> str:
    """`page` with its `<!-- table:name -->` block's content replaced by `table`; SystemExit naming the block when
    it is missing or not closed."""
    start, end = f"<!-- table:{name} -->", "<!-- /table -->"
    head, sep, rest = page.partition(start)
    if not sep:
        raise SystemExit(f"the page has no {start} block")
    _, sep2, tail = rest.partition(end)
    if not sep2:
        raise SystemExit(f"the {start} block is not closed by {end}")
    return f"{head}{start}\n{table}\n{end}{tail}"
