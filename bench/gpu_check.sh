#!/usr/bin/env bash
# The one prepared check for the lent GPU machine (H100/H200): every GPU-marked test, then the benchmark.
#
#   bash bench/gpu_check.sh          # from any folder; results under $OUT (bench/out when OUT is unset)
#
# Nothing is fetched: wheels carried in .whl/ (lion-pytorch, say) are installed to /tmp/site first.
# Writes environment.txt, gpu_tests.log, gpu_bench.log, gpu_bench.json and gpu_bench.md under $OUT and
# prints the benchmark's Markdown table last. Budget: tests 240 s, benchmark 120 s (under 6 minutes).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
        --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/environment.txt"

timeout 240 "$PY" -m pytest -q -m gpu --continue-on-collection-errors -p no:cacheprovider tests/ 2>&1 \
    | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 120 "$PY" bench/gpu_bench.py --out "$OUT" >"$OUT/gpu_bench.log" 2>&1
bench_rc=$?

echo
echo "gpu tests: $(tail -n 1 "$OUT/gpu_tests.log") (exit $tests_rc)"
echo "benchmark: exit $bench_rc$( [ "$bench_rc" = 124 ] && echo ' (timed out: the table holds the workloads done)')"
grep -E "^gpu_bench:|Error" "$OUT/gpu_bench.log" | tail -n 5
if [ -s "$OUT/gpu_bench.md" ]; then
    echo
    cat "$OUT/gpu_bench.md"
fi
exit $(( tests_rc != 0 || bench_rc != 0 ))
