#!/usr/bin/env bash
# The GPU measurements of benchmarks/ on one H200 or H100, in three parts that each fit in one 600 s
# call. benchmarks/README.md says what each benchmark measures and holds the latest figures.
# Within a part, the figures still open come first, and every benchmark prints its lines as it
# measures them: a part stopped early keeps what it measured before the stop.
#   `train` (time boxes 280 + 70 s, plus about 15 s of wheel install): the aligner's training step,
#     naive against the training path, then the T5 decoder's attention per SDPA backend and on
#     FlexAttention.
#   `infer` (230 + 260 s, plus the install): FLUX for CoBSAT generation, then the VLM on CoBSAT's
#     prompts, then the features stage against naive generate.
#   `extra` (40 + 60 + 25 + 220 s): the feature store on this machine's cores, the CoBSAT judge,
#     the decode attention, and the training step on FlexAttention (worth its time only when
#     `train`'s flex row beats the training path's attention).
#   `all` (the default) runs the three in turn, about 20 minutes at most.
#
#   make gpu-wheels                          # on the development machine, once: wheels into .whl/
#   bash benchmarks/gpu_checks.sh train      # on the GPU machine, from the repository root, .whl/ copied along
#   bash benchmarks/gpu_checks.sh infer
#   bash benchmarks/gpu_checks.sh extra      # when its figures are wanted again
#
# Where .whl/ holds wheels (`make gpu-wheels`: transformers 5.24, whose cache API the project needs,
# diffusers and importlib_metadata, for CPython 3.12 on x86_64 Linux), they are installed into
# /tmp/site for this run and put first on PYTHONPATH, ahead of what the interpreter has.
# Outputs land in $OUT (or benchmarks/out): one .txt per benchmark, written as it runs (a killed
# benchmark still leaves its naive numbers). Record new figures in benchmarks/README.md with the
# date, the card, the commit and the command. `TINY=1` runs the same script at tiny shapes on a
# CPU in a minute or two per part (a check before a GPU run). Prefer an H200 for `train`: the
# batch-128 training step at target length 128 is tight on an H100's 80 GB.
# The interpreter is $PYTHON, else .venv/bin/python where `make setup` made one, else python3. Every
# benchmark runs even when one before it fails or runs out of time; the exit status is then 1 and
# the last lines name each one that did.
set -uo pipefail
PART=${1:-all}
OUT=${OUT:-benchmarks/out}
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
FAILED=()
# bench OUTPUT_NAME SECONDS SCRIPT ARGS...: one benchmark, time-boxed, its lines in $OUT/OUTPUT_NAME.txt.
bench() {
    local name=$1 seconds=$2 script=$3
    shift 3
    timeout "$seconds" "$PYTHON" "benchmarks/$script" "$@" 2>&1 | tee "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then FAILED+=("$name (exit $status$( [ "$status" -eq 124 ] && echo ', out of time'))"); fi
}
if [ "$PART" = train ] || [ "$PART" = all ]; then
    # Naive padded full T5 at batch 32 vs the training path at 96 (paper-lvlm's global batch on one
    # GPU: its peak memory) and at 128, one model build and one compiled decoder for all three, over
    # one bucketing pool of the preset's 64 batches each (the padding share printed); after the
    # numbers, a profile of every 4th batch-128 batch (attention share, GPU busy share).
    bench train_step 280 train_step.py $SIZE --batch 32 --project-batch 96 128 --profile
    # The decoder's attention per SDPA backend (the training path's against cuDNN) and on compiled
    # FlexAttention (train.decoder_attention=flex), and cuDNN's reported NaN backward
    # (pytorch/pytorch#196678) at these shapes.
    bench decoder_attention 70 decoder_attention.py $SIZE
fi
if [ "$PART" = infer ] || [ "$PART" = all ]; then
    # FLUX first: eager b1/b4 vs b8 fused and compiled, then with cuDNN at the head of the SDPA
    # backends, then with that and inductor's coordinate-descent tuning too: the combination
    # `wrap_flux` would adopt if both pay (VAE share, SDPA backends). One timed batch per path, each
    # path's line printed as it is measured. Then the VLM: eval's call on CoBSAT's own 2- and
    # 4-image prompts at eval.batch_size 8 (its share of an evaluation, for the nightly sizing),
    # then naive generate at 32 vs the features stage at 256 and its phases.
    bench flux_generate 230 flux_generate.py $SIZE --batches 1 --variants cudnn cudnn+coordinate-descent
    FEATURE_BATCH=256; if [ -n "${TINY:-}" ]; then FEATURE_BATCH=8; fi
    bench extract_features 260 extract_features.py $SIZE --batch $FEATURE_BATCH --cobsat-shots 2 4
fi
if [ "$PART" = extra ] || [ "$PART" = all ]; then
    # The training input side (store reader, batch making) on this machine's cores; the target is
    # batches at 3x or more the rate the training step consumes them.
    bench feature_store 40 feature_store.py $SIZE --samples 512
    # The CoBSAT judge (LLaVA-1.5-13B shapes), image by image vs one call per generator batch; one
    # decode step's attention, K/V repeated vs packed.
    bench cobsat_judge 60 cobsat_judge.py $SIZE
    bench decode_attention 25 decode_attention.py $SIZE
    # The training step on FlexAttention (naive again for the same-run ratio, half a pool): run it
    # when `train`'s flex row beat the training path's attention.
    if [ -z "${TINY:-}" ]; then
        bench train_step_flex 220 train_step.py --batch 32 --project-batch 128 --steps 32 --decoder-attention flex
    fi
fi
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'gpu_checks: did not finish: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
