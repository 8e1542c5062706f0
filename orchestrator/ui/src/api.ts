// The orchestrator's API as the page uses it: the same routes and tokens as sagactl and curl.
// Types follow the OpenAPI document at /api/v1/openapi.json.

export type Status = "RUNNING" | "COMPENSATING" | "COMPLETED" | "FAILED" | "NEEDS_ATTENTION";
export const STATUSES: Status[] = ["RUNNING", "COMPENSATING", "COMPLETED", "FAILED", "NEEDS_ATTENTION"];

export interface StepRef {
  index: number;
  name: string;
  kind: string;
  attempt: number;
}

export interface Failure {
  step: string | null;
  code: string;
  reason: string | null;
}

export interface SagaSummary {
  id: string;
  saga_type: string;
  definition_version: number;
  business_key: string | null;
  status: Status;
  current_step: (StepRef & { waiting_for: string; until: string | null }) | null;
  last_step: StepRef;
  failure: Failure | null;
  attention: Failure | null;
  version: number;
  created_at: string;
  updated_at: string;
  ended_at: string | null;
}

export interface Attempt {
  step: string;
  kind: string;
  attempt: number;
  status: string;
  output: unknown;
  error_code: string | null;
  error_message: string | null;
  started_at: string;
  deadline_at: string;
  finished_at: string | null;
}

export interface StepView {
  index: number;
  name: string;
  participant: string;
  action: string;
  compensation: string | null;
  status: string;
  attempts: Attempt[];
}

export interface Compensation {
  step: string;
  action: string;
  status: string;
  attempts: number;
  finished_at: string | null;
}

export interface HistoryEntry {
  version: number;
  from_status: string | null;
  to_status: string;
  trigger: string;
  summary: string;
  detail: unknown;
  recorded_at: string;
}

export interface SagaDetail extends SagaSummary {
  input: unknown;
  outputs: unknown;
  steps: StepView[];
  compensations: Compensation[];
  history: HistoryEntry[];
  trace_id: string;
  correlation_id: string | null;
}

export interface SagaPage {
  items: SagaSummary[];
  count: number;
  limit: number;
  next: string | null;
}

export interface Count {
  key: string;
  count: number;
}

export interface Stats {
  from: string;
  to: string;
  total: number;
  by_status: Record<Status, number>;
  success_rate: number | null;
  failures_by_step: Count[];
  failures_by_code: Count[];
  attention_by_step: Count[];
  completed_duration_seconds: { p50: number; p95: number; p99: number } | null;
  admission: Record<string, { in_flight: number; limit: number; saturated: boolean }>;
  start_requests_waiting: number | null;
}

export interface AuditEntry {
  id: number;
  action: string;
  actor: string;
  reason: string;
  idempotency_key: string | null;
  bulk_id: string | null;
  status_before: string;
  status_after: string;
  version_before: number;
  version_after: number;
  detail: unknown;
  recorded_at: string;
}

export interface ActionResult {
  saga_id: string;
  action: string;
  status_before: string;
  status_after: string;
  version: number;
  audit_id: number;
  summary: string;
}

export interface BulkItem {
  saga_id: string;
  business_key: string | null;
  status_before: string;
  result: string;
  status_after: string | null;
  detail: string;
}

export interface BulkResult {
  dry_run: boolean;
  bulk_id: string | null;
  matched: number;
  retried: number;
  refused: number;
  items: BulkItem[];
}

export interface DeadLetter {
  id: string;
  topic: string;
  partition: number;
  offset: number;
  source_topic: string | null;
  reason: string | null;
  error: string | null;
  service: string | null;
  dead_lettered_at: string | null;
  key: string | null;
  payload: string | null;
  payload_base64: string | null;
  headers: Record<string, string>;
  replayed: { replayed_at: string; actor: string; reason: string; times: number } | null;
}

export interface DeadLetterPage {
  topics: string[];
  count: number;
  items: DeadLetter[];
}

export interface ReplayResult {
  dry_run: boolean;
  replayed: number;
  skipped: number;
  items: { id: string; result: string; detail: string }[];
}

export interface Session {
  name: string;
  scope: "read" | "admin";
  auth: "tokens" | "disabled";
}

/** A refusal or failure of the API, with its problem+json detail. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly title: string,
    readonly detail: string,
  ) {
    super(detail ? `${title}: ${detail}` : title);
  }
}

const TOKEN_KEY = "saga-orchestrator.token";

/** The bearer token, kept for this tab only (sessionStorage). */
export const token = {
  get: (): string | null => sessionStorage.getItem(TOKEN_KEY),
  set: (value: string) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** Called on 401: the token is missing or wrong; the page goes to sign-in. */
let onUnauthorized: (message: string) => void = () => {};
export function whenUnauthorized(handler: (message: string) => void) {
  onUnauthorized = handler;
}

async function request<T>(method: string, path: string, body?: unknown, idempotencyKey?: string): Promise<T> {
  const headers: Record<string, string> = { Accept: "application/json" };
  const secret = token.get();
  if (secret) headers.Authorization = `Bearer ${secret}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (idempotencyKey) headers["Idempotency-Key"] = idempotencyKey;
  let response: Response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    throw new ApiError(0, "The orchestrator did not answer", String(error));
  }
  const text = await response.text();
  let json: unknown = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!response.ok) {
    const problem = (json ?? {}) as { title?: string; detail?: string };
    const error = new ApiError(
      response.status,
      problem.title ?? `${response.status} ${response.statusText}`,
      problem.detail ?? text.slice(0, 300),
    );
    if (response.status === 401) onUnauthorized(error.detail);
    throw error;
  }
  return json as T;
}

export const api = {
  session: () => request<Session>("GET", "/api/v1/session"),
  stats: (window: string) => request<Stats>("GET", `/api/v1/sagas/stats?window=${encodeURIComponent(window)}`),
  list: (query: URLSearchParams) => request<SagaPage>("GET", `/api/v1/sagas?${query}`),
  saga: (id: string) => request<SagaDetail>("GET", `/api/v1/sagas/${encodeURIComponent(id)}`),
  audit: (id: string) => request<{ entries: AuditEntry[] }>("GET", `/api/v1/sagas/${encodeURIComponent(id)}/audit`),
  act: (id: string, action: "retry" | "abort", reason: string, key: string) =>
    request<ActionResult>("POST", `/api/v1/sagas/${encodeURIComponent(id)}/${action}`, { reason }, key),
  bulkRetry: (filter: Record<string, unknown>, limit: number, dryRun: boolean, reason: string | null, key: string) =>
    request<BulkResult>(
      "POST",
      "/api/v1/sagas/bulk-retry",
      dryRun ? { filter, limit, dry_run: true } : { filter, limit, reason },
      dryRun ? undefined : key,
    ),
  definitions: () => request<{ items: { name: string; version: number }[] }>("GET", "/api/v1/saga-definitions"),
  deadLetters: (query: URLSearchParams) => request<DeadLetterPage>("GET", `/api/v1/dead-letters?${query}`),
  replay: (ids: string[], reason: string | null, dryRun: boolean, force: boolean) =>
    request<ReplayResult>(
      "POST",
      "/api/v1/dead-letters/replay",
      dryRun ? { ids, force, dry_run: true } : { ids, force, reason },
    ),
};
