# shellcheck shell=bash
# Helpers shared by launch/torchrun.sh and launch/slurm/*.sbatch (sourced, never run).
#
# die MESSAGE...        print "launch: error: MESSAGE" on stderr and exit 2 (the CLI's status for a bad setting)
# need_int NAME VALUE MIN   VALUE must be an integer >= MIN, else die naming NAME
# resolve_python ROOT   set PYTHON: $PYTHON if set, else the active venv's interpreter ($VIRTUAL_ENV/bin/python),
#                       else ROOT/.venv/bin/python, else python3. Never a bare `python` from PATH, which on many
#                       machines is a system interpreter without torch.

die() {
  echo "launch: error: $*" >&2
  exit 2
}

need_int() {
  local name=$1 value=$2 min=$3
  if ! [[ "$value" =~ ^[0-9]+$ ]] || (( 10#$value < min )); then
    die "$name=$value must be an integer >= $min"
  fi
}

resolve_python() {
  local root=$1
  if [[ -n "${PYTHON:-}" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON is not an executable; point it at the venv's interpreter (e.g. PYTHON=$root/.venv/bin/python)"
  elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PYTHON=$VIRTUAL_ENV/bin/python
  elif [[ -x "$root/.venv/bin/python" ]]; then
    PYTHON=$root/.venv/bin/python
  elif command -v python3 >/dev/null 2>&1; then
    PYTHON=python3
  else
    die "no Python found: run 'make setup' in $root (it creates .venv), activate a venv, or set PYTHON=/path/to/python"
  fi
  export PYTHON
}
