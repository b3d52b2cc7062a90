"""Progress bars only when stderr is a terminal (curvlab/progress.py; issue 13, item 6).

Each command runs as a subprocess twice: with stderr a pipe (as in a log file: no bar, no carriage
return, no escape sequence) and with stderr a pseudo-terminal of 100 columns (the bar is drawn).
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest

from curvlab.progress import SilentBar, progress_bar, stderr_is_terminal

ENV = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
SMALL_FACTORS = ["factors", "--model", "mlp", "--model-arg", "widths=8", "--examples", "64",
                 "--batch-size", "16"]


def _with_pipe(args: list[str], cwd) -> tuple[int, str]:
    run = subprocess.run([sys.executable, "-m", "curvlab", *args], capture_output=True, text=True,
                         timeout=600, env=ENV, cwd=cwd)
    return run.returncode, run.stderr


def _with_terminal(args: list[str], cwd) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (24 x 100); what the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm needs a width
    proc = subprocess.Popen([sys.executable, "-m", "curvlab", *args], stdout=subprocess.DEVNULL, stderr=slave,
                            stdin=subprocess.DEVNULL, env=ENV, cwd=cwd)
    os.close(slave)
    chunks = []
    try:
        while select.select([master], [], [], 600)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(timeout=600)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_no_bar_in_a_log(tmp_path):
    code, err = _with_pipe([*SMALL_FACTORS, "-o", "x.h5"], tmp_path)
    assert code == 0 and err == ""
    code, err = _with_pipe(["train", "--model", "mlp", "--model-arg", "widths=8", "--examples", "64",
                            "--batch-size", "16", "--factor-examples", "16", "--steps", "10", "-o", "run"],
                           tmp_path)
    assert code == 0 and err == ""  # a bar here wrote 46 KB of carriage returns in 300 steps


def test_bar_on_a_terminal(tmp_path):
    code, err = _with_terminal([*SMALL_FACTORS, "-o", "x.h5"], tmp_path)
    assert code == 0 and "factors: " in err and "batch/s" in err and "\r" in err
    code, err = _with_terminal([*SMALL_FACTORS, "-o", "y.h5", "--quiet"], tmp_path)
    assert code == 0 and err == ""


def test_nqm_figure_15_leaves_no_cursor_movement(tmp_path):
    """Fig. 15 showed two bars at once; the nested one moved the cursor up (ESC[A) and left it in logs."""
    args = ["nqm", "figure", "15", "--d", "100", "--bins", "20", "--out", "figs"]
    code, err = _with_terminal(args, tmp_path)
    assert code == 0 and "bisection steps" in err
    assert "\x1b[A" not in err
    code, err = _with_pipe(args + ["--quiet"], tmp_path)
    assert code == 0 and err == ""


def test_progress_bar_follows_the_stream(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not stderr_is_terminal()
    bar = progress_bar(range(3), desc="x")
    assert isinstance(bar, SilentBar) and list(bar) == [0, 1, 2]
    bar.update(1)
    bar.set_postfix(loss=1.0)
    bar.close()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert stderr_is_terminal()
    assert not isinstance(progress_bar(range(3), desc="x"), SilentBar)
    assert isinstance(progress_bar(range(3), desc="x", enabled=False), SilentBar)


@pytest.mark.parametrize("stream", [None, "closed"])
def test_an_odd_stream_is_not_a_terminal(monkeypatch, stream):
    if stream == "closed":
        closed = io.StringIO()
        closed.close()
        monkeypatch.setattr(sys, "stderr", closed)
    else:
        monkeypatch.setattr(sys, "stderr", object())
    assert not stderr_is_terminal()
