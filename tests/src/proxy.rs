//! A TCP proxy in front of a private broker, so that a test can cut every client's connection at
//! once — what clients see when a broker restarts or fails over — without the in-memory broker
//! losing its topics, as killing it would.

use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards `127.0.0.1:<port>` to `upstream` until dropped.
pub struct Proxy {
    pub port: u16,
    cut: watch::Sender<Option<Instant>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cut, _) = watch::channel(None::<Instant>);
        let cuts = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                // While cut, a connection is accepted and closed at once, like a refused one.
                if cuts.borrow().is_some_and(|until| Instant::now() < until) {
                    drop(client);
                    continue;
                }
                tokio::spawn(forward(client, upstream.clone(), cuts.subscribe()));
            }
        });
        Ok(Proxy { port, cut, task })
    }

    /// Closes every open connection and refuses new ones for `outage`.
    pub fn cut(&self, outage: Duration) {
        self.cut.send_replace(Some(Instant::now() + outage));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(mut client: TcpStream, upstream: String, mut cuts: watch::Receiver<Option<Instant>>) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
    cuts.mark_unchanged();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        // Any cut ends the connection; dropping both halves resets them.
        _ = cuts.changed() => {}
    }
}
