"""One plain-text table formatter for every report the project prints (pruning, eligibility, benchmarks)."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def format_table(head: Sequence[str], rows: Sequence[Sequence[object]], right: Collection[int] = (),
                 markdown: bool = False) -> str:
    """A header, a rule and the rows, each column as wide as its widest cell; columns whose index is in `right`
    are right-aligned (numbers), the others left-aligned; no trailing spaces. markdown: a GitHub markdown table
    instead (the benchmarks' results/*.md), unpadded, `right` as ---: in the rule, a "|" in a cell escaped."""
    cells = [[str(v) for v in r] for r in [head, *rows]]
    if markdown:
        def md_line(r: list[str]) -> str:
            return "| " + " | ".join(v.replace("|", "\\|") for v in r) + " |"

        rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(head))) + "|"
        return "\n".join([md_line(cells[0]), rule, *map(md_line, cells[1:])])
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])
