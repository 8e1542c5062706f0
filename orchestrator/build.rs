//! Builds the on-call web page (`ui/`, TypeScript and Vite) into `$OUT_DIR/ui`, which the binary
//! embeds (ADR 26). The sources are copied to `$OUT_DIR/ui-build` and built there with npm, so a
//! build writes nothing outside `target/` and two profiles never share a `node_modules`.
//! `SAGA_UI_DIST=<dir>` takes a page built elsewhere instead (the image's node stage).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

/// What the page is built from, relative to the crate; anything else under `ui/` is ignored.
const SOURCES: [&str; 6] =
    ["src", "index.html", "package.json", "package-lock.json", "tsconfig.json", "vite.config.ts"];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dist = out.join("ui");
    // sqlx::migrate! embeds the migrations at compile time but cannot tell cargo that a new file
    // appeared in the directory: without this, an incremental build misses a migration just added.
    println!("cargo:rerun-if-changed={}", manifest.join("../migrations/orchestrator").display());
    println!("cargo:rerun-if-env-changed=SAGA_UI_DIST");
    if let Ok(built) = env::var("SAGA_UI_DIST") {
        let built = PathBuf::from(built);
        println!("cargo:rerun-if-changed={}", built.display());
        assert!(built.join("index.html").is_file(), "SAGA_UI_DIST={} has no index.html", built.display());
        replace_dir(&built, &dist);
        return;
    }
    let ui = manifest.join("ui");
    for source in SOURCES {
        println!("cargo:rerun-if-changed={}", ui.join(source).display());
    }
    let work = out.join("ui-build");
    fs::create_dir_all(&work).expect("create the page's build directory");
    // npm ci only when the lockfile changed: a change of the sources alone rebuilds in seconds.
    let lock = fs::read(ui.join("package-lock.json")).expect("orchestrator/ui/package-lock.json");
    let installed = fs::read(work.join("package-lock.json")).ok();
    for source in SOURCES {
        let (from, to) = (ui.join(source), work.join(source));
        if from.is_dir() {
            replace_dir(&from, &to);
        } else {
            fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        }
    }
    if installed.as_deref() != Some(lock.as_slice()) || !work.join("node_modules").is_dir() {
        npm(&work, &["ci", "--no-audit", "--no-fund", "--prefer-offline"]);
    }
    let out_dir = dist.to_str().expect("OUT_DIR is UTF-8");
    npm(&work, &["run", "build", "--", "--outDir", out_dir, "--emptyOutDir"]);
    assert!(dist.join("index.html").is_file(), "the page's build wrote no index.html");
}

fn npm(dir: &Path, args: &[&str]) {
    let status = Command::new("npm").args(args).current_dir(dir).status().unwrap_or_else(|e| {
        panic!(
            "the orchestrator embeds its web page, built with npm (Node.js 20 or later), which could not run: {e}. \
             Install Node.js and npm (scripts/lib.sh does), or set SAGA_UI_DIST to a built page."
        )
    });
    assert!(status.success(), "npm {} failed in {} ({status})", args.join(" "), dir.display());
}

/// Makes `to` a copy of the directory `from`.
fn replace_dir(from: &Path, to: &Path) {
    if to.exists() {
        fs::remove_dir_all(to).unwrap_or_else(|e| panic!("remove {}: {e}", to.display()));
    }
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            replace_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}
