#!/usr/bin/env bash
# Launch lightspan training with torchrun.
#
# Single node:   launch/torchrun.sh --nproc 8 -- --config configs/tnl-1b.yaml --parallel.tp=2
# Multi-node:    on every node, the same command with the rendezvous of the head node:
#                NNODES=4 RDZV_ENDPOINT=head-host:29500 launch/torchrun.sh --nproc 8 -- --config ...
# Elastic:       MAX_RESTARTS=3 restarts failed workers; training resumes from the latest complete
#                checkpoint in the run folder (checkpoint.resume=auto, the default).
set -euo pipefail

NPROC=${NPROC:-1}
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29500}
RDZV_ID=${RDZV_ID:-lightspan}
PYTHON=${PYTHON:-python}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) NPROC=$2; shift 2 ;;
    --nnodes) NNODES=$2; shift 2 ;;
    --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
    --rdzv-endpoint) RDZV_ENDPOINT=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if [[ "$NNODES" == "1" ]]; then
  # --standalone starts its own c10d store on a free port: no endpoint to agree on.
  exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NPROC" \
       --max-restarts="$MAX_RESTARTS" -m pretrain "$@"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC" \
     --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" \
     --max-restarts="$MAX_RESTARTS" -m pretrain "$@"
