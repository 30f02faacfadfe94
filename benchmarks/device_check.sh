#!/usr/bin/env bash
# Every accelerator figure of the project in one call on one card: the generation benchmark with its diffusers
# baseline (eager and torch.compile), the precision benchmark, and the step profile. Everything lands in $OUT:
#   <device>-<date>.json, <device>-<date>-precision.json   -> commit into benchmarks/results/
#   bench.log, precision.log, profile.txt, step.xplane.pb, profile.log
# Run from anywhere; svd_jax and convert are imported from this checkout. diffusers (torch's baseline) comes from
# wheels in $WHEELS (default .whl/) when it is not importable. Usage:
#   OUT=/some/folder bash benchmarks/device_check.sh            # full size (about 15 min on an H200: size parts)
#   OUT=/tmp/check SIZE=tiny bash benchmarks/device_check.sh    # the same path in minutes on a CPU
# PARTS (default "bench precision profile") picks parts; BENCH_ARGS, PRECISION_ARGS and PROFILE_ARGS pass options.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/device-check}
SIZE=${SIZE:-full}
PARTS=${PARTS:-bench precision profile}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  "$PYTHON" -c "import diffusers" || echo "diffusers is not importable (no wheel in $WHEELS): baselines will fail"
fi
"$PYTHON" - <<'EOF'
import importlib.metadata as metadata
for name in ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "missing")
EOF

status=0
for part in $PARTS; do
  echo "== $part ($(date -u +%H:%M:%S))"
  case $part in
    bench) "$PYTHON" benchmarks/bench_generate.py --size "$SIZE" --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" ;;
    precision) "$PYTHON" benchmarks/unet_precision.py --size "$SIZE" --out "$OUT" ${PRECISION_ARGS:-} 2>&1 \
                 | tee "$OUT/precision.log" ;;
    profile) "$PYTHON" benchmarks/profile_step.py --size "$SIZE" --out "$OUT" ${PROFILE_ARGS:-} 2>&1 \
               | tee "$OUT/profile.log" ;;
    *) echo "unknown part $part (bench, precision, profile)"; false ;;
  esac || status=1
done
echo "== done ($(date -u +%H:%M:%S)), exit $status"
ls -la "$OUT"
exit $status
