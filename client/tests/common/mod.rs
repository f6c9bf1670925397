//! A real logitd server in this process, for the client's end-to-end tests.

use clap::Parser;
use logitd::config::{Cli, Command as ServerCommand};

/// Starts `logitd serve` on the tiny Llama fixture on ephemeral ports; returns
/// its gRPC URI and the task (abort it to stop the server).
pub async fn tiny_server()
-> (String, tokio::task::JoinHandle<Result<(), logitd::server::ServeError>>) {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../server/tests/fixtures/tiny/llama");
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
    let server = tokio::spawn(logitd::server::serve_until(
        *args,
        move |b| {
            let _ = tx.send(b.grpc);
        },
        std::future::pending(),
    ));
    (format!("http://{}", rx.await.unwrap()), server)
}
