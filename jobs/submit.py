"""``pervade submit``: render a worker job from a template in ``jobs/templates/`` and hand it to the batch
system with its own command (sbatch, condor_submit, qsub).

``--workers N`` submits N jobs as one array (a Slurm job array, an HTCondor cluster of N procs, a Grid
Engine task array), so the scheduler gets one request, and each job can still be cancelled on its own.
Each job runs ``pervade node`` (jobs/node.py): one worker per GPU it was given. The templates are Jinja2
files that a user can copy, edit and pass back with ``--template``; the variables they get are the fields
of ``JobSpec`` (plus ``script`` for HTCondor's submit description).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path

import jinja2

from pervade.errors import ConfigError, PervadeError
from pervade.options import NON_NEGATIVE, at_least, check_options, option

TEMPLATES_DIR = Path(__file__).parent / "templates"
#: Seconds a scheduler's submit command may take before it counts as failed.
SUBMIT_TIMEOUT_S = 120.0


class Scheduler(str, Enum):
    SLURM = "slurm"
    HTCONDOR = "htcondor"
    SGE = "sge"

    @property
    def template(self) -> str:
        return {"slurm": "slurm.sbatch", "htcondor": "htcondor.sub", "sge": "sge.sh"}[self.value]

    @property
    def directive(self) -> str:
        """What an extra line starting with ``-`` is prefixed with (HTCondor lines are ``key = value``)."""
        return {"slurm": "#SBATCH ", "htcondor": "", "sge": "#$ "}[self.value]


class SubmitError(PervadeError):
    """The batch system refused the job, or its submit command is missing."""


def parse_duration(text: str) -> int:
    """Seconds in a time limit written as minutes (``240``), ``HH:MM:SS``, ``MM:SS`` or ``D-HH:MM:SS``."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ConfigError(f"time limit {text!r}: write minutes, HH:MM:SS or D-HH:MM:SS")
    days, first, second, third = match.groups()
    if second is None:  # minutes, or D-HH
        seconds = int(first) * (3600 if days else 60)
    elif third is None:  # MM:SS, or D-HH:MM
        seconds = int(first) * 3600 + int(second) * 60 if days else int(first) * 60 + int(second)
    else:
        seconds = int(first) * 3600 + int(second) * 60 + int(third)
    seconds += int(days or 0) * 86400
    if seconds <= 0:
        raise ConfigError(f"time limit {text!r} must be positive")
    return seconds


def time_limit(text: str) -> int:
    """``--time``: a duration (see ``parse_duration``); "" for none (0: the site's default)."""
    return parse_duration(text) if text else 0


def slurm_time(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    return f"{days}-{hms(rest)}" if days else hms(rest)


def hms(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


@dataclass(frozen=True)
class JobSpec:
    """What a worker job asks of the batch system, and what it runs. Templates see every field."""

    scheduler: Scheduler = option(
        help="the batch system",
        flag="--scheduler",
        parse=Scheduler,
        choices=[scheduler.value for scheduler in Scheduler],
    )
    #: The broker's endpoint, as the compute nodes reach it (not 127.0.0.1 on a real cluster).
    broker: str = option(
        help="the broker's endpoint as compute nodes reach it, e.g. tcp://login1:5555",
        flag="--broker",
        metavar="ENDPOINT",
    )
    #: Jobs to submit (as one array).
    workers: int = option(1, "jobs to submit", flag="--workers", check=at_least(1))
    gpus_per_job: int = option(1, "GPUs per job, one worker each; 0 for a CPU job", flag="--gpus-per-job",
                               check=NON_NEGATIVE)  # fmt: skip
    cpus_per_job: int = option(4, "CPU cores per job", flag="--cpus-per-job", check=at_least(1))
    #: Memory per job in the scheduler's syntax (``16G``); "" leaves it to the site's default.
    memory: str = option("16G", "memory per job, in the scheduler's syntax; '' for the site default", flag="--memory")
    #: Wall-clock limit in seconds; 0 leaves it to the site's default.
    time_limit_s: int = option(
        4 * 3600,
        "wall-clock limit: minutes, HH:MM:SS or D-HH:MM:SS; '' for the site default",
        flag="--time",
        parse=time_limit,
        show=slurm_time,
    )
    #: Slurm partition or Grid Engine queue ("" for the default; HTCondor has none).
    partition: str = option("", "Slurm partition or Grid Engine queue", flag="--partition")
    #: Slurm account, Grid Engine project, HTCondor accounting group.
    account: str = option("", "Slurm account, Grid Engine project or HTCondor accounting group", flag="--account")
    job_name: str = option("pervade-worker", "job name", flag="--job-name")
    #: Where the batch system writes the jobs' output (and the workers their logs).
    log_dir: Path = option(Path("pervade-jobs"), "where the jobs' output and rendered scripts go", flag="--log-dir")
    #: The Python that runs ``pervade`` on the compute nodes (default: this one, with its environment).
    python: str = option(
        sys.executable,
        "the Python on the compute nodes (with --venv: the venv's python)",
        flag="--python",
        show=lambda _: "this one",
    )
    #: Shell lines run before the worker starts (``module load cuda``, ``source venv/bin/activate``).
    setup_lines: tuple[str, ...] = option(
        (),
        "a shell line run before the worker, e.g. 'module load cuda' (repeatable)",
        flag="--setup",
        metavar="LINE",
        repeat=True,
    )
    #: Scheduler lines added verbatim (``--constraint=a100`` becomes ``#SBATCH --constraint=a100``).
    extra_lines: tuple[str, ...] = option(
        (),
        "a scheduler line added verbatim; one starting with - gets the directive prefix, written with = as in "
        "--extra=--constraint=a100 (repeatable)",
        flag="--extra",
        metavar="LINE",
        repeat=True,
    )
    #: Let the batch system put a preempted job back in the queue.
    requeue: bool = option(False, "let the scheduler requeue a preempted job", flag="--requeue")
    #: Options of ``pervade node`` (idle timeout, deadline, cache dir) and ``-- worker options``.
    node_options: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        check_options(self)
        if not re.fullmatch(r"[A-Za-z][\w.+-]*://\S+", self.broker):
            raise ConfigError(f"--broker {self.broker!r} is not a ZeroMQ endpoint such as tcp://login1:5555")
        if not re.fullmatch(r"[\w.+-]+", self.job_name):
            raise ConfigError(f"--job-name {self.job_name!r}: use letters, digits and ._+-")
        if self.scheduler is Scheduler.HTCONDOR and self.partition:
            raise ConfigError("HTCondor has no partitions: select machines with --extra 'requirements = ...'")
        for line in (*self.setup_lines, *self.extra_lines):
            if "\n" in line or "\r" in line:
                raise ConfigError(f"one line per --setup/--extra, got {line!r}")
        # These land inside scheduler directives, unquoted: a newline or a space would end the directive
        # block or split the value, silently dropping the lines after it.
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--memory", self.memory)):
            if not re.fullmatch(r"[\w.,:+=/@-]*", value):
                raise ConfigError(f"{flag} {value!r}: use letters, digits and .,:+=/@-")
        if re.search(r"[\s%]", str(self.log_dir)):
            raise ConfigError(f"--log-dir {str(self.log_dir)!r}: no spaces or % (schedulers read it unquoted)")

    @property
    def node_args(self) -> str:
        """The shell-quoted arguments after ``pervade node --broker B --job-id J``."""
        args = list(self.node_options)
        if self.worker_args:
            args += ["--", *self.worker_args]
        return shlex.join(args)

    def extra_directives(self) -> list[str]:
        return [self.scheduler.directive + line if line.startswith("-") else line for line in self.extra_lines]


@dataclass(frozen=True)
class RenderedJob:
    """The files of one submission: name -> text. The first is what the submit command is given."""

    files: dict[str, str]

    @property
    def main(self) -> str:
        return next(iter(self.files))

    def show(self) -> str:
        return "\n".join(f"# ---- {name} ----\n{text}" for name, text in self.files.items())


def _environment(search: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(search)), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    env.filters["slurm_time"] = slurm_time
    env.filters["hms"] = hms
    return env


def render(spec: JobSpec, template: Path | None = None, job_dir: Path | None = None, stem: str = "") -> RenderedJob:
    """Render the job's files (``template``: a user's copy of the scheduler's template), named ``stem`` (default:
    the job name) plus the template's suffix."""
    path = template or TEMPLATES_DIR / spec.scheduler.template
    stem = stem or spec.job_name
    if not path.is_file():
        raise ConfigError(f"no job template at {path}")
    values = {
        **asdict(spec),
        "broker": shlex.quote(spec.broker),
        "python": shlex.quote(spec.python),
        "log_dir": str(spec.log_dir.absolute()),
        "extra_lines": spec.extra_directives(),
        "node_args": spec.node_args,
    }
    if spec.scheduler is not Scheduler.HTCONDOR:
        return RenderedJob({f"{stem}{path.suffix}": _render_one(path, values)})
    # HTCondor's submit description names a script: rendered beside it, from the .sh of the same name.
    script_name = f"{stem}.sh"
    values["script"] = str(((job_dir or spec.log_dir) / script_name).absolute())
    script_template = path.with_suffix(".sh") if template is not None else TEMPLATES_DIR / "htcondor.sh"
    return RenderedJob({f"{stem}.sub": _render_one(path, values), script_name: _render_one(script_template, values)})


def _render_one(path: Path, values: dict) -> str:
    if not path.is_file():
        raise ConfigError(f"no job template at {path}")
    try:
        return _environment(path.parent).get_template(path.name).render(**values)
    except jinja2.TemplateError as exc:
        raise ConfigError(f"job template {path}: {exc}") from None


def submit_command(scheduler: Scheduler, job_file: Path) -> list[str]:
    return {
        Scheduler.SLURM: ["sbatch", "--parsable", str(job_file)],
        Scheduler.HTCONDOR: ["condor_submit", str(job_file)],
        Scheduler.SGE: ["qsub", "-terse", str(job_file)],
    }[scheduler]


def job_ids(scheduler: Scheduler, output: str, workers: int) -> list[str]:
    """The ids of the submitted jobs, as the scheduler's cancel command takes them, from its submit output."""
    text = output.strip()
    if scheduler is Scheduler.SLURM:  # --parsable: "ID" or "ID;CLUSTER"
        match = re.fullmatch(r"(\d+)(;\S+)?", text)
        base = match.group(1) if match else None
        ids = [None] if base is None else [f"{base}_{i}" for i in range(workers)] if workers > 1 else [base]
    elif scheduler is Scheduler.HTCONDOR:  # "N job(s) submitted to cluster ID."
        match = re.search(r"submitted to cluster (\d+)", text)
        ids = [f"{match.group(1)}.{i}" for i in range(workers)] if match else [None]
    else:  # -terse: "ID" or "ID.FIRST-LAST:STEP"
        match = re.match(r"(\d+)(?:\.(\d+)-(\d+):(\d+))?", text)
        if match and match.group(2):
            first, last, step = (int(g) for g in match.group(2, 3, 4))
            ids = [f"{match.group(1)}.{t}" for t in range(first, last + 1, step)]
        else:
            ids = [match.group(1) if match else None]
    if any(i is None for i in ids):
        raise SubmitError(f"could not read job ids from the {scheduler.value} output: {text!r}")
    return [i for i in ids if i is not None]


def write_job(rendered: RenderedJob, job_dir: Path) -> Path:
    """Write the rendered files (scripts executable); the path of the one to submit."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.files.items():
        path = job_dir / name
        path.write_text(text)
        if text.startswith("#!"):
            path.chmod(0o755)
    return job_dir / rendered.main


def submit(spec: JobSpec, template: Path | None = None, job_dir: Path | None = None) -> list[str]:
    """Render, write and submit the jobs; their ids."""
    job_dir = (job_dir or spec.log_dir).absolute()
    spec.log_dir.mkdir(parents=True, exist_ok=True)  # the batch system will not create it
    # A name of its own per submission: HTCondor runs the script from this path when a job starts, so a
    # later submission must not overwrite the script of jobs still idle.
    stem = f"{spec.job_name}-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    rendered = render(spec, template, job_dir, stem)
    job_file = write_job(rendered, job_dir)
    command = submit_command(spec.scheduler, job_file)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise SubmitError(f"{command[0]} not found: is {spec.scheduler.value} installed and on PATH here?") from None
    except subprocess.TimeoutExpired:
        raise SubmitError(f"{command[0]} did not answer in {SUBMIT_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        raise SubmitError(f"{shlex.join(command)} failed ({done.returncode}): {(done.stderr or done.stdout).strip()}")
    return job_ids(spec.scheduler, done.stdout, spec.workers)
