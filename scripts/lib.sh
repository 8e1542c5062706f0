# Shared by scripts/demo and scripts/test: make sure Postgres and the Kafka-compatible broker are
# installed and running. Sourced, not run.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
PGHOST_ADDR="${PGHOST_ADDR:-127.0.0.1}"
PGPORT_NUM="${PGPORT_NUM:-5432}"
KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
TANSU_VERSION="0.6.0"
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
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  say "Starting PostgreSQL $version"
  # Local development trusts loopback connections, as the project's machines do.
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  if ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
  wait_port "$PGHOST_ADDR" "$PGPORT_NUM" 30 PostgreSQL
}

ensure_tansu_installed() {
  if command -v tansu >/dev/null 2>&1; then
    return 0
  fi
  say "Building the Tansu broker (cargo install tansu $TANSU_VERSION): about 20 minutes on 2 cores, once."
  say "Progress is shown below; it is installed into ~/.cargo/bin and reused afterwards."
  cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore 2>&1 |
    grep --line-buffered -E 'Compiling|Installed|error' |
    awk '/Compiling/ {n++; if (n % 25 == 0) printf "    ... %d crates compiled (latest: %s)\n", n, $2; fflush(); next} {print; fflush()}' >&2
  command -v tansu >/dev/null 2>&1 || { echo "tansu failed to install" >&2; return 1; }
}

ensure_broker() {
  local host="${KAFKA_BROKERS%%:*}" port="${KAFKA_BROKERS##*:}"
  port="${port%%,*}"
  if port_open "$host" "$port"; then
    return 0
  fi
  ensure_tansu_installed
  say "Starting the Tansu broker on $host:$port (in memory; log: $STATE_DIR/logs/tansu.log)"
  nohup tansu broker \
    --listener-url "tcp://$host:$port" \
    --advertised-listener-url "tcp://$host:$port" \
    --storage-engine memory://tansu/ >"$STATE_DIR/logs/tansu.log" 2>&1 &
  echo $! >"$STATE_DIR/tansu.pid"
  wait_port "$host" "$port" 30 "the Tansu broker"
}

# Consumer settings for a local broker: group joins in ~2 s instead of ~24 s, and a short fetch
# wait, since the local broker holds a fetch for its full wait even when data is there.
# Production leaves librdkafka's defaults (or sets its own through the same variable).
export KAFKA_CONSUMER_PROPERTIES="${KAFKA_CONSUMER_PROPERTIES:-session.timeout.ms=2000,heartbeat.interval.ms=500,max.poll.interval.ms=10000,fetch.wait.max.ms=10}"
