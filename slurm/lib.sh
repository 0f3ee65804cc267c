# shellcheck shell=bash
# The launch logic shared by slurm/sdpg_*.sh: node roles, rollout servers + router, health wait,
# the trainer under srun, per-component logs, cleanup, and checkpoint-and-requeue on SIGUSR1.
#
# The sbatch scripts only set defaults and call `sdpg_main`; all node-count logic lives here, so the
# DRY_RUN=1 test on a one-node Slurm exercises exactly what a multi-node job runs.
#
# Inputs (environment; the scripts give defaults):
#   RECIPE            YAML recipe passed to the trainer (--config)
#   MODEL_PATH        HF model directory (servers load it; the trainer gets model.path=...)
#   RUN_DIR           trainer.run_dir; logs go to $RUN_DIR/logs/job_$SLURM_JOB_ID/
#   GPUS_PER_NODE     GPUs (DRY_RUN: CPU "slots") per node; one trainer task per GPU
#   ROLLOUT_MODE      dedicated (servers on their own nodes) | colocated (servers share training GPUs;
#                     the trainer gets rollout.colocated=true and hands them its memory between phases)
#   ROLLOUT_NODES     dedicated only: how many of the job's nodes (the last ones) run servers
#   ROLLOUT_TP        GPUs per rollout server; GPUS_PER_NODE / ROLLOUT_TP servers per rollout node
#   SERVER_BASE_PORT  first server port on each node (server i on a node uses BASE + i)
#   USE_ROUTER        1: put the servers behind sglang_router and give the trainer the router URL
#   ROUTER_PORT       router port on the first rollout host (default 30100; its Prometheus
#                     exporter takes ROUTER_METRICS_PORT, default ROUTER_PORT + 1)
#   HEALTH_TIMEOUT    seconds for every server (and the router) to answer /health, else exit 3
#   SERVER_CMD        command of one server, run by bash with SDPG_SERVER_PORT, SDPG_SERVER_HOST,
#                     SDPG_SERVER_BIND, SDPG_API_KEY_FILE, SDPG_MODEL_PATH and CUDA_VISIBLE_DEVICES
#                     set (default: SGLang, or the built-in dev server under DRY_RUN)
#   SERVER_BIND       address the servers and the router listen on when the job spans hosts
#                     (default 0.0.0.0); a job on one host always uses 127.0.0.1
#   TRAINER_CMD       trainer command; recipe and key=value overrides are appended
#   TRAINER_OVERRIDES extra key=value overrides (space separated) for the trainer
#   PYTHON            Python interpreter (default: python3)
#   DRY_RUN           1: same logic on CPU with a tiny model, synthetic data and the dev server
#   SDPG_FAKE_NODES   DRY_RUN only: pretend the job has this many nodes (the one real node repeated)
#   DRY_RUN_ASSETS    DRY_RUN only: where the tiny model and synthetic data are made (reused if present)
#
# Exit codes: 0 done (or requeued), 2 bad settings, 3 a rollout server or the router did not come
# up, anything else: the trainer's exit code.
#
# Security. Every job makes a fresh API key (256 bits, $RUN_DIR/secrets/rollout_api_key_job_<id>,
# mode 0600 in a 0700 directory: it must be on a file system all the job's nodes share). Servers and
# the router read it from that file (SGLang and the router through
# sdpg_mcore/rollout/sglang_entry/sdpg_keyed_main.py: they only take a key on their command line,
# which every user of a node can read in /proc); the trainer gets rollout.api_key_file. What the
# network still reaches when the job spans hosts (bound to SERVER_BIND, 0.0.0.0 by default):
#   - servers (SERVER_BASE_PORT + i) and router (ROUTER_PORT): everything needs the key except
#     /health*, /ready* and /metrics* (SGLang leaves probes and metrics open), which tell a caller
#     the server is up and how loaded it is, nothing about prompts or weights;
#   - the router's Prometheus exporter (ROUTER_METRICS_PORT): metrics, no key;
#   - with rollout.weight_sync=distributed, the trainer's weight-update rendezvous (a torch TCPStore
#     on a free port of trainer rank 0's node) and the NCCL/gloo connections the servers open to it:
#     torch.distributed has no authentication, so keep the job's nodes on a network only trusted
#     users reach (as for the trainer's own NCCL traffic); disk sync opens nothing.
# A job on one host binds 127.0.0.1 and reaches everything through loopback.

SDPG_BG_PIDS=()
SDPG_BG_NAMES=()
SDPG_REQUEUE=0
SDPG_TRAINER_PID=""

sdpg_log() { printf '[sdpg %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

sdpg_die() {
  local code=$1
  shift
  printf '[sdpg %(%H:%M:%S)T] ERROR: %s\n' -1 "$*" >&2
  exit "$code"
}

# ---- nodes and roles --------------------------------------------------------------------------
# Prints the job's hosts, one per line (SDPG_FAKE_NODES repeats the first one, DRY_RUN only).
sdpg_node_list() {
  [ -n "${SLURM_JOB_NODELIST:-}" ] || sdpg_die 2 "SLURM_JOB_NODELIST is empty: run this under sbatch/salloc"
  local hosts
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || sdpg_die 2 "scontrol show hostnames failed"
  if [ -n "${SDPG_FAKE_NODES:-}" ]; then
    [ "${DRY_RUN:-0}" = 1 ] || sdpg_die 2 "SDPG_FAKE_NODES is only allowed with DRY_RUN=1"
    local first i
    first=$(head -n1 <<<"$hosts")
    for ((i = 0; i < SDPG_FAKE_NODES; i++)); do echo "$first"; done
  else
    echo "$hosts"
  fi
}

# Splits NODES (array) into trainer nodes, server slots and the router; sets:
#   TRAIN_NODES (array), MASTER_ADDR, SERVER_HOSTS/SERVER_PORTS/SERVER_GPUS/SERVER_URLS (arrays, one
#   per server; the host is where srun starts it, the URL how it is reached), ROUTER_HOST,
#   SERVER_BIND, ROLLOUT_URLS (what the trainer is given), TRAIN_TASKS (one per training GPU).
sdpg_plan_roles() {
  local num_nodes=${#NODES[@]}
  local gpn=${GPUS_PER_NODE:?GPUS_PER_NODE must be set}
  local tp=${ROLLOUT_TP:?ROLLOUT_TP must be set}
  local base=${SERVER_BASE_PORT:-30000}
  ((num_nodes >= 1)) || sdpg_die 2 "the job has no nodes"
  ((gpn >= 1 && tp >= 1 && gpn % tp == 0)) ||
    sdpg_die 2 "ROLLOUT_TP=$tp must divide GPUS_PER_NODE=$gpn (one server spans ROLLOUT_TP GPUs of one node)"
  local rollout_nodes=()
  case "${ROLLOUT_MODE:-dedicated}" in
    dedicated)
      local nr=${ROLLOUT_NODES:-1}
      ((nr >= 1 && nr < num_nodes)) ||
        sdpg_die 2 "ROLLOUT_MODE=dedicated needs 1 <= ROLLOUT_NODES < nodes; got ROLLOUT_NODES=$nr with $num_nodes node(s) (use more nodes or ROLLOUT_MODE=colocated)"
      TRAIN_NODES=("${NODES[@]:0:num_nodes-nr}")
      rollout_nodes=("${NODES[@]:num_nodes-nr}")
      ;;
    colocated)
      TRAIN_NODES=("${NODES[@]}")
      rollout_nodes=("${NODES[@]}")
      ;;
    *) sdpg_die 2 "ROLLOUT_MODE=${ROLLOUT_MODE} is not one of: dedicated, colocated" ;;
  esac
  MASTER_ADDR=${TRAIN_NODES[0]}
  TRAIN_TASKS=$((${#TRAIN_NODES[@]} * gpn))
  SERVER_HOSTS=()
  SERVER_PORTS=()
  SERVER_GPUS=()
  local host s g gpus
  for host in "${rollout_nodes[@]}"; do
    for ((s = 0; s < gpn / tp; s++)); do
      gpus=""
      for ((g = s * tp; g < (s + 1) * tp; g++)); do gpus+="${gpus:+,}$g"; done
      SERVER_HOSTS+=("$host")
      SERVER_GPUS+=("$gpus")
    done
  done
  # Ports count up per host, so servers of repeated (DRY_RUN) hosts never collide.
  local i j n
  for ((i = 0; i < ${#SERVER_HOSTS[@]}; i++)); do
    n=0
    for ((j = 0; j < i; j++)); do [ "${SERVER_HOSTS[j]}" = "${SERVER_HOSTS[i]}" ] && n=$((n + 1)); done
    SERVER_PORTS+=($((base + n)))
  done
  ROUTER_HOST=${rollout_nodes[0]}
  # One host: everything on loopback, where no other machine reaches it; else by the hosts' names.
  local num_hosts
  num_hosts=$(printf '%s\n' "${TRAIN_NODES[@]}" "${rollout_nodes[@]}" | sort -u | wc -l)
  SERVER_ADDRS=()
  if ((num_hosts == 1)); then
    SERVER_BIND=127.0.0.1
    ROUTER_ADDR=127.0.0.1
    for ((i = 0; i < ${#SERVER_HOSTS[@]}; i++)); do SERVER_ADDRS+=(127.0.0.1); done
  else
    SERVER_BIND=${SERVER_BIND:-0.0.0.0}
    ROUTER_ADDR=$ROUTER_HOST
    SERVER_ADDRS=("${SERVER_HOSTS[@]}")
  fi
  SERVER_URLS=()
  for ((i = 0; i < ${#SERVER_HOSTS[@]}; i++)); do SERVER_URLS+=("http://${SERVER_ADDRS[i]}:${SERVER_PORTS[i]}"); done
  if [ "${USE_ROUTER:-1}" = 1 ]; then
    ROLLOUT_URLS="http://${ROUTER_ADDR}:${ROUTER_PORT:-30100}"
  else
    ROLLOUT_URLS=$(IFS=,; echo "${SERVER_URLS[*]}")
  fi
}

sdpg_print_roles() {
  local i
  echo "nodes: ${#NODES[@]} (${NODES[*]}); rollout: ${ROLLOUT_MODE:-dedicated}"
  echo "trainer: ${#TRAIN_NODES[@]} node(s) (${TRAIN_NODES[*]}) x ${GPUS_PER_NODE} tasks = ${TRAIN_TASKS} ranks; master ${MASTER_ADDR}:${MASTER_PORT:-?}"
  for ((i = 0; i < ${#SERVER_HOSTS[@]}; i++)); do
    echo "server $i: ${SERVER_URLS[i]} on ${SERVER_HOSTS[i]} gpus=${SERVER_GPUS[i]}"
  done
  if [ "${USE_ROUTER:-1}" = 1 ]; then echo "router: ${ROLLOUT_URLS}"; fi
  echo "servers listen on: ${SERVER_BIND}"
  echo "trainer rollout.urls: ${ROLLOUT_URLS}"
  if [ "${ROLLOUT_MODE:-dedicated}" = colocated ]; then
    echo "gpus: servers share the trainer's GPUs (rollout.colocated=true: memory handed over between phases)"
  else
    echo "gpus: servers on their own nodes (${SERVER_HOSTS[*]}), none on a trainer GPU"
  fi
}

# Prints the trainer's key=value overrides for the roles, one per line: where the rollout servers are
# and whether they share the trainer's GPUs. Colocated servers get weights from disk: a distributed
# (NCCL) group refuses two ranks on one GPU, and tensor handles need every server to see the sending
# rank's GPU, which each server's own CUDA_VISIBLE_DEVICES hides. TRAINER_OVERRIDES come later and win.
sdpg_trainer_overrides() {
  printf '%s\n' "trainer.run_dir=$RUN_DIR" "model.path=$MODEL_PATH" "rollout.backend=external" \
    "rollout.urls=[$ROLLOUT_URLS]" "rollout.api_key_file=$SDPG_API_KEY_FILE"
  if [ "${ROLLOUT_MODE:-dedicated}" = colocated ]; then
    printf '%s\n' "rollout.colocated=true" "rollout.weight_sync=disk"
  else
    printf '%s\n' "rollout.colocated=false"
  fi
}

# ---- background components ----------------------------------------------------------------------
# sdpg_on_host HOST CMD...: run CMD as a one-task job step on HOST (overlapping the trainer's step).
# Only for background use (sdpg_start_bg): `exec` makes the recorded PID srun's own, so cleanup's
# SIGTERM reaches srun, which forwards it to the step.
sdpg_on_host() {
  local host=$1
  shift
  exec srun --overlap --nodes=1 --ntasks=1 --nodelist="$host" --kill-on-bad-exit=1 "$@"
}

# sdpg_start_bg NAME LOG CMD...: start CMD in the background, logging to LOG; remembers the PID.
sdpg_start_bg() {
  local name=$1 log=$2
  shift 2
  "$@" >"$log" 2>&1 &
  SDPG_BG_PIDS+=($!)
  SDPG_BG_NAMES+=("$name")
  sdpg_log "started $name (pid $!, log $log)"
}

# sdpg_wait_healthy NAME URL PID LOG DEADLINE: poll URL/health until 200; exit 3 with a clear message
# when the process exits first or the deadline (epoch seconds) passes. Never hangs.
sdpg_wait_healthy() {
  local name=$1 url=$2 pid=$3 log=$4 deadline=$5
  while :; do
    if curl -sf -m 5 -o /dev/null "$url/health"; then
      sdpg_log "$name is healthy at $url"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null
      local rc=$?
      tail -n 20 "$log" >&2 2>/dev/null
      sdpg_die 3 "$name ($url) exited with code $rc before becoming healthy; see $log"
    fi
    if (($(date +%s) >= deadline)); then
      tail -n 20 "$log" >&2 2>/dev/null
      sdpg_die 3 "$name ($url) did not become healthy within ${HEALTH_TIMEOUT}s; see $log"
    fi
    sleep 2
  done
}

sdpg_cleanup() {
  local rc=$?
  trap - EXIT TERM INT
  local pid
  for pid in ${SDPG_TRAINER_PID:-} "${SDPG_BG_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null
  done
  local waited=0
  for pid in ${SDPG_TRAINER_PID:-} "${SDPG_BG_PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((waited < 20)); do
      sleep 0.5
      waited=$((waited + 1))
    done
    kill -KILL "$pid" 2>/dev/null
  done
  sdpg_log "cleanup done (exit $rc)"
  exit "$rc"
}

# SIGUSR1 from `#SBATCH --signal=B:USR1@300`: ask the trainer to checkpoint and stop, then requeue.
sdpg_on_usr1() {
  sdpg_log "SIGUSR1 (time limit near): telling the trainer to save (touch $SAVE_FILE, SIGUSR1), then requeue"
  SDPG_REQUEUE=1
  touch "$SAVE_FILE"
  if [ -n "$SDPG_TRAINER_PID" ]; then kill -USR1 "$SDPG_TRAINER_PID" 2>/dev/null; fi
}

# sdpg_new_key FILE: a fresh random key in FILE (mode 0600, its directory 0700), never on a command line.
sdpg_new_key() {
  local file=$1
  local dir
  dir=$(dirname "$file")
  (
    umask 077
    mkdir -p "$dir" && chmod 700 "$dir" || exit 1
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$file.tmp.$$" && echo >>"$file.tmp.$$" &&
      mv -f "$file.tmp.$$" "$file"
  ) || sdpg_die 2 "cannot write the API key file $file"
}

# ---- dry run assets --------------------------------------------------------------------------------
sdpg_dry_run_assets() {
  local dir=${DRY_RUN_ASSETS:-$RUN_DIR/dryrun_assets}
  mkdir -p "$dir"
  if [ ! -f "$dir/model/config.json" ]; then
    sdpg_log "DRY_RUN: making a tiny model in $dir/model"
    "$PYTHON" tools/make_tiny_model.py --out "$dir/model" --sft-steps "${DRY_RUN_SFT_STEPS:-0}" \
      >"$LOG_DIR/make_tiny_model.log" 2>&1 || sdpg_die 2 "tools/make_tiny_model.py failed; see $LOG_DIR/make_tiny_model.log"
  fi
  if [ ! -f "$dir/data/train.jsonl" ]; then
    "$PYTHON" tools/prepare_data.py --synthetic arithmetic --out "$dir/data" --format jsonl \
      >"$LOG_DIR/prepare_data.log" 2>&1 || sdpg_die 2 "tools/prepare_data.py failed; see $LOG_DIR/prepare_data.log"
  fi
  MODEL_PATH="$dir/model"
  DRY_RUN_TRAINER_OVERRIDES="data.train_files=[$dir/data/train.jsonl] eval.files=[] \
model.dtype=float32 model.recompute_activations=false model.transformer_impl=auto parallel.tp=1 parallel.pp=1 parallel.cp=1 parallel.dp=-1 \
parallel.sequence_parallel=false data.max_prompt_length=96 data.max_response_length=24 data.batch_prompts=2 \
data.mini_batch_prompts=2 data.micro_batch_tokens=256 rollout.n=2 rollout.weight_sync=disk \
rollout.request_timeout_s=120 trainer.total_steps=${DRY_RUN_STEPS:-2} trainer.save_interval=1 \
logging.tensorboard=false logging.progress=false"
}

# ---- the job -------------------------------------------------------------------------------------
sdpg_main() {
  PYTHON=${PYTHON:-python3}
  cd "$SDPG_ROOT" || sdpg_die 2 "cannot cd to the repository $SDPG_ROOT"
  export PYTHONPATH="$SDPG_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  [ -f "$RECIPE" ] || sdpg_die 2 "RECIPE=$RECIPE does not exist (relative paths are from $SDPG_ROOT)"
  mkdir -p "$RUN_DIR"
  LOG_DIR=${LOG_DIR:-$RUN_DIR/logs/job_${SLURM_JOB_ID:-local}}
  mkdir -p "$LOG_DIR"
  SAVE_FILE="$RUN_DIR/SAVE_AND_EXIT"
  rm -f "$SAVE_FILE"
  trap sdpg_cleanup EXIT
  trap 'exit 143' TERM INT
  trap sdpg_on_usr1 USR1

  mapfile -t NODES < <(sdpg_node_list)
  ((${#NODES[@]})) || exit 2
  MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
  sdpg_plan_roles
  export MASTER_ADDR MASTER_PORT
  sdpg_print_roles | tee "$LOG_DIR/roles.txt" >&2
  sdpg_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}; logs in $LOG_DIR"

  if [ "${DRY_RUN:-0}" = 1 ]; then
    sdpg_dry_run_assets
    # shellcheck disable=SC2016  # expanded later, by the bash that runs each server
    SERVER_CMD=${SERVER_CMD:-'exec "$PYTHON" -m sdpg_mcore.rollout.dev_server --model-path "$SDPG_MODEL_PATH" --host "$SDPG_SERVER_BIND" --port "$SDPG_SERVER_PORT" --api-key-file "$SDPG_API_KEY_FILE" --num-threads 1'}
  fi
  [ -n "${MODEL_PATH:-}" ] || sdpg_die 2 "MODEL_PATH is not set (HF model directory for servers and trainer)"
  if [ "${ROLLOUT_MODE:-dedicated}" = colocated ]; then
    # The trainer's default for colocated servers (rollout/placement.py COLOCATED_MEM_FRACTION): it
    # offloads its state while they generate, so its residue and SGLang's activations share the rest.
    SGLANG_MEM_FRACTION=${SGLANG_MEM_FRACTION:-0.5}
    SGLANG_ARGS=${SGLANG_ARGS:---enable-memory-saver}
  fi
  # shellcheck disable=SC2016  # expanded later, by the bash that runs each server
  SERVER_CMD=${SERVER_CMD:-'exec "$PYTHON" "$SDPG_KEYED_MAIN" --api-key-file "$SDPG_API_KEY_FILE" -m sglang.launch_server --model-path "$SDPG_MODEL_PATH" --host "$SDPG_SERVER_BIND" --port "$SDPG_SERVER_PORT" --tp-size "$ROLLOUT_TP" --mem-fraction-static "$SGLANG_MEM_FRACTION" $SGLANG_ARGS'}
  SDPG_API_KEY_FILE="$RUN_DIR/secrets/rollout_api_key_job_${SLURM_JOB_ID:-local}"
  sdpg_new_key "$SDPG_API_KEY_FILE"
  export PYTHON ROLLOUT_TP SDPG_MODEL_PATH="$MODEL_PATH" SGLANG_MEM_FRACTION="${SGLANG_MEM_FRACTION:-0.85}" \
    SGLANG_ARGS="${SGLANG_ARGS:-}" SDPG_API_KEY_FILE SDPG_SERVER_BIND="$SERVER_BIND" \
    SDPG_KEYED_MAIN="$SDPG_ROOT/sdpg_mcore/rollout/sglang_entry/sdpg_keyed_main.py"

  local deadline=$(($(date +%s) + ${HEALTH_TIMEOUT:-900}))
  local i
  for ((i = 0; i < ${#SERVER_HOSTS[@]}; i++)); do
    sdpg_start_bg "server_$i" "$LOG_DIR/server_$i.log" sdpg_on_host "${SERVER_HOSTS[i]}" \
      env CUDA_VISIBLE_DEVICES="${SERVER_GPUS[i]}" SDPG_SERVER_HOST="${SERVER_HOSTS[i]}" \
      SDPG_SERVER_PORT="${SERVER_PORTS[i]}" bash -c "$SERVER_CMD"
  done
  for ((i = 0; i < ${#SERVER_HOSTS[@]}; i++)); do
    sdpg_wait_healthy "rollout server $i" "${SERVER_URLS[i]}" \
      "${SDPG_BG_PIDS[i]}" "$LOG_DIR/server_$i.log" "$deadline"
  done
  if [ "${USE_ROUTER:-1}" = 1 ]; then
    sdpg_start_bg router "$LOG_DIR/router.log" sdpg_on_host "$ROUTER_HOST" \
      "$PYTHON" "$SDPG_KEYED_MAIN" --api-key-file "$SDPG_API_KEY_FILE" -m sglang_router.launch_router \
      --host "$SERVER_BIND" --port "${ROUTER_PORT:-30100}" --prometheus-host "$SERVER_BIND" \
      --prometheus-port "${ROUTER_METRICS_PORT:-$((${ROUTER_PORT:-30100} + 1))}" --policy "${ROUTER_POLICY:-cache_aware}" --worker-urls "${SERVER_URLS[@]}"
    sdpg_wait_healthy router "$ROLLOUT_URLS" "${SDPG_BG_PIDS[-1]}" "$LOG_DIR/router.log" "$deadline"
  fi

  local overrides
  mapfile -t overrides < <(sdpg_trainer_overrides)
  # shellcheck disable=SC2206  # word splitting of the override lists is intended
  overrides+=(${DRY_RUN_TRAINER_OVERRIDES:-} ${TRAINER_OVERRIDES:-})
  local train_hosts
  train_hosts=$(printf '%s\n' "${TRAIN_NODES[@]}" | sort -u | paste -sd,)
  local num_hosts
  num_hosts=$(tr ',' '\n' <<<"$train_hosts" | wc -l)
  sdpg_log "trainer: $TRAIN_TASKS task(s) on $train_hosts"
  # CUDA_DEVICE_MAX_CONNECTIONS=1: one hardware queue, so kernels start in issue order and Megatron's
  # TP/SP communication (and DDP's overlapped reduce / param gather) is scheduled ahead of the compute
  # that needs it (Megatron-LM and Megatron-Bridge set it for every TP>1 recipe).
  # shellcheck disable=SC2086  # TRAINER_CMD is a command line
  srun --overlap --nodes="$num_hosts" --ntasks="$TRAIN_TASKS" --ntasks-per-node=$((TRAIN_TASKS / num_hosts)) \
    --nodelist="$train_hosts" --kill-on-bad-exit=1 --output="$LOG_DIR/trainer_%t.log" \
    --export=ALL,SDPG_SAVE_FILE="$SAVE_FILE",WORLD_SIZE="$TRAIN_TASKS",CUDA_DEVICE_MAX_CONNECTIONS=1 \
    ${TRAINER_CMD:-$PYTHON -m sdpg_mcore.cli} --config "$RECIPE" "${overrides[@]}" &
  SDPG_TRAINER_PID=$!
  local rc
  while :; do
    wait "$SDPG_TRAINER_PID"
    rc=$?
    # A trap (USR1) interrupts `wait` with rc > 128 while the trainer still runs (or is a zombie).
    if kill -0 "$SDPG_TRAINER_PID" 2>/dev/null; then continue; fi
    break
  done
  SDPG_TRAINER_PID=""
  sdpg_log "trainer exited with code $rc"
  if [ "$SDPG_REQUEUE" = 1 ]; then
    sdpg_log "requeueing job $SLURM_JOB_ID (the next run resumes from the checkpoint)"
    scontrol requeue "$SLURM_JOB_ID" || sdpg_die 1 "scontrol requeue $SLURM_JOB_ID failed"
    exit 0
  fi
  exit "$rc"
}
