#!/usr/bin/env bash
# Download the wheels the device machine needs into .whl/ (ignored by git, carried by the device tool):
# Python 3.12 on x86-64 Linux, every package of loadtests/device/requirements.txt, no dependency
# resolution (the list is already closed). Run here, where PyPI is reachable; the device has no index.
#   loadtests/device/fetch-wheels.sh          then carry ".whl" in the device call (docs/loadtests.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl -r loadtests/device/requirements.txt
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
