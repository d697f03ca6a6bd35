"""dsno.progress: one bar look for every long stage, silent where stderr is not a terminal."""

import io

from rich.console import Console

from dsno.progress import counter, progress_bar


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=100), out


def test_a_terminal_shows_the_bar_with_its_count():
    console, out = _console(True)
    with counter("sampling", 40, console=console) as advance:
        advance(15)
        advance(25)
    text = out.getvalue()
    assert "sampling" in text and "40/40" in text


def test_not_a_terminal_or_disabled_prints_nothing_but_counts():
    for terminal, enabled in ((False, True), (True, False)):
        console, out = _console(terminal)
        with progress_bar(enabled, console) as bar:
            task = bar.add_task("shards", total=3)
            bar.advance(task, 2)
            assert bar.tasks[0].completed == 2
        assert out.getvalue() == ""
