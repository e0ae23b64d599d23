"""The shared progress bars: drawn only on a terminal, never moving what a step prints."""

import io

from dlmodels import _progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_off_without_a_terminal_or_when_disabled(monkeypatch):
    assert not _progress.enabled(io.StringIO())
    assert _progress.enabled(_Tty())
    monkeypatch.setenv("DLMODELS_PROGRESS", "0")
    assert not _progress.enabled(_Tty())


def test_a_bar_leaves_stdout_where_it_was_sent(monkeypatch, capsys):
    """With a bar drawn (stderr a terminal), a step's prints still go to stdout (a file or a
    pipe), not into the bar's stderr console."""
    import rich.console

    real = rich.console.Console
    bar = io.StringIO()  # the "terminal" the bar draws on
    monkeypatch.setattr(
        rich.console, "Console", lambda **kw: real(file=bar, force_terminal=True, width=80)
    )
    monkeypatch.setattr(_progress, "enabled", lambda stream=None: True)
    seen = []
    for item in _progress.track([1, 2, 3], "testing"):
        print(f"line {item}")
        seen.append(item)
    with _progress.steps("more", total=None) as advance:
        print("inside steps")
        advance(1, note="x")
    out = capsys.readouterr().out
    assert seen == [1, 2, 3]
    assert out.splitlines() == ["line 1", "line 2", "line 3", "inside steps"]
    assert "testing" in bar.getvalue()  # a bar was drawn
