"""What every rendered overlay of k8s/ must hold, beyond the schemas (scripts/check-deploy):
pods locked down, probes that fit /ready, one migration Job per service and no migrating
replica, a disruption budget per Deployment, no replica count fighting an autoscaler, every
service scraped, topic declarations that match what the services would create, every
container's command a binary that the image (the Dockerfile's last stage) has, and every
environment variable a setting of the binary it is given to (a misspelt one is otherwise
ignored without a word).

Usage: policy.py RENDERED.yaml DEFINITIONS_DIR DOCKERFILE SETTINGS_DIR
SETTINGS_DIR holds BINARY.txt per binary: the environment variables its --help lists.
"""

import json
import pathlib
import re
import sys

import yaml

import cook_context  # the Dockerfile's reader, beside this file

PART_OF = "app.kubernetes.io/part-of"
# /ready checks Postgres, then Kafka, each bounded to 2 s (participants/runtime/src/health.rs).
READY_WORST_SECONDS = 4

problems = []


def problem(what):
    problems.append(what)


def ours(doc):
    return doc.get("metadata", {}).get("labels", {}).get(PART_OF) == "order-saga"


def check_pod(where, spec):
    if spec.get("automountServiceAccountToken") is not False:
        problem(f"{where}: mounts a service account token")
    if spec.get("serviceAccountName", "default") == "default":
        problem(f"{where}: runs as the default ServiceAccount")
    pod = spec.get("securityContext", {})
    if pod.get("runAsNonRoot") is not True:
        problem(f"{where}: runAsNonRoot is not set")
    if not isinstance(pod.get("runAsUser"), int) or pod["runAsUser"] == 0:
        problem(f"{where}: no numeric non-root runAsUser")
    if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problem(f"{where}: seccomp profile is not RuntimeDefault")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        name = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            problem(f"{name}: privilege escalation allowed")
        if sc.get("readOnlyRootFilesystem") is not True:
            problem(f"{name}: root filesystem writable")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problem(f"{name}: capabilities not all dropped")
        resources = c.get("resources", {})
        if "memory" not in resources.get("limits", {}) or "cpu" not in resources.get("requests", {}):
            problem(f"{name}: no memory limit or cpu request")


def image_binaries(dockerfile):
    """The paths the Dockerfile's last stage copies from other stages into /usr/local/bin/."""
    paths = set()
    for keyword, rest in cook_context.stages(dockerfile)[-1]:
        words = rest.split()
        if keyword == "COPY" and any(w.startswith("--from=") for w in words) and words[-1] == "/usr/local/bin/":
            paths |= {"/usr/local/bin/" + w.rsplit("/", 1)[-1] for w in words[:-1] if not w.startswith("--")}
    return paths


def check_command(where, container, binaries):
    command = container.get("command") or []
    if not command or command[0] not in binaries:
        problem(f"{where}: runs {command[:1]}, which the image does not have (it has {sorted(binaries)})")


def settings_of(settings_dir, container):
    """The environment variables the container's binary reads (from its --help), or None."""
    command = container.get("command") or []
    path = pathlib.Path(settings_dir) / (pathlib.PurePosixPath(command[0]).name + ".txt") if command else None
    return set(path.read_text().split()) if path and path.exists() else None


def check_settings(where, container, settings_dir, shared):
    """A container's own variables must be its binary's settings; a shared ConfigMap's keys are
    collected in `shared` (ConfigMap name -> settings of the binaries that load it)."""
    known = settings_of(settings_dir, container)
    if known is None:
        problem(f"{where}: no --help settings for {container.get('command')}")
        return
    for variable in container.get("env", []):
        if variable["name"] not in known:
            problem(f"{where}: sets {variable['name']}, which is not a setting of {container['command'][0]}")
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            shared.setdefault(source["configMapRef"]["name"], set()).update(known)
        else:
            problem(f"{where}: envFrom {source} is not checked against the binary's settings")


def main(rendered, definitions, dockerfile, settings_dir):
    binaries = image_binaries(dockerfile)
    shared = {}
    if not binaries:
        problem(f"{dockerfile}: its last stage copies no binary into /usr/local/bin/")
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = [d for d in by_kind.get("Deployment", []) if ours(d)]
    jobs = [d for d in by_kind.get("Job", []) if ours(d)]
    if len(deployments) < 6:
        problem(f"only {len(deployments)} Deployments of the order saga")

    config = next(c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == "saga-config")["data"]
    if config.get("DATABASE_MIGRATE") != "false":
        problem("saga-config: replicas migrate at start-up (DATABASE_MIGRATE is not false)")

    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind.get("HorizontalPodAutoscaler", [])}
    budgets = by_kind.get("PodDisruptionBudget", [])
    services = [s for s in by_kind.get("Service", []) if ours(s)]
    for d in deployments:
        name = d["metadata"]["name"]
        where = f"Deployment {name}"
        spec = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        check_pod(where, spec)
        container = spec["containers"][0]
        check_command(where, container, binaries)
        check_settings(where, container, settings_dir, shared)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe not in container:
                problem(f"{where}: no {probe}")
        ready = container.get("readinessProbe", {})
        if ready.get("httpGet", {}).get("path") != "/ready" or ready.get("timeoutSeconds", 1) <= READY_WORST_SECONDS:
            problem(f"{where}: the readiness probe is not /ready with a timeout above {READY_WORST_SECONDS} s")
        if name in scaled and "replicas" in d["spec"]:
            problem(f"{where}: sets replicas while an autoscaler owns them")
        if not any(
            all(labels.get(k) == v for k, v in b["spec"]["selector"]["matchLabels"].items()) for b in budgets
        ):
            problem(f"{where}: no PodDisruptionBudget")
        if not any(
            j["spec"]["template"]["spec"]["containers"][0].get("command") == container.get("command")
            and j["spec"]["template"]["spec"]["containers"][0].get("args") == ["migrate"]
            and j["spec"]["template"]["spec"]["containers"][0].get("image") == container.get("image")
            for j in jobs
        ):
            problem(f"{where}: no migration Job running its binary's migrate with its image")
        if not any(
            all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
            and any(p["name"] == "metrics" for p in s["spec"]["ports"])
            for s in services
        ):
            problem(f"{where}: no Service with a metrics port labelled {PART_OF}")
    for j in jobs:
        check_pod(f"Job {j['metadata']['name']}", j["spec"]["template"]["spec"])
        check_command(f"Job {j['metadata']['name']}", j["spec"]["template"]["spec"]["containers"][0], binaries)
        check_settings(f"Job {j['metadata']['name']}", j["spec"]["template"]["spec"]["containers"][0], settings_dir, shared)
    # A key of a ConfigMap shared by several services may be meant for some of them only
    # (AUTH_DISABLED is the orchestrator's), but one that none of them reads is a mistake.
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind.get("ConfigMap", [])}
    for name, known in shared.items():
        unread = sorted(set(config_maps.get(name, {})) - known)
        if unread:
            problem(f"ConfigMap {name}: {unread} is a setting of none of the services that load it")

    for monitor in by_kind.get("ServiceMonitor", []):
        selector = monitor["spec"]["selector"]["matchLabels"]
        unwatched = [
            s["metadata"]["name"]
            for s in services
            if not all(s["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())
        ]
        if unwatched:
            problem(f"ServiceMonitor {monitor['metadata']['name']} does not select {unwatched}")

    topics = by_kind.get("KafkaTopic", [])
    if topics:
        participants = set()
        for path in pathlib.Path(definitions).glob("*.json"):
            for step in json.load(open(path))["steps"]:
                participants.add(step["participant"])
        # The notification service consumes the lifecycle events: they have a dead-letter topic too.
        consumed = [f"{p}-commands" for p in sorted(participants)] + ["saga-replies", "saga-start-requests", "saga-events"]
        wanted = set(consumed) | {f"{t}.dlq" for t in consumed}
        declared = {t["spec"].get("topicName", t["metadata"]["name"]): t for t in topics}
        if set(declared) != wanted:
            problem(f"KafkaTopics: missing {sorted(wanted - set(declared))}, extra {sorted(set(declared) - wanted)}")
        days = re.fullmatch(r"(\d+)d", config.get("KAFKA_DEAD_LETTER_RETENTION", "14d"))
        dlq_ms = str(int(days.group(1)) * 86_400_000) if days else None
        for name, t in declared.items():
            spec = t["spec"]
            if str(spec.get("partitions")) != config["KAFKA_TOPIC_PARTITIONS"]:
                problem(f"KafkaTopic {name}: {spec.get('partitions')} partitions, saga-config says {config['KAFKA_TOPIC_PARTITIONS']}")
            if str(spec.get("replicas")) != config["KAFKA_TOPIC_REPLICATION"]:
                problem(f"KafkaTopic {name}: {spec.get('replicas')} replicas, saga-config says {config['KAFKA_TOPIC_REPLICATION']}")
            if name.endswith(".dlq") and spec.get("config", {}).get("retention.ms") != dlq_ms:
                problem(f"KafkaTopic {name}: retention.ms is not KAFKA_DEAD_LETTER_RETENTION ({dlq_ms})")

    for p in problems:
        print(f"FAIL {rendered}: {p}", file=sys.stderr)
    print(f"{rendered}: {len(deployments)} Deployments, {len(jobs)} Jobs, {len(topics)} topics; {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
