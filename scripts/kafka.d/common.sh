# shellcheck shell=bash
# Apache Kafka from Maven Central: the pinned version, where its jars are cached, and how to run
# a class from them. Sourced by scripts/lib.sh, scripts/kafka and scripts/kafka.d/run-broker.

KAFKA_VERSION="4.3.1" # keep in step with pom.xml beside this file
KAFKA_D="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Outside the checkout, so that every clone and every CI run on a machine shares one download.
KAFKA_HOME="${KAFKA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/saga-orchestrator/kafka-$KAFKA_VERSION}"
export KAFKA_HOME

# Fetches the broker, the tools and a log4j2 back end once (Maven shows what it downloads).
ensure_kafka_jars() {
  if [[ -f "$KAFKA_HOME/libs/.complete" ]]; then
    return 0
  fi
  if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
    printf '\033[1m==> %s\033[0m\n' "Installing Java 17 and Maven from Debian's packages (Apache Kafka needs them)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless maven >&2
  fi
  printf '\033[1m==> %s\033[0m\n' "Fetching Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_HOME (once)" >&2
  rm -rf "$KAFKA_HOME/libs.partial"
  mkdir -p "$KAFKA_HOME"
  mvn -B -f "$KAFKA_D/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$KAFKA_HOME/libs.partial" 2>&1 |
    grep --line-buffered -E 'Downloaded from|ERROR|BUILD' |
    awk '/Downloaded from/ {n++; if (n % 100 == 0) {printf "    ... %d files downloaded\n", n; fflush()}; next} {print; fflush()}' >&2
  if [[ ! -f "$KAFKA_HOME/libs.partial/kafka_2.13-$KAFKA_VERSION.jar" ]]; then
    echo "fetching Apache Kafka $KAFKA_VERSION failed (see the Maven output above)" >&2
    return 1
  fi
  touch "$KAFKA_HOME/libs.partial/.complete"
  rm -rf "$KAFKA_HOME/libs"
  mv "$KAFKA_HOME/libs.partial" "$KAFKA_HOME/libs"
}

# kafka_java LOG4J2_CONFIG CLASS ARGS...: sets KAFKA_JAVA to the command line that runs a Kafka
# class from the cached jars; run it as "${KAFKA_JAVA[@]}" (or exec it).
kafka_java() {
  local log_config="$1" class="$2"
  shift 2
  # shellcheck disable=SC2206 # KAFKA_HEAP_OPTS and KAFKA_JVM_OPTS are lists of options
  # shellcheck disable=SC2034 # read by the callers
  KAFKA_JAVA=(java ${KAFKA_HEAP_OPTS:--Xms64m -Xmx256m} ${KAFKA_JVM_OPTS:-}
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$KAFKA_D/$log_config"
    -cp "$KAFKA_HOME/libs/*" "$class" "$@")
}
