"""Launchers: launch/torchrun.sh (single and multi-node), launch/slurm/{train,prepare}.sbatch (helpers sourced from
launch/common.sh), `launch.preflight` (the check they run before any worker starts: interpreter, config, layout vs
NNODES x NPROC; with --dry-run one rank's dry run) and `launch.env` (reads the torchrun / slurm environment and
fails clearly on a bad rendezvous)."""
