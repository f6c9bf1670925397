//! Security: TLS and mutual TLS with certificates made in the test (rcgen),
//! the concurrency limit, and private data kept out of the logs.

use crate::common;

use std::{path::Path, time::Duration};

use common::{Server, request, seq, tiny};
use logitd_proto::v1::{GetModelInfoRequest, teacher_client::TeacherClient};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

/// A CA, and PEM certificate + key pairs it signed.
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

/// Connects with `tls` to the server's port (as https) and asks for ModelInfo,
/// retrying while the model loads.
async fn model_info(server: &Server, tls: ClientTlsConfig) -> Result<String, tonic::Status> {
    let addr = server.grpc.replace("http://", "https://");
    let endpoint = Channel::from_shared(addr).unwrap().tls_config(tls).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let result = match endpoint.connect().await {
            Ok(ch) => TeacherClient::new(ch)
                .get_model_info(GetModelInfoRequest {})
                .await
                .map(|r| r.into_inner().model_id),
            Err(e) => Err(tonic::Status::unavailable(format!("connect: {e:?}"))),
        };
        match result {
            Err(s) if s.message().contains("still loading") => {}
            // A refused handshake is final; the port is open from the start.
            other => return other,
        }
        assert!(std::time::Instant::now() < deadline, "server not ready: {}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_only_clients_that_trust_its_certificate() {
    let dir = tempdir("tls");
    let pki = Pki::new("logitd test CA");
    let (cert, key) = pki.leaf(&["localhost", "127.0.0.1"]);
    let cert_path = write(&dir, "server.pem", &cert);
    let key_path = write(&dir, "server.key", &key);
    let server = Server::start(&tiny("llama"), &["--tls-cert", &cert_path, "--tls-key", &key_path]);
    let trusting = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    assert_eq!(model_info(&server, trusting).await.unwrap(), "llama@2eeb6259b860");

    // A client trusting another CA refuses the server.
    let other = Pki::new("another CA");
    let distrusting = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&other.ca_pem))
        .domain_name("localhost");
    assert!(model_info(&server, distrusting).await.is_err());
    // A certificate for another name is refused.
    let wrong_name = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("teacher.example.com");
    assert!(model_info(&server, wrong_name).await.is_err());
    // Plaintext HTTP/2 to the TLS port gets nowhere.
    let plain = Channel::from_shared(server.grpc.clone()).unwrap().connect().await;
    if let Ok(ch) = plain {
        let r = TeacherClient::new(ch).get_model_info(GetModelInfoRequest {}).await;
        assert!(r.is_err(), "a plaintext call was answered over TLS");
    }
    let log = server.log();
    assert!(!log.contains("PRIVATE KEY"), "{log}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_client_ca() {
    let dir = tempdir("mtls");
    let server_pki = Pki::new("server CA");
    let client_pki = Pki::new("client CA");
    let (cert, key) = server_pki.leaf(&["localhost"]);
    let (cert_path, key_path) = (write(&dir, "s.pem", &cert), write(&dir, "s.key", &key));
    let client_ca = write(&dir, "client-ca.pem", &client_pki.ca_pem);
    let server = Server::start(
        &tiny("llama"),
        &["--tls-cert", &cert_path, "--tls-key", &key_path, "--tls-client-ca", &client_ca],
    );
    let base = || {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&server_pki.ca_pem))
            .domain_name("localhost")
    };
    // With a certificate from the client CA: served.
    let (c, k) = client_pki.leaf(&["trainer-1"]);
    let ok = base().identity(Identity::from_pem(&c, &k));
    assert_eq!(model_info(&server, ok).await.unwrap(), "llama@2eeb6259b860");
    // Without one, or with one from another CA (here the server's own): refused.
    assert!(model_info(&server, base()).await.is_err(), "served without a client certificate");
    let (c, k) = server_pki.leaf(&["intruder"]);
    let rogue = base().identity(Identity::from_pem(&c, &k));
    assert!(model_info(&server, rogue).await.is_err(), "served a certificate from another CA");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_concurrency_limit_are_refused_and_health_still_answers() {
    let server = Server::start(&tiny("llama"), &["--max-concurrent-requests", "2"]);
    let mut c = server.client().await;
    // Two open streams hold both slots.
    let (tx1, rx1) = tokio::sync::mpsc::channel(1);
    let (tx2, rx2) = tokio::sync::mpsc::channel(1);
    let mut held = Vec::new();
    for (tx, rx) in [(tx1, rx1), (tx2, rx2)] {
        tx.send(request(vec![seq(&[1, 2], 0, None)], 8, 1)).await.unwrap();
        let mut s = c
            .sample_logits_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().expect("the stream answers");
        held.push((tx, s));
    }
    let e = c.sample_logits(request(vec![seq(&[1], 0, None)], 8, 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("2 calls are in progress"), "{}", e.message());
    // Probes are not counted against the limit.
    let ch = Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap();
    let status = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, 1, "health is SERVING while the Teacher is at its limit");
    // Closing a stream frees its slot.
    drop(held.pop());
    let mut answered = false;
    for _ in 0..100 {
        match c.sample_logits(request(vec![seq(&[1], 0, None)], 8, 1)).await {
            Ok(_) => {
                answered = true;
                break;
            }
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answered, "the freed slot was not reused");
}

/// Token ids that occur nowhere else: five-digit ids, checked as whole
/// numbers, below the ephemeral port range (32768 and up) so that a port the
/// test servers bind cannot be one of them (38261 once was: a CI failure).
const MARKERS: [u32; 6] = [17_513, 28_261, 29_347, 21_879, 13_617, 25_029];
/// An id over the vocabulary: refused, named to the caller, not logged.
const BAD_ID: u32 = 7_654_321;
const SECRET_TEXT: &str = "Zanzibar quokkas whisper";

fn assert_private(what: &str, log: &str) {
    // The addresses the servers bound are logged; their ports are not token ids.
    let mut rest = log.split("127.0.0.1:");
    let mut text = rest.next().unwrap_or_default().to_string();
    for part in rest {
        text.push(' ');
        text.push_str(part.trim_start_matches(|c: char| c.is_ascii_digit()));
    }
    let words: Vec<&str> = text.split(|c: char| !c.is_ascii_digit()).collect();
    for m in MARKERS.iter().chain(&[BAD_ID]) {
        assert!(
            !words.contains(&m.to_string().as_str()),
            "{what}: token id {m} is in the log:\n{log}"
        );
    }
    for w in SECRET_TEXT.split(' ') {
        assert!(!log.contains(w), "{what}: text {w:?} is in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_ids_and_text_never_appear_in_the_logs_at_any_level() {
    let teacher = common::demo_teacher();
    for (level, json) in [("trace", false), ("trace", true), ("debug", false), ("info", true)] {
        let mut extra = vec!["--max-num-samples", "512"];
        if json {
            extra.push("--log-json");
        }
        let server = Server::start_with_log(&teacher, &extra, level);
        let mut c = server.client().await;
        let good = request(vec![seq(&MARKERS, 1, Some(7)), seq(&MARKERS[..3], 0, None)], 64, 3);
        c.sample_logits(good.clone()).await.unwrap();
        // Errors name the offending id to the caller, but not in the log.
        let bad = request(vec![seq(&[MARKERS[0], BAD_ID], 0, None)], 64, 3);
        let e = c.sample_logits(bad).await.unwrap_err();
        assert!(e.message().contains(&BAD_ID.to_string()), "{e:?}");
        let mut s = c
            .sample_logits_stream(futures::stream::iter([good.clone(), good]))
            .await
            .unwrap()
            .into_inner();
        while s.message().await.unwrap().is_some() {}
        server.signal(libc::SIGTERM);
        let log = server.wait_log();
        assert!(log.lines().count() > 3, "{level}: too little logged to mean anything:\n{log}");
        assert_private(&format!("serve --log {level} json={json}"), &log);
    }
    // `logitd sample` prints its results, but its log stays private.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_logitd"))
        .args(["sample", "--model"])
        .arg(&teacher)
        .args(["--text", SECRET_TEXT, "--num-samples", "16", "--log", "trace"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_private("sample --log trace", &String::from_utf8_lossy(&out.stderr));
}
