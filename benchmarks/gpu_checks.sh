#!/usr/bin/env bash
# The GPU measurements of benchmarks/ on one H100 or H200. The fair comparisons (each project path
# against a naive baseline, each at its best batch) and the settings they decide take two parts,
# each sized for one 600 s call, wheel install included; a third part holds the figures outside
# those comparisons. benchmarks/README.md says what each benchmark measures and holds the latest
# figures. Within a part, the figures still undecided come first, and every benchmark prints its
# lines as it measures them: a part stopped early keeps what it measured before the stop.
#   `1` (time boxes 40 + 440 + 50 s, plus about 15 s of wheel install): the T5 decoder's attention
#     per SDPA backend and on FlexAttention, then the aligner's training step, naive against the
#     training path, each searched for its best batch, the training path then on FlexAttention at
#     its best batch (with both, train.decoder_attention can be decided); then the CoBSAT judge.
#   `2` (260 + 290 s, plus the install): FLUX for CoBSAT generation, naive against the project's
#     path, each searched for its best batch, with the candidate fast-path variants at
#     eval.batch_size before the larger batches; then the features stage against naive generate
#     and its states pass.
#   `3` (20 + 30 + 90 + 240 s, plus the install): the decode attention, the feature store on this
#     machine's cores, the VLM on CoBSAT's own prompts (the nightly sizing), and TBDN's decoding.
#   `all` (the default) runs the three in turn, about 26 minutes at most.
#
#   make gpu-wheels                          # on the development machine, once: wheels into .whl/
#   bash benchmarks/gpu_checks.sh 1          # on the GPU machine, from the repository root, .whl/ copied along
#   bash benchmarks/gpu_checks.sh 2
#
# The benchmarks that search batches get their time box less 40 s as `--time-box`: they start no
# batch that would likely end after it, so they print their summary (the two ratios) before
# `timeout` would stop them. A search that stops at that box or at the end of its batch list,
# rather than at the card's memory, says so in its lines: widen the box or the list to go further.
# Where .whl/ holds wheels (`make gpu-wheels`: transformers 5.24, whose cache API the project needs,
# diffusers and importlib_metadata, for CPython 3.12 on x86_64 Linux), they are installed into
# /tmp/site for this run and put first on PYTHONPATH, ahead of what the interpreter has.
# Outputs land in $OUT (or benchmarks/out): one .txt per benchmark, written as it runs (a killed
# benchmark still leaves its first numbers), and gpu.txt with the card, the versions and the
# commit. Record new figures in benchmarks/README.md with the date, the card, the commit and the
# command. `TINY=1` runs the same script at tiny shapes on a CPU in a minute or two per part (a
# check before a GPU run; tests/unit/test_benchmarks.py runs every part). Prefer an H200 for `1`:
# the training step at large batches is tight on an H100's 80 GB.
# The interpreter is $PYTHON, else .venv/bin/python where `make setup` made one, else python3. Every
# benchmark runs even when one before it fails or runs out of time; the exit status is then 1 and
# the last lines name each one that did.
set -uo pipefail
PART=${1:-all}
OUT=${OUT:-benchmarks/out}
case "$PART" in
    1 | 2 | 3 | all) ;;
    *) echo "usage: bash benchmarks/gpu_checks.sh [1|2|3|all]" >&2; exit 2 ;;
esac
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
SIZE=${TINY:+--tiny}
if [ -z "${TINY:-}" ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"; fi
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt" || exit 1
git describe --always --dirty 2>/dev/null | sed "s/^/commit /" | tee -a "$OUT/gpu.txt"
FAILED=()
# bench OUTPUT_NAME SECONDS SCRIPT ARGS...: one benchmark, time-boxed, its lines in $OUT/OUTPUT_NAME.txt.
bench() {
    local name=$1 seconds=$2 script=$3
    shift 3
    timeout "$seconds" "$PYTHON" "benchmarks/$script" "$@" 2>&1 | tee "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then FAILED+=("$name (exit $status$( [ "$status" -eq 124 ] && echo ', out of time'))"); fi
}
if [ "$PART" = 1 ] || [ "$PART" = all ]; then
    # The decoder's attention per SDPA backend (the training path's against cuDNN) and on compiled
    # FlexAttention (train.decoder_attention=flex), and cuDNN's reported NaN backward
    # (pytorch/pytorch#196678) at these shapes.
    bench decoder_attention 40 decoder_attention.py $SIZE
    # Naive T5 training (whole model, padded to 128, inputs ready on the device) against the
    # training path, each from batch 32 doubling until the card runs out of memory, one compiled
    # decoder for every batch; then the training path at its best batch on FlexAttention, and, if
    # the box still has room, a profile of a quarter of that batch's pool (attention share, GPU
    # busy share).
    bench train_step 440 train_step.py $SIZE --flex --profile --time-box 400
    # The CoBSAT judge (LLaVA-1.5-13B shapes), image by image vs one call per generator batch.
    bench cobsat_judge 50 cobsat_judge.py $SIZE --batches 1
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
    # FLUX: the pipeline as loaded from batch 1 doubling, the fused and compiled path from
    # eval.batch_size 8 doubling, with cuDNN at the head of the SDPA backends and then with
    # inductor's coordinate-descent tuning too (the combination `wrap_flux` would adopt if both pay)
    # timed at batch 8 right after the path itself; the VAE share and SDPA per backend last.
    bench flux_generate 260 flux_generate.py $SIZE --variants cudnn cudnn+coordinate-descent --time-box 220
    # Naive generate and its teacher-forced states pass (transformers' defaults), each from batch 32
    # doubling, against the features stage from its preset's batch 256, then the stage's phases.
    bench extract_features 290 extract_features.py $SIZE --time-box 250
fi
if [ "$PART" = 3 ] || [ "$PART" = all ]; then
    # One decode step's attention, K/V repeated vs packed; the training input side (store reader,
    # batch making) on this machine's cores, whose target is batches at 3x or more the training
    # step's rate; eval's VLM call on CoBSAT's own 2- and 4-image prompts at eval.batch_size (its
    # share of an evaluation, for the nightly sizing).
    bench decode_attention 20 decode_attention.py $SIZE
    bench feature_store 30 feature_store.py $SIZE --samples 256
    bench cobsat_vlm 90 extract_features.py $SIZE --cobsat-only --cobsat-shots 2 4
    # TBDN's VLM decoding per prompt at eval.batch_size: the text bridge, the project's
    # query-contrastive decoding, and TBDN's own (the query-less prompt run again every step).
    bench tbdn_decode 240 tbdn_decode.py $SIZE
fi
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'gpu_checks: did not finish: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
