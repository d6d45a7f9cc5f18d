#!/usr/bin/env bash
# The wheels a GPU session carries to the device machine, into .whl/ (git-ignored).
#
#   bash benchmarks/gpu_wheels.sh [folder]      # here, where pip reaches the package registry
#
# The machine fetches nothing. Its image has Python 3.12, torch 2.11, transformers 5.17 and
# huggingface_hub 1.33, timm, peft, accelerate, sentencepiece and pytest (the device tool's
# KINDS.md lists them). It lacks what this list brings: the transformers we need (>= 5.24, with
# the huggingface_hub it needs), OmegaConf, gguf, webdataset and bitsandbytes, and regex: importing
# transformers 5.25 checks for regex >= 2025.10.22, and the image's version is not listed. The versions are
# the ones this project's tests run with. bitsandbytes ships a library for every CUDA and ROCm
# version (43 MB); only the CUDA 13 ones are kept (the machine's torch is built for CUDA 13.0),
# so that the wheels and the working tree stay under the 64 MiB a call may carry.
# benchmarks/gpu_session.py installs them there with pip's --target.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-.whl}
python=${PYTHON:-python3}
version=${PYTHON_VERSION:-3.12}  # the machine's Python (another only to try the kit here)
mkdir -p "$folder"
rm -f "$folder"/*.whl

wheels=(
    transformers==5.25.0 huggingface_hub==2.5.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5
    kernels==0.19.1 tomlkit==0.14.0 omegaconf==2.4.0 gguf==0.19.0 webdataset==1.0.2 braceexpand==0.1.7
    bitsandbytes==0.50.2 regex==2026.12.2
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    "${platforms[@]}" -d "$folder" "${wheels[@]}"

# bitsandbytes: keep the CUDA 13 libraries, drop the other CUDA and ROCm builds.
bnb=$(ls "$folder"/bitsandbytes-*.whl)
"$python" - "$bnb" <<'EOF'
import re, sys, zipfile
from pathlib import Path

path = Path(sys.argv[1])
kept = path.with_suffix(".tmp")
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda(?!13)\d+|rocm\d+)\.so$")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(kept, "w", zipfile.ZIP_DEFLATED) as dst:
    names = [info for info in src.infolist() if not drop.search(info.filename)]
    if not any(re.search(r"libbitsandbytes_cuda13\d\.so$", info.filename) for info in names):
        sys.exit(f"{path.name} has no CUDA 13 library: the machine's torch could not use it")
    for info in names:
        dst.writestr(info, src.read(info))
kept.replace(path)
EOF

total=$(du -cb "$folder"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024))
echo "$folder: $(ls "$folder"/*.whl | wc -l) wheels, $((total / 1000000)) MB; with the working tree ($((tree / 1000000)) MB)" \
    "$(((total + tree) / 1000000)) of the $((limit / 1000000)) MB a call may carry"
if (( total + tree > limit )); then
    echo "too large for one call of the device tool" >&2
    exit 1
fi
