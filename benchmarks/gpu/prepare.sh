#!/usr/bin/env bash
# Download, on a machine with network, the wheels a GPU machine without network needs to run this
# project (DALI for CUDA 13, MONAI, nibabel and their small dependencies) for Python 3.12 on x86-64
# Linux, and cut the DALI wheel into parts that each fit one transfer of at most 64 MiB.
#
# usage: benchmarks/gpu/prepare.sh [FOLDER]      (default .gpu in the repository root; git ignores it)
#
# Layout written (each folder travels alone, beside the repository, in one transfer):
#   FOLDER/partN/   one part of the DALI wheel (PART_MIB MiB at most) and its .sha256
#   FOLDER/small/   the other wheels and MANIFEST: the sha256 of the whole DALI wheel and of every wheel
#   FOLDER/download/ the whole DALI wheel (stays here)
# It checks that joining the parts gives the wheel, lists what each wheel requires, and prints the
# transfers to make and the command that runs the checks there (benchmarks/gpu/README.md).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FOLDER=${1:-$ROOT/.gpu}
PYTHON=${PYTHON:-python3}
PART_MIB=${PART_MIB:-56}
DALI=${DALI:-nvidia-dali-cuda130==2.4.0}
# Pure-Python wheels, and the cp312 builds of the two with compiled parts (optree, nvtx, libcst).
SMALL=(monai==1.6.1 nibabel==5.4.2 astunparse==1.6.3 gast==0.7.0 makefun==1.16.0 optree==0.20.0 nvtx==0.2.17
       libcst==1.9.0)
# Requirements the GPU machine's image already holds, and DALI's image-decoding libraries, which the
# pipelines of this project do not use.
PRESENT="torch numpy packaging six wheel typing-extensions pyyaml"
LEFT_OUT="nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13"

download() {
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$@"
}

rm -rf "$FOLDER"/part* "$FOLDER/small"
mkdir -p "$FOLDER/download" "$FOLDER/small"
download "$FOLDER/download" "$DALI"
download "$FOLDER/small" "${SMALL[@]}"
wheel=$(ls "$FOLDER"/download/nvidia_dali_cuda130-*.whl | tail -n 1)
name=$(basename "$wheel")

# Every requirement (for Python 3.12 on Linux, extras aside) is carried, already there, or left out on purpose.
"$PYTHON" - "$wheel" "$FOLDER"/small/*.whl <<PY
import re, sys, zipfile
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
target = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
def norm(name): return re.sub(r"[-_.]+", "-", name).lower()
known = {norm(p) for p in "$PRESENT $LEFT_OUT".split()}
carried = {norm(p.split("/")[-1].split("-")[0]) for p in sys.argv[1:]}
missing = []
for path in sys.argv[1:]:
    with zipfile.ZipFile(path) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate(target):
                if norm(requirement.name) not in carried | known:
                    missing.append(f"{path.split('/')[-1]} needs {requirement}")
print("\n".join(missing) if missing else "each requirement is carried, on the GPU machine already, or left out")
sys.exit(1 if missing else 0)
PY

# The parts, one folder each, and the checksums.
scratch=$(mktemp -d)
split -b "${PART_MIB}m" -d -a 1 "$wheel" "$scratch/dali.whl.part"
count=0
for piece in "$scratch"/dali.whl.part*; do
    count=$((count + 1))
    mkdir -p "$FOLDER/part$count"
    mv "$piece" "$FOLDER/part$count/dali.whl.part$count"
    (cd "$FOLDER/part$count" && sha256sum "dali.whl.part$count" > "dali.whl.part$count.sha256")
done
rmdir "$scratch"
(cd "$FOLDER/download" && sha256sum "$name") > "$FOLDER/small/MANIFEST"
(cd "$FOLDER/small" && sha256sum -- *.whl) >> "$FOLDER/small/MANIFEST"
echo "parts $count" >> "$FOLDER/small/MANIFEST"

# Rehearse the join.
joined=$(for i in $(seq 1 "$count"); do cat "$FOLDER/part$i/dali.whl.part$i"; done | sha256sum | cut -d' ' -f1)
expected=$(head -n 1 "$FOLDER/small/MANIFEST" | cut -d' ' -f1)
[ "$joined" = "$expected" ] || { echo "error: the joined parts do not give $name" >&2; exit 1; }
echo "$name: $count parts join to sha256 $expected"
du -sh "$FOLDER"/part* "$FOLDER/small"

rel=${FOLDER#"$ROOT"/}
echo
echo "On the GPU machine, from the repository root, one transfer per line, in quick succession:"
for i in $(seq 1 $((count - 1))); do
    echo "  carry [$rel/part$i]: bash benchmarks/gpu/check.sh --stage $rel/part$i"
done
echo "  carry [$rel/part$count, $rel/small]: bash benchmarks/gpu/check.sh --wheels $rel"
