#!/usr/bin/env bash
# Launch lightspan training with torchrun, after checking every setting (nothing starts on a bad one).
#
# Single node:   launch/torchrun.sh --nproc 8 -- --config configs/tnl-1b.yaml --parallel.tp=2 --parallel.dp=4
# Multi-node:    on every node, the same command with the rendezvous of the head node:
#                NNODES=4 RDZV_ENDPOINT=head-host:29500 launch/torchrun.sh --nproc 8 -- --config ...
# Dry check:     add --dry-run (before or after --): prints the rendezvous, the layout check and one rank's
#                dry run (resolved config, parameters, mesh on torch's fake backend); starts no worker.
# Elastic:       MAX_RESTARTS=3 restarts failed workers; training resumes from the latest complete
#                checkpoint in the run folder (checkpoint.resume=auto, the default).
#
# Settings (environment, or the flag in brackets):
#   NPROC [--nproc]           processes on this node (default: the GPUs nvidia-smi lists, else 1)
#   NNODES [--nnodes]         nodes in the job (default 1)
#   RDZV_ENDPOINT [--rdzv-endpoint]  host:port of the c10d rendezvous on the head node; required when NNODES > 1
#                             (without it every node would wait on a rendezvous of its own until the timeout)
#   RDZV_ID [--rdzv-id]       the job's rendezvous id, the same on every node (default lightspan)
#   MAX_RESTARTS [--max-restarts]  elastic restarts of the workers (default 0)
#   LOG_DIR [--log-dir]       per-rank log files (default logs/; created if absent):
#                             LOG_DIR[/<host> when NNODES > 1]/<rdzv id>_*/attempt_<k>/<local rank>/{stdout,stderr}.log
#   CONSOLE [--console]       rank0 (default): the console shows local rank 0 of each node (the metrics lines
#                             come from global rank 0 alone; the other local ranks 0 add their warnings and
#                             errors); all: every rank's output. The per-rank files are written either way.
#   PYTHON                    the interpreter (default: the active venv's, else .venv/bin/python next to this
#                             repository, else python3); it must import torch.
# Each check fails at once with `launch: error: ...` or the CLI's `error: ...` and exit status 2:
# NNODES > 1 without RDZV_ENDPOINT, a malformed endpoint, non-integer counts, an interpreter without torch,
# a config that does not load, and a layout whose dp*pp*cp*tp is not NNODES x NPROC.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

NPROC=${NPROC:-auto}
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
RDZV_ID=${RDZV_ID:-lightspan}
LOG_DIR=${LOG_DIR:-logs}
CONSOLE=${CONSOLE:-rank0}
DRY_RUN=0

value() {  # the value of option $1, which must be there
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see launch/torchrun.sh --help)"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) value "$@"; NPROC=$2; shift 2 ;;
    --nnodes) value "$@"; NNODES=$2; shift 2 ;;
    --max-restarts) value "$@"; MAX_RESTARTS=$2; shift 2 ;;
    --rdzv-endpoint) value "$@"; RDZV_ENDPOINT=$2; shift 2 ;;
    --rdzv-id) value "$@"; RDZV_ID=$2; shift 2 ;;
    --log-dir) value "$@"; LOG_DIR=$2; shift 2 ;;
    --console) value "$@"; CONSOLE=$2; shift 2 ;;
    --nproc=*) NPROC=${1#*=}; shift ;;
    --nnodes=*) NNODES=${1#*=}; shift ;;
    --max-restarts=*) MAX_RESTARTS=${1#*=}; shift ;;
    --rdzv-endpoint=*) RDZV_ENDPOINT=${1#*=}; shift ;;
    --rdzv-id=*) RDZV_ID=${1#*=}; shift ;;
    --log-dir=*) LOG_DIR=${1#*=}; shift ;;
    --console=*) CONSOLE=${1#*=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;  # the first argument that is not ours starts the training arguments
  esac
done
for arg in "$@"; do
  [[ "$arg" == "--dry-run" ]] && DRY_RUN=1
done

# -- settings, each checked before anything starts -----------------------------------------------------------
need_int NNODES "$NNODES" 1
need_int MAX_RESTARTS "$MAX_RESTARTS" 0
if [[ "$NPROC" == "auto" ]]; then
  NPROC=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [[ "$gpus" =~ ^[0-9]+$ ]] && (( gpus > 0 )); then NPROC=$gpus; fi
  fi
fi
need_int NPROC "$NPROC" 1
if (( NNODES > 1 )) && [[ -z "$RDZV_ENDPOINT" ]]; then
  die "NNODES=$NNODES but RDZV_ENDPOINT is not set: every node would wait on a rendezvous of its own until the" \
      "timeout. Set RDZV_ENDPOINT=<head node>:<free port>, the same on every node (e.g." \
      "NNODES=$NNODES RDZV_ENDPOINT=node001:29500 launch/torchrun.sh ...); under slurm use launch/slurm/train.sbatch"
fi
if [[ -n "$RDZV_ENDPOINT" ]]; then
  if ! [[ "$RDZV_ENDPOINT" =~ ^[^:[:space:]]+:([0-9]+)$ ]] || (( 10#${BASH_REMATCH[1]} < 1 || 10#${BASH_REMATCH[1]} > 65535 )); then
    die "RDZV_ENDPOINT=$RDZV_ENDPOINT is not host:port (a TCP port 1-65535 on the head node)"
  fi
fi
[[ "$RDZV_ID" =~ ^[A-Za-z0-9._-]+$ ]] || die "RDZV_ID=$RDZV_ID: use letters, digits, '.', '_' and '-' only"
case "$CONSOLE" in
  rank0|all) ;;
  *) die "CONSOLE=$CONSOLE must be rank0 (local rank 0 of each node on the console) or all (every rank)" ;;
esac
resolve_python "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# -- what torchrun gets --------------------------------------------------------------------------------------
if (( NNODES > 1 )); then
  NODE_LOG_DIR="$LOG_DIR/${HOSTNAME:-$(uname -n)}"
else
  NODE_LOG_DIR=$LOG_DIR
fi
if [[ -n "$RDZV_ENDPOINT" ]]; then
  rdzv=(--rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=$RDZV_ID")
  rdzv_text="c10d at $RDZV_ENDPOINT, id $RDZV_ID"
else
  # --standalone starts its own c10d store on a free port: no endpoint to agree on.
  rdzv=(--standalone)
  rdzv_text="standalone (a c10d store of this node on a free local port)"
fi
if [[ "$CONSOLE" == "all" ]]; then
  console=(--tee 3)
  console_text="every rank"
else
  # Not "global rank 0 only": c10d assigns global ranks at the rendezvous, after this line is written.
  console=(--tee 3 --local-ranks-filter 0)
  console_text="local rank 0 of this node"
fi
cmd=("$PYTHON" -m torch.distributed.run "${rdzv[@]}" "--nnodes=$NNODES" "--nproc-per-node=$NPROC"
     "--max-restarts=$MAX_RESTARTS" --log-dir "$NODE_LOG_DIR" "${console[@]}" -m pretrain "$@")

echo "launch: python $PYTHON"
echo "launch: rendezvous $rdzv_text; $NNODES node(s) x $NPROC process(es) = $((NNODES * NPROC)) rank(s);" \
     "max restarts $MAX_RESTARTS"
echo "launch: console: $console_text; per-rank logs: $NODE_LOG_DIR/<rdzv id>_*/attempt_<k>/<local rank>/{stdout,stderr}.log"

# The config and the layout, checked against this launch (exit 2 with the fix when they do not fit).
preflight=("$PYTHON" -m launch.preflight --nnodes "$NNODES" --nproc "$NPROC")
(( DRY_RUN )) && preflight+=(--dry-run)
"${preflight[@]}" -- "$@"

if (( DRY_RUN )); then
  printf 'launch: dry run, not started:'
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi
mkdir -p "$NODE_LOG_DIR" || die "cannot create the log folder $NODE_LOG_DIR (set LOG_DIR to a writable folder)"
exec "${cmd[@]}"
