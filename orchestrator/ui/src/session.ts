import { createContext } from "preact";
import { useContext } from "preact/hooks";

import type { Session } from "./api";

export const SessionContext = createContext<Session>({ name: "", scope: "read", auth: "tokens" });

/** Whether the signed-in token may act (retry, abort, replay). */
export function useIsAdmin(): boolean {
  return useContext(SessionContext).scope === "admin";
}
