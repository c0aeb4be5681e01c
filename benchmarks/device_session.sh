#!/usr/bin/env bash
# One prepared check for a session that is lent a GPU (15 minutes of device time per
# session, start-up included, 10 minutes per call), in two stages, each step under its own
# time limit so that one slow step cannot eat the others:
#   STAGE=1 (default): every benchmark on CUDA (the GPU throughput targets), then the three
#           jobs end to end on CUDA at a tiny size (does every code path run there?);
#   STAGE=2: a card end to end on CUDA at its own size (CARD=drell_yan_full by default, or any
#           card with JOB=unweight|generate|unfold; JOB_LIMIT seconds, 400 by default, TOTAL above it;
#           SETS: more arguments for the job, e.g. --set overrides);
#   STAGE=zw_full: cards/zw_full.yaml end to end in one call: its network, with less simulation
#           (8e5 + 2e5 events on the machine's cores: 100-170 s at 16 x 400-600 events/s; the card's
#           3e6 take about 5 min there) and the training fitted to 200 s (training.time_limit_s):
#           about 7 minutes in all; JOB_LIMIT 500. Its CPU dry run (SIZE=tiny) took 2 min 8 s on 2026-12-06, and
#           3 min 4 s with the card's refine.fits 3 and data.resmear 2 (2-core CPU).
# Results (JSON, logs, report.json; the plots stay behind) come back as $OUT/session.tar.gz, the JSON and
# steps.txt beside it.
#
# From the repository root of this machine:
#   ../shared/device/wheels.sh graphviz particle hepunits pyunfold   # wheels the device image lacks, in .whl/
#   run tool: carry [".whl"], timeout_s 560, command "bash benchmarks/device_session.sh" (TOTAL=520 s of its own; on 2026-12-04 stage 1 took 327 s)
#   or command "STAGE=zw_full bash benchmarks/device_session.sh" (the GPU run cards/zw_full.yaml still lacks)
# A CPU dry run with tiny sizes: SIZE=tiny OUT=runs/device_dry bash benchmarks/device_session.sh
set -uo pipefail
OUT=${OUT:-runs/device_session}
SIZE=${SIZE:-full}
STAGE=${STAGE:-1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$SIZE" != tiny ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src
fi
PY=${PY:-python3}
if [ "$SIZE" = tiny ]; then  # a CPU dry run of the script itself
  PDF_POINTS=20000; DY_EVENTS=100000; GEN_EVENTS=100000; UNF_SAMPLES=100000; PYTHIA=300; STEPS=10; LIMIT=300; TINY_LIMIT=300
else
  PDF_POINTS=1000000; DY_EVENTS=20000000; GEN_EVENTS=10000000; UNF_SAMPLES=10000000; PYTHIA=2000; STEPS=100; LIMIT=${LIMIT:-75}; TINY_LIMIT=${TINY_LIMIT:-160}
fi
# the jobs at a tiny size: every code path, not the physics
TINY=(--set training.epochs=1 --set data.n_events=20000)

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, partonic, FrEIA, pythia8mc, fastjet, pylhe, pyunfold; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'partonic', partonic.__file__)"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# step NAME SECONDS COMMAND...: run one step under its limit, keep its log, note its exit status and time.
# Every step also ends by the script's own deadline (TOTAL seconds from its start, less a margin for
# packing the results), so that the archive is made even when the call's limit is near.
TOTAL=${TOTAL:-520}
step() {
  local name=$1 limit=$2; shift 2
  local left=$((TOTAL - SECONDS - 20))
  if [ "$left" -lt 15 ]; then echo "$name skipped: the deadline (TOTAL=$TOTAL s) is near" | tee -a "$OUT/steps.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/steps.txt"
  tail -n 4 "$OUT/$name.log"
}

export PARTONIC_CACHE=$OUT/cache
if [ "$STAGE" = 1 ]; then
  # ---- throughput (JSON) ----------------------------------------------------------
  step bench_generate "$LIMIT" $PY benchmarks/generate_throughput.py --card cards/ttbar_full.yaml --events "$PYTHIA" \
    --steps "$STEPS" --generate "$GEN_EVENTS" --out "$OUT/generate.json"
  step bench_unfold "$LIMIT" $PY benchmarks/unfold_throughput.py --card cards/zw_full.yaml --events "$PYTHIA" \
    --steps "$STEPS" --samples "$UNF_SAMPLES" --out "$OUT/unfold.json"
  step bench_unweight "$LIMIT" $PY benchmarks/unweight_throughput.py --devices cuda --events "$DY_EVENTS" --gpu-events "$DY_EVENTS" \
    --pythia-events 20000 --out "$OUT/unweight.json"
  step bench_pdf 40 $PY benchmarks/pdf_throughput.py --points "$PDF_POINTS" --out "$OUT/pdf.json"
  # ---- the jobs on CUDA, tiny ------------------------------------------------------
  step tiny_unweight "$TINY_LIMIT" $PY -m partonic.cli unweight --card cards/drell_yan.yaml "${TINY[@]}" --output "$OUT/tiny_drell_yan"
  step tiny_generate "$TINY_LIMIT" $PY -m partonic.cli generate --card cards/ttbar.yaml "${TINY[@]}" --output "$OUT/tiny_ttbar"
  step tiny_unfold "$TINY_LIMIT" $PY -m partonic.cli unfold --card cards/zw.yaml "${TINY[@]}" \
    --set model.refine.independent_events=20000 --output "$OUT/tiny_zw"
else
  if [ "$STAGE" = zw_full ]; then
    CARD=zw_full; JOB=unfold; JOB_LIMIT=${JOB_LIMIT:-500}
    [ "$SIZE" = tiny ] && SETS=${SETS:-"--set data.n_events=30000 --set model.refine.independent_events=20000 --set training.time_limit_s=30 --set evaluation.test_events=1000"}
    SETS=${SETS:-"--set data.n_events=800000 --set model.refine.independent_events=200000 --set training.time_limit_s=200"}
  fi
  CARD=${CARD:-drell_yan_full}; JOB=${JOB:-unweight}
  # shellcheck disable=SC2086  # SETS holds several arguments
  step "card_$CARD" "${JOB_LIMIT:-400}" $PY -m partonic.cli "$JOB" --card "cards/$CARD.yaml" ${SETS:-} --output "$OUT/$CARD"
fi
# one archive of what is small enough to come back (16 MiB a file): reports, metrics, logs;
# the plots stay behind (with them the archive was 35 MB on 2026-12-04)
rm -rf "$OUT/cache"
find "$OUT" \( -name '*.pt' -o -name '*.lhe' -o -name '*.lhe.gz' -o -name '*.h5' \) -delete
tar -czf /tmp/session.tar.gz -C "$OUT" --exclude='*.pdf' --exclude='*.png' . && mv /tmp/session.tar.gz "$OUT/"
find "$OUT" -mindepth 1 -maxdepth 1 ! -name session.tar.gz ! -name '*.json' ! -name steps.txt -exec rm -rf {} +
ls -la "$OUT"; cat "$OUT/steps.txt"
