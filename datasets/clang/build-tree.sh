#!/usr/bin/env bash
# Builds the default workload's tree: clang-22 with the libraries it loads (libLLVM,
# libclang-cpp) and its resource headers, ~210 MB, from the Debian package clang-22
# (installed by scripts/setup.sh). Usage: build-tree.sh OUT_DIR
# The binary finds its libraries through its RPATH ($ORIGIN/../lib) and its headers at
# ../lib/clang/22, so the tree runs from wherever it is mounted: OUT_DIR/bin/clang -c hello.c
set -euo pipefail
out=${1:?usage: build-tree.sh OUT_DIR}
llvm=/usr/lib/llvm-22
if [ ! -x "$llvm/bin/clang" ]; then
  echo "build-tree.sh: $llvm/bin/clang is missing: apt-get install clang-22 (or run scripts/setup.sh)" >&2
  exit 1
fi
[ -f "$out/.complete" ] && exit 0
mkdir -p "$out/bin" "$out/lib/clang"
cp -L "$llvm/bin/clang" "$out/bin/clang"
cp -L "$llvm/lib/libLLVM.so.22.1" "$llvm/lib/libclang-cpp.so.22.1" "$out/lib/"
cp -rL "$llvm"/lib/clang/* "$out/lib/clang/"
printf '#include <stdio.h>\nint main(void) { printf("hello\\n"); return 0; }\n' > "$out/hello.c"
touch "$out/.complete"
