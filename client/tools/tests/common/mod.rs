//! A real logitd server in this process, for the client's end-to-end tests.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use clap::Parser;
use logitd::cli::{Cli, Command as ServerCommand};
use logitd_client::{ClientConfig, TeacherClient, TeacherTargets};

/// The server task; abort it to stop the server.
pub type ServerTask = tokio::task::JoinHandle<Result<(), logitd::server::ServeError>>;

/// How long a server may take to bind its ports or to answer its first call.
pub const STARTUP: Duration = Duration::from_secs(60);

/// Starts `logitd serve` on the tiny Llama fixture on ephemeral ports; returns
/// its gRPC URI and the task (abort it to stop the server). Fails with the
/// server's error if it stops before binding, or after [`STARTUP`].
pub async fn tiny_server() -> (String, ServerTask) {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../server/tests/fixtures/tiny/llama");
    let argv = [
        "logitd",
        "serve",
        "--model",
        model,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let ServerCommand::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!()
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut server = tokio::spawn(logitd::server::serve_until(
        *args,
        move |b| {
            let _ = tx.send(b.grpc);
        },
        std::future::pending(),
    ));
    let addr = match tokio::time::timeout(STARTUP, rx).await {
        Ok(Ok(addr)) => addr,
        // The sender is gone: the server stopped before binding; say why.
        Ok(Err(_)) => panic!("the server stopped before binding: {:?}", (&mut server).await),
        Err(_) => panic!("the server bound no port within {STARTUP:?}"),
    };
    (format!("http://{addr}"), server)
}

/// Connects to `uri` once the server answers (the model is loaded), within
/// [`STARTUP`]; fails with the last error, or with the server's own error
/// when its task has ended, instead of waiting for ever.
pub async fn connect(uri: &str, server: &mut ServerTask) -> TeacherClient {
    let deadline = Instant::now() + STARTUP;
    loop {
        let error = match TeacherClient::connect(ClientConfig::new([uri.to_string()])).await {
            Ok(c) => return c,
            Err(e) => e,
        };
        if server.is_finished() {
            panic!("the server stopped: {:?} (last connect error: {error})", server.await);
        }
        assert!(
            Instant::now() < deadline,
            "no answer from {uri} within {STARTUP:?}; last error: {error}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The same targets: the same positions, sampled ids and counts (and token
/// ranks and candidate offsets, where scored), bit for bit; the teacher's
/// log-probabilities, lse (and token and candidate log-probabilities) as many
/// and within 1e-5. The server's forward pass is not bit for bit the same for
/// every batch it packs a sequence into (tiles of other shapes sum in another
/// order; seen: 4.8e-7 on one lse with two servers), and which requests it
/// batches together depends on timing.
pub fn same_targets(got: &[TeacherTargets], want: &[TeacherTargets], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: sequences");
    for (n, (g, w)) in got.iter().zip(want).enumerate() {
        let same_samples = (g.num_samples, g.first_position, &g.offsets, &g.token_ids, &g.counts)
            == (w.num_samples, w.first_position, &w.offsets, &w.token_ids, &w.counts)
            && (&g.token_ranks, &g.candidate_offsets) == (&w.token_ranks, &w.candidate_offsets);
        assert!(same_samples, "{what}: sequence {n} has other samples:\n{g:?}\n{w:?}");
        for (field, a, b) in [
            ("logprobs", &g.logprobs, &w.logprobs),
            ("lse", &g.lse, &w.lse),
            ("token_logprobs", &g.token_logprobs, &w.token_logprobs),
            ("candidate_logprobs", &g.candidate_logprobs, &w.candidate_logprobs),
        ] {
            assert_eq!(
                a.len(),
                b.len(),
                "{what}: sequence {n} has {} {field}, not {}:\n{g:?}\n{w:?}",
                a.len(),
                b.len()
            );
            assert!(
                // NaN where there is no next token, in both.
                a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 || (x.is_nan() && y.is_nan())),
                "{what}: sequence {n} has other {field}:\n{g:?}\n{w:?}"
            );
        }
    }
}
