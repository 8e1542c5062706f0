import type { ComponentChildren } from "preact";
import { useCallback, useEffect, useRef, useState } from "preact/hooks";

import { ApiError } from "./api";
import { idempotencyKey } from "./format";

/** Loads with `load` whenever `key` changes; `reload` fetches again without blanking the page. */
export function useLoad<T>(load: () => Promise<T>, key: string) {
  const [data, setData] = useState<T | null>(null);
  const [error, setError] = useState<ApiError | Error | null>(null);
  const [loading, setLoading] = useState(true);
  const latest = useRef(0);
  const run = useCallback(
    async (blank: boolean) => {
      const ticket = ++latest.current;
      if (blank) setData(null);
      setLoading(true);
      try {
        const value = await load();
        if (ticket === latest.current) {
          setData(value);
          setError(null);
        }
      } catch (e) {
        if (ticket === latest.current) setError(e instanceof Error ? e : new Error(String(e)));
      } finally {
        if (ticket === latest.current) setLoading(false);
      }
    },
    // eslint-disable-next-line react-hooks/exhaustive-deps
    [key],
  );
  useEffect(() => {
    void run(true);
  }, [run]);
  return { data, error, loading, reload: () => run(false) };
}

/**
 * Calls `tick` every `seconds` while `on`, the tab is visible and no earlier tick is still running:
 * a page left open in a background tab costs Postgres nothing.
 */
export function useLiveRefresh(on: boolean, seconds: number, tick: () => Promise<void>) {
  const running = useRef(false);
  const tickRef = useRef(tick);
  tickRef.current = tick;
  useEffect(() => {
    if (!on) return;
    const timer = setInterval(async () => {
      if (document.visibilityState !== "visible" || running.current) return;
      running.current = true;
      try {
        await tickRef.current();
      } finally {
        running.current = false;
      }
    }, seconds * 1000);
    return () => clearInterval(timer);
  }, [on, seconds]);
}

export function StatusBadge({ status }: { status: string }) {
  return <span class={`badge s-${status.toLowerCase()}`}>{status}</span>;
}

export function Problem({ error }: { error: ApiError | Error | null }) {
  if (!error) return null;
  const text =
    error instanceof ApiError && error.status === 403
      ? `Refused: ${error.detail} An admin token is needed for this.`
      : error.message;
  return (
    <p role="alert" class="error">
      {text}
    </p>
  );
}

/**
 * An action a person confirms: a reason (for the audit log), then a confirmation. The Idempotency-Key
 * is made when the dialog opens, so a double click, or a retry after a lost answer, acts once.
 */
export function ConfirmDialog({
  title,
  description,
  confirmLabel,
  needsReason = true,
  onConfirm,
  onClose,
  children,
}: {
  title: string;
  description: ComponentChildren;
  confirmLabel: string;
  needsReason?: boolean;
  onConfirm: (reason: string, key: string) => Promise<ComponentChildren>;
  onClose: (acted: boolean) => void;
  children?: ComponentChildren;
}) {
  const dialog = useRef<HTMLDialogElement>(null);
  const [key] = useState(() => idempotencyKey(confirmLabel.toLowerCase().replace(/[^a-z]+/g, "-")));
  const inFlight = useRef(false);
  const [reason, setReason] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<Error | null>(null);
  const [done, setDone] = useState<ComponentChildren | null>(null);
  useEffect(() => {
    dialog.current?.showModal();
  }, []);
  async function submit(event: Event) {
    event.preventDefault();
    // A ref, not state: a second click can come before the page re-renders.
    if (inFlight.current || done) return;
    inFlight.current = true;
    setBusy(true);
    setError(null);
    try {
      setDone(await onConfirm(reason.trim(), key));
    } catch (e) {
      setError(e instanceof Error ? e : new Error(String(e)));
    } finally {
      inFlight.current = false;
      setBusy(false);
    }
  }
  return (
    <dialog ref={dialog} aria-labelledby="dialog-title" onClose={() => onClose(done !== null)} class="confirm">
      <form method="dialog" onSubmit={submit}>
        <h2 id="dialog-title">{title}</h2>
        <div>{description}</div>
        {children}
        {needsReason && !done && (
          <>
            <label for="reason">Reason (kept in the audit log)</label>
            <textarea
              id="reason"
              required
              maxLength={1000}
              rows={2}
              value={reason}
              onInput={(e) => setReason((e.target as HTMLTextAreaElement).value)}
            />
          </>
        )}
        <Problem error={error} />
        {done && (
          <div role="status" class="notice">
            {done}
          </div>
        )}
        <div class="buttons">
          {!done && (
            <button type="submit" class="danger" disabled={busy || (needsReason && !reason.trim())}>
              {busy ? "Working…" : confirmLabel}
            </button>
          )}
          <button type="button" onClick={() => dialog.current?.close()}>
            {done ? "Close" : "Cancel"}
          </button>
        </div>
      </form>
    </dialog>
  );
}

export function Json({ value, label }: { value: unknown; label: string }) {
  return (
    <pre class="json" aria-label={label} tabIndex={0}>
      {JSON.stringify(value, null, 2)}
    </pre>
  );
}
