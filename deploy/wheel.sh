#!/bin/sh
# The one way Vigil is built and installed from source: the container image
# (deploy/Dockerfile) and the wheel test (tests/integration/test_readme.py) both run
# this script, so what the test proves is what the image ships.
#
#   deploy/wheel.sh build OUT [SRC]   wheel of SRC (default: `git archive HEAD` of this
#                                     repository, a clean checkout) into OUT, with the
#                                     requirements.lock it was tested with
#   deploy/wheel.sh install PYTHON OUT
#                                     install OUT's wheel with PYTHON (a fresh venv's),
#                                     the lock as constraints
#
# The generated gRPC code is never in the source: setup.py's build hook generates it
# from protos/ while the wheel is built. PYTHON (build) defaults to python3.
set -eu

die() { echo "wheel.sh: $*" >&2; exit 1; }

build() {
    out=$1
    src=${2:-}
    py=${PYTHON:-python3}
    mkdir -p "$out"
    tmp=
    if [ -z "$src" ]; then
        repo=$(cd "$(dirname "$0")/.." && pwd)
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        git -C "$repo" archive -o "$tmp/src.tar" HEAD
        mkdir "$tmp/src"
        tar -xf "$tmp/src.tar" -C "$tmp/src"
        src=$tmp/src
    fi
    [ -f "$src/pyproject.toml" ] || die "$src is not a Vigil source tree"
    for f in "$src"/vigil/v1/*_pb2*.py; do
        [ -e "$f" ] && die "$f is in the source: generated code comes from the build only"
    done
    rm -f "$out"/vigil-*.whl
    "$py" -m pip wheel -q --no-deps -w "$out" "$src"
    cp "$src/requirements.lock" "$out/requirements.lock"
    # The wheel carries the generated code and installs nothing but `vigil`.
    "$py" - "$out" <<'EOF'
import sys, zipfile
from pathlib import Path

(wheel,) = Path(sys.argv[1]).glob("vigil-*.whl")
names = zipfile.ZipFile(wheel).namelist()
top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
if top != {"vigil"}:
    sys.exit(f"wheel.sh: {wheel.name} installs {sorted(top)}, not only vigil")
for mod in ("vigil/v1/tasks_pb2.py", "vigil/v1/tasks_pb2_grpc.py", "vigil/v1/liveness_pb2.py"):
    if mod not in names:
        sys.exit(f"wheel.sh: {wheel.name} lacks the generated {mod}")
print(wheel)
EOF
}

install() {
    py=$1
    out=$2
    set -- "$out"/vigil-*.whl
    [ $# -eq 1 ] && [ -f "$1" ] || die "expected one vigil wheel in $out"
    "$py" -m pip install -q --no-cache-dir -c "$out/requirements.lock" "$1"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    build) [ $# -ge 1 ] || die "usage: wheel.sh build OUT [SRC]"; build "$@" ;;
    install) [ $# -eq 2 ] || die "usage: wheel.sh install PYTHON OUT"; install "$@" ;;
    *) die "usage: wheel.sh build OUT [SRC] | wheel.sh install PYTHON OUT" ;;
esac
