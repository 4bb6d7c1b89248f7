"""launch/: the shell launchers as an operator runs them.

- every script is shellcheck-clean (shellcheck comes from the Makefile's test-deps; the test skips without it);
- launch/torchrun.sh refuses, at once and with a message, a multi-node launch without RDZV_ENDPOINT, a layout
  that does not match NNODES x NPROC, and an interpreter without torch; it never falls back to a bare `python`;
- `--dry-run` under the launcher prints the rendezvous, the layout check and one rank's dry run, starting nothing;
- launch/torchrun.sh trains (2 ranks) with rank 0 alone on the console and a log file per rank;
- launch/slurm/prepare.sbatch and train.sbatch run under stub `sbatch`/`srun`/`scontrol` (2 "nodes" on
  localhost, one worker each, from SLURM_GPUS_ON_NODE): the data is prepared, 2 steps train, the job's output
  file holds each node's local rank 0 (the metrics lines once), and every rank has its own log files.
"""
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel.harness import free_port
from parallel_parity import trainer_args

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
TINY = ROOT / "configs" / "tiny.yaml"
SCRIPTS = sorted(p for p in (ROOT / "launch").rglob("*") if p.suffix in (".sh", ".sbatch"))


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NNODES", "NPROC", "RDZV_", "MAX_RESTARTS", "LOG_DIR", "CONSOLE",
                                "NODE_RANK", "PYTHON"))}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(cmd, env, cwd=ROOT, timeout=120):
    return subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_every_launch_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (`make test-deps` installs it with apt-get when run as root)")
    assert {p.name for p in SCRIPTS} >= {"torchrun.sh", "common.sh", "train.sbatch", "prepare.sbatch"}
    res = _run([shellcheck, "-x", "--shell=bash", *[p.relative_to(ROOT) for p in SCRIPTS]], os.environ)
    assert res.returncode == 0, res.stdout + res.stderr


def test_scripts_are_executable_and_parse():
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
        if script.name != "common.sh":  # sourced, never run
            assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


def test_multinode_without_endpoint_fails_at_once():
    t0 = time.monotonic()
    res = _run([TORCHRUN_SH, "--nproc", "2", "--", "--config", TINY], _env(NNODES=2), timeout=20)
    assert time.monotonic() - t0 < 5  # no rendezvous wait, not even a Python start
    assert res.returncode != 0
    assert "NNODES=2 but RDZV_ENDPOINT is not set" in res.stderr and "RDZV_ENDPOINT=<head node>" in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("env, words", [
    ({"NNODES": "two"}, "NNODES=two must be an integer"),
    ({"NPROC": "0"}, "NPROC=0 must be an integer >= 1"),
    ({"NNODES": "2", "RDZV_ENDPOINT": "head"}, "is not host:port"),
    ({"NNODES": "2", "RDZV_ENDPOINT": "head:99999"}, "is not host:port"),
    ({"CONSOLE": "some"}, "CONSOLE=some must be rank0"),
    ({"PYTHON": "/nonexistent/python"}, "PYTHON=/nonexistent/python is not an executable"),
])
def test_bad_settings_fail_before_python(env, words):
    res = _run([TORCHRUN_SH, "--", "--config", TINY], _env(**env), timeout=20)
    assert res.returncode == 2 and words in res.stderr, res.stderr


def test_layout_that_does_not_match_the_launch_is_refused():
    res = _run([TORCHRUN_SH, "--nproc", "2", "--", "--config", TINY, "--parallel.tp=4"], _env())
    assert res.returncode == 2
    assert "dp*pp*cp*tp = 1*1*1*4 = 4 process(es), but this launch starts NNODES x NPROC = 1 x 2 = 2" in res.stderr
    res = _run([TORCHRUN_SH, "--nproc=4", "--", "--config", TINY], _env())
    assert res.returncode == 2 and "set --parallel.dp=4" in res.stderr


def test_interpreter_without_torch_is_named(tmp_path):
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    res = _run([TORCHRUN_SH, "--", "--config", TINY], _env(PYTHONPATH=tmp_path / "site"))
    assert res.returncode == 2
    assert f"{sys.executable} cannot import 'torch'" in res.stderr and "PYTHON=" in res.stderr


def test_interpreter_is_the_venv_not_a_bare_python(tmp_path):
    """Without PYTHON and VIRTUAL_ENV: .venv/bin/python next to the repository, never `python` from PATH."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    if not venv_python.exists():
        pytest.skip("no .venv in this checkout")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):
        _stub(bin_dir / name, "echo 'the bare python on PATH ran' >&2; exit 97")
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    del env["PYTHON"]
    env.pop("VIRTUAL_ENV", None)
    res = _run([TORCHRUN_SH, "--dry-run", "--", "--config", TINY], env)
    assert res.returncode == 0, res.stderr
    assert f"launch: python {venv_python}" in res.stdout and "bare python" not in res.stderr


def test_dry_run_prints_rendezvous_and_layout_and_starts_nothing(tmp_path):
    res = _run([TORCHRUN_SH, "--nproc", "2", "--dry-run", "--", "--config", TINY, "--parallel.dp=2",
                "--parallel.tp=2"], _env(NNODES=2, RDZV_ENDPOINT="head-node:29400", RDZV_ID="job7",
                                         LOG_DIR=tmp_path / "logs"))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "rendezvous c10d at head-node:29400, id job7; 2 node(s) x 2 process(es) = 4 rank(s)" in out
    assert "layout: dp=2 pp=1 cp=1 tp=2 = 4 process(es) = 2 node(s) x 2 per node: ok" in out
    assert "parameters: " in out and "mesh: ('dp', 'pp', 'cp', 'tp') shape (2, 1, 1, 2)" in out
    assert "launch: dry run, not started:" in out and "--rdzv-endpoint=head-node:29400" in out
    assert not (tmp_path / "logs").exists()  # nothing started, nothing written


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_sh_trains_with_rank0_console_and_per_rank_logs(corpus, tmp_path):
    logs = tmp_path / "logs"
    args = [*trainer_args(corpus, tmp_path / "run"), "--parallel.dp=2", "--train.steps=2"]
    res = _run([TORCHRUN_SH, "--nproc", "2", "--", *args], _env(LOG_DIR=logs), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[default0]:step      2/2" in res.stdout and "[default1]" not in res.stdout + res.stderr
    for rank in (0, 1):
        (log,) = logs.glob(f"*/attempt_0/{rank}/stdout.log")
        assert log.is_file() and (log.parent / "stderr.log").is_file()
    (rank0,) = logs.glob("*/attempt_0/0/stdout.log")
    assert "step      2/2" in rank0.read_text()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


# -- slurm, with stub sbatch / srun / scontrol --------------------------------------------------------------------
SBATCH_STUB = r"""
# stub sbatch: runs the job script here and now (like `sbatch --wait` on a one-machine cluster)
nodes=1
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in --nodes=*) nodes=${1#--nodes=} ;; esac
  shift
done
script=$1; shift
name=$(sed -n 's/^#SBATCH --job-name=//p' "$script" | head -n 1)
out=$(sed -n 's/^#SBATCH --output=//p' "$script" | head -n 1)
jobid=${STUB_JOB_ID:-4242}
out=${out//%x/$name}; out=${out//%j/$jobid}
if [[ ! -d "$(dirname "$out")" ]]; then
  echo "stub sbatch: cannot open $out: slurm does not create folders, the job dies without a log" >&2; exit 1
fi
echo "Submitted batch job $jobid"
SLURM_JOB_ID=$jobid SLURM_JOB_NAME=$name SLURM_NNODES=$nodes SLURM_JOB_NODELIST="stub[0-$((nodes - 1))]" \
  SLURM_SUBMIT_DIR=$PWD SLURM_NODEID=0 bash "$script" "$@" > "$out" 2>&1
"""

SRUN_STUB = r"""
# stub srun: the tasks of every node, all on this machine (SLURM_NODEID 0..n-1)
echo "srun $*" >> "$STUB_LOG"
ntasks=${SLURM_NNODES:-1}
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in --ntasks=*) ntasks=${1#--ntasks=} ;; esac
  shift
done
pids=()
for ((i = 0; i < ntasks; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NTASKS=$ntasks "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""

SCONTROL_STUB = r"""
# stub scontrol: `scontrol show hostnames LIST` -> one line per node, all this machine
[[ "$1 $2" == "show hostnames" ]] || { echo "stub scontrol: only 'show hostnames'" >&2; exit 1; }
for ((i = 0; i < ${SLURM_NNODES:-1}; i++)); do echo 127.0.0.1; done
"""


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def slurm(tmp_path):
    """(submit folder with logs/, environment with the stubs first on PATH, the srun call log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "sbatch", SBATCH_STUB)
    _stub(bin_dir / "srun", SRUN_STUB)
    _stub(bin_dir / "scontrol", SCONTROL_STUB)
    submit = tmp_path / "submit"
    (submit / "logs").mkdir(parents=True)  # what the scripts' headers ask for before the first sbatch
    calls = tmp_path / "srun-calls.txt"
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", LIGHTSPAN_ROOT=ROOT, STUB_LOG=calls,
               SLURM_CPUS_PER_TASK=2)
    return submit, env, calls


def test_sbatch_headers_carry_placeholders_and_the_logs_folder_note():
    for name in ("train.sbatch", "prepare.sbatch"):
        text = (ROOT / "launch" / "slurm" / name).read_text()
        for placeholder in ("##SBATCH --partition=", "##SBATCH --account=", "##SBATCH --time="):
            assert placeholder in text, (name, placeholder)
        assert "mkdir -p logs" in text and "#SBATCH --output=logs/%x-%j.out" in text


def test_sbatch_without_gpus_reported_is_refused(slurm):
    submit, env, calls = slurm
    res = _run(["sbatch", "--nodes=2", ROOT / "launch/slurm/train.sbatch", "--config", TINY], env, cwd=submit)
    out = (submit / "logs" / "lightspan-4242.out").read_text()
    assert res.returncode == 2 and "slurm reports no GPUs on this node (SLURM_GPUS_ON_NODE is unset)" in out
    assert not calls.exists()


def test_sbatch_dry_run_prints_the_rendezvous_slurm_gives(slurm):
    submit, env, calls = slurm
    port = free_port()
    res = _run(["sbatch", "--nodes=2", ROOT / "launch/slurm/train.sbatch", "--dry-run", "--config", TINY,
                "--parallel.dp=2"], dict(env, SLURM_GPUS_ON_NODE="1", RDZV_PORT=str(port)), cwd=submit)
    out = (submit / "logs" / "lightspan-4242.out").read_text()
    assert res.returncode == 0, out
    assert f"rendezvous c10d at 127.0.0.1:{port}, id lightspan-4242; 2 node(s) x 1 process(es) = 2 rank(s)" in out
    assert "layout: dp=2 pp=1 cp=1 tp=1 = 2 process(es) = 2 node(s) x 1 per node: ok" in out
    assert "mesh: " in out and "dry run, not started" in out
    assert not calls.exists()  # no srun: nothing started on the nodes


@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_prepare_then_train_two_nodes_on_localhost(corpus, slurm, tmp_path):
    submit, env, calls = slurm
    run = tmp_path / "run"
    args = [*trainer_args(corpus, run), "--parallel.dp=2", "--train.steps=2"]
    data_args = [a for a in args if a.startswith(("--data.", "--model.vocab_size"))]

    res = _run(["sbatch", ROOT / "launch/slurm/prepare.sbatch", *data_args], dict(env, STUB_JOB_ID="100"),
               cwd=submit, timeout=300)
    out = (submit / "logs" / "lightspan-prepare-100.out").read_text()
    assert res.returncode == 0, out
    assert "2 worker(s)" in out and f"prepared data: {corpus / 'prepared'}" in out  # SLURM_CPUS_PER_TASK workers
    assert (corpus / "prepared" / "tokenizer.model").is_file()

    port = free_port()
    res = _run(["sbatch", "--nodes=2", ROOT / "launch/slurm/train.sbatch", *args],
               dict(env, STUB_JOB_ID="101", SLURM_GPUS_ON_NODE="1", RDZV_PORT=str(port)), cwd=submit, timeout=300)
    out = (submit / "logs" / "lightspan-101.out").read_text()
    assert res.returncode == 0, out[-5000:]
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1" in calls.read_text()
    # local rank 0 of each node on the console; the metrics lines (global rank 0's) once
    assert out.count("step      2/2") == 1 and "[default0]:step      1/2" in out
    assert out.count("layout: dp=2 pp=1 cp=1 tp=1") == 2  # every node checked the launch before starting
    node_logs = sorted((submit / "logs" / "101").glob("*/lightspan-101_*/attempt_0/0/stdout.log"))
    assert len(node_logs) == 2  # one agent per node, each with its own folder of per-rank files
    assert sum("step      2/2" in log.read_text() for log in node_logs) == 1  # global rank 0 logs the metrics
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["world_size"] == 2


@pytest.mark.slow
def test_slurm_sharded_prepare_runs_tokenizer_shards_and_merge(corpus, slurm, tmp_path):
    preparation = pytest.importorskip("data_pipeline.preparation")
    if not hasattr(preparation, "prepare_shard"):
        pytest.skip("this checkout's `lightspan prepare` has no sharded preparation (--num-shards)")
    submit, env, calls = slurm
    out_dir = tmp_path / "sharded"
    res = _run(["sbatch", ROOT / "launch/slurm/prepare.sbatch", "--source", corpus / "docs.jsonl", "--out", out_dir,
                "--vocab-size", "512", "--num-shards", "2"], dict(env, STUB_JOB_ID="102"), cwd=submit, timeout=300)
    out = (submit / "logs" / "lightspan-prepare-102.out").read_text()
    assert res.returncode == 0, out[-5000:]
    assert "step 1/3" in out and "step 2/3, 2 shard task(s)" in out and "step 3/3" in out
    assert sorted(p.name for p in out_dir.glob("shard_*")) == ["shard_00000", "shard_00001"]
    assert (out_dir / "manifest.json").is_file() and (out_dir / "tokenizer.model").is_file()
    assert [line.split()[1] for line in calls.read_text().splitlines()] == ["--ntasks=1", "--ntasks=2", "--ntasks=1"]
