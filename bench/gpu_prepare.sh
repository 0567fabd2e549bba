#!/usr/bin/env bash
# Prepare, on THIS machine (with network and the project's venv), what bench/gpu_session.sh needs on a
# lent GPU machine, which has no network: `.gpu_carry/` (git-ignored), to be named in the device
# tool's `carry`. It holds
#   wheels/  the Python packages the device image lacks (its python3 is 3.12 with torch, lightning 2.6.6,
#            transformers, pyarrow, tensorboard, matplotlib, onnxruntime, ...: /work/.library/device/KINDS.md):
#            jsonargparse + omegaconf (the CLI and the benches' part builder), deepspeed and its pydantic/hjson,
#            the audio/metric packages the evaluation imports lazily. Pure-python ones are built here
#            (`pip wheel`), compiled ones downloaded for CPython 3.12 manylinux x86_64.
#   demo/    the demo corpus's 50 Hz shards (27 MB; building them there would need espeak-ng).
#   reference/fixtures/  the v1 fixture parts the gpu tier trains (../shared does not travel).
# Size is checked against the tool's 64 MiB. Usage, from the repository root:
#   bash bench/gpu_prepare.sh            # then: run(command="bash bench/gpu_session.sh", carry=[".gpu_carry"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUTDIR=.gpu_carry
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR/wheels" "$OUTDIR/demo"
pin() { grep -i "^$1==" constraints.txt | head -1; }

# pure python: built here into py3-none-any wheels (deepspeed's ops build lazily, so its wheel is pure)
# (resemblyzer is left out: its webrtcvad needs a compiler there; speaker similarity is not in the GPU run)
PURE="jsonargparse docstring_parser typeshed_client omegaconf deepspeed hjson pydantic annotated-types
      typing-inspection jiwer librosa audioread pooch decorator platformdirs dtw-python soundfile espeakng-loader"
for name in $PURE; do
    spec=$(pin "$name" || true)
    [ -n "$spec" ] || { echo "gpu_prepare: $name is not pinned in constraints.txt" >&2; exit 1; }
    case "$name" in
        dtw-python|soundfile|espeakng-loader)  # compiled or binary-carrying: need the 3.12 manylinux build
            $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$OUTDIR/wheels" "$spec" ;;
        *) $PY -m pip wheel -q --no-deps --no-build-isolation -w "$OUTDIR/wheels" "$spec" ;;
    esac
done
# compiled dependencies, CPython 3.12 builds
for name in pydantic_core rapidfuzz soxr; do
    spec=$(pin "$name" || true)
    [ -n "$spec" ] || continue
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$OUTDIR/wheels" "$spec"
done

# the demo shards (data.list rewritten on the device to where they land)
DEMO=$($PY -c "from cosytrain.data.demo_corpus import ensure_demo_corpus; print(ensure_demo_corpus().parent)")
cp "$DEMO"/parquet_*.tar "$OUTDIR/demo/"
ls "$OUTDIR"/demo/parquet_*.tar | xargs -n1 basename > "$OUTDIR/demo/shards.txt"

# the reference fixtures the gpu tier builds its tiny parts from (tests/conftest.py: $COSYTRAIN_REFERENCE)
REF=${COSYTRAIN_REFERENCE:-../shared/reference}
mkdir -p "$OUTDIR/reference/fixtures"
cp "$REF"/fixtures/INDEX.json "$REF"/fixtures/v1_llm.pt "$REF"/fixtures/v1_flow.pt "$REF"/fixtures/hift_v1.pt \
   "$OUTDIR/reference/fixtures/"

size=$(du -sm "$OUTDIR" | cut -f1)
echo "gpu_prepare: $OUTDIR holds $(ls "$OUTDIR/wheels" | wc -l) wheels and $(wc -l < "$OUTDIR/demo/shards.txt") shards, ${size} MiB"
[ "$size" -lt 60 ] || { echo "gpu_prepare: over the device tool's 64 MiB working-tree limit" >&2; exit 1; }
