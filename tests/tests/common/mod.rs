//! logitd servers run in this test process (the library's `serve_until`), on
//! 127.0.0.1, stopped by the test or when dropped.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Child,
    time::Duration,
};

use clap::Parser;
use logitd::{
    cli::{Cli, Command},
    server::{Bound, ServeError, serve_until},
};
use tokio::sync::oneshot;

pub fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/tests/fixtures/tiny").join(name)
}

pub fn cached(file: &str) -> PathBuf {
    let p = logitd::model::cache_dir().join("teachers").join(file);
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
        let mut task = tokio::spawn(serve_until(
            *args,
            move |b| {
                let _ = bound_tx.send(b);
            },
            async move {
                let _ = stop_rx.await;
            },
        ));
        let addr = match tokio::time::timeout(STARTUP, bound_rx).await {
            Ok(Ok(bound)) => bound.grpc,
            // The sender is gone: the server stopped before binding; say why.
            Ok(Err(_)) => panic!("the server stopped before binding: {:?}", (&mut task).await),
            Err(_) => panic!("the server bound no port within {STARTUP:?}"),
        };
        InProcess { addr, uri: format!("http://{addr}"), stop: Some(stop_tx), task: Some(task) }
    }

    /// Waits until the server answers a client (the model loaded and warmed
    /// up), within [`STARTUP`]: a real teacher's load can outlast one client's
    /// retries on a busy machine.
    pub async fn ready(&self) {
        let deadline = tokio::time::Instant::now() + STARTUP;
        loop {
            let config = logitd_client::ClientConfig::new([self.uri.clone()]);
            match logitd_client::TeacherClient::connect(config).await {
                Ok(_) => return,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{} was not ready within {STARTUP:?}: {e}", self.uri),
            }
        }
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

/// How long a server may take to bind its ports or print its addresses.
pub const STARTUP: Duration = Duration::from_secs(60);

/// The first line `child` prints on its (piped) stdout, read within
/// [`STARTUP`]; fails with `log()` (the child's stderr so far) when none comes,
/// instead of blocking for ever. The stdout pipe stays open on the reading
/// thread (a closed pipe would kill a child that prints again).
pub fn first_line(child: &mut Child, log: impl Fn() -> String) -> String {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining (and holding) the pipe until the child exits.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    match rx.recv_timeout(STARTUP) {
        Ok(line) if !line.is_empty() => line,
        Ok(_) => {
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "the process closed stdout without a line ({:?}); log:\n{}",
                child.try_wait(),
                log()
            )
        }
        Err(_) => panic!("no line on stdout within {STARTUP:?}; log:\n{}", log()),
    }
}

/// `n` short sequences of ids below 96 (the tiny fixtures' vocabulary), of
/// lengths 4 to 12, varied by `salt`.
pub fn batch(n: usize, salt: u32) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..(4 + (i * 3) % 9) as u32).map(|p| (p * 13 + i as u32 * 7 + salt) % 96).collect()
        })
        .collect()
}

/// k = 32 with the given seed, the rest the defaults.
pub fn options(seed: u64) -> logitd_client::SampleOptions {
    logitd_client::SampleOptions { num_samples: 32, seed, ..Default::default() }
}
