"""export.table.format_table: the one table formatter of the reports."""

from export.table import format_table


def test_columns_padded_and_aligned_without_trailing_spaces():
    text = format_table(["name", "ms"], [["fc1", "1.50"], ["layers.0.q", "12.25"]], right=(1,))
    assert text.split("\n") == [
        "name           ms",
        "----------  -----",
        "fc1          1.50",
        "layers.0.q  12.25",
    ]
    assert format_table(["a", "note"], [["x", ""]]).split("\n")[2] == "x"  # a short last cell leaves no spaces


def test_markdown_rule_marks_right_aligned_columns_and_escapes_pipes():
    text = format_table(["kind", "ms"], [["a|b", 1.5]], right=(1,), markdown=True)
    assert text.split("\n") == ["| kind | ms |", "|---|---:|", "| a\\|b | 1.5 |"]
