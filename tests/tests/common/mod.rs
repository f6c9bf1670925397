//! logitd servers run in this test process (the library's `serve_until`), on
//! 127.0.0.1, stopped by the test or when dropped.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::Parser;
use logitd::{
    config::{Cli, Command},
    server::{Bound, ServeError, serve_until},
};
use tokio::sync::oneshot;

pub fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/tests/fixtures/tiny").join(name)
}

pub fn cached(file: &str) -> PathBuf {
    let p = logitd::server::cache_dir().join("teachers").join(file);
    assert!(p.exists(), "{} missing: run tests/fetch-teachers.sh all", p.display());
    p
}

/// A free port below the kernel's ephemeral range (32768 and up on Linux), so
/// servers other tests start on port 0 can never be given it, e.g. while a
/// test restarts its server on the same port.
pub fn free_low_port() -> u16 {
    let start = 20_000 + (std::process::id() as u16 % 10_000);
    (0..10_000u16)
        .map(|i| 20_000 + (start - 20_000 + i) % 10_000)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port in 20000..30000")
}

pub struct InProcess {
    pub addr: SocketAddr,
    pub uri: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

impl InProcess {
    /// Starts `logitd serve --model MODEL --listen 127.0.0.1:PORT EXTRA...`
    /// (port 0 = any) and returns once it listens (the model may still load).
    pub async fn start(model: &Path, port: u16, extra: &[&str]) -> InProcess {
        let listen = format!("127.0.0.1:{port}");
        let mut argv =
            vec!["logitd", "serve", "--model", model.to_str().unwrap(), "--listen", &listen];
        argv.extend(["--metrics-listen", "127.0.0.1:0"]);
        argv.extend(extra);
        let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
            unreachable!()
        };
        let (bound_tx, bound_rx) = oneshot::channel::<Bound>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_until(
            *args,
            move |b| {
                let _ = bound_tx.send(b);
            },
            async move {
                let _ = stop_rx.await;
            },
        ));
        let addr = bound_rx.await.expect("the server bound its ports").grpc;
        InProcess { addr, uri: format!("http://{addr}"), stop: Some(stop_tx), task: Some(task) }
    }

    /// Drains and stops the server.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
