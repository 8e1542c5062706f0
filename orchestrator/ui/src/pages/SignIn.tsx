import { useState } from "preact/hooks";

import { api, ApiError, token, type Session } from "../api";

/** Asks for a bearer token once; it is kept for this tab (sessionStorage) and never sent elsewhere. */
export function SignIn({ message, onSignedIn }: { message: string | null; onSignedIn: (s: Session) => void }) {
  const [secret, setSecret] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  async function submit(event: Event) {
    event.preventDefault();
    setBusy(true);
    setError(null);
    token.set(secret.trim());
    try {
      onSignedIn(await api.session());
    } catch (e) {
      token.clear();
      setError(
        e instanceof ApiError && e.status === 401
          ? "That token is not valid. Check it with whoever runs the orchestrator (API_TOKENS)."
          : String(e),
      );
    } finally {
      setBusy(false);
    }
  }

  return (
    <main class="page signin">
      <h1>Sign in</h1>
      <p>
        Enter an API token of this orchestrator. A <strong>read</strong> token shows everything; an{" "}
        <strong>admin</strong> token can also retry, abort and replay. It is kept for this tab only.
      </p>
      {message && !error && (
        <p role="status" class="notice">
          {message}
        </p>
      )}
      {error && (
        <p role="alert" class="error">
          {error}
        </p>
      )}
      <form onSubmit={submit}>
        <label for="token">API token</label>
        <input
          id="token"
          name="token"
          type="password"
          autocomplete="off"
          required
          minLength={1}
          value={secret}
          onInput={(e) => setSecret((e.target as HTMLInputElement).value)}
        />
        <button type="submit" disabled={busy || !secret.trim()}>
          {busy ? "Checking…" : "Sign in"}
        </button>
      </form>
    </main>
  );
}
