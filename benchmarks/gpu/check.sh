#!/usr/bin/env bash
# The GPU checks of this project on a machine without network, in one command (benchmarks/gpu/README.md).
#
#   bash benchmarks/gpu/check.sh --stage .gpu/partN       keep one part of the DALI wheel (made by prepare.sh)
#                                                         in /tmp/dali_parts, checked against its sha256
#   bash benchmarks/gpu/check.sh --wheels .gpu [OUTPUT]   stage any parts under .gpu, join them, check the
#                                                         wheel's sha256, install the wheels of .gpu/small into
#                                                         /tmp/gpu_site, then run the checks (check.py)
#   bash benchmarks/gpu/check.sh --install .gpu           only stage, join, check and install
#   bash benchmarks/gpu/check.sh --cpu [OUTPUT]           the same checks with tiny sizes on the CPU, in the
#                                                         current Python environment (a rehearsal)
#
# PIP_FLAGS adds pip options to the installation (to rehearse it elsewhere: --python-version 3.12
# --only-binary=:all: --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64).
# OUTPUT (default: $OUT when set, else results/gpu_check) receives check.log, table.md and results.json.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PARTS=${DALI_PARTS:-/tmp/dali_parts}
SITE=${GPU_SITE:-/tmp/gpu_site}
JOINED=${DALI_JOINED:-/tmp/dali_wheel}
PYTHON=${PYTHON:-python3}

stage() {  # copy a part and its checksum next to the others; a repeated transfer replaces the same file
    local folder=$1 sums
    sums=$(ls "$folder"/dali.whl.part*.sha256 2>/dev/null | head -n 1)
    [ -n "$sums" ] || { echo "$folder holds no part of the DALI wheel (benchmarks/gpu/prepare.sh makes them)"; return 1; }
    mkdir -p "$PARTS"
    cp "$folder"/dali.whl.part* "$PARTS"/ || return 1
    (cd "$PARTS" && sha256sum -c --quiet "$(basename "$sums")") || return 1
    echo "staged ${sums%.sha256} ($(du -h "${sums%.sha256}" | cut -f1)); $(ls "$PARTS" | grep -vc sha256) part(s) in $PARTS"
}

install_wheels() {  # join, verify and install; prints one line per problem
    local folder=$1 manifest=$1/small/MANIFEST
    [ -f "$manifest" ] || { echo "no $manifest: carry $folder/small"; return 1; }
    for part in "$folder"/part*; do [ -d "$part" ] && { stage "$part" || return 1; }; done
    local wheel count
    wheel=$(head -n 1 "$manifest" | awk '{print $2}')
    count=$(awk '$1 == "parts" {print $2}' "$manifest")
    for i in $(seq 1 "$count"); do
        [ -f "$PARTS/dali.whl.part$i" ] || { echo "part $i of $count is missing in $PARTS: send $folder/part$i" \
            "again (a machine given back loses /tmp)"; return 1; }
    done
    mkdir -p "$JOINED"
    for i in $(seq 1 "$count"); do cat "$PARTS/dali.whl.part$i"; done > "$JOINED/$wheel"
    (cd "$JOINED" && head -n 1 "$manifest" | sha256sum -c --quiet) || { echo "joined $wheel: wrong sha256"; return 1; }
    (cd "$folder/small" && grep '\.whl$' MANIFEST | tail -n +2 | sha256sum -c --quiet) || return 1
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        ${PIP_FLAGS:-} "$JOINED/$wheel" "$folder"/small/*.whl || return 1
    echo "installed $wheel and $(ls "$folder"/small/*.whl | wc -l) wheels into $SITE"
}

case "${1:-}" in
    --stage)
        stage "${2:?--stage needs the folder of one part}"; exit ;;
    --install)
        install_wheels "${2:?--install needs the folder made by prepare.sh}"; exit ;;
    --wheels)
        folder=${2:?--wheels needs the folder made by prepare.sh}; shift 2; mode=gpu ;;
    --cpu)
        shift; mode=cpu ;;
    *)
        sed -n '2,17p' "$0"; exit 2 ;;
esac
output=${1:-${OUT:-$ROOT/results/gpu_check}}
mkdir -p "$output"
cd "$ROOT"
start=$SECONDS
if [ "$mode" = gpu ]; then
    if install_wheels "$folder" > "$output/install.txt" 2>&1; then status=ok; else status=failed; fi
    export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
    # nvidia is a namespace package; should the image hold a regular one, DALI's half must join it.
    if ! "$PYTHON" -c "import nvidia.dali" 2>/dev/null && [ -d "$SITE/nvidia/dali" ]; then
        printf 'import nvidia\nnvidia.__path__.append("%s/nvidia")\n' "$SITE" > "$SITE/sitecustomize.py"
    fi
    "$PYTHON" -c "import nvidia.dali, monai, nibabel" >> "$output/install.txt" 2>&1 || status=failed
    echo "install	$((SECONDS - start))	s	$status" > "$output/steps.tsv"
    cat "$output/install.txt"
else
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    : > "$output/steps.tsv"
fi
exec "$PYTHON" benchmarks/gpu/check.py --output "$output" ${mode:+--$mode}
