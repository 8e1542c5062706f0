// Validates the custom resources of rendered manifests (a multi-document YAML file) against the
// OpenAPI schemas of their CRDs, as packaged by kubernetes-models: the Prometheus Operator's
// ServiceMonitor and PrometheusRule, Strimzi's KafkaTopic. Kubernetes' own kinds are
// kubernetes-validate's (scripts/check-deploy). A custom kind it does not know fails.
import { readFileSync } from "node:fs";
import yaml from "js-yaml";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { KafkaTopic } from "@kubernetes-models/strimzi-kafka-operator/kafka.strimzi.io/v1beta2/KafkaTopic";

const models = [ServiceMonitor, PrometheusRule, KafkaTopic];
const builtIn = /^(v1|apps\/v1|batch\/v1|policy\/v1|autoscaling\/v2|networking\.k8s\.io\/v1)$/;

let failed = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (!doc) continue;
    const name = `${file}: ${doc.kind}/${doc.metadata?.name}`;
    if (builtIn.test(doc.apiVersion)) continue;
    const model = models.find((m) => m.apiVersion === doc.apiVersion && m.kind === doc.kind);
    if (!model) {
      console.error(`FAIL ${name}: no schema for ${doc.apiVersion} ${doc.kind}`);
      failed++;
      continue;
    }
    try {
      new model(doc).validate();
      checked++;
    } catch (error) {
      console.error(`FAIL ${name}: ${error.message}`);
      failed++;
    }
  }
}
console.log(`custom resources: ${checked} valid, ${failed} invalid`);
process.exit(failed ? 1 : 0);
