#!/usr/bin/env bash
# Builds a pair of consecutive versions of a tree from PyPI, to measure updates (issue 19):
# OUT_DIR/v1 and OUT_DIR/v2, each pip-installed into a prefix as datasets/python/build-tree.sh
# does (so .pyc files are compiled for the python3 on PATH, as the workload runs them).
# Usage: build-pair.sh PAIR OUT_DIR, PAIR one of
#   numpy   numpy 2.2.5 -> 2.2.6 (one patch release; ~70 MB, most of it native .so files)
#   python  the python workload's packages one minor version apart:
#           sympy 1.13.3, networkx 3.5 -> sympy 1.14.0, networkx 3.6.1 (mpmath 1.3.0 in both)
# Needs python3 with pip (Debian: apt-get install python3-pip) and PyPI.
set -euo pipefail
pair=${1:?usage: build-pair.sh numpy|python OUT_DIR}
out=${2:?usage: build-pair.sh numpy|python OUT_DIR}
case "$pair" in
  numpy)  v1=('numpy==2.2.5'); v2=('numpy==2.2.6') ;;
  python) v1=('sympy==1.13.3' 'networkx==3.5' 'mpmath==1.3.0')
          v2=('sympy==1.14.0' 'networkx==3.6.1' 'mpmath==1.3.0') ;;
  *) echo "build-pair.sh: unknown pair $pair (numpy or python)" >&2; exit 2 ;;
esac
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "build-pair.sh: python3 has no pip: apt-get install python3-pip" >&2
  exit 1
fi
build() {
  local dir=$1; shift
  [ -f "$dir/.complete" ] && return 0
  rm -rf "$dir"
  mkdir -p "$dir"
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
    --no-warn-script-location --no-deps --only-binary=:all: --target "$dir" "$@"
  touch "$dir/.complete"
}
build "$out/v1" "${v1[@]}"
build "$out/v2" "${v2[@]}"
