import { defineConfig } from "vite";

// The page is served by the orchestrator under /ui/ (ADR 26); the build writes where build.rs says.
export default defineConfig({
  base: "/ui/",
  build: {
    target: "es2022",
    assetsDir: "assets",
    sourcemap: false,
    // One small bundle: the page must stay light (first load < 200 KB compressed).
    chunkSizeWarningLimit: 150,
  },
  server: {
    // `npm exec vite` during development: the API of an orchestrator started by scripts/demo.
    proxy: { "/api": "http://127.0.0.1:8080" },
  },
});
