import { useState } from "preact/hooks";
import { useLocation } from "preact-iso";

import { api, type DeadLetter } from "../api";
import { ConfirmDialog, Problem, useLoad } from "../components";
import { time } from "../format";
import { useIsAdmin } from "../session";

/** Messages no consumer could apply, by topic and reason, with replay for admins. */
export function DeadLetters() {
  const location = useLocation();
  const params = new URLSearchParams(location.url.split("?")[1] ?? "");
  const admin = useIsAdmin();
  const key = params.toString();
  const page = useLoad(() => api.deadLetters(params), key);
  const [selected, setSelected] = useState<Set<string>>(new Set());
  const [replaying, setReplaying] = useState(false);
  const [open, setOpen] = useState<string | null>(null);

  function submit(event: Event) {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const [name, value] of new FormData(event.target as HTMLFormElement)) {
      if (String(value)) next.set(name, String(value));
    }
    setSelected(new Set());
    location.route(`/ui/dead-letters${next.size ? `?${next}` : ""}`);
  }
  const reasons = [...new Set(page.data?.items.map((l) => l.reason).filter((r): r is string => !!r) ?? [])].sort();
  const toggle = (id: string) =>
    setSelected((s) => {
      const next = new Set(s);
      if (next.has(id)) next.delete(id);
      else next.add(id);
      return next;
    });

  return (
    <>
      <h1>Dead letters</h1>
      <form class="filters" onSubmit={submit} aria-label="Filters" key={key}>
        <label>
          Topic
          <select name="topic">
            <option value="">every dead-letter topic</option>
            {page.data?.topics.map((t) => (
              <option key={t} value={t} selected={params.get("topic") === t}>
                {t}
              </option>
            ))}
          </select>
        </label>
        <label>
          Reason
          <input name="reason" list="reasons" maxLength={255} defaultValue={params.get("reason") ?? ""} />
          <datalist id="reasons">
            {reasons.map((r) => (
              <option key={r} value={r} />
            ))}
          </datalist>
        </label>
        <label>
          Replayed
          <select name="replayed">
            <option value="">either</option>
            <option value="false" selected={params.get("replayed") === "false"}>
              not yet
            </option>
            <option value="true" selected={params.get("replayed") === "true"}>
              replayed
            </option>
          </select>
        </label>
        <div class="buttons">
          <button type="submit">Apply filters</button>
          <a href="/ui/dead-letters">Clear</a>
          {admin && (
            <button type="button" disabled={selected.size === 0} onClick={() => setReplaying(true)}>
              Replay {selected.size || ""} selected…
            </button>
          )}
        </div>
      </form>
      <Problem error={page.error} />
      {page.data && (
        <>
          <p class="muted" role="status">
            {page.data.count === 0 ? "No dead letter matches." : `${page.data.count} dead letters, newest first.`}
          </p>
          <div class="scroll">
            <table class="list">
              <thead>
                <tr>
                  {admin && <th scope="col">Select</th>}
                  <th scope="col">When</th>
                  <th scope="col">From</th>
                  <th scope="col">Reason</th>
                  <th scope="col">Error</th>
                  <th scope="col">Replayed</th>
                  <th scope="col">Message</th>
                </tr>
              </thead>
              <tbody>
                {page.data.items.map((l) => (
                  <Row
                    key={l.id}
                    letter={l}
                    admin={admin}
                    selected={selected.has(l.id)}
                    onToggle={() => toggle(l.id)}
                    open={open === l.id}
                    onOpen={() => setOpen(open === l.id ? null : l.id)}
                  />
                ))}
              </tbody>
            </table>
          </div>
        </>
      )}
      {replaying && (
        <Replay
          ids={[...selected]}
          onClose={(acted) => {
            setReplaying(false);
            if (acted) {
              setSelected(new Set());
              void page.reload();
            }
          }}
        />
      )}
    </>
  );
}

function Row(props: {
  letter: DeadLetter;
  admin: boolean;
  selected: boolean;
  onToggle: () => void;
  open: boolean;
  onOpen: () => void;
}) {
  const l = props.letter;
  return (
    <>
      <tr>
        {props.admin && (
          <td>
            <input type="checkbox" checked={props.selected} onChange={props.onToggle} aria-label={`Select ${l.id}`} />
          </td>
        )}
        <td>{time(l.dead_lettered_at)}</td>
        <td>
          <code>{l.source_topic ?? l.topic}</code>
          <div class="muted small">{l.service ?? ""}</div>
        </td>
        <td>
          <code>{l.reason ?? "—"}</code>
        </td>
        <td class="small">{l.error ?? ""}</td>
        <td>{l.replayed ? `${l.replayed.times}×, last by ${l.replayed.actor}` : "no"}</td>
        <td>
          <button type="button" class="link" aria-expanded={props.open} onClick={props.onOpen}>
            {props.open ? "Hide" : "Show"}
          </button>
        </td>
      </tr>
      {props.open && (
        <tr class="detail">
          <td colSpan={props.admin ? 7 : 6}>
            <p class="small">
              <code>{l.id}</code> · key <code>{l.key ?? "—"}</code>
            </p>
            <pre class="json" tabIndex={0}>
              {l.payload ?? `(binary, base64) ${l.payload_base64 ?? ""}`}
            </pre>
            <pre class="json small" tabIndex={0}>
              {JSON.stringify(l.headers, null, 2)}
            </pre>
          </td>
        </tr>
      )}
    </>
  );
}

function Replay({ ids, onClose }: { ids: string[]; onClose: (acted: boolean) => void }) {
  const [force, setForce] = useState(false);
  const preview = useLoad(() => api.replay(ids, null, true, force), `${ids.join(",")}/${force}`);
  return (
    <ConfirmDialog
      title="Replay dead letters"
      confirmLabel={`Replay ${preview.data?.items.filter((i) => i.result === "would_replay").length ?? "…"}`}
      description={<p>Publishes them again to the topics they came from, once their cause is fixed.</p>}
      onConfirm={async (reason) => {
        const done = await api.replay(ids, reason, false, force);
        return `Replayed ${done.replayed}, skipped ${done.skipped}.`;
      }}
      onClose={onClose}
    >
      <label class="check">
        <input type="checkbox" checked={force} onChange={(e) => setForce((e.target as HTMLInputElement).checked)} />{" "}
        Also those replayed before
      </label>
      <Problem error={preview.error} />
      {preview.data && (
        <ul class="plain">
          {preview.data.items.map((i) => (
            <li key={i.id}>
              <code>{i.id}</code>: {i.result === "would_replay" ? `would go to ${i.detail}` : `${i.result}, ${i.detail}`}
            </li>
          ))}
        </ul>
      )}
    </ConfirmDialog>
  );
}
