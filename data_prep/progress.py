"""Build progress: tqdm's bar on a terminal, plain lines in a log.

A batch job's stderr (a SLURM log) is a file: a bar there is one endless line of carriage
returns, useless until the job ends. So when stderr is not a terminal the build prints one plain
line every ``interval`` seconds instead, e.g.
``part 2/3: 1200/4000 inputs (30%), 210 samples/s, 3 rejected``; the summary follows at the end.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm

INTERVAL_S = 30.0


class Progress:
    """``enabled``: True a bar, False nothing, None a bar on a terminal and lines otherwise."""

    def __init__(
        self,
        label: str,
        total: int | None,
        enabled: bool | None = None,
        interval: float = INTERVAL_S,
        stream: IO[str] | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.done = 0
        self.rejected = 0
        self._bar: tqdm | None = None
        self._lines = False
        if enabled is None:
            enabled = self._is_terminal()
            self._lines = not enabled
        if enabled:
            self._bar = tqdm(
                total=total,
                desc=label,
                unit="sample",
                file=self.stream,
                mininterval=0.5,
                dynamic_ncols=True,
            )
        self._started: float | None = None  # the first input done (a part reads ahead before it)
        self._next_line = time.monotonic() + interval

    def _is_terminal(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def _due(self) -> bool:
        now = time.monotonic()
        if now < self._next_line:
            return False
        self._next_line = now + self.interval
        return True

    def _print(self, text: str) -> None:
        print(f"{self.label}: {text}", file=self.stream, flush=True)

    def update(self, rejected: bool) -> None:
        """One input done (written or rejected)."""
        if self._started is None:
            self._started = time.monotonic()
            if self._bar is not None:
                self._bar.set_postfix_str("", refresh=False)  # done reading ahead (see reading)
        self.done += 1
        self.rejected += int(rejected)
        if self._bar is not None:
            self._bar.update(1)
        elif self._lines and self._due():
            self._print(self.line())

    def reading(self, index: int, until: int) -> None:
        """At input #``index`` of the ``until`` read before this build's own (a part claims their keys)."""
        percent = 100 * index // max(until, 1)
        text = f"reading inputs [0, {until}) first (their keys): at #{index} ({percent}%)"
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
        elif self._lines and self._due():
            self._print(text)

    def line(self) -> str:
        """``1200/4000 inputs (30%), 210 samples/s, 3 rejected`` (the log line without its label)."""
        elapsed = time.monotonic() - self._started if self._started is not None else 0.0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            done = f"{self.done}/{self.total} inputs ({100 * self.done // self.total}%)"
        else:
            done = f"{self.done} inputs"
        return f"{done}, {rate:.0f} samples/s, {self.rejected} rejected"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
