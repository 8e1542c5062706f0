import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { LocationProvider, Route, Router } from "preact-iso";

import { api, ApiError, token, whenUnauthorized, type Session } from "./api";
import { SessionContext } from "./session";
import { SignIn } from "./pages/SignIn";
import { Overview } from "./pages/Overview";
import { SagaList } from "./pages/SagaList";
import { SagaPage } from "./pages/SagaPage";
import { DeadLetters } from "./pages/DeadLetters";
import "./style.css";

function App() {
  // undefined: asking who we are; null: signed out.
  const [session, setSession] = useState<Session | null | undefined>(undefined);
  const [message, setMessage] = useState<string | null>(null);
  const [fatal, setFatal] = useState<string | null>(null);

  useEffect(() => {
    whenUnauthorized((detail) => {
      token.clear();
      setSession(null);
      setMessage(detail || "The token is not valid.");
    });
    api
      .session()
      .then(setSession)
      .catch((error: unknown) => {
        if (error instanceof ApiError && error.status === 401) return; // handled above
        setFatal(String(error));
      });
  }, []);

  if (fatal) {
    return (
      <main class="page">
        <h1>Sagas</h1>
        <p role="alert" class="error">
          The orchestrator's API did not answer: {fatal}
        </p>
        <button type="button" onClick={() => location.reload()}>
          Try again
        </button>
      </main>
    );
  }
  if (session === undefined) return <p class="page">Loading…</p>;
  if (session === null) {
    return (
      <SignIn
        message={message}
        onSignedIn={(s) => {
          setMessage(null);
          setSession(s);
        }}
      />
    );
  }
  return (
    <SessionContext.Provider value={session}>
      <LocationProvider>
        <Header
          session={session}
          onSignOut={() => {
            token.clear();
            setMessage("Signed out.");
            setSession(null);
          }}
        />
        <main id="main" class="page">
          <Router>
            <Route path="/ui/" component={Overview} />
            <Route path="/ui/sagas" component={SagaList} />
            <Route path="/ui/sagas/:id" component={SagaPage} />
            <Route path="/ui/dead-letters" component={DeadLetters} />
            <Route default component={NotFound} />
          </Router>
        </main>
      </LocationProvider>
    </SessionContext.Provider>
  );
}

function Header({ session, onSignOut }: { session: Session; onSignOut: () => void }) {
  return (
    <>
      <a class="skip" href="#main">
        Skip to content
      </a>
      {session.auth === "disabled" && (
        <p class="banner" role="status">
          Authentication is off (AUTH_DISABLED): anyone who reaches this page can retry and abort sagas. For local
          development only.
        </p>
      )}
      <header class="top">
        <nav aria-label="Main">
          <a href="/ui/" class="brand">
            saga-orchestrator
          </a>
          <a href="/ui/">Overview</a>
          <a href="/ui/sagas">Sagas</a>
          <a href="/ui/sagas?status=NEEDS_ATTENTION">Needs attention</a>
          <a href="/ui/dead-letters">Dead letters</a>
        </nav>
        <span class="who">
          {session.auth === "tokens" ? (
            <>
              <span>
                {session.name} ({session.scope === "admin" ? "admin" : "read only"})
              </span>
              <button type="button" class="link" onClick={onSignOut}>
                Sign out
              </button>
            </>
          ) : (
            <span>no sign-in</span>
          )}
        </span>
      </header>
    </>
  );
}

function NotFound() {
  return (
    <>
      <h1>Not found</h1>
      <p>
        No page here. <a href="/ui/">Overview</a>
      </p>
    </>
  );
}

render(<App />, document.getElementById("app")!);
