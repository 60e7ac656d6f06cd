"""Text from a file cannot draw on the terminal: every non-printable character is escaped."""

from hypothesis import given
from hypothesis import strategies as st

from repconv.terminal import shown


def test_control_sequences_are_escaped():
    assert shown("arch\x1b[2K\rverification passed\x07") == (
        "arch\\x1b[2K\\rverification passed\\x07"
    )
    assert shown("right\u202eto-left") == "right\\u202eto-left"
    assert shown("naïve résumé 模型") == "naïve résumé 模型"  # printable text is left alone


@given(st.text())
def test_nothing_non_printable_survives(text):
    assert all(ch.isprintable() for ch in shown(text))
