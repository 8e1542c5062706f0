import { useState } from "preact/hooks";
import { useLocation } from "preact-iso";

import { api, STATUSES, type BulkResult } from "../api";
import { ConfirmDialog, Problem, StatusBadge, useLiveRefresh, useLoad } from "../components";
import { relative, time } from "../format";
import { useIsAdmin } from "../session";

/** The API's text filters, in the order the form shows them. */
const TEXT_FILTERS: [name: string, label: string, hint: string][] = [
  ["business_key", "Order id (business key)", ""],
  ["saga_type", "Saga type", "order-fulfilment"],
  ["failed_step", "Failed step", "charge_payment"],
  ["failure_code", "Error code", "PAYMENT_DECLINED"],
  ["stuck_for", "Stuck for at least", "15m, 2h, 1d"],
];
const TIME_FILTERS: [name: string, label: string][] = [
  ["created_after", "Created from"],
  ["created_before", "Created before"],
  ["updated_after", "Changed from"],
  ["updated_before", "Changed before"],
];
/** Page-only parameter: created within this window back from now, kept relative in a shared link. */
const WINDOWS: Record<string, number> = { "15m": 15 * 60e3, "1h": 3600e3, "6h": 6 * 3600e3, "24h": 86400e3, "7d": 7 * 86400e3 };
const PAGE_SIZES = ["20", "50", "100"];

/** The API's query for the page's URL: `window` becomes `created_after`. */
export function apiQuery(params: URLSearchParams): URLSearchParams {
  const query = new URLSearchParams();
  for (const [name, value] of params) {
    if (name === "window") {
      const span = WINDOWS[value];
      if (span && !params.has("created_after")) query.set("created_after", new Date(Date.now() - span).toISOString());
    } else if (value !== "") {
      query.append(name, value);
    }
  }
  return query;
}

/** The list, filtered by every filter the API has; the filters live in the URL, so a link shares them. */
export function SagaList() {
  const location = useLocation();
  const params = new URLSearchParams(location.url.split("?")[1] ?? "");
  const admin = useIsAdmin();
  const [live, setLive] = useState(() => sessionStorage.getItem("saga-orchestrator.live") !== "off");
  const [bulk, setBulk] = useState(false);
  const key = params.toString();
  const page = useLoad(() => api.list(apiQuery(params)), key);
  const definitions = useLoad(() => api.definitions(), "definitions");
  const types = [...new Set(definitions.data?.items.map((d) => d.name) ?? [])].sort();
  const firstPage = !params.has("cursor");
  useLiveRefresh(live && firstPage, 10, () => page.reload());

  function go(next: URLSearchParams) {
    next.delete("cursor");
    location.route(`/ui/sagas${next.size ? `?${next}` : ""}`);
  }
  function submit(event: Event) {
    event.preventDefault();
    const form = new FormData(event.target as HTMLFormElement);
    const next = new URLSearchParams();
    for (const [name, value] of form) {
      const text = String(value).trim();
      if (!text) continue;
      // datetime-local gives local time without a zone; the API takes RFC 3339.
      next.append(name, name.endsWith("_after") || name.endsWith("_before") ? new Date(text).toISOString() : text);
    }
    go(next);
  }
  const statuses = params.getAll("status").flatMap((s) => s.split(","));
  const nextHref = page.data?.next
    ? `/ui/sagas?${(() => {
        const p = new URLSearchParams(params);
        p.set("cursor", page.data!.next!);
        return p;
      })()}`
    : null;

  return (
    <>
      <div class="title-row">
        <h1>Sagas</h1>
        <label class="toggle">
          <input
            type="checkbox"
            checked={live}
            onChange={(e) => {
              const on = (e.target as HTMLInputElement).checked;
              sessionStorage.setItem("saga-orchestrator.live", on ? "on" : "off");
              setLive(on);
            }}
          />
          Refresh every 10 s{firstPage ? "" : " (first page only)"}
        </label>
      </div>
      {/* Uncontrolled (default values): a live refresh re-renders without undoing an edit in progress. */}
      <form class="filters" onSubmit={submit} aria-label="Filters" key={key}>
        <fieldset>
          <legend>Status</legend>
          {STATUSES.map((s) => (
            <label key={s} class="check">
              <input type="checkbox" name="status" value={s} defaultChecked={statuses.includes(s)} /> {s}
            </label>
          ))}
        </fieldset>
        {TEXT_FILTERS.map(([name, label, hint]) => (
          <label key={name}>
            {label}
            <input
              name={name}
              type="text"
              maxLength={255}
              placeholder={hint}
              defaultValue={params.get(name) ?? ""}
              list={name === "saga_type" ? "saga-types" : undefined}
            />
          </label>
        ))}
        <datalist id="saga-types">
          {types.map((t) => (
            <option key={t} value={t} />
          ))}
        </datalist>
        <label>
          Created within
          <select name="window">
            <option value="">any time</option>
            {Object.keys(WINDOWS).map((w) => (
              <option key={w} value={w} selected={params.get("window") === w}>
                last {w}
              </option>
            ))}
          </select>
        </label>
        {TIME_FILTERS.map(([name, label]) => (
          <label key={name}>
            {label}
            <input name={name} type="datetime-local" step={1} defaultValue={toLocalInput(params.get(name))} />
          </label>
        ))}
        <label class="check">
          <input
            type="checkbox"
            name="past_deadline"
            value="true"
            defaultChecked={params.get("past_deadline") === "true"}
          />{" "}
          Past its deadline
        </label>
        <label>
          Per page
          <select name="limit">
            {PAGE_SIZES.map((n) => (
              <option key={n} value={n} selected={(params.get("limit") ?? "20") === n}>
                {n}
              </option>
            ))}
          </select>
        </label>
        <div class="buttons">
          <button type="submit">Apply filters</button>
          <a href="/ui/sagas">Clear</a>
          {admin && (
            <button type="button" onClick={() => setBulk(true)}>
              Retry matching…
            </button>
          )}
        </div>
      </form>
      <Problem error={page.error} />
      {page.data && (
        <>
          <p class="muted" role="status">
            {page.data.count === 0
              ? "No saga matches."
              : `${page.data.count}${page.data.next ? "+" : ""} saga${page.data.count === 1 && !page.data.next ? "" : "s"}, newest first${firstPage ? "" : " (a later page)"}.`}
          </p>
          <div class="scroll">
            <table class="list">
              <thead>
                <tr>
                  <th scope="col">Saga</th>
                  <th scope="col">Order</th>
                  <th scope="col">Status</th>
                  <th scope="col">Step</th>
                  <th scope="col">Code</th>
                  <th scope="col">Created</th>
                  <th scope="col">Changed</th>
                </tr>
              </thead>
              <tbody>
                {page.data.items.map((s) => {
                  const step = s.current_step ?? s.failure ?? s.attention ?? null;
                  const stepName = s.current_step?.name ?? s.attention?.step ?? s.failure?.step ?? s.last_step.name;
                  return (
                    <tr key={s.id}>
                      <td>
                        <a href={`/ui/sagas/${s.id}`} title={s.id}>
                          <code>{s.id.slice(0, 8)}…</code>
                        </a>
                        <div class="muted small">{s.saga_type}</div>
                      </td>
                      <td>
                        <code>{s.business_key ?? "—"}</code>
                      </td>
                      <td>
                        <StatusBadge status={s.status} />
                      </td>
                      <td>{step ? stepName : <span class="muted">{s.last_step.name}</span>}</td>
                      <td>
                        <code>{s.attention?.code ?? s.failure?.code ?? ""}</code>
                      </td>
                      <td title={s.created_at}>{time(s.created_at)}</td>
                      <td title={s.updated_at}>{relative(s.updated_at)}</td>
                    </tr>
                  );
                })}
              </tbody>
            </table>
          </div>
          <nav class="pager" aria-label="Pages">
            {!firstPage && (
              <a
                href={`/ui/sagas?${(() => {
                  const p = new URLSearchParams(params);
                  p.delete("cursor");
                  return p;
                })()}`}
              >
                First page
              </a>
            )}
            {nextHref && <a href={nextHref}>Next page</a>}
          </nav>
        </>
      )}
      {bulk && <BulkRetry params={params} onClose={(acted) => (setBulk(false), acted && page.reload())} />}
    </>
  );
}

/** Bulk retry: a dry run first, showing exactly which sagas would be touched, then the real one. */
function BulkRetry({ params, onClose }: { params: URLSearchParams; onClose: (acted: boolean) => void }) {
  // Fixed when the dialog opens: a relative window resolves to a time once, so the dry run and
  // the retry touch the same sagas, and a re-render asks nothing again.
  const [filter] = useState(() => bulkFilter(params));
  const limit = 500;
  const preview = useLoad<BulkResult>(() => api.bulkRetry(filter, limit, true, null, ""), JSON.stringify(filter));
  const wouldRetry = preview.data?.items.filter((i) => i.result === "would_retry") ?? [];
  return (
    <ConfirmDialog
      title="Retry the matching sagas"
      confirmLabel={`Retry ${wouldRetry.length} sagas`}
      description={
        <p>
          Filter: <code>{JSON.stringify(filter)}</code> {filter.status ? "" : "(no status: NEEDS_ATTENTION)"}; at most{" "}
          {limit}, oldest first. Dry run:
        </p>
      }
      onConfirm={async (reason, key) => {
        const done = await api.bulkRetry(filter, limit, false, reason, key);
        return `Retried ${done.retried}, refused ${done.refused} (bulk ${done.bulk_id}).`;
      }}
      onClose={onClose}
    >
      <Problem error={preview.error} />
      {preview.data ? (
        <div class="scroll short">
          <p>
            {preview.data.matched} match: {wouldRetry.length} would be retried, {preview.data.refused} refused.
          </p>
          <ul class="plain">
            {preview.data.items.map((i) => (
              <li key={i.saga_id}>
                <code>{i.saga_id.slice(0, 8)}</code> {i.business_key ?? ""} <StatusBadge status={i.status_before} />{" "}
                {i.result === "would_retry" ? "would retry" : `${i.result}: ${i.detail}`}
              </li>
            ))}
          </ul>
        </div>
      ) : (
        !preview.error && <p>Asking what would be touched…</p>
      )}
    </ConfirmDialog>
  );
}

/** The bulk retry's filter: the list's filters as the API's JSON body takes them. */
function bulkFilter(params: URLSearchParams): Record<string, unknown> {
  const filter: Record<string, unknown> = {};
  for (const [name, value] of apiQuery(params)) {
    if (name === "limit" || name === "cursor") continue;
    if (name === "status") filter.status = [...((filter.status as string[]) ?? []), ...value.split(",")];
    else if (name === "past_deadline") filter.past_deadline = value === "true";
    else filter[name] = value;
  }
  return filter;
}

function toLocalInput(iso: string | null): string {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const local = new Date(d.getTime() - d.getTimezoneOffset() * 60e3);
  return local.toISOString().slice(0, 19);
}
