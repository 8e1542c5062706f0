import { useEffect, useState } from "preact/hooks";
import { useRoute } from "preact-iso";

import { api, type Attempt, type SagaDetail, type StepView } from "../api";
import { ConfirmDialog, Json, Problem, StatusBadge, useLiveRefresh, useLoad } from "../components";
import { relative, time, took, whyNotMoving } from "../format";
import { useIsAdmin } from "../session";

const FINISHED = ["COMPLETED", "FAILED"];

/** One saga: why it is where it is, its steps and attempts, what was undone, its history and audit log. */
export function SagaPage() {
  const { params } = useRoute();
  const id = params.id ?? "";
  const admin = useIsAdmin();
  const saga = useLoad(() => api.saga(id), id);
  const audit = useLoad(() => api.audit(id), id);
  const [acting, setActing] = useState<"retry" | "abort" | null>(null);
  const unfinished = saga.data && !FINISHED.includes(saga.data.status);
  useLiveRefresh(!!unfinished, 5, async () => {
    await Promise.all([saga.reload(), audit.reload()]);
  });
  // A deep link to a step (#step-charge_payment) scrolls to it once the page is drawn.
  useEffect(() => {
    if (saga.data && location.hash) document.getElementById(decodeURIComponent(location.hash.slice(1)))?.scrollIntoView();
  }, [!!saga.data]);

  if (saga.error) {
    return (
      <>
        <h1>Saga {id}</h1>
        <Problem error={saga.error} />
      </>
    );
  }
  const s = saga.data;
  if (!s) return <p>Loading…</p>;
  const why = whyNotMoving(s);
  const canRetry = ["NEEDS_ATTENTION", "RUNNING", "COMPENSATING"].includes(s.status);
  const canAbort = s.status === "RUNNING";
  return (
    <>
      <p class="crumbs">
        <a href="/ui/sagas">Sagas</a> › {s.business_key ?? s.id}
      </p>
      <div class="title-row">
        <h1>
          {s.saga_type} <StatusBadge status={s.status} />
        </h1>
        {admin && (canRetry || canAbort) && (
          <div class="buttons">
            {canRetry && (
              <button type="button" onClick={() => setActing("retry")}>
                Retry…
              </button>
            )}
            {canAbort && (
              <button type="button" class="danger" onClick={() => setActing("abort")}>
                Abort…
              </button>
            )}
          </div>
        )}
      </div>
      {why && (
        <p class="why" role="status">
          {why}
        </p>
      )}
      <dl class="facts">
        <dt>Saga id</dt>
        <dd>
          <code>{s.id}</code>
        </dd>
        <dt>Order (business key)</dt>
        <dd>
          <code>{s.business_key ?? "—"}</code>
        </dd>
        <dt>Definition</dt>
        <dd>
          {s.saga_type} v{s.definition_version}
        </dd>
        <dt>Started</dt>
        <dd title={s.created_at}>
          {time(s.created_at)} ({relative(s.created_at)})
        </dd>
        <dt>{s.ended_at ? "Ended" : "Last change"}</dt>
        <dd title={s.ended_at ?? s.updated_at}>
          {time(s.ended_at ?? s.updated_at)} (after {took(s.created_at, s.ended_at ?? s.updated_at)})
        </dd>
        <dt>Trace id</dt>
        <dd>
          <code>{s.trace_id}</code>
        </dd>
        {s.correlation_id && (
          <>
            <dt>Correlation id</dt>
            <dd>
              <code>{s.correlation_id}</code>
            </dd>
          </>
        )}
      </dl>
      {s.failure && (
        <div class="failure" role="note" aria-label="Failure">
          <h2>Failure</h2>
          <p>
            <code>{s.failure.code}</code> at <a href={`#step-${s.failure.step}`}>{s.failure.step}</a>
            {s.failure.reason && <>: {s.failure.reason}</>}
          </p>
        </div>
      )}
      {s.attention && (
        <div class="failure attention" role="note" aria-label="Needs attention">
          <h2>Needs attention</h2>
          <p>
            <code>{s.attention.code}</code> at <a href={`#step-${s.attention.step}`}>{s.attention.step}</a>
            {s.attention.reason && <>: {s.attention.reason}</>}
          </p>
        </div>
      )}

      <section aria-labelledby="steps">
        <h2 id="steps">Steps</h2>
        <ol class="timeline">
          {s.steps.map((step) => (
            <Step key={step.name} step={step} />
          ))}
        </ol>
      </section>

      {(s.compensations.length > 0 || s.status === "COMPENSATING" || s.failure) && <Undone saga={s} />}

      <section aria-labelledby="data">
        <h2 id="data">Input and outputs</h2>
        <div class="two">
          <div>
            <h3>Input (sensitive fields redacted)</h3>
            <Json value={s.input} label="Input" />
          </div>
          <div>
            <h3>Outputs by step</h3>
            <Json value={s.outputs} label="Outputs" />
          </div>
        </div>
      </section>

      <section aria-labelledby="history">
        <h2 id="history">History</h2>
        <div class="scroll">
          <table class="list">
            <thead>
              <tr>
                <th scope="col">#</th>
                <th scope="col">When</th>
                <th scope="col">Trigger</th>
                <th scope="col">Status</th>
                <th scope="col">What happened</th>
              </tr>
            </thead>
            <tbody>
              {s.history.map((h) => (
                <tr key={h.version}>
                  <td>{h.version}</td>
                  <td title={h.recorded_at}>{time(h.recorded_at)}</td>
                  <td>{h.trigger}</td>
                  <td>
                    {h.from_status ? `${h.from_status} → ` : ""}
                    {h.to_status}
                  </td>
                  <td>{h.summary}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      </section>

      <section aria-labelledby="audit">
        <h2 id="audit">Audit log</h2>
        <Problem error={audit.error} />
        {audit.data && audit.data.entries.length === 0 && <p class="muted">No operator has acted on this saga.</p>}
        {audit.data && audit.data.entries.length > 0 && (
          <div class="scroll">
            <table class="list" aria-label="Audit log">
              <thead>
                <tr>
                  <th scope="col">When</th>
                  <th scope="col">Who</th>
                  <th scope="col">Action</th>
                  <th scope="col">Why</th>
                  <th scope="col">Status</th>
                </tr>
              </thead>
              <tbody>
                {audit.data.entries.map((e) => (
                  <tr key={e.id}>
                    <td title={e.recorded_at}>{time(e.recorded_at)}</td>
                    <td>{e.actor}</td>
                    <td>{e.action}</td>
                    <td>{e.reason}</td>
                    <td>
                      {e.status_before} → {e.status_after}
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        )}
      </section>

      {acting && (
        <ConfirmDialog
          title={acting === "retry" ? "Retry this saga" : "Abort this saga"}
          confirmLabel={acting === "retry" ? "Retry" : "Abort"}
          description={
            acting === "retry" ? (
              <p>
                Sends the current step again ({s.current_step?.name ?? s.attention?.step ?? s.last_step.name}) with a
                fresh retry budget. A participant that already acted answers from its record: nothing is applied twice.
              </p>
            ) : (
              <p>
                Stops the saga and compensates, in reverse order, every step it may have done. Refused past a step that
                cannot be undone.
              </p>
            )
          }
          onConfirm={async (reason, key) => {
            const done = await api.act(s.id, acting, reason, key);
            return `${done.summary} (${done.status_before} → ${done.status_after}).`;
          }}
          onClose={(acted) => {
            setActing(null);
            if (acted) void Promise.all([saga.reload(), audit.reload()]);
          }}
        />
      )}
    </>
  );
}

function Step({ step }: { step: StepView }) {
  const anchor = `step-${step.name}`;
  return (
    <li id={anchor} class={`step st-${step.status.toLowerCase()}`}>
      <div class="step-head">
        <h3>
          {step.index + 1}. {step.name}{" "}
          <a class="anchor" href={`#${anchor}`} aria-label={`Link to step ${step.name}`}>
            #
          </a>
        </h3>
        <StatusBadge status={step.status} />
      </div>
      <p class="muted small">
        {step.participant}: {step.action}
        {step.compensation ? `, undone by ${step.compensation}` : ", cannot be undone"}
      </p>
      {step.attempts.length > 0 && (
        <div class="scroll">
        <table class="attempts" aria-label={`Attempts of ${step.name}`}>
          <thead>
            <tr>
              <th scope="col">Kind</th>
              <th scope="col">#</th>
              <th scope="col">Outcome</th>
              <th scope="col">Error</th>
              <th scope="col">Started</th>
              <th scope="col">Took</th>
            </tr>
          </thead>
          <tbody>
            {step.attempts.map((a) => (
              <AttemptRow key={`${a.kind}-${a.attempt}`} attempt={a} />
            ))}
          </tbody>
        </table>
        </div>
      )}
    </li>
  );
}

function AttemptRow({ attempt: a }: { attempt: Attempt }) {
  return (
    <tr>
      <td>{a.kind === "COMPENSATION" ? "undo" : "do"}</td>
      <td>{a.attempt}</td>
      <td>
        <StatusBadge status={a.status} />
      </td>
      <td>
        {a.error_code && <code>{a.error_code}</code>}
        {a.error_message && <div class="small">{a.error_message}</div>}
      </td>
      <td title={a.started_at}>{time(a.started_at)}</td>
      <td>
        {a.finished_at
          ? took(a.started_at, a.finished_at)
          : `waiting, deadline ${relative(a.deadline_at)}`}
      </td>
    </tr>
  );
}

/** What was undone, in the order the compensations ran, and what was not. */
function Undone({ saga }: { saga: SagaDetail }) {
  const notUndone = saga.steps.filter(
    (step) =>
      step.attempts.some((a) => a.kind === "ACTION" && a.status === "SUCCEEDED") &&
      !saga.compensations.some((c) => c.step === step.name && c.status === "SUCCEEDED"),
  );
  return (
    <section aria-labelledby="undone">
      <h2 id="undone">Compensations</h2>
      {saga.compensations.length === 0 ? (
        <p class="muted">None ran yet.</p>
      ) : (
        <ol class="compensations" aria-label="Compensations in the order they ran">
          {saga.compensations.map((c) => (
            <li key={c.step}>
              <code>{c.action}</code> for <a href={`#step-${c.step}`}>{c.step}</a> <StatusBadge status={c.status} />{" "}
              <span class="muted small">
                {c.status === "SUCCEEDED" ? "undone" : "not undone yet"}
                {c.attempts > 1 ? `, ${c.attempts} attempts` : ""}
                {c.finished_at ? `, ${time(c.finished_at)}` : ""}
              </span>
            </li>
          ))}
        </ol>
      )}
      {notUndone.length > 0 && (
        <p class="notice">
          Done and not undone:{" "}
          {notUndone.map((s) => `${s.name}${s.compensation ? "" : " (cannot be undone)"}`).join(", ")}.
        </p>
      )}
    </section>
  );
}
