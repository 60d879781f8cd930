#!/usr/bin/env bash
# One prepared run of the benchmarks on a lent GPU machine (bare image with jax[cuda], flax, optax, orbax, torch,
# transformers; diffusers travels as wheels in .whl/, see bench/README.md "On a lent GPU").
#
#   bash bench/gpu_session.sh [unet] [train_step] [retarget] [-- extra bench flags, e.g. --no-compile]
#
# Each bench writes $OUT/<name>.json and $OUT/<name>.log (OUT defaults to bench_out/); a bench that fails or runs
# past PMF_BENCH_TIMEOUT seconds (default 280) is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

benches=() extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  benches+=("$1"); shift
done
[ ${#benches[@]} -eq 0 ] && benches=(unet train_step retarget)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } | tee "$OUT/device.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)" \
  | tee -a "$OUT/device.txt"
status=0
for name in "${benches[@]}"; do
  start=$(date +%s)
  timeout "${PMF_BENCH_TIMEOUT:-280}" python3 "bench/$name.py" --json "$OUT/$name.json" "${extra[@]}" \
    > "$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s"
  grep "^|" "$OUT/$name.log" || tail -n 20 "$OUT/$name.log"
  [ $rc -ne 0 ] && status=1
done
exit $status
