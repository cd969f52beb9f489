#!/usr/bin/env bash
# The GPU check's entry on the lent machine (bench/README.md, "GPU check"); it runs here too.
#
#   bash bench/gpu/device.sh a [check.py options]   call A, carry bench/gpu/pack/a: CTranslate2, faster-whisper,
#                                                    the model, numpy speech: what loaded, the bare rows
#   bash bench/gpu/device.sh b [check.py options]   call B at once after A (same warm machine), carry
#                                                    bench/gpu/pack/b: PyAV and Opus speech: every row
#
# It unpacks bench/gpu/pack/<part>/*.tar.xz into bench/gpu/work/<part>/ (ignored by git, so a warm machine
# keeps part a for call B), links libcublas.so.12 and libcublasLt.so.12 (the names CTranslate2 4.x opens) to
# the image's CUDA 13 cuBLAS in bench/gpu/work/cublas12/, and sets LD_LIBRARY_PATH (it works only when set
# before Python starts), PYTHONPATH and a CUDA JIT cache in bench/gpu/work/ before it runs check.py.
# Environment: WD_GPU_PYTHON (default /opt/torch/.venv/bin/python3, else python3), WD_GPU_PACK (default
# bench/gpu/pack), WD_GPU_WORK (default bench/gpu/work), OUT (where the JSON goes; default <work>/out).
# Exit status: check.py's; 2 a part or its manifest missing; 4 call B on a machine without part a.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
pack=${WD_GPU_PACK:-$here/pack}
work=${WD_GPU_WORK:-$here/work}
python=${WD_GPU_PYTHON:-/opt/torch/.venv/bin/python3}
[ -x "$python" ] || python=$(command -v python3)
part=${1:-}
case "$part" in
    a|b) shift ;;
    *) echo "usage: bash bench/gpu/device.sh a|b [check.py options]" >&2; exit 2 ;;
esac
echo "# device.sh $part: $python ($("$python" --version 2>&1)), repository $repo"

unpack() {  # part $1 into $work/$1, unless the same manifest is unpacked there already
    local name=$1 folder=$pack/$1
    if [ ! -f "$folder/manifest.json" ]; then
        echo "GPU CHECK STOPPED: $folder/manifest.json is missing: run bench/gpu/prepare.py here, then carry bench/gpu/pack/$name"
        exit 2
    fi
    if [ -f "$work/$name/manifest.json" ] && [ "$(cat "$folder/manifest.json")" = "$(cat "$work/$name/manifest.json")" ]; then
        echo "# part $name: unpacked already in $work/$name"
        return
    fi
    rm -rf "${work:?}/$name" && mkdir -p "$work/$name" || exit 2
    "$python" - "$folder" "$work/$name" <<'EOF' || exit 2
import pathlib, sys, tarfile, time
source, target = pathlib.Path(sys.argv[1]), sys.argv[2]
started = time.monotonic()
archives = sorted(source.glob("*.tar.xz"))
for archive in archives:
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
print(f"# part {source.name}: {len(archives)} archives unpacked into {target} in {time.monotonic() - started:.1f} s")
EOF
    cp "$folder/manifest.json" "$work/$name/manifest.json"
}

mkdir -p "$work" || exit 2
if [ "$part" = b ] && [ ! -f "$work/a/manifest.json" ]; then
    echo "GPU CHECK STOPPED: part a is not unpacked on this machine ($work/a): the machine was given back after call A" \
         "(it keeps ignored files only while warm, about 30 s after a call). Run call A again, then call B at once."
    exit 4
fi
unpack "$part"

# CTranslate2 4.8.5 opens libcublas.so.12 at run time; the image has CUDA 13 (site-packages/nvidia/cu13/lib).
cuda13=$("$python" - <<'EOF'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
found = sorted(path for root in roots for path in glob.glob(os.path.join(root, "*", "lib", "libcublas.so.13")))
print(os.path.dirname(found[0]) if found else "")
EOF
)
if [ -z "$cuda13" ]; then
    cuda13=$(ldconfig -p 2>/dev/null | awk '/libcublas\.so\.13 /{print $NF; exit}' | xargs -r dirname)
fi
links=$work/cublas12
if [ -n "$cuda13" ]; then
    mkdir -p "$links"
    ln -sfn "$cuda13/libcublas.so.13" "$links/libcublas.so.12"
    ln -sfn "$cuda13/libcublasLt.so.13" "$links/libcublasLt.so.12"
    export LD_LIBRARY_PATH="$links:$cuda13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "# cuBLAS: $links/libcublas.so.12 -> $(readlink "$links/libcublas.so.12"), libcublasLt.so.12 -> $(readlink "$links/libcublasLt.so.12")"
else
    echo "# cuBLAS: no CUDA 13 libcublas.so.13 found (nvidia/*/lib beside $python's packages, ldconfig): no links made"
fi
real12=$(ldconfig -p 2>/dev/null | awk '/libcublas\.so\.12 /{print $NF; exit}')
[ -n "$real12" ] && echo "# note: this machine also has a CUDA 12 cuBLAS at $real12 (the links come first on LD_LIBRARY_PATH)"

export PYTHONPATH="$work/a/site:$work/b/site:$repo${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_CACHE_PATH="$work/nvcache" CUDA_CACHE_MAXSIZE=4294967296 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ "$part" = a ]; then
    exec "$python" "$here/check.py" --rows bare --no-av --device cuda --model "$work/a/model" --audio "$work/a/audio" \
        --work "$work" --json gpu-check-a.json --budget-s 90 "$@"
fi
exec "$python" "$here/check.py" --rows all --device cuda --model "$work/a/model" --audio "$work/b/audio" \
    --work "$work" --json gpu-check-b.json --budget-s 240 "$@"
