"""Training runs launched as users launch them: ``torchrun --standalone -m pretrain.train <overrides>``.

torchrun gets the flags slurm/job.sbatch.in gives it (``--signals-to-handle`` with SIGUSR1 and a
long ``--shutdown-timeout``), so a SIGUSR1 sent to torchrun reaches the training processes exactly
as SLURM's time-limit warning does: every rank finishes its step, writes a checkpoint and exits with
85; torchrun itself then exits non-zero (it exits 1 whenever it forwarded a signal).

Each launch writes its whole console output to ``<run_dir>.log``; a failed launch shows its tail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHUTDOWN_TIMEOUT_S = 300  # torchrun waits this long for the ranks' checkpoint after a signal


def torchrun(nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}", "-m", "pretrain.train", *overrides]


class Run:
    """One run directory: the launches that write it, and what they wrote."""

    def __init__(self, run_dir: Path, nproc: int, overrides: list[str], timeout_s: int,
                 env: dict[str, str] | None = None):
        self.dir = run_dir
        self.nproc = nproc
        self.overrides = [*overrides, f"run_dir={run_dir}"]
        self.timeout_s = timeout_s
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **(env or {})}
        self.log_path = run_dir.with_name(run_dir.name + ".log")
        self.wall_s = 0.0  # all launches of this run together

    # ------------------------------------------------------------------------------- launches

    def _launch(self, on_poll=None) -> int:
        """One torchrun launch, its console appended to the log; returns torchrun's exit code.
        ``on_poll(proc)`` runs every 0.1 s while it runs."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        command = torchrun(self.nproc, self.overrides)
        started = time.monotonic()
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            proc = subprocess.Popen(
                command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a timeout kills torchrun and every rank
                env=self.env)
            while proc.poll() is None:
                if on_poll is not None:
                    on_poll(proc)
                if time.monotonic() - started > self.timeout_s:
                    os.killpg(proc.pid, signal.SIGKILL)  # no stray rank keeps a GPU
                    proc.wait()
                    raise AssertionError(f"launch ran over {self.timeout_s}s, killed:\n{self.log_tail()}")
                time.sleep(0.1)
        self.wall_s += time.monotonic() - started
        return proc.returncode

    def train(self) -> None:
        """Launch; the run must finish (exit 0)."""
        code = self._launch()
        assert code == 0, f"training exited with {code}:\n{self.log_tail()}"

    def train_until_signal(self, after_step: int) -> int:
        """Launch, send SIGUSR1 to torchrun once step ``after_step`` is logged, wait for the exit.
        Returns the step the run checkpointed at (``after_step`` or a step or two later: the ranks
        stop at the first step boundary after the signal arrives)."""
        sent = []

        def signal_when_due(proc: subprocess.Popen) -> None:
            if not sent and self.last_step() >= after_step:
                proc.send_signal(signal.SIGUSR1)
                sent.append(time.monotonic())

        code = self._launch(signal_when_due)
        log = self.log_text()
        assert sent, f"the run ended (exit {code}) before step {after_step} was logged:\n{self.log_tail()}"
        assert "exiting with 85" in log, f"no 'exiting with 85' after SIGUSR1 (exit {code}):\n{log[-6000:]}"
        return self.last_step()

    # -------------------------------------------------------------------------------- results

    def metrics(self) -> list[dict]:
        """metrics.jsonl rows (a line still being written is left out)."""
        path = self.dir / "metrics.jsonl"
        rows = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
        return rows

    def last_step(self) -> int:
        rows = self.metrics()
        return rows[-1]["step"] if rows else 0

    def losses(self) -> dict[int, float]:
        return {row["step"]: row["loss"] for row in self.metrics()}

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.is_file() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def keep_results(self, out: Path) -> None:
        """Copy the log and metrics.jsonl to ``out`` (they outlive the temporary run directory)."""
        out.mkdir(parents=True, exist_ok=True)
        if self.log_path.is_file():
            shutil.copy2(self.log_path, out / self.log_path.name)
        if (self.dir / "metrics.jsonl").is_file():
            shutil.copy2(self.dir / "metrics.jsonl", out / f"{self.dir.name}.metrics.jsonl")

    def drop_checkpoints(self) -> None:
        """Checkpoints are GBs at these widths: free the disk once the tests have read them."""
        shutil.rmtree(self.dir / "checkpoints", ignore_errors=True)
