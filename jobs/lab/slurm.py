"""A one-node Slurm on localhost for tests and benchmarks: start it, query it, stop it by pid.

The daemons are started by ``start-slurm.sh`` beside this file (which installs Debian's packages when they
are missing; root only) under a lab directory of their own, on free ports, with fake GPUs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pervade.errors import PervadeError

SCRIPTS = Path(__file__).parent / "slurm"
#: Seconds the start script may take (it may install packages) and any Slurm command may take.
START_TIMEOUT_S = 600
COMMAND_TIMEOUT_S = 60
PIDFILES = ("run/slurmctld.pid", "run/slurmd.pid", "munge/munged.pid")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SlurmLab:
    """A running one-node Slurm and the environment its commands need (``SLURM_CONF``)."""

    lab: Path
    env: dict[str, str]

    @classmethod
    def start(cls, fake_gpus: int = 4) -> SlurmLab:
        """Start munged, slurmctld and slurmd under a fresh lab directory; PervadeError if they do not come up."""
        if os.geteuid() != 0:
            raise PervadeError("a one-node Slurm needs root")
        # munged wants every directory above its socket searchable by all: a mkdtemp dir, opened up.
        lab = Path(tempfile.mkdtemp(prefix="pervade-slurm-"))
        lab.chmod(0o755)
        env = {
            **os.environ, "SLURM_LAB": str(lab), "SLURM_FAKE_GPUS": str(fake_gpus), "SLURM_CLEAN": "1",
            "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port()), "SLURM_CONF": str(lab / "etc" / "slurm.conf"),
        }  # fmt: skip
        started = subprocess.run(["bash", str(SCRIPTS / "start-slurm.sh")], env=env, capture_output=True, text=True,
                                 timeout=START_TIMEOUT_S, check=False)  # fmt: skip
        slurm = cls(lab, env)
        if started.returncode != 0:
            try:
                slurm.stop()  # whatever did come up
            except PervadeError as stop_failure:
                started.stderr += f"\n(and stopping what started failed: {stop_failure})"
            raise PervadeError(f"Slurm did not start:\n{started.stdout}\n{started.stderr}")
        return slurm

    def stop(self) -> None:
        """Cancel every job, stop the daemons by the pids in their pidfiles, and remove the lab."""
        stopped = subprocess.run(["bash", str(SCRIPTS / "stop-slurm.sh")], env=self.env, capture_output=True, text=True,
                                 timeout=START_TIMEOUT_S, check=False)  # fmt: skip
        left = [name for name in PIDFILES if (self.lab / name).exists()]
        if stopped.returncode != 0 or left:
            raise PervadeError(f"Slurm did not stop cleanly (pidfiles left: {left}):\n{stopped.stdout}{stopped.stderr}")
        shutil.rmtree(self.lab, ignore_errors=True)

    def run(self, *command: str) -> str:
        """A Slurm command's output; PervadeError with its message if it fails."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise PervadeError(f"{' '.join(command)}: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def queued(self) -> set[str]:
        """Ids of jobs pending, running or completing, array tasks as JOB_TASK."""
        return set(self.run("squeue", "-h", "-r", "-o", "%i").split())

    def final_states(self) -> dict[str, str]:
        """JobState of every finished job by its JobId, from the job completion log."""
        states = {}
        log = self.lab / "log" / "jobcomp.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            states[fields["JobId"]] = fields["JobState"]
        return states

    def job_number(self, job_id: str) -> str:
        """The plain JobId of an array task (``12_1`` → ``14``), as the completion log names it."""
        out = self.run("scontrol", "show", "job", job_id, "-o")
        return next(f.split("=", 1)[1] for f in out.split() if f.startswith("JobId="))
