//! Connection mistakes from a fresh clone give errors that name the address
//! tried and what is wrong there: a closed port (connection refused), and an
//! HTTP server that is not gRPC (logitd's own metrics port, a plain HTTP/1.1
//! server). The gRPC code is kept: the Python package maps errors by it.

use std::{
    io::{Read, Write},
    net::TcpListener,
    time::Duration,
};

use clap::Parser;
use logitd::cli::{Cli, Command as ServerCommand};
use logitd_client::{ClientConfig, ClientError, RetryPolicy, TeacherClient};
use tonic::{Code, Status};

/// Two quick attempts (the retry path runs, the test stays short).
fn config(uri: &str) -> ClientConfig {
    let mut c = ClientConfig::new([uri.to_string()]);
    c.retry = RetryPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
    };
    c.timeout = Duration::from_secs(30);
    c
}

/// The status and the whole error text of connecting to `uri`, which must fail.
async fn connect_error(uri: &str) -> (Status, String) {
    match TeacherClient::connect(config(uri)).await {
        Ok(_) => panic!("{uri} is no teacher, yet the client connected"),
        Err(e) => {
            let text = e.to_string();
            eprintln!("{uri}: {text}");
            match e {
                ClientError::Rpc { status, .. } => (status, text),
                other => panic!("expected an RPC error, got {other}"),
            }
        }
    }
}

/// A port nothing listens on: bound, then closed.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_closed_port_names_the_address_and_connection_refused() {
    let uri = format!("http://127.0.0.1:{}", closed_port());
    let (status, text) = connect_error(&uri).await;
    assert_eq!(status.code(), Code::Unavailable, "{text}");
    let m = status.message();
    assert!(m.contains(&format!("could not connect to {uri} (connection refused)")), "{text}");
    assert!(text.contains("after 2 attempt(s)") && text.contains(&uri), "{text}");
}

#[tokio::test]
async fn several_endpoints_are_all_named() {
    let uris = [closed_port(), closed_port()].map(|p| format!("http://127.0.0.1:{p}"));
    let mut c = config(&uris[0]);
    c.endpoints = uris.to_vec();
    c.timeout = Duration::from_secs(3);
    let e = TeacherClient::connect(c).await.err().expect("no endpoint listens");
    let text = e.to_string();
    eprintln!("{text}");
    assert!(text.contains(&uris[0]) && text.contains(&uris[1]), "{text}");
}

const HINT: &str = "not gRPC: is it logitd's metrics port (--metrics-listen) or its HTTP \
                    front (--http-listen) instead of the gRPC --listen port?";

/// logitd's own `/metrics` port (the Prometheus exporter, HTTP/1.1 and h2c):
/// what a user reaches when they swap the two ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_says_http_not_grpc_and_names_the_ports() {
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
            let _ = tx.send(b.metrics);
        },
        std::future::pending(),
    ));
    let metrics = tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .expect("the server bound its ports within 60 s")
        .expect("the server stopped before binding");
    let uri = format!("http://{metrics}");
    let (status, text) = connect_error(&uri).await;
    server.abort();
    // tonic maps HTTP 404 to UNIMPLEMENTED; the code stays.
    assert_eq!(status.code(), Code::Unimplemented, "{text}");
    let m = status.message();
    assert!(m.starts_with(&format!("{uri} answers HTTP (status 404) but {HINT}")), "{text}");
    assert!(m.contains("grpc-status header missing"), "{text}");
}

/// A plain HTTP/1.1 server answering 404 to anything (no HTTP/2).
#[tokio::test]
async fn a_plain_http1_server_says_http_not_grpc() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot found",
            );
            // Close our side only, then read until the client closes: a
            // connection dropped at once can reset the client's own writes
            // (its HTTP/2 preface) before it reads the reply, and the client
            // then sees a broken pipe instead of the HTTP/1 answer.
            let _ = conn.shutdown(std::net::Shutdown::Write);
            while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    let (status, text) = connect_error(&uri).await;
    // The client's HTTP/2 layer refuses the reply: INTERNAL, kept.
    assert_eq!(status.code(), Code::Internal, "{text}");
    let m = status.message();
    assert!(m.starts_with(&format!("{uri} answers HTTP/1, not HTTP/2, so {HINT}")), "{text}");
}
