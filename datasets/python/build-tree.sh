#!/usr/bin/env bash
# Builds the python workload's tree: sympy and networkx (and mpmath, which sympy needs)
# pip-installed into a prefix, ~105 MB in ~4,500 files, most of them small .py and .pyc
# files. Usage: build-tree.sh OUT_DIR
# The workload runs the machine's own interpreter (it stays local; only the packages come
# from the tree):  env PYTHONPATH=OUT_DIR PYTHONDONTWRITEBYTECODE=1 python3 -c 'import sympy, networkx'
# pip compiles every module to __pycache__/*.cpython-3XY.pyc for the interpreter that runs
# it, so build the tree with the python3 that the bench will run (the first on PATH).
# Needs python3 with pip (Debian: apt-get install python3-pip) and PyPI.
set -euo pipefail
out=${1:?usage: build-tree.sh OUT_DIR}
[ -f "$out/.complete" ] && exit 0
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "build-tree.sh: python3 has no pip: apt-get install python3-pip" >&2
  exit 1
fi
mkdir -p "$out"
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
  --no-warn-script-location --target "$out" 'sympy==1.14.0' 'networkx==3.6.1' 'mpmath==1.3.0'
touch "$out/.complete"
