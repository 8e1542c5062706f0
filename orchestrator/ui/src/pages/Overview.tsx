import { useState } from "preact/hooks";

import { api, STATUSES, type Count, type SagaPage, type Stats } from "../api";
import { Problem, StatusBadge, useLiveRefresh, useLoad } from "../components";
import { duration, percent } from "../format";

/** How many sagas a "how many need a human" count looks at; past it the page says "N+". */
const COUNT_UP_TO = 100;

interface Open {
  attention: SagaPage;
  pastDeadline: SagaPage;
  stuck: SagaPage;
}

function countOf(page: SagaPage): string {
  return page.next ? `${page.count}+` : String(page.count);
}

function query(params: Record<string, string>): URLSearchParams {
  return new URLSearchParams({ ...params, limit: String(COUNT_UP_TO) });
}

/** The first page at 3 a.m.: how things went in the last hour and day, and what needs a human now. */
export function Overview() {
  const [live, setLive] = useState(true);
  const hour = useLoad(() => api.stats("1h"), "1h");
  const day = useLoad(() => api.stats("24h"), "24h");
  const open = useLoad<Open>(async () => {
    const [attention, pastDeadline, stuck] = await Promise.all([
      api.list(query({ status: "NEEDS_ATTENTION" })),
      api.list(query({ past_deadline: "true" })),
      api.list(query({ stuck_for: "15m" })),
    ]);
    return { attention, pastDeadline, stuck };
  }, "open");
  useLiveRefresh(live, 15, async () => {
    await Promise.all([hour.reload(), day.reload(), open.reload()]);
  });

  return (
    <>
      <div class="title-row">
        <h1>Overview</h1>
        <label class="toggle">
          <input type="checkbox" checked={live} onChange={(e) => setLive((e.target as HTMLInputElement).checked)} />
          Refresh every 15 s
        </label>
      </div>
      <Problem error={hour.error ?? day.error ?? open.error} />

      <section aria-labelledby="now">
        <h2 id="now">Now</h2>
        <div class="cards">
          <Card
            label="Need attention"
            value={open.data ? countOf(open.data.attention) : "…"}
            href="/ui/sagas?status=NEEDS_ATTENTION"
            alarm={!!open.data?.attention.count}
          />
          <Card
            label="Past their deadline"
            value={open.data ? countOf(open.data.pastDeadline) : "…"}
            href="/ui/sagas?past_deadline=true"
            alarm={!!open.data?.pastDeadline.count}
          />
          <Card
            label="Stuck for 15 min"
            value={open.data ? countOf(open.data.stuck) : "…"}
            href="/ui/sagas?stuck_for=15m"
            alarm={!!open.data?.stuck.count}
          />
          <Card
            label="In flight"
            value={hour.data ? String(inFlight(hour.data)) : "…"}
            href="/ui/sagas?status=RUNNING&status=COMPENSATING"
          />
          <Card
            label="Queued (start requests)"
            value={hour.data ? (hour.data.start_requests_waiting ?? "unknown").toString() : "…"}
          />
        </div>
        {hour.data && <Admission stats={hour.data} />}
      </section>

      <div class="two">
        <Window title="Last hour" window="1h" stats={hour.data} />
        <Window title="Last 24 hours" window="24h" stats={day.data} />
      </div>
    </>
  );
}

function inFlight(stats: Stats): number {
  return Object.values(stats.admission).reduce((sum, a) => sum + a.in_flight, 0);
}

function Admission({ stats }: { stats: Stats }) {
  const saturated = Object.entries(stats.admission).filter(([, a]) => a.saturated);
  if (saturated.length === 0) return null;
  return (
    <p class="notice" role="status">
      At the in-flight bound, new starts wait in Kafka:{" "}
      {saturated.map(([type, a]) => `${type} (${a.in_flight} of ${a.limit})`).join(", ")}.
    </p>
  );
}

function Card({ label, value, href, alarm }: { label: string; value: string; href?: string; alarm?: boolean }) {
  const body = (
    <>
      <span class="value">{value}</span>
      <span class="label">{label}</span>
    </>
  );
  return href ? (
    <a class={`card${alarm ? " alarm" : ""}`} href={href}>
      {body}
    </a>
  ) : (
    <div class="card">{body}</div>
  );
}

function Window({ title, window, stats }: { title: string; window: string; stats: Stats | null }) {
  const id = `w-${window}`;
  if (!stats) {
    return (
      <section aria-labelledby={id}>
        <h2 id={id}>{title}</h2>
        <p>Loading…</p>
      </section>
    );
  }
  const link = (params: Record<string, string>) => `/ui/sagas?${new URLSearchParams({ ...params, window })}`;
  const d = stats.completed_duration_seconds;
  return (
    <section aria-labelledby={id}>
      <h2 id={id}>{title}</h2>
      <p class="big">
        <span title="Completed ÷ (completed + failed + needing attention)">Success rate {percent(stats.success_rate)}</span>{" "}
        · <a href={link({})}>{stats.total} started</a>
        {d && (
          <>
            {" "}
            · completed in p50 {duration(d.p50 * 1000)}, p99 {duration(d.p99 * 1000)}
          </>
        )}
      </p>
      <table class="counts">
        <caption>By status</caption>
        <tbody>
          {STATUSES.map((s) => (
            <tr key={s}>
              <th scope="row">
                <StatusBadge status={s} />
              </th>
              <td>
                <a href={link({ status: s })}>{stats.by_status[s] ?? 0}</a>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <Counts caption="Failures by step" counts={stats.failures_by_step} link={(k) => link({ failed_step: k })} />
      <Counts caption="Failures by code" counts={stats.failures_by_code} link={(k) => link({ failure_code: k })} />
      <Counts
        caption="Needing attention, by step"
        counts={stats.attention_by_step}
        link={(k) => link({ status: "NEEDS_ATTENTION", failed_step: k })}
      />
    </section>
  );
}

function Counts({ caption, counts, link }: { caption: string; counts: Count[]; link: (key: string) => string }) {
  return (
    <table class="counts">
      <caption>{caption}</caption>
      <tbody>
        {counts.length === 0 && (
          <tr>
            <td colSpan={2}>none</td>
          </tr>
        )}
        {counts.map((c) => (
          <tr key={c.key}>
            <th scope="row">
              <code>{c.key}</code>
            </th>
            <td>
              <a href={link(c.key)}>{c.count}</a>
            </td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}
