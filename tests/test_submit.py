"""``pervade submit``: rendered jobs for each batch system, checked with their own tools where this machine has
them (bash for the scripts, HTCondor's official parser for the submit description), and its refusals."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import htcondor2
import pytest

from pervade.jobs.submit import JobSpec, Scheduler, SubmitError, job_ids, parse_duration, render, submit

BROKER = "tcp://login1.cluster:5555"


def pervade(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line, as a user runs it (in a process of its own: it configures logging for the process)."""
    return subprocess.run([sys.executable, "-m", "pervade", *args], capture_output=True, text=True, timeout=60, check=False)


def dry_run(*args: str) -> str:
    done = pervade("submit", "--broker", BROKER, "--dry-run", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def files_of(shown: str) -> dict[str, str]:
    """The files a dry run printed, by name."""
    files: dict[str, str] = {}
    name = None
    for line in shown.splitlines(keepends=True):
        if line.startswith("# ---- ") and line.rstrip().endswith(" ----"):
            name = line.strip()[7:-5]
            files[name] = ""
        elif name is not None:
            files[name] += line
    return files


def bash_syntax_ok(script: str) -> None:
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr


def exec_line(script: str) -> list[str]:
    return shlex.split(next(line for line in script.splitlines() if line.startswith("exec ")))[1:]


def test_slurm_job_asks_for_what_the_options_say() -> None:
    shown = dry_run("--scheduler", "slurm", "--workers", "3", "--gpus-per-job", "2", "--cpus-per-job", "8",
                    "--memory", "64G", "--time", "1-02:00:00", "--partition", "gpu", "--account", "lab42",
                    "--extra=--constraint=a100", "--setup", "module load cuda/12", "--log-dir", "/scratch/logs",
                    "--requeue", "--", "--prefetch", "2", "--max-contexts", "2")  # fmt: skip
    (script,) = files_of(shown).values()
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=pervade-worker", "#SBATCH --array=0-2", "#SBATCH --output=/scratch/logs/%x-%A_%a.out",
        "#SBATCH --nodes=1", "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=8", "#SBATCH --gres=gpu:2",
        "#SBATCH --mem=64G", "#SBATCH --time=1-02:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=lab42",
        "#SBATCH --requeue", "#SBATCH --constraint=a100",
    ]  # fmt: skip
    bash_syntax_ok(script)
    assert "module load cuda/12" in script.splitlines()
    command = exec_line(script)
    assert command[1:4] == ["-m", "pervade", "node"]
    assert command[command.index("--broker") + 1] == BROKER
    assert command[command.index("--") + 1 :] == ["--prefetch", "2", "--max-contexts", "2"]


def test_one_slurm_job_is_not_an_array_and_optional_lines_are_left_out() -> None:
    (script,) = files_of(dry_run("--scheduler", "slurm", "--memory", "", "--time", "", "--gpus-per-job", "0")).values()
    assert "--array" not in script and "--mem" not in script and "--time" not in script and "--gres" not in script
    assert "#SBATCH --output=" in script and "%x-%j.out" in script


def test_htcondor_description_passes_the_official_parser() -> None:
    shown = dry_run("--scheduler", "htcondor", "--workers", "5", "--gpus-per-job", "2", "--memory", "40G",
                    "--time", "90", "--account", "group_ml", "--extra", "gpus_minimum_memory = 20000",
                    "--log-dir", "/scratch/logs")  # fmt: skip
    files = files_of(shown)
    assert list(files) == ["pervade-worker.sub", "pervade-worker.sh"]
    submit_description = htcondor2.Submit(files["pervade-worker.sub"])
    assert submit_description.getQArgs() == "5"
    expected = {
        "executable": "/scratch/logs/pervade-worker.sh", "request_gpus": "2", "request_memory": "40G",
        "request_cpus": "4", "allowed_execute_duration": "5400", "kill_sig": "SIGTERM", "accounting_group": "group_ml",
        "gpus_minimum_memory": "20000", "MY.is_resumable": "true",
    }  # fmt: skip
    assert {k: submit_description[k] for k in expected} == expected
    assert submit_description["arguments"] == "htcondor-$(Cluster).$(Process)"
    assert submit_description.expand("output") == "/scratch/logs/pervade-worker-1.0.out"  # macros resolve
    bash_syntax_ok(files["pervade-worker.sh"])
    command = exec_line(files["pervade-worker.sh"])
    assert command[command.index("--job-id") + 1] == "$1"  # htcondor-CLUSTER.PROCESS, from the arguments line


def test_htcondor_parser_rejects_what_we_would_never_render() -> None:
    """The check has teeth: a broken description does not parse."""
    with pytest.raises(ValueError):
        htcondor2.Submit("request_gpus = 1\nrequest gpus 1\nqueue 4\n")  # a line without "="


def test_sge_script_asks_for_notify_and_an_array() -> None:
    (script,) = files_of(dry_run("--scheduler", "sge", "--workers", "4", "--cpus-per-job", "2", "--time", "30",
                                 "--partition", "gpu.q", "--account", "proj")).values()  # fmt: skip
    directives = [line for line in script.splitlines() if line.startswith("#$")]
    for wanted in ("#$ -t 1-4", "#$ -pe smp 2", "#$ -l gpu=1", "#$ -l h_rt=00:30:00", "#$ -q gpu.q", "#$ -P proj",
                   "#$ -notify", "#$ -r n"):  # fmt: skip
        assert wanted in directives, wanted
    bash_syntax_ok(script)


def test_a_venv_is_activated_and_its_python_used(tmp_path) -> None:
    (script,) = files_of(dry_run("--scheduler", "slurm", "--venv", str(tmp_path / "env"))).values()
    assert f"source {tmp_path / 'env' / 'bin' / 'activate'}" in script
    assert exec_line(script)[0] == "python"


def test_a_users_edited_copy_of_a_template_is_rendered(tmp_path) -> None:
    from pervade.jobs.submit import TEMPLATES_DIR

    mine = tmp_path / "my.sbatch"
    mine.write_text((TEMPLATES_DIR / "slurm.sbatch").read_text().replace("#SBATCH --nodes=1", "#SBATCH --nodes=1\n#SBATCH --qos=low"))
    (script,) = files_of(dry_run("--scheduler", "slurm", "--template", str(mine))).values()
    assert "#SBATCH --qos=low" in script


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scheduler", "slurm", "--time", "soon"], "time limit 'soon'"),
        (["--scheduler", "htcondor", "--partition", "gpu"], "HTCondor has no partitions"),
        (["--scheduler", "slurm", "--extra", "--qos=low\n#SBATCH --uid=0"], "one line per --setup/--extra"),
        (["--scheduler", "slurm", "--job-name", "a b"], "--job-name 'a b'"),
        (["--scheduler", "slurm", "--", "--worker-id", "x"], "--worker-id: set by the job itself"),
        (["--scheduler", "slurm", "--", "--no-such-option"], "invalid worker options after --"),
        (["--scheduler", "slurm", "--template", "/nonexistent/job.sbatch"], "no job template"),
        (["--scheduler", "slurm", "--partition", "gpu\necho hi"], "--partition 'gpu\\necho hi'"),
        (["--scheduler", "sge", "--account", "a b"], "--account 'a b'"),
        (["--scheduler", "slurm", "--log-dir", "/scratch/my logs"], "no spaces or %"),
        (["--scheduler", "slurm", "--", "--worker", "x"], "--worker-id: set by the job itself"),
    ],
)
def test_bad_options_are_refused_with_the_reason(args: list[str], message: str) -> None:
    done = pervade("submit", "--broker", BROKER, "--dry-run", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_broker_that_is_not_an_endpoint_is_refused() -> None:
    done = pervade("submit", "--scheduler", "slurm", "--broker", "login1:5555", "--dry-run")
    assert done.returncode == 2 and "is not a ZeroMQ endpoint" in done.stderr


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 5400), ("4:00:00", 14400), ("30:00", 1800), ("1-00:00:00", 86400), ("2-12", 2 * 86400 + 12 * 3600)],
)
def test_time_limits_in_the_schedulers_formats(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("scheduler", "output", "workers", "ids"),
    [
        (Scheduler.SLURM, "1234\n", 1, ["1234"]),
        (Scheduler.SLURM, "1234;cluster2\n", 3, ["1234_0", "1234_1", "1234_2"]),
        (Scheduler.HTCONDOR, "Submitting job(s)...\n2 job(s) submitted to cluster 77.\n", 2, ["77.0", "77.1"]),
        (Scheduler.SGE, "5012\n", 1, ["5012"]),
        (Scheduler.SGE, "5013.1-3:1\n", 3, ["5013.1", "5013.2", "5013.3"]),
    ],
)
def test_job_ids_are_read_from_each_schedulers_answer(scheduler, output: str, workers: int, ids: list[str]) -> None:
    assert job_ids(scheduler, output, workers) == ids


@pytest.mark.parametrize(
    ("scheduler", "output", "workers"),
    [
        (Scheduler.HTCONDOR, "ERROR: no schedd\n", 1),
        (Scheduler.SLURM, "Submitted batch job 123\n", 3),  # a site wrapper that ignores --parsable
        (Scheduler.SGE, "Your job 5 has been submitted\n", 1),
    ],
)
def test_an_unreadable_answer_is_an_error_not_a_guess(scheduler, output: str, workers: int) -> None:
    with pytest.raises(SubmitError, match="could not read job ids"):
        job_ids(scheduler, output, workers)


@pytest.mark.skipif(shutil.which("condor_submit") is not None, reason="this machine has HTCondor's client")
def test_a_missing_scheduler_command_says_so(tmp_path) -> None:
    spec = JobSpec(scheduler=Scheduler.HTCONDOR, broker=BROKER, log_dir=tmp_path / "logs")
    with pytest.raises(SubmitError, match="condor_submit not found"):
        submit(spec)
    written = sorted(p.name for p in (tmp_path / "logs").iterdir())  # written, for the user to submit by hand
    assert len(written) == 2 and written[0].endswith(".sh") and written[1].endswith(".sub"), written
    assert written[0][:-3] == written[1][:-4] != "pervade-worker"  # a name of its own per submission


def test_rendering_refuses_a_template_variable_it_does_not_know(tmp_path) -> None:
    from pervade.errors import ConfigError

    broken = tmp_path / "job.sbatch"
    broken.write_text("#!/bin/bash\n#SBATCH --qos={{ qos }}\n")
    with pytest.raises(ConfigError, match="'qos' is undefined"):
        render(JobSpec(scheduler=Scheduler.SLURM, broker=BROKER), broken)
