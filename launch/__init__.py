"""Launchers: launch/torchrun.sh (single and multi-node), launch/slurm/*.sbatch, and `launch.env` (reads the
torchrun / slurm environment and fails clearly on a bad rendezvous)."""
