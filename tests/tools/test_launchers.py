"""The distributed launchers end to end on the CPU: two processes talking over gloo.

tools/dist_train.sh and tools/dist_test.sh run torchrun; tools/slurm_train.sh and
tools/slurm_test.sh run a fake ``srun`` (first on PATH) that records its arguments and starts the
tasks as srun would, with SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS/SLURM_NODELIST, and a fake
``scontrol`` that expands the node list; ``--launcher mpi`` runs two processes given the
variables Open MPI's mpirun sets. Each run trains or tests the demo UperNet on 64 px pictures.
"""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from tool_test_utils import ROOT, SEG_CONFIG, SMALL_PIPELINES, TOOLS, free_port

pytest.importorskip("mmseg")

TRAIN_OPTIONS = ["--cfg-options", "train_cfg.max_iters=2", "train_cfg.val_interval=1000",
                 "default_hooks.checkpoint.interval=2", *SMALL_PIPELINES]
TEST_OPTIONS = ["--cfg-options", *SMALL_PIPELINES]

FAKE_SRUN = '''#!{python}
"""Fake srun: records its arguments, then runs the command as --ntasks local tasks."""
import json, os, subprocess, sys

args = sys.argv[1:]
with open(os.environ["FAKE_SRUN_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
i, ntasks, job_name = 0, 1, "job"
while args[i].startswith("-"):
    if args[i] == "-p":  # the only option of the launchers whose value is the next word
        i += 1
    elif args[i].startswith("--ntasks="):
        ntasks = int(args[i].split("=", 1)[1])
    elif args[i].startswith("--job-name="):
        job_name = args[i].split("=", 1)[1]
    i += 1
tasks = [subprocess.Popen(args[i:], env=dict(
    os.environ, SLURM_PROCID=str(k), SLURM_LOCALID=str(k), SLURM_NTASKS=str(ntasks),
    SLURM_NODELIST=os.environ["FAKE_SRUN_NODELIST"], SLURM_JOB_NAME=job_name))
    for k in range(ntasks)]
codes = [task.wait() for task in tasks]
sys.exit(next((c for c in codes if c != 0), 0))
'''
FAKE_SCONTROL = '''#!{python}
"""Fake scontrol: `scontrol show hostname a,b` prints one host a line; records its arguments."""
import json, os, sys

with open(os.environ["FAKE_SCONTROL_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
assert sys.argv[1:3] == ["show", "hostname"], sys.argv
print("\\n".join(sys.argv[3].split(",")))
'''


def _env(data_root: Path, **extra: str) -> Dict[str, str]:
    """The tools' environment: the shapes data, this interpreter, one thread per process."""
    env = dict(os.environ, VMAMBA_MM_SHAPES_ROOT=str(data_root) + os.sep, PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(command: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (
        f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
        f"{done.stderr[-5000:]}")
    # What rank 0 once printed when it exited with its process group still up.
    assert "terminate called" not in done.stderr
    return done


def _log(work_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(work_dir.glob("*/*.log")))


def _metrics(work_dir: Path) -> List[dict]:
    return [json.loads(p.read_text()) for p in work_dir.glob("*/*.json")
            if p.stem == p.parent.name]


def _assert_ran_on_two_processes(work_dir: Path, launcher: str) -> None:
    log = _log(work_dir)
    assert f"Distributed launcher: {launcher}" in log
    assert "Distributed training: True" in log
    assert "GPU number: 2" in log, "the world size mmengine saw"


LAUNCHER_USAGE = {
    "dist_train.sh": "CONFIG NUM_PROCS [train.py options...]",
    "dist_test.sh": "CONFIG CHECKPOINT NUM_PROCS [test.py options...]",
    "slurm_train.sh": "PARTITION JOB_NAME CONFIG WORK_DIR [train.py options...]",
    "slurm_test.sh": "PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options...]",
}
# Arguments enough to start; the dist scripts' process count is the last of them.
LAUNCHER_ARGS = {
    "dist_train.sh": ["cfg.py", "2"],
    "dist_test.sh": ["cfg.py", "ckpt.pth", "2"],
    "slurm_train.sh": ["part", "job", "cfg.py", "work"],
    "slurm_test.sh": ["part", "job", "cfg.py", "ckpt.pth"],
}
FAKE_SRUN_RECORDER = "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$FAKE_SRUN_LOG\"\n"


def _launch(script: str, args: List[str], tmp_path: Path,
            **env: str) -> Tuple[subprocess.CompletedProcess, List[str]]:
    """Runs a launcher with ``PYTHON=echo`` and a fake srun that only records its arguments.

    Returns:
        The finished process and what srun was given, one argument a line ([] if not called).
    """
    bin_dir = tmp_path / "bin"
    srun = bin_dir / "srun"
    if not srun.exists():
        bin_dir.mkdir()
        srun.write_text(FAKE_SRUN_RECORDER)
        srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "srun.txt"
    log.unlink(missing_ok=True)
    environ = {k: v for k, v in os.environ.items()
               if k not in ("SRUN_ARGS", "GPUS", "GPUS_PER_NODE", "CPUS_PER_TASK")}
    environ.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON="echo",
                   FAKE_SRUN_LOG=str(log), **env)
    done = subprocess.run(["bash", str(TOOLS / script), *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)
    return done, log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("script", sorted(LAUNCHER_USAGE))
def test_launchers_print_their_usage_for_too_few_arguments(script: str, tmp_path: Path) -> None:
    for args in ([], LAUNCHER_ARGS[script][:-1]):
        done, srun_args = _launch(script, args, tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr == f"usage: {TOOLS / script} {LAUNCHER_USAGE[script]}\n"
        assert done.stdout == "" and srun_args == []


@pytest.mark.parametrize("script, args, env, name", [
    ("dist_train.sh", ["cfg.py", "two"], {}, "NUM_PROCS"),
    # The checkpoint where the process count goes: the old dist_test.sh's mistake.
    ("dist_test.sh", ["cfg.py", "2", "ckpt.pth"], {}, "NUM_PROCS"),
    ("dist_test.sh", ["cfg.py", "ckpt.pth", "0"], {}, "NUM_PROCS"),
    ("slurm_train.sh", LAUNCHER_ARGS["slurm_train.sh"], {"GPUS": "eight"}, "GPUS"),
    ("slurm_test.sh", LAUNCHER_ARGS["slurm_test.sh"], {"GPUS_PER_NODE": "-1"}, "GPUS_PER_NODE"),
])
def test_launchers_refuse_a_process_count_that_is_not_a_number(
        script: str, args: List[str], env: Dict[str, str], name: str, tmp_path: Path) -> None:
    done, srun_args = _launch(script, args, tmp_path, **env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"{TOOLS / script}: {name} must be a positive whole number")
    assert done.stdout == "" and srun_args == []


@pytest.mark.parametrize("script", ["dist_train.sh", "dist_test.sh"])
def test_dist_launchers_start_torchrun_with_the_tool(script: str, tmp_path: Path) -> None:
    done, _ = _launch(script, [*LAUNCHER_ARGS[script], "--work-dir", "w"], tmp_path, PORT="1234")
    assert done.returncode == 0, done.stderr
    tool = "train.py" if script == "dist_train.sh" else "test.py"
    assert done.stdout.split() == [
        "-m", "torch.distributed.run", "--nnodes=1", "--node_rank=0",
        "--master_addr=127.0.0.1", "--nproc_per_node=2", "--master_port=1234",
        str(TOOLS / tool), "--launcher", "pytorch", *LAUNCHER_ARGS[script][:-1],
        "--work-dir", "w"]


@pytest.mark.parametrize("script", ["slurm_train.sh", "slurm_test.sh"])
@pytest.mark.parametrize("srun_options", [None, "", "--exclusive  --quotatype=auto"])
def test_slurm_launchers_run_with_or_without_srun_args(script: str, srun_options, tmp_path: Path
                                                       ) -> None:
    env = {} if srun_options is None else {"SRUN_ARGS": srun_options}
    done, srun_args = _launch(script, LAUNCHER_ARGS[script], tmp_path, GPUS="4", **env)
    assert done.returncode == 0, done.stderr
    tool_args = (["cfg.py", "--work-dir=work"] if script == "slurm_train.sh"
                 else ["cfg.py", "ckpt.pth"])
    assert srun_args == [
        "-p", "part", "--job-name=job", "--gres=gpu:8", "--ntasks=4", "--ntasks-per-node=8",
        "--cpus-per-task=5", "--kill-on-bad-exit=1", *(srun_options or "").split(), "echo", "-u",
        str(TOOLS / script.replace("slurm_", "").replace(".sh", ".py")), "--launcher=slurm",
        *tool_args]


def test_launchers_expand_arrays_safely_for_old_bash() -> None:
    # Under set -u, bash < 4.4 (e.g. CentOS 7's 4.2) stops at an empty array's "${a[@]}"
    # ("unbound variable"); the launchers must write ${a[@]+"${a[@]}"}. The bash here is newer,
    # so the scripts' text is checked.
    for script in (TOOLS / name for name in ["_launch.sh", *sorted(LAUNCHER_USAGE)]):
        code = [line for line in script.read_text().splitlines()
                if not line.lstrip().startswith("#")]
        for line in code:
            for match in re.finditer(r'"\$\{(\w+)\[@\]\}"', line):
                guard = f"${{{match.group(1)}[@]+"
                assert line[match.start() - len(guard):match.start()] == guard, (
                    f"{script.name}: unguarded {match.group(0)} in {line.strip()!r}")


@pytest.mark.slow
def test_dist_train_then_dist_test_on_two_processes(tiny_shapes: Path, tmp_path: Path) -> None:
    work_dir = tmp_path / "work"
    _run(["bash", str(TOOLS / "dist_train.sh"), str(SEG_CONFIG), "2", "--work-dir",
          str(work_dir), *TRAIN_OPTIONS], _env(tiny_shapes, PORT=str(free_port())))
    _assert_ran_on_two_processes(work_dir, "pytorch")
    assert "Iter(train) [2/2]" in _log(work_dir)
    checkpoint = work_dir / "iter_2.pth"
    assert checkpoint.is_file() and checkpoint.stat().st_size > 0

    test_dir = tmp_path / "test"
    _run(["bash", str(TOOLS / "dist_test.sh"), str(SEG_CONFIG), str(checkpoint), "2",
          "--work-dir", str(test_dir), *TEST_OPTIONS], _env(tiny_shapes, PORT=str(free_port())))
    _assert_ran_on_two_processes(test_dir, "pytorch")
    assert any({"mIoU", "aAcc"} <= set(m) for m in _metrics(test_dir)), _metrics(test_dir)


def _fake_slurm(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        script = bin_dir / name
        script.write_text(text.format(python=sys.executable))
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _records(path: Path) -> List[List[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_slurm_train_and_test_through_srun(tiny_shapes: Path, tmp_path: Path) -> None:
    bin_dir = _fake_slurm(tmp_path)
    srun_log, scontrol_log = tmp_path / "srun.jsonl", tmp_path / "scontrol.jsonl"

    def slurm_env(tasks: int) -> Dict[str, str]:
        # No MASTER_ADDR: each task asks scontrol for the first node of SLURM_NODELIST.
        return _env(tiny_shapes, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                    FAKE_SRUN_LOG=str(srun_log), FAKE_SCONTROL_LOG=str(scontrol_log),
                    FAKE_SRUN_NODELIST="localhost,cpu-b02", MASTER_PORT=str(free_port()),
                    GPUS=str(tasks), GPUS_PER_NODE=str(tasks), CPUS_PER_TASK="1",
                    SRUN_ARGS="--quotatype=auto --exclusive")

    work_dir = tmp_path / "work"
    _run(["bash", str(TOOLS / "slurm_train.sh"), "cpu-part", "vm-train", str(SEG_CONFIG),
          str(work_dir), *TRAIN_OPTIONS], slurm_env(2))
    _assert_ran_on_two_processes(work_dir, "slurm")
    assert "Iter(train) [2/2]" in _log(work_dir)
    checkpoint = work_dir / "iter_2.pth"
    assert checkpoint.is_file()

    test_dir = tmp_path / "test"
    _run(["bash", str(TOOLS / "slurm_test.sh"), "cpu-part", "vm-test", str(SEG_CONFIG),
          str(checkpoint), "--work-dir", str(test_dir), *TEST_OPTIONS], slurm_env(2))
    _assert_ran_on_two_processes(test_dir, "slurm")
    assert any({"mIoU", "aAcc"} <= set(m) for m in _metrics(test_dir)), _metrics(test_dir)

    train_call, test_call = _records(srun_log)
    for call, job, tool, tool_args in (
        (train_call, "vm-train", "train.py", [str(SEG_CONFIG), f"--work-dir={work_dir}"]),
        (test_call, "vm-test", "test.py", [str(SEG_CONFIG), str(checkpoint)]),
    ):
        command = call.index(sys.executable)
        assert call[:command] == [
            "-p", "cpu-part", f"--job-name={job}", "--gres=gpu:2", "--ntasks=2",
            "--ntasks-per-node=2", "--cpus-per-task=1", "--kill-on-bad-exit=1",
            "--quotatype=auto", "--exclusive"]
        assert call[command + 1:command + 6] == [
            "-u", str(TOOLS / tool), "--launcher=slurm", *tool_args]
    # Each task took the first node of SLURM_NODELIST as the master address.
    assert _records(scontrol_log) == [["show", "hostname", "localhost,cpu-b02"]] * 4


def _run_mpi_ranks(command: List[str], env: Dict[str, str]) -> List[Tuple[int, str]]:
    """Runs ``command`` as the two processes `mpirun -np 2 -x MASTER_ADDR -x MASTER_PORT` starts.

    Returns:
        Each rank's exit status and stderr.
    """
    port = str(free_port())
    ranks = [subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(env, OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2",
                 OMPI_COMM_WORLD_LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port))
        for rank in range(2)]
    try:
        errors = [rank.communicate(timeout=600)[1] for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    for err in errors:
        assert "terminate called" not in err
    return [(rank.returncode, err) for rank, err in zip(ranks, errors)]


def test_mpi_launcher_trains_then_tests_on_two_processes(tiny_shapes: Path,
                                                        tmp_path: Path) -> None:
    work_dir = tmp_path / "work"
    results = _run_mpi_ranks([sys.executable, str(TOOLS / "train.py"), str(SEG_CONFIG),
                              "--work-dir", str(work_dir), "--launcher", "mpi", *TRAIN_OPTIONS],
                             _env(tiny_shapes))
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-5000:]}"
    _assert_ran_on_two_processes(work_dir, "mpi")
    assert "Iter(train) [2/2]" in _log(work_dir)
    checkpoint = work_dir / "iter_2.pth"
    assert checkpoint.is_file()

    test_dir = tmp_path / "test"
    results = _run_mpi_ranks([sys.executable, str(TOOLS / "test.py"), str(SEG_CONFIG),
                              str(checkpoint), "--work-dir", str(test_dir), "--launcher", "mpi",
                              *TEST_OPTIONS], _env(tiny_shapes))
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-5000:]}"
    _assert_ran_on_two_processes(test_dir, "mpi")
    assert any({"mIoU", "aAcc"} <= set(m) for m in _metrics(test_dir)), _metrics(test_dir)


def test_two_ranks_end_with_one_error_line_for_a_damaged_checkpoint(tiny_shapes: Path,
                                                                   tmp_path: Path) -> None:
    # Found only when the Runner loads it, after the process group is up: each rank closes its
    # side of the group and exits with the error, none waits for the other or aborts.
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"not a checkpoint")
    results = _run_mpi_ranks([sys.executable, str(TOOLS / "test.py"), str(SEG_CONFIG),
                              str(damaged), "--work-dir", str(tmp_path / "work"), "--launcher",
                              "mpi", *TEST_OPTIONS], _env(tiny_shapes))
    for rank, (code, err) in enumerate(results):
        assert code == 1, f"rank {rank}: exit status {code}\n{err[-5000:]}"
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and "damaged.pth" in last, err[-3000:]
