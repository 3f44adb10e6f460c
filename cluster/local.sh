#!/usr/bin/env bash
# Start, inspect and stop a single-node Ray cluster on this machine, for `ray job submit`.
#
#   cluster/local.sh start [options]   start the head (returns once the job server answers and
#                                      `ray status` reports the cluster's resources)
#   cluster/local.sh start --like aws  a rehearsal of cluster/aws.yaml (or gcp, or a config path):
#                                      Ray's autoscaler launches that config's node types as local
#                                      nodes (GPUs simulated, CPUs scaled, short idle timeout); see
#                                      docs/cluster.md and pipeline/cluster.py
#   cluster/local.sh env               print the exports the Ray CLI needs (eval "$(cluster/local.sh env)")
#   cluster/local.sh status            is it running, its ports, `ray status`
#   cluster/local.sh submit -- CMD...  ray job submit --working-dir <repo> -- CMD... (waits, streams logs)
#   cluster/local.sh stop              stop every process of this cluster (and only those)
#
# Options (start) and their environment defaults:
#   --state-dir DIR      ATSS_RAY_STATE_DIR   (/tmp/atss-ray-$UID)  token, logs, Ray temp dir, pid
#   --port N             ATSS_RAY_PORT        (6390)   GCS port
#   --dashboard-port N   ATSS_RAY_DASHBOARD_PORT (8275) dashboard + job server, bound to 127.0.0.1
#   --client-port N      ATSS_RAY_CLIENT_PORT (9981)   Ray Client server (outside the worker port range 10002-19999)
#   --agent-port N       ATSS_RAY_AGENT_PORT  (52375)  dashboard agent HTTP port
#   --num-cpus N         ATSS_RAY_NUM_CPUS    (all cores)
#   --object-store-mb N  ATSS_RAY_OBJECT_STORE_MB (512)
#   --timeout S          ATSS_RAY_START_TIMEOUT (90)   give up waiting for the job server
#   --like NAME|PATH     ATSS_RAY_LIKE        ()       rehearse aws | gcp | path/to/cluster.yaml
#   --idle-timeout S     ATSS_RAY_IDLE_TIMEOUT (20)    rehearsal: idle worker nodes go after S seconds
#   (stop)               ATSS_RAY_STOP_TIMEOUT (20)    grace before the remaining processes are killed
#   (status)             ATSS_RAY_STATUS_TIMEOUT (30)  wait for `ray status` to report resources
#
# Why it looks like this (see shared/RAY_NOTES.md section 4):
# * Token auth, always: a plain `ray start` turns it on only if ~/.ray/auth_token happens to exist.
#   The token is a file in the state dir, exported with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH
#   for `ray start` and every CLI call, so nothing is read from or written to ~/.ray.
# * `ray stop` would kill every Ray process of this user, including other people's test clusters.
#   Instead `ray start --head --block` runs as the leader of its own session (setsid); `stop` signals
#   exactly the processes of that session.
# * `--temp-dir` keeps Ray's "current cluster" address file out of /tmp/ray, so a plain
#   `ray.init()` elsewhere on this machine starts its own cluster instead of attaching to this one.
# * The venv's bin/ goes first on the cluster's PATH, so a job's `python` is the project's.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${ATSS_RAY_STATE_DIR:-/tmp/atss-ray-$(id -u)}"
PORT="${ATSS_RAY_PORT:-6390}"
DASHBOARD_PORT="${ATSS_RAY_DASHBOARD_PORT:-8275}"
CLIENT_PORT="${ATSS_RAY_CLIENT_PORT:-9981}"
AGENT_PORT="${ATSS_RAY_AGENT_PORT:-52375}"
NUM_CPUS="${ATSS_RAY_NUM_CPUS:-}"
OBJECT_STORE_MB="${ATSS_RAY_OBJECT_STORE_MB:-512}"
START_TIMEOUT="${ATSS_RAY_START_TIMEOUT:-90}"
LIKE="${ATSS_RAY_LIKE:-}"
IDLE_TIMEOUT="${ATSS_RAY_IDLE_TIMEOUT:-20}"
STOP_TIMEOUT="${ATSS_RAY_STOP_TIMEOUT:-20}"

die() { echo "local.sh: $*" >&2; exit 1; }

usage() { sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
# Bad input (options, --like): exit 2, before anything starts.
bad_input() { echo "local.sh: $*" >&2; exit 2; }

find_ray() {
    if [[ -n "${RAY:-}" ]]; then
        [[ -x "$RAY" ]] || die "RAY=$RAY is not an executable"
        echo "$RAY"
    elif [[ -x "$REPO/.venv/bin/ray" ]]; then
        echo "$REPO/.venv/bin/ray"
    elif command -v ray >/dev/null 2>&1; then
        command -v ray
    else
        die "the ray CLI was not found (make setup creates $REPO/.venv/bin/ray, or set RAY=/path/to/ray)"
    fi
}

parse_opts() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --state-dir) STATE_DIR="$2"; shift 2 ;;
            --port) PORT="$2"; shift 2 ;;
            --dashboard-port) DASHBOARD_PORT="$2"; shift 2 ;;
            --client-port) CLIENT_PORT="$2"; shift 2 ;;
            --agent-port) AGENT_PORT="$2"; shift 2 ;;
            --num-cpus) NUM_CPUS="$2"; shift 2 ;;
            --object-store-mb) OBJECT_STORE_MB="$2"; shift 2 ;;
            --timeout) START_TIMEOUT="$2"; shift 2 ;;
            --like) [[ $# -ge 2 ]] || bad_input "--like needs a value: aws, gcp or a cluster config path"
                    LIKE="$2"; shift 2 ;;
            --idle-timeout) IDLE_TIMEOUT="$2"; shift 2 ;;
            --) shift; REST=("$@"); return ;;
            *) bad_input "unknown option '$1' (see: cluster/local.sh help)" ;;
        esac
    done
}

check_int() { [[ "$2" =~ ^[0-9]+$ ]] || bad_input "$1 must be a positive integer, got '$2'"; }

# The state dir's cluster.env pins what `start` used, so status/env/stop need only the state dir.
load_state() {
    [[ -f "$STATE_DIR/cluster.env" ]] || return 1
    # shellcheck disable=SC1091
    source "$STATE_DIR/cluster.env"
}

# pid of the session leader if it is still the process we started (guards against pid reuse).
leader_pid() {
    local pid start
    [[ -f "$STATE_DIR/ray.pid" ]] || return 1
    read -r pid start < "$STATE_DIR/ray.pid"
    [[ -d "/proc/$pid" ]] || return 1
    [[ "$(cut -d' ' -f22 "/proc/$pid/stat" 2>/dev/null)" == "$start" ]] || return 1
    echo "$pid"
}

# Every live process of the cluster's session. Linux never hands out a pid while it is still some
# process's session id, so while any of them lives the id cannot belong to anybody else; a live
# process with the leader's pid but another start time means the session is long gone.
session_pids() {
    local sid start
    [[ -f "$STATE_DIR/ray.pid" ]] || return 0
    read -r sid start < "$STATE_DIR/ray.pid"
    if [[ -d "/proc/$sid" ]] && [[ "$(cut -d' ' -f22 "/proc/$sid/stat" 2>/dev/null)" != "$start" ]]; then
        return 0
    fi
    ps -e -o pid=,sid= | awk -v s="$sid" -v me="$$" '$2 == s && $1 != me {print $1}'
}

print_env() {
    cat <<EOF
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token
export RAY_ADDRESS=127.0.0.1:$PORT
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export PATH=$(dirname "$(find_ray)"):\$PATH
EOF
}

cli_env() {
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE_DIR/auth_token"
    export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
    export PATH="$(dirname "$(find_ray)"):$PATH"
}

cmd_start() {
    local ray pid start_time deadline
    parse_opts "$@"
    for v in PORT DASHBOARD_PORT CLIENT_PORT AGENT_PORT OBJECT_STORE_MB START_TIMEOUT IDLE_TIMEOUT; do
        check_int "$v" "${!v}"
    done
    [[ -z "$NUM_CPUS" ]] || check_int NUM_CPUS "$NUM_CPUS"
    ray="$(find_ray)"
    mkdir -p "$STATE_DIR"
    STATE_DIR="$(cd "$STATE_DIR" && pwd)"
    if pid="$(leader_pid)"; then
        die "a cluster is already running from $STATE_DIR (pid $pid); run: cluster/local.sh stop"
    fi
    # Ray's unix sockets live under the temp dir; their paths must stay under 107 bytes.
    (( ${#STATE_DIR} <= 40 )) || die "state dir path too long for Ray's sockets (max 40 chars): $STATE_DIR"
    local rehearsal_env=()
    if [[ -n "$LIKE" ]]; then
        rehearsal_start_args || exit $?
    fi

    umask 077
    if [[ ! -s "$STATE_DIR/auth_token" ]]; then
        od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$STATE_DIR/auth_token"
    fi
    cat > "$STATE_DIR/cluster.env" <<EOF
PORT=$PORT
DASHBOARD_PORT=$DASHBOARD_PORT
CLIENT_PORT=$CLIENT_PORT
AGENT_PORT=$AGENT_PORT
LIKE=$LIKE
EOF
    local args=(start --head --block --disable-usage-stats
        --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT"
        --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$AGENT_PORT"
        --object-store-memory $((OBJECT_STORE_MB * 1024 * 1024))
        --temp-dir "$STATE_DIR/ray")
    [[ -z "$NUM_CPUS" ]] || args+=(--num-cpus "$NUM_CPUS")
    [[ -z "$LIKE" ]] || args+=(--autoscaling-config "$STATE_DIR/autoscaling.yaml")

    # Environment of every cluster process (and so of every job and Train worker; the rehearsal's
    # nodes are started by the autoscaler on the head, so they inherit it too).
    (
        [[ ${#rehearsal_env[@]} -eq 0 ]] || export "${rehearsal_env[@]}"
        export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE_DIR/auth_token"
        export PATH="$(dirname "$ray"):$PATH"
        export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.2}"
        export RAY_TRAIN_ENABLE_PRINT_PATCH="${RAY_TRAIN_ENABLE_PRINT_PATCH:-0}"
        # A loaded 2-core machine can take longer than Ray's 30 s to register a raylet.
        export RAY_raylet_start_wait_time_s="${RAY_raylet_start_wait_time_s:-120}"
        unset RAY_ADDRESS RAY_API_SERVER_ADDRESS
        cd "$STATE_DIR"
        exec setsid "$ray" "${args[@]}" > "$STATE_DIR/ray-start.log" 2>&1 < /dev/null
    ) &
    pid=$!
    # setsid execs in place (the subshell is no group leader), so $! becomes the session leader
    # once the exec has happened; until then it is still the subshell in our session.
    start_time="$(cut -d' ' -f22 "/proc/$pid/stat" 2>/dev/null)" || die "ray start exited at once; see $STATE_DIR/ray-start.log"
    echo "$pid $start_time" > "$STATE_DIR/ray.pid"
    for _ in $(seq 50); do
        [[ "$(cut -d' ' -f6 "/proc/$pid/stat" 2>/dev/null)" == "$pid" ]] && break
        sleep 0.1
    done
    [[ "$(cut -d' ' -f6 "/proc/$pid/stat" 2>/dev/null)" == "$pid" ]] \
        || die "ray start (pid $pid) did not become a session leader; see $STATE_DIR/ray-start.log"

    deadline=$((SECONDS + START_TIMEOUT))
    cli_env
    until curl -s -o /dev/null "http://127.0.0.1:$DASHBOARD_PORT/api/version" \
            && "$ray" job list --address "http://127.0.0.1:$DASHBOARD_PORT" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$STATE_DIR/ray-start.log" >&2 || true
            cmd_stop >/dev/null 2>&1 || true
            die "ray start exited before the job server came up; log: $STATE_DIR/ray-start.log"
        fi
        if (( SECONDS >= deadline )); then
            tail -n 30 "$STATE_DIR/ray-start.log" >&2 || true
            cmd_stop >/dev/null 2>&1 || true
            die "the job server did not answer on 127.0.0.1:$DASHBOARD_PORT within ${START_TIMEOUT}s"
        fi
        sleep 1
    done
    # The autoscaler monitor publishes the first cluster status a few seconds after the job server
    # answers; until then `ray status` prints "No cluster status" and the CPUs look missing.
    until ray_status_ready "$ray"; do
        if ! kill -0 "$pid" 2>/dev/null || (( SECONDS >= deadline )); then
            tail -n 30 "$STATE_DIR/ray-start.log" >&2 || true
            cmd_stop >/dev/null 2>&1 || true
            die "the cluster did not report its resources (ray status) within ${START_TIMEOUT}s"
        fi
        sleep 1
    done
    [[ -z "$LIKE" ]] || sed -n 's/^# //p' "$STATE_DIR/rehearsal.out"
    echo "Ray head running (pid $pid). Dashboard and job server: http://127.0.0.1:$DASHBOARD_PORT"
    echo "State, token and logs: $STATE_DIR"
    echo "For the Ray CLI in this shell: eval \"\$(cluster/local.sh env)\""
}

# The rehearsal (--like): pipeline/cluster.py derives the autoscaling config from the cloud config
# and checks it (unknown name, no GPU node type, a node type too small for the largest trial: exit 2,
# nothing started). The head runs Ray's fake multi-node provider under autoscaler v2 (as
# ray.cluster_utils.AutoscalingCluster sets it up); v1 left launched nodes "uninitialized".
rehearsal_start_args() {
    local python ip out line
    python="$(dirname "$(find_ray)")/python"
    [[ -x "$python" ]] || python="$(command -v python3)"
    ip="$(hostname -I 2>/dev/null | awk '{print $1}')"
    ip="${ip:-127.0.0.1}"
    (cd "$REPO" && "$python" -m pipeline.cluster rehearsal --like "$LIKE" --gcs-address "$ip:$PORT" \
        --cores "${NUM_CPUS:-$(getconf _NPROCESSORS_ONLN)}" --idle-timeout-s "$IDLE_TIMEOUT" \
        --out "$STATE_DIR/autoscaling.yaml") > "$STATE_DIR/rehearsal.out" || return $?
    while IFS= read -r line; do
        case "$line" in
            HEAD_CPUS=*) NUM_CPUS="${line#HEAD_CPUS=}" ;;
            ATSS_*=*) rehearsal_env+=("$line") ;;
        esac
    done < "$STATE_DIR/rehearsal.out"
    # The head node's id must be the one the config names (autoscaler v2 matches them).
    # PYTHONPATH: the autoscaler on the head imports the node provider from pipeline/.
    rehearsal_env+=(PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
        RAY_FAKE_CLUSTER=1 RAY_enable_autoscaler_v2=1 AUTOSCALER_UPDATE_INTERVAL_S=1
        RAY_CLOUD_INSTANCE_ID=fffffffffffffffffffffffffffffffffffffffffffffffffff00000
        RAY_OVERRIDE_NODE_ID_FOR_TESTING=fffffffffffffffffffffffffffffffffffffffffffffffffff00000
        # All simulated nodes share this machine's cores: one thread per worker process.
        OMP_NUM_THREADS=1
        # Every simulated node's memory monitor would see the whole machine's memory (other
        # nodes and other users included) and kill workers for it: a real node sees only its own.
        RAY_memory_monitor_refresh_ms=0)
}

# True once `ray status` reports the cluster's resources (its output is left in $STATUS_OUT).
ray_status_ready() {
    STATUS_OUT="$("$1" status --address "127.0.0.1:$PORT" 2>&1)" || return 1
    [[ "$STATUS_OUT" != *"No cluster status"* ]]
}

# Waits up to $1 seconds for the session to be empty (zombies included: they go once reaped).
wait_session_empty() {
    local deadline=$((SECONDS + $1))
    while [[ -n "$(session_pids)" ]] && (( SECONDS < deadline )); do
        sleep 0.5
    done
    [[ -z "$(session_pids)" ]]
}

cmd_stop() {
    local pid pids
    parse_opts "$@"
    load_state || true
    if [[ -z "$(session_pids)" ]]; then
        rm -f "$STATE_DIR/ray.pid"
        echo "no local cluster running from $STATE_DIR"
        return 0
    fi
    # `ray start --block` stops its own processes on SIGTERM (about 6 s when idle); signalling
    # every process at once instead leaves parents and children waiting on each other. Whatever
    # is left after that (a busy machine, a stuck worker) gets SIGTERM, then SIGKILL.
    if pid="$(leader_pid)"; then
        kill -TERM "$pid" 2>/dev/null || true
        wait_session_empty "$STOP_TIMEOUT" && { stopped; return 0; }
    fi
    kill -TERM $(session_pids) 2>/dev/null || true
    wait_session_empty 10 && { stopped; return 0; }
    pids="$(session_pids)"
    echo "local.sh: killing what is left: $(echo $pids)" >&2
    kill -KILL $pids 2>/dev/null || true
    wait_session_empty 10 || die "processes still alive after SIGKILL: $(echo $(session_pids))"
    stopped
}

stopped() {
    rm -f "$STATE_DIR/ray.pid"
    echo "local cluster stopped ($STATE_DIR)"
}

cmd_status() {
    local pid
    parse_opts "$@"
    load_state || die "no local cluster state in $STATE_DIR"
    if ! pid="$(leader_pid)"; then
        echo "stopped ($STATE_DIR)"
        return 3
    fi
    echo "running: pid $pid, GCS 127.0.0.1:$PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT, state $STATE_DIR"
    cli_env
    local ray deadline=$((SECONDS + ${ATSS_RAY_STATUS_TIMEOUT:-30}))
    ray="$(find_ray)"
    until ray_status_ready "$ray"; do
        if (( SECONDS >= deadline )); then
            echo "$STATUS_OUT"
            echo "local.sh: ray status gave no cluster resources within ${ATSS_RAY_STATUS_TIMEOUT:-30}s" >&2
            return 4
        fi
        sleep 1
    done
    echo "$STATUS_OUT"
}

cmd_env() {
    parse_opts "$@"
    load_state || die "no local cluster state in $STATE_DIR (run: cluster/local.sh start)"
    print_env
}

cmd_submit() {
    REST=()
    parse_opts "$@"
    load_state || die "no local cluster state in $STATE_DIR (run: cluster/local.sh start)"
    leader_pid >/dev/null || die "the local cluster is not running (run: cluster/local.sh start)"
    [[ ${#REST[@]} -gt 0 ]] || die "usage: cluster/local.sh submit -- python jobs/ablation.py --smoke"
    cli_env
    cd "$REPO"
    exec "$(find_ray)" job submit --address "http://127.0.0.1:$DASHBOARD_PORT" \
        --working-dir . --runtime-env cluster/runtime_env.yaml -- "${REST[@]}"
}

case "${1:-help}" in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    env) shift; cmd_env "$@" ;;
    submit) shift; cmd_submit "$@" ;;
    help|-h|--help) usage ;;
    *) usage >&2; exit 2 ;;
esac
