import type { SagaSummary } from "./api";

/** "3.2 s", "4 min 10 s", "2 h 5 min", "3 d 4 h". */
export function duration(ms: number): string {
  const s = Math.abs(ms) / 1000;
  if (s < 1) return `${Math.round(Math.abs(ms))} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.floor(s % 60)} s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

/** "5 min ago" or "in 20 s". */
export function relative(iso: string, now = Date.now()): string {
  const delta = new Date(iso).getTime() - now;
  return delta <= 0 ? `${duration(-delta)} ago` : `in ${duration(delta)}`;
}

/** The local time, to the second, with the date when it is not today. */
export function time(iso: string | null | undefined): string {
  if (!iso) return "—";
  const d = new Date(iso);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

/** How long from `start` to `end` (or now). */
export function took(start: string, end: string | null): string {
  return duration((end ? new Date(end).getTime() : Date.now()) - new Date(start).getTime());
}

/** The timer loop moves a due saga within a fraction of a second; past this it is late (as the API's past_deadline). */
export const OVERDUE_GRACE_MS = 5000;

/**
 * Why a saga is not moving, in one sentence, for anyone looking at an unfinished saga; null once it
 * completed or failed (compensated).
 */
export function whyNotMoving(saga: SagaSummary, now = Date.now()): string | null {
  if (saga.status === "NEEDS_ATTENTION") {
    const a = saga.attention;
    const where = a?.step ? ` at ${a.step}` : "";
    const why = a ? `${a.code}${a.reason ? ` (${a.reason})` : ""}` : "no reason recorded";
    return `Stopped for a human${where}: ${why}. Retry once the cause is fixed, or abort.`;
  }
  const current = saga.current_step;
  if (!current) return null;
  const what = `${current.kind === "COMPENSATION" ? "the compensation of " : ""}${current.name} (attempt ${current.attempt})`;
  const until = current.until ? new Date(current.until).getTime() : null;
  if (current.waiting_for === "REPLY") {
    const since = `waiting for the reply to ${what} since ${relative(saga.updated_at, now)}`;
    if (until === null) return `${capital(since)}.`;
    if (until + OVERDUE_GRACE_MS < now) {
      return `${capital(since)}; its deadline passed ${relative(current.until!, now)} and the timer loop has not acted: check the orchestrator (saga_timer metrics, logs).`;
    }
    return `${capital(since)}; it times out ${relative(current.until!, now)}.`;
  }
  if (current.waiting_for === "RETRY") {
    if (until !== null && until + OVERDUE_GRACE_MS < now) {
      return `Backing off before ${what}; the backoff ended ${relative(current.until!, now)} and the timer loop has not resent it: check the orchestrator.`;
    }
    return `Backing off after a failure; ${what} is sent again ${until === null ? "soon" : relative(current.until!, now)}.`;
  }
  return `At ${what}, waiting for ${current.waiting_for.toLowerCase()}.`;
}

function capital(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}

/** A fresh Idempotency-Key for one action a user confirmed. */
export function idempotencyKey(action: string): string {
  // crypto.randomUUID exists only on https and localhost; getRandomValues everywhere.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `ui-${action}-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

export function percent(rate: number | null): string {
  return rate === null ? "—" : `${(rate * 100).toFixed(rate >= 0.999 || rate === 0 ? 0 : 1)} %`;
}

export function pretty(value: unknown): string {
  return JSON.stringify(value, null, 2);
}
