//! `logitd_client::TeacherClient` against a real logitd server with TLS and a
//! bearer token (certificates made here with rcgen): with the right CA and
//! token it connects and samples, the same targets as a plaintext server gives;
//! a missing or wrong token is UNAUTHENTICATED and not retried; a client
//! trusting another CA, or expecting another name, gets no answer; with mutual
//! TLS the client's certificate is sent from `ClientConfig::tls`.

use crate::common;

use std::{path::Path, time::Duration};

use common::{InProcess, tiny};
use logitd_client::{ClientConfig, ClientError, SampleOptions, TeacherClient};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::{
    Code,
    transport::{Certificate, ClientTlsConfig, Identity},
};

/// A CA, and PEM certificate + key pairs it signs.
struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Pki { ca_pem, issuer: Issuer::new(params, key) }
    }

    /// (certificate PEM, key PEM) for these subject alternative names.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("logitd-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const TOKEN: &str = "s3cret-training-run-7";

fn config(uri: &str, tls: Option<ClientTlsConfig>, token: Option<&str>) -> ClientConfig {
    let mut c = ClientConfig::new([uri.to_string()]);
    c.tls = tls;
    c.bearer_token = token.map(str::to_string);
    c.retry.max_attempts = 4;
    c.retry.initial_backoff = Duration::from_millis(20);
    c.retry.max_backoff = Duration::from_millis(200);
    c.timeout = Duration::from_secs(30);
    c
}

fn trusting(pki: &Pki) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost")
}

/// Connects, retrying while the model loads (UNAVAILABLE "still loading").
async fn connect(config: ClientConfig) -> Result<TeacherClient, ClientError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match TeacherClient::connect(config.clone()).await {
            Err(e) if e.to_string().contains("still loading") => {
                assert!(std::time::Instant::now() < deadline, "the model never loaded: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

fn batch() -> Vec<Vec<u32>> {
    (0..3u32).map(|i| (0..(5 + 4 * i)).map(|p| (p * 11 + i * 5 + 1) % 96).collect()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_samples_over_tls_with_its_bearer_token() {
    let dir = tempdir("client-tls");
    let pki = Pki::new("logitd test CA");
    let (cert, key) = pki.leaf(&["localhost"]);
    let (cert_path, key_path) = (write(&dir, "s.pem", &cert), write(&dir, "s.key", &key));
    let server = InProcess::start(
        &tiny("llama"),
        0,
        &["--tls-cert", &cert_path, "--tls-key", &key_path, "--auth-token", TOKEN],
    )
    .await;
    let plain = InProcess::start(&tiny("llama"), 0, &[]).await;
    let uri = format!("https://{}", server.addr);
    let options = SampleOptions { num_samples: 32, seed: 5, ..Default::default() };

    // The right CA and token: connected, and the same targets as plaintext.
    let client = connect(config(&uri, Some(trusting(&pki)), Some(TOKEN))).await.unwrap();
    assert_eq!(client.model_info().vocab_size, 96);
    let got = client.sample_targets(&batch(), None, options).await.unwrap();
    let want = connect(config(&plain.uri, None, None))
        .await
        .unwrap()
        .sample_targets(&batch(), None, options)
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got, want, "TLS and plaintext servers give the same targets");

    // No token, or a wrong one: UNAUTHENTICATED at once, never retried.
    for token in [None, Some("s3cret-training-run-8")] {
        let e = connect(config(&uri, Some(trusting(&pki)), token)).await.err().expect("refused");
        assert!(
            matches!(&e, ClientError::Rpc { status, attempts: 1 } if status.code() == Code::Unauthenticated),
            "token {token:?}: {e}"
        );
    }
    // A token that cannot be a header value: a configuration error.
    let e = connect(config(&uri, Some(trusting(&pki)), Some("bad\ntoken"))).await.err().unwrap();
    assert!(matches!(e, ClientError::Config(_)), "{e}");

    // Another CA, or another expected name: the handshake fails, no answer.
    let other = Pki::new("another CA");
    let wrong_name = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("teacher.example.com");
    for (what, tls) in [("another CA", trusting(&other)), ("another name", wrong_name)] {
        let e = connect(config(&uri, Some(tls), Some(TOKEN))).await.err().expect(what);
        eprintln!("{what}: {e}");
        // tonic reports a failed handshake as UNAVAILABLE; the message names
        // the cause, and the client gives up at once (every attempt would fail
        // alike), where it retries other connection failures.
        match &e {
            ClientError::Rpc { status, attempts } => {
                assert_eq!(*attempts, 1, "{what}: a refused certificate was retried");
                assert_eq!(status.code(), Code::Unavailable, "{what}: {e}");
                assert!(
                    status.message().contains("invalid peer certificate"),
                    "{what}: not a certificate error: {e}"
                );
            }
            other => panic!("{what}: {other}"),
        }
    }
    // Plaintext to the TLS port: no answer either.
    let e = connect(config(&format!("http://{}", server.addr), None, Some(TOKEN))).await.err();
    assert!(e.is_some(), "a plaintext client was answered by the TLS port");
    server.stop().await;
    plain.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_presents_its_certificate_for_mutual_tls() {
    let dir = tempdir("client-mtls");
    let server_pki = Pki::new("server CA");
    let client_pki = Pki::new("client CA");
    let (cert, key) = server_pki.leaf(&["localhost"]);
    let (cert_path, key_path) = (write(&dir, "s.pem", &cert), write(&dir, "s.key", &key));
    let client_ca = write(&dir, "client-ca.pem", &client_pki.ca_pem);
    let server = InProcess::start(
        &tiny("llama"),
        0,
        &["--tls-cert", &cert_path, "--tls-key", &key_path, "--tls-client-ca", &client_ca],
    )
    .await;
    let uri = format!("https://{}", server.addr);
    let (c, k) = client_pki.leaf(&["trainer-1"]);
    let with_cert = trusting(&server_pki).identity(Identity::from_pem(&c, &k));
    let client = connect(config(&uri, Some(with_cert), None)).await.unwrap();
    let options = SampleOptions { num_samples: 16, seed: 2, ..Default::default() };
    assert_eq!(client.sample_targets(&batch(), None, options).await.unwrap().len(), 3);
    // Without a client certificate: refused.
    let e = connect(config(&uri, Some(trusting(&server_pki)), None)).await.err();
    assert!(e.is_some(), "served without a client certificate");
    server.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}
