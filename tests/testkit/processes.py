"""Jobs as subprocesses that never hang a test silently: every wait has a timeout, and a timeout
(or an early exit) fails the test with the child's last output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TAIL_CHARS = 4000


def tail(text: str | bytes | None, chars: int = TAIL_CHARS) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return (text or "")[-chars:]


def environment_without_ray() -> dict[str, str]:
    """No RAY_ADDRESS: if the job got as far as Ray it would start one and say so."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def run_job(script: str, *args: str, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:  # fmt: skip
    """`python jobs/<script>[.py] args...`, output captured. Past `timeout` seconds the job is
    killed and the test fails with its last output (a hang is a failure, never a silent wait)."""
    path = REPO_ROOT / "jobs" / (script if script.endswith(".py") else f"{script}.py")
    try:
        return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"jobs/{path.name} did not finish within {timeout:.0f} s; its last output:\n"
                    f"--- stdout\n{tail(expired.stdout)}\n--- stderr\n{tail(expired.stderr)}", pytrace=False)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class RunningJob:
    """A job started with Popen whose stdout+stderr a thread drains into `lines` (a job whose pipe
    fills up blocks in write() and looks hung). Every wait has a timeout that kills the job and
    fails with its last lines."""

    def __init__(self, command: list[str], env: dict | None = None, cwd: Path | None = None):
        self.command = command
        # SIGINT at its default in the child: a suite started in the background by a non-interactive
        # shell inherits SIGINT *ignored*, Python then installs no KeyboardInterrupt handler, and a
        # job told to stop with Ctrl-C (the tests' SIGINT) would serve on until the timeout.
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env, cwd=cwd, preexec_fn=_default_sigint)  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._drained = False
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._drained = True
            self._changed.notify_all()

    def output(self, lines: int | None = None) -> str:
        with self._changed:
            return "".join(self.lines if lines is None else self.lines[-lines:])

    def wait_for(self, marker: str, timeout_s: float) -> list[str]:
        """The lines up to the first holding `marker`; fails if the job ends first or time runs out."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not any(marker in line for line in self.lines):
                if self._drained:
                    self._fail(f"ended (exit code {self.process.poll()}) before printing {marker!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._fail(f"printed no {marker!r} within {timeout_s:.0f} s")
                self._changed.wait(timeout=remaining)
            return list(self.lines)

    def wait(self, timeout_s: float) -> int:
        """The exit code, once the output is drained."""
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._fail(f"did not exit within {timeout_s:.0f} s")
        with self._changed:
            self._changed.wait_for(lambda: self._drained, timeout=30)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def _fail(self, what: str) -> None:
        self.kill()
        raise AssertionError(f"{' '.join(self.command[1:3])} {what}; its last output:\n{self.output(40)}")


def start_job(script: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> RunningJob:
    """`python jobs/<script>[.py] args...` in the background, its output drained (see RunningJob)."""
    path = REPO_ROOT / "jobs" / (script if script.endswith(".py") else f"{script}.py")
    return RunningJob([sys.executable, str(path), *args], env=env, cwd=cwd)
