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


def test_enabled_without_a_terminal_logs_a_line_per_tenth(caplog):
    import logging
    console, out = _console(False)
    with caplog.at_level(logging.INFO, logger="dsno"):
        with counter("trajectories", 200, console=console) as advance:
            for _ in range(200):
                advance(1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trajectories ")]
    assert [line.split()[1] for line in lines] == [f"{k}/200" for k in range(20, 201, 20)]   # 10 lines, not 200
    assert "(100%)" in lines[-1] and "left" not in lines[-1] and "left" in lines[0]
    assert out.getvalue() == ""


def test_disabled_logs_nothing(caplog):
    import logging
    console, _ = _console(False)
    with caplog.at_level(logging.INFO, logger="dsno"):
        with counter("sampling", 10, enabled=False, console=console) as advance:
            advance(10)
    assert not [r for r in caplog.records if r.getMessage().startswith("sampling")]
