//! Shutdown on SIGTERM or Ctrl-C.

use tokio_util::sync::CancellationToken;

/// A token cancelled when the process receives SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("install SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received");
        cancel.cancel();
    });
    token
}

/// Ends the process with `code` after `deadline`, on a thread of its own, so that a shutdown
/// that hangs (a blocking client call to a broker that is gone, a pool waiting for a database
/// that does not answer) still ends in time. Called when a shutdown starts.
pub fn exit_by(deadline: std::time::Duration, code: i32) {
    std::thread::spawn(move || {
        std::thread::sleep(deadline);
        eprintln!("shutdown took longer than {deadline:?}; exiting now");
        std::process::exit(code);
    });
}
