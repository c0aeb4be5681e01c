#!/usr/bin/env bash
# One prepared check for a session that is lent a GPU (15 minutes of device time per
# session, start-up included, 10 minutes per call), in two stages of under 9 minutes, each
# step under its own time limit so that one slow step cannot eat the others:
#   STAGE=1 (default): every benchmark on CUDA (the GPU throughput targets of the three
#           jobs), then `partonic unweight` end to end with cards/drell_yan.yaml;
#   STAGE=2: `partonic generate` with cards/ttbar.yaml and `unfold` with cards/zw.yaml.
# Results (JSON, logs, report.json) go to $OUT.
#
# From the repository root of this machine:
#   ../shared/device/wheels.sh            # Python 3.12 wheels the device image lacks, in .whl/
#   run tool: carry [".whl"], timeout_s 580, command "bash benchmarks/device_session.sh"
# A CPU dry run with tiny sizes: SIZE=tiny STAGE=1 OUT=runs/device_dry bash benchmarks/device_session.sh
set -uo pipefail
OUT=${OUT:-runs/device_session}
SIZE=${SIZE:-full}
STAGE=${STAGE:-1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src
fi
PY=${PY:-python3}
if [ "$SIZE" = tiny ]; then
  PDF_POINTS=20000; DY_EVENTS=100000; GEN_EVENTS=100000; UNF_SAMPLES=100000; PYTHIA=500; STEPS=10; BENCH_LIMIT=240; JOB_LIMIT=400
  JOB_SETS=(--set training.epochs=1 --set data.n_events=20000)
else
  PDF_POINTS=10000000; DY_EVENTS=10000000; GEN_EVENTS=10000000; UNF_SAMPLES=10000000; PYTHIA=3000; STEPS=100; BENCH_LIMIT=90; JOB_LIMIT=240
  JOB_SETS=()
fi

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, partonic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'partonic', partonic.__file__)"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# step NAME SECONDS COMMAND...: run one step under its limit, keep its log, note its exit status and time
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/steps.txt"
  tail -n 3 "$OUT/$name.log"
}

export PARTONIC_CACHE=$OUT/cache
if [ "$STAGE" = 1 ]; then
  # ---- throughput (JSON) ----------------------------------------------------------
  step bench_pdf "$BENCH_LIMIT" $PY benchmarks/pdf_throughput.py --points "$PDF_POINTS" --out "$OUT/pdf.json"
  step bench_unweight "$BENCH_LIMIT" $PY benchmarks/unweight_throughput.py --events "$DY_EVENTS" --out "$OUT/unweight.json"
  step bench_generate "$BENCH_LIMIT" $PY benchmarks/generate_throughput.py --card cards/ttbar_full.yaml --events "$PYTHIA" \
    --steps "$STEPS" --generate "$GEN_EVENTS" --out "$OUT/generate.json"
  step bench_unfold "$BENCH_LIMIT" $PY benchmarks/unfold_throughput.py --card cards/zw_full.yaml --events "$PYTHIA" \
    --steps "$STEPS" --samples "$UNF_SAMPLES" --out "$OUT/unfold.json"
  step job_unweight "$JOB_LIMIT" $PY -m partonic.cli unweight --card cards/drell_yan.yaml "${JOB_SETS[@]}" --output "$OUT/drell_yan"
else
  step job_generate "$JOB_LIMIT" $PY -m partonic.cli generate --card cards/ttbar.yaml "${JOB_SETS[@]}" --output "$OUT/ttbar"
  step job_unfold "$JOB_LIMIT" $PY -m partonic.cli unfold --card cards/zw.yaml "${JOB_SETS[@]}" --output "$OUT/zw"
fi
for run in drell_yan ttbar zw; do
  if [ -f "$OUT/$run/report.json" ]; then cp "$OUT/$run/report.json" "$OUT/report_$run.json"; fi
done
# keep only what is small enough to come back: reports, metrics, logs, plots
rm -rf "$OUT/cache" "$OUT"/*/checkpoint.pt "$OUT"/*/model.pt "$OUT"/*/*.lhe "$OUT"/*/*.lhe.gz "$OUT"/*/*.h5
cat "$OUT/steps.txt"
