//! The HTTP front (`--http-listen`) through a real `logitd serve`: vLLM's
//! `/v1/completions`, SGLang's `/generate` and TRL 1.1's
//! `/get_sequence_logprobs/` give the gRPC reply's values bit for bit at the
//! right positions (an alignment test that fails when the shift is off by
//! one either way); bad input gets the real servers' statuses and bodies
//! with logitd's messages while a canary's answers stay the same; auth, TLS,
//! the size limit, call slots, deadlines and the drain on the HTTP port.

// Loops run over token indices, which index several arrays at once.
#![allow(clippy::needless_range_loop)]

use crate::common;

use std::time::Duration;

use base64::Engine as _;
use common::{Server, tiny};
use logitd_proto::v1::{SampleLogitsRequest, SampleLogitsResponse, SamplingMethod, Sequence};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 call (`Connection: close`): status, headers, body.
async fn call_on<S>(
    mut stream: S,
    host: &str,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> (u16, String, Vec<u8>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        // The server closed the connection without an answer.
        return (0, String::new(), raw);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head[9..12].parse().unwrap();
    (status, head, raw[split + 4..].to_vec())
}

async fn call(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> (u16, String, Vec<u8>) {
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        // Nothing listens (a server that has exited): no answer.
        return (0, String::new(), Vec::new());
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        call_on(stream, addr, method, path, body, headers),
    )
    .await
    .expect("an HTTP answer within 120 s")
}

async fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, bytes) = call(addr, "POST", path, body.to_string().as_bytes(), &[]).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// The raw body of a POST, for what a parsed Value loses (key order).
async fn post_raw(addr: &str, path: &str, body: &Value) -> String {
    let (_, _, bytes) = call(addr, "POST", path, body.to_string().as_bytes(), &[]).await;
    String::from_utf8(bytes).unwrap()
}

/// Waits until the HTTP front's health answers 200 (the model is loaded).
async fn ready(server: &Server) -> String {
    let addr = http(server);
    server
        .eventually("HTTP health 200", Duration::from_secs(60), || {
            let addr = addr.clone();
            async move { (call(&addr, "GET", "/health", b"", &[]).await.0 == 200).then_some(()) }
        })
        .await;
    addr
}

fn http(server: &Server) -> String {
    server.http.clone().expect("the server prints its HTTP address")
}

/// The gRPC request the HTTP front makes for `prompts` (top-k from
/// position 0, realised tokens).
fn grpc_request(prompts: &[Vec<u32>], k: u32, temperature: f32) -> SampleLogitsRequest {
    SampleLogitsRequest {
        sequences: prompts
            .iter()
            .map(|p| Sequence { token_ids: p.clone(), ..Default::default() })
            .collect(),
        num_samples: k,
        temperature: Some(temperature),
        seed: Some(1),
        method: SamplingMethod::TopK as i32,
        return_token_logprobs: true,
        ..Default::default()
    }
}

async fn grpc(server: &Server, req: SampleLogitsRequest) -> SampleLogitsResponse {
    server.client().await.sample_logits(req).await.unwrap().into_inner()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![1, 5, 9, 2, 7, 3, 8], vec![4, 4, 6, 1]]
}

/// vLLM's prompt_logprobs entry j against gRPC position `j - 1 + shift`:
/// equal (bit for bit) for shift 0.
fn entry_matches(
    entry: &Value,
    token: u32,
    g: &logitd_proto::v1::SampledSequence,
    position: usize,
    k: usize,
) -> bool {
    let Some(row) = position.checked_sub(g.first_position as usize) else { return false };
    if row + 1 >= g.offsets.len() || row >= g.token_logprobs.len() {
        return false;
    }
    let map = entry.as_object().unwrap();
    let mut keys: Vec<u32> = map.keys().map(|s| s.parse().unwrap()).collect();
    let (a, b) = (g.offsets[row] as usize, g.offsets[row + 1] as usize);
    let top: Vec<u32> = g.token_ids[a..b].iter().take(k).copied().collect();
    // The realised token first, then the top k (without it).
    // (A parsed Value sorts keys: the order is checked on the raw body.)
    let mut expected = vec![token];
    expected.extend(top.iter().filter(|&&t| t != token));
    keys.sort_unstable();
    expected.sort_unstable();
    if keys != expected {
        return false;
    }
    let lp = |id: u32| map[&id.to_string()]["logprob"].as_f64().unwrap();
    let realised_ok = (lp(token) as f32).to_bits() == g.token_logprobs[row].to_bits();
    let top_ok = top.iter().enumerate().all(|(i, &id)| {
        (lp(id) as f32).to_bits() == g.logprobs[a + i].to_bits()
            && map[&id.to_string()]["rank"] == json!(i + 1)
    });
    let rank_ok =
        top.contains(&token) || map[&token.to_string()]["rank"] == json!(g.token_ranks[row]);
    realised_ok && top_ok && rank_ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_equal_grpc_at_the_shifted_positions() {
    let server = Server::start(&tiny("llama"), &["--http-listen", "127.0.0.1:0"]);
    let addr = http(&server);
    let (k, t) = (5usize, 0.7f32);
    let g = grpc(&server, grpc_request(&prompts(), k as u32, t)).await;
    let (status, reply) = post(
        &addr,
        "/v1/completions",
        &json!({"prompt": prompts(), "max_tokens": 1, "temperature": t, "prompt_logprobs": k, "seed": 1, "unknown_field": [1, {"x": 2}]}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "text_completion");
    let choices = reply["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, (choice, prompt)) in choices.iter().zip(prompts()).enumerate() {
        let pl = choice["prompt_logprobs"].as_array().unwrap();
        assert_eq!(pl.len(), prompt.len());
        assert!(pl[0].is_null(), "entry 0 is vLLM's placeholder");
        let gs = &g.sequences[i];
        for j in 1..prompt.len() {
            assert!(
                entry_matches(&pl[j], prompt[j], gs, j - 1, k),
                "token {j} of prompt {i}: {} vs gRPC position {} of {gs:?}",
                pl[j],
                j - 1
            );
            // Off by one either way fails.
            assert!(
                !entry_matches(&pl[j], prompt[j], gs, j, k),
                "token {j} also matches position {j}"
            );
            if j >= 2 {
                assert!(
                    !entry_matches(&pl[j], prompt[j], gs, j - 2, k),
                    "token {j} also matches position {}",
                    j - 2
                );
            }
        }
        // One generated token, from the last position's top k.
        assert_eq!(choice["finish_reason"], "length");
        let last = gs.offsets.len() - 2;
        let (a, b) = (gs.offsets[last] as usize, gs.offsets[last + 1] as usize);
        assert_eq!(choice["text"], "", "the tiny teacher has no tokenizer");
        assert!(b > a);
    }
    // vLLM's dict order, which a parsed Value does not keep: each entry
    // starts with the realised token.
    let raw = post_raw(
        &addr,
        "/v1/completions",
        &json!({"prompt": prompts()[0], "max_tokens": 1, "temperature": t, "prompt_logprobs": k, "seed": 1}),
    )
    .await;
    for &token in &prompts()[0][1..] {
        let opening = format!(r#"{{"{token}":{{"logprob":"#);
        assert!(raw.contains(&opening), "token {token} does not open its entry: {raw}");
    }
    assert_eq!(reply["usage"]["prompt_tokens"], 11);
    assert_eq!(reply["usage"]["completion_tokens"], 2);
    // The same through max_tokens 0 with echo, and one id list.
    let (status, one) = post(
        &addr,
        "/v1/completions",
        &json!({"prompt": prompts()[0], "max_tokens": 0, "echo": true, "temperature": t, "prompt_logprobs": k}),
    )
    .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["choices"][0]["prompt_logprobs"], choices[0]["prompt_logprobs"]);
    assert_eq!(one["usage"]["completion_tokens"], 0);

    // /v1/models, /health.
    let (status, _, body) = call(&addr, "GET", "/v1/models", b"", &[]).await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(models["data"][0]["id"], g.model_id.as_str());
    assert_eq!(call(&addr, "GET", "/health", b"", &[]).await.0, 200);
    let (status, _, body) = call(&addr, "GET", "/health/", b"", &[]).await;
    assert_eq!((status, body), (200, br#"{"status":"ok"}"#.to_vec()));
    // Counted by endpoint in the metrics.
    assert_eq!(
        server
            .metric_value(r#"logitd_requests_total{method="POST /v1/completions",status="OK"}"#)
            .await,
        3.0
    );
}

#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sglang_and_trl_bodies_equal_grpc() {
    let server = Server::start(&tiny("gemma2"), &["--http-listen", "127.0.0.1:0"]);
    let addr = http(&server);
    let p = prompts();
    let k = 4usize;
    let g = grpc(&server, grpc_request(&p, k as u32, 1.0)).await;

    // SGLang, as slime's on-policy distillation sends it
    // (slime/rollout/on_policy_distillation.py, THUDM/slime 624b824a):
    // input_token_logprobs[1:] are the teacher's log p of tokens 1..len.
    let (status, r) = post(
        &addr,
        "/generate",
        &json!({"input_ids": p[0], "sampling_params": {"temperature": 1.0, "max_new_tokens": 0, "skip_special_tokens": false},
                "return_logprob": true, "logprob_start_len": 0}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let itl = r["meta_info"]["input_token_logprobs"].as_array().unwrap();
    assert_eq!(itl.len(), p[0].len());
    assert_eq!(itl[0], json!([null, p[0][0], null]));
    for j in 1..p[0].len() {
        assert_eq!(itl[j][1], json!(p[0][j]));
        assert_eq!(
            (itl[j][0].as_f64().unwrap() as f32).to_bits(),
            g.sequences[0].token_logprobs[j - 1].to_bits(),
            "token {j}"
        );
    }
    assert_eq!(r["meta_info"]["finish_reason"], json!({"type": "length", "length": 0}));
    assert_eq!(r["output_ids"], json!([]));

    // SGLang, as Axolotl's online-teacher collator sends it (batched, top-k,
    // src/axolotl/integrations/kd/collator_online_teacher.py,
    // axolotl-ai-cloud/axolotl 067b021c).
    let (status, r) = post(
        &addr,
        "/generate",
        &json!({"input_ids": p, "return_logprob": true, "top_logprobs_num": k, "logprob_start_len": 0,
                "return_text_in_logprobs": true, "echo": true,
                "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "skip_special_tokens": false}}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let items = r.as_array().unwrap();
    assert_eq!(items.len(), 2);
    for (i, item) in items.iter().enumerate() {
        let top = item["meta_info"]["input_top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), p[i].len());
        assert!(top[0].is_null());
        let gs = &g.sequences[i];
        for j in 1..p[i].len() {
            let a = gs.offsets[j - 1] as usize;
            let row = top[j].as_array().unwrap();
            assert_eq!(row.len(), k);
            for (e, triple) in row.iter().enumerate() {
                assert_eq!(triple[1], json!(gs.token_ids[a + e]));
                assert_eq!(
                    (triple[0].as_f64().unwrap() as f32).to_bits(),
                    gs.logprobs[a + e].to_bits()
                );
            }
        }
    }

    // SGLang's token_ids_logprob (candidates at every position).
    let (status, r) = post(
        &addr,
        "/generate",
        &json!({"input_ids": p[1], "return_logprob": true, "logprob_start_len": 0, "token_ids_logprob": [3, 1],
                "sampling_params": {"max_new_tokens": 0}}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let cands = r["meta_info"]["input_token_ids_logprobs"].as_array().unwrap();
    assert!(cands[0].is_null());
    for j in 1..p[1].len() {
        let row = cands[j].as_array().unwrap();
        assert_eq!((row[0][1].clone(), row[1][1].clone()), (json!(3), json!(1)));
        // The realised token's candidate score equals its realised score.
        if p[1][j] == 1 {
            assert_eq!(row[1][0], r["meta_info"]["input_token_logprobs"][j][0]);
        }
    }

    // TRL 1.1's /get_sequence_logprobs/, json and binary: completion rows
    // from prompt_length on.
    let plens = [3usize, 0];
    for format in ["json", "binary"] {
        let (status, r) = post(
            &addr,
            "/get_sequence_logprobs/",
            &json!({"sequences": p, "prompt_lengths": plens, "top_logprobs": k, "temperature": 1.0, "response_format": format}),
        )
        .await;
        assert_eq!(status, 200, "{r}");
        if format == "json" {
            for i in 0..2 {
                let rows = r["logprobs"][i].as_array().unwrap();
                assert_eq!(rows.len(), p[i].len() - plens[i]);
                for (t, row) in rows.iter().enumerate() {
                    let j = plens[i] + t;
                    if j == 0 {
                        assert_eq!(row, &json!([]));
                        continue;
                    }
                    let gs = &g.sequences[i];
                    let a = gs.offsets[j - 1] as usize;
                    let ids = r["logprob_token_ids"][i][t].as_array().unwrap();
                    assert_eq!(ids[0], json!(gs.token_ids[a]));
                    assert_eq!(
                        (row[0].as_f64().unwrap() as f32).to_bits(),
                        gs.logprobs[a].to_bits()
                    );
                    // k entries, or k + 1 when the realised token is outside the top k.
                    let inside = gs.token_ids[a..a + k].contains(&p[i][j]);
                    assert_eq!(row.as_array().unwrap().len(), if inside { k } else { k + 1 });
                }
            }
            assert!(r["logprobs_b64"].is_null());
        } else {
            let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
            assert_eq!(keys.len(), 6, "{keys:?}");
            let shape: Vec<usize> = serde_json::from_value(r["shape"].clone()).unwrap();
            assert_eq!(shape, vec![2, 4, k]);
            assert_eq!(r["completion_lengths"], json!([4, 4]));
            let f32s = |key: &str| -> Vec<f32> {
                let b = base64::engine::general_purpose::STANDARD
                    .decode(r[key].as_str().unwrap())
                    .unwrap();
                b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
            };
            let i32s = |key: &str| -> Vec<i32> {
                let b = base64::engine::general_purpose::STANDARD
                    .decode(r[key].as_str().unwrap())
                    .unwrap();
                b.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
            };
            let (lps, ids, actual, actual_ids) = (
                f32s("logprobs_b64"),
                i32s("token_ids_b64"),
                f32s("actual_logprobs_b64"),
                i32s("actual_token_ids_b64"),
            );
            for i in 0..2 {
                for t in 0..4 {
                    let j = plens[i] + t;
                    let at = (i * 4 + t) * k;
                    if j == 0 {
                        assert!(
                            lps[at].is_infinite()
                                && ids[at] == 0
                                && actual[i * 4 + t].is_infinite()
                        );
                        continue;
                    }
                    let gs = &g.sequences[i];
                    let a = gs.offsets[j - 1] as usize;
                    assert_eq!(ids[at], gs.token_ids[a] as i32);
                    assert_eq!(lps[at].to_bits(), gs.logprobs[a].to_bits());
                    assert_eq!(actual[i * 4 + t].to_bits(), gs.token_logprobs[j - 1].to_bits());
                    assert_eq!(actual_ids[i * 4 + t], p[i][j] as i32);
                }
            }
        }
    }
}

/// Bad inputs, each with the status and body shape the real server gives
/// and logitd's message, while a canary's answer stays the same.
#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_the_real_servers_status_and_body() {
    let server = Server::start(
        &tiny("llama"),
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--max-num-samples",
            "64",
            "--default-num-samples",
            "8",
            "--max-message-bytes",
            "100000",
        ],
    );
    let addr = http(&server);
    let vocab = server
        .client()
        .await
        .get_model_info(logitd_proto::v1::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .vocab_size;
    let canary = json!({"prompt": [1, 2, 3, 4], "max_tokens": 1, "prompt_logprobs": 3, "seed": 5});
    let (_, alone) = post(&addr, "/v1/completions", &canary).await;
    let alone = alone["choices"][0]["prompt_logprobs"].clone();
    let canary_task = {
        let addr = addr.clone();
        let canary = canary.clone();
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..20 {
                let (s, r) = post(&addr, "/v1/completions", &canary).await;
                answers.push((s, r["choices"][0]["prompt_logprobs"].clone()));
            }
            answers
        })
    };
    let big = vec![1u32; 40_000];
    // (path, raw body, status, field that holds the message, words it must contain)
    let cases: Vec<(&str, Vec<u8>, u16, &str, String)> = vec![
        (
            "/v1/completions",
            b"{\"prompt\": [1, 2".to_vec(),
            400,
            "/error/message",
            "not valid JSON".into(),
        ),
        (
            "/v1/completions",
            b"[1, 2]".to_vec(),
            400,
            "/error/message",
            "must be a JSON object".into(),
        ),
        (
            "/v1/completions",
            br#"{"prompt": "hi"}"#.to_vec(),
            400,
            "/error/message",
            "no tokenizer for its teacher; send token ids".into(),
        ),
        (
            "/v1/completions",
            br#"{"prompt": [1, "x"]}"#.to_vec(),
            400,
            "/error/message",
            "`prompt`[1] must be a token id".into(),
        ),
        (
            "/v1/completions",
            br#"{"prompt": [1, -2]}"#.to_vec(),
            400,
            "/error/message",
            "`prompt`[1] = -2 is not a token id".into(),
        ),
        (
            "/v1/completions",
            br#"{"max_tokens": 1}"#.to_vec(),
            400,
            "/error/message",
            "Either prompt or prompt_embeds must be provided".into(),
        ),
        (
            "/v1/completions",
            br#"{"prompt": []}"#.to_vec(),
            400,
            "/error/message",
            "Either prompt or prompt_embeds must be provided".into(),
        ),
        (
            "/v1/completions",
            br#"{"prompt": [[1, 2], []]}"#.to_vec(),
            400,
            "/error/message",
            "sequence 1 is empty".into(),
        ),
        (
            "/v1/completions",
            format!(r#"{{"prompt": [1, {vocab}]}}"#).into_bytes(),
            400,
            "/error/message",
            format!("token id {vocab} is outside the vocabulary"),
        ),
        (
            "/v1/completions",
            br#"{"prompt": [1, 2], "prompt_logprobs": 65}"#.to_vec(),
            400,
            "/error/message",
            "Requested prompt logprobs of 65, which is greater than max allowed: 64".into(),
        ),
        (
            "/v1/completions",
            br#"{"prompt": [1, 2], "prompt_logprobs": -2}"#.to_vec(),
            400,
            "/error/message",
            "must be a positive value or -1".into(),
        ),
        (
            "/v1/completions",
            br#"{"prompt": [1, 2], "prompt_logprobs": "5"}"#.to_vec(),
            400,
            "/error/message",
            "`prompt_logprobs` must be an integer".into(),
        ),
        (
            "/v1/completions",
            br#"{"prompt": [1, 2], "n": 2}"#.to_vec(),
            400,
            "/error/message",
            "n = 2: logitd scores each prompt once".into(),
        ),
        (
            "/v1/completions",
            br#"{"prompt": [1, 2], "max_tokens": 2}"#.to_vec(),
            400,
            "/error/message",
            "logitd scores sequences and does not generate".into(),
        ),
        (
            "/v1/completions",
            br#"{"prompt": [1, 2], "max_tokens": 0}"#.to_vec(),
            400,
            "/error/message",
            "max_tokens must be at least 1, got 0".into(),
        ),
        (
            "/v1/completions",
            br#"{"prompt": [1, 2], "temperature": "hot"}"#.to_vec(),
            400,
            "/error/message",
            "`temperature` must be a number".into(),
        ),
        (
            "/v1/completions",
            br#"{"prompt": [1, 2], "model": "gpt-4"}"#.to_vec(),
            404,
            "/error/message",
            "The model `gpt-4` does not exist.".into(),
        ),
        (
            "/v1/completions",
            format!(r#"{{"prompt": {big:?}}}"#).into_bytes(),
            413,
            "/error/message",
            "larger than --max-message-bytes (100000 bytes)".into(),
        ),
        (
            "/generate",
            br#"{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 8}}"#.to_vec(),
            400,
            "/error/message",
            "max_new_tokens = 8: logitd scores sequences".into(),
        ),
        (
            "/generate",
            br#"{"input_ids": [1, 2], "top_logprobs_num": 65, "return_logprob": true}"#.to_vec(),
            400,
            "/error/message",
            "top_logprobs_num = 65".into(),
        ),
        (
            "/generate",
            br#"{"sampling_params": {}}"#.to_vec(),
            400,
            "/error/message",
            "Either text or input_ids should be provided.".into(),
        ),
        (
            "/generate",
            format!(r#"{{"input_ids": [{vocab}]}}"#).into_bytes(),
            400,
            "/error/message",
            "outside the vocabulary".into(),
        ),
        (
            "/get_sequence_logprobs/",
            br#"{"sequences": [[1, 2]]}"#.to_vec(),
            422,
            "/detail/0/msg",
            "`prompt_lengths` is required".into(),
        ),
        (
            "/get_sequence_logprobs/",
            br#"{"sequences": [[1, 2]], "prompt_lengths": [3]}"#.to_vec(),
            400,
            "/detail",
            "Sequence 0 has prompt_length=3 which is out of range [0, 2]".into(),
        ),
        (
            "/get_sequence_logprobs/",
            br#"{"sequences": [[1, 2]], "prompt_lengths": [1, 1]}"#.to_vec(),
            400,
            "/detail",
            "sequences and prompt_lengths must have the same length".into(),
        ),
        ("/get_sequence_logprobs/", b"{".to_vec(), 422, "/detail/0/msg", "not valid JSON".into()),
        (
            "/get_sequence_logprobs/",
            br#"{"sequences": [[1, 2]], "prompt_lengths": [1], "top_logprobs": 65}"#.to_vec(),
            400,
            "/detail",
            "top_logprobs = 65".into(),
        ),
    ];
    let n = cases.len();
    for (path, body, status, pointer, words) in cases {
        let (got, _, bytes) = call(&addr, "POST", path, &body, &[]).await;
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&bytes)));
        assert_eq!(
            got,
            status,
            "{path} {}: {v}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        let message = v
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{path}: no {pointer} in {v}"));
        assert!(message.contains(words.as_str()), "{path}: {message:?} lacks {words:?}");
        if path == "/v1/completions" && status != 413 {
            assert_eq!(v["error"]["code"], json!(status), "{v}");
            assert!(v["error"]["type"].is_string(), "{v}");
        }
    }
    assert_eq!(n, 27);
    // An unknown path: FastAPI's 404.
    let (status, _, body) = call(&addr, "POST", "/v1/chat/completions", b"{}", &[]).await;
    assert_eq!((status, body), (404, br#"{"detail":"Not Found"}"#.to_vec()));
    for (status, answer) in canary_task.await.unwrap() {
        assert_eq!(status, 200, "canary; log:\n{}", server.log());
        assert_eq!(answer, alone, "the canary's answer changed while bad input was refused");
    }
    // Every refusal is counted (INVALID_ARGUMENT, OUT_OF_RANGE for the size).
    let text = server.metrics_text().await;
    let refused: f64 = text
        .lines()
        .filter(|l| l.starts_with("logitd_requests_total{method=\"POST /"))
        .filter(|l| !l.contains("status=\"OK\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(refused, n as f64, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bearer_token_guards_every_endpoint_but_health() {
    let server =
        Server::start(&tiny("llama"), &["--http-listen", "127.0.0.1:0", "--auth-token", "s3cret"]);
    let addr = ready(&server).await;
    let body = br#"{"prompt": [1, 2], "max_tokens": 1}"#;
    let (status, _, bytes) = call(&addr, "POST", "/v1/completions", body, &[]).await;
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_slice::<Value>(&bytes).unwrap(),
        json!({"error": "Unauthorized: missing `authorization: Bearer <token>` metadata"})
    );
    let (status, _, bytes) = call(
        &addr,
        "POST",
        "/generate",
        br#"{"input_ids": [1]}"#,
        &[("Authorization", "Bearer nope")],
    )
    .await;
    assert_eq!(
        (status, serde_json::from_slice::<Value>(&bytes).unwrap()),
        (401, json!({"error": "Unauthorized: invalid bearer token"}))
    );
    assert_eq!(call(&addr, "GET", "/v1/models", b"", &[]).await.0, 401);
    let (status, _, models) =
        call(&addr, "GET", "/v1/models", b"", &[("Authorization", "Bearer s3cret")]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&models));
    assert_eq!(200, 200);
    assert_eq!(
        call(&addr, "POST", "/v1/completions", body, &[("Authorization", "Bearer s3cret")]).await.0,
        200
    );
    assert_eq!(
        call(&addr, "GET", "/health", b"", &[]).await.0,
        200,
        "health stays open for probes"
    );
    assert!(!server.log().contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlines_and_call_slots_on_the_http_port() {
    // A lone call waits up to 3 s for a fuller batch; the deadline is 1 s.
    let server = Server::start(
        &tiny("llama"),
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--max-wait-ms",
            "3000",
            "--request-timeout-s",
            "1",
            "--max-concurrent-requests",
            "1",
        ],
    );
    let addr = http(&server);
    server.client().await;
    let held = {
        let addr = addr.clone();
        tokio::spawn(
            async move { post(&addr, "/v1/completions", &json!({"prompt": [1, 2, 3]})).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The one slot is taken: 503 at once, naming the limit.
    let (status, r) = post(&addr, "/generate", &json!({"input_ids": [1, 2]})).await;
    assert_eq!(status, 503, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("1 calls are in progress"), "{r}");
    let (status, r) = held.await.unwrap();
    assert_eq!(status, 504, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the deadline (1000 ms after the request arrived) passed"),
        "{r}"
    );
    // The batcher drops the expired item when it next looks (at its 3 s timer).
    server
        .eventually("the expired call dropped before compute", Duration::from_secs(10), || async {
            (server.metric(r#"logitd_dropped_total{reason="deadline_exceeded"}"#).await
                == Some(1.0))
            .then_some(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_the_http_port_too() {
    // The real SmolLM2 teacher and 600 tokens, so that the drain lasts long
    // enough to watch (as service.rs's gRPC drain test); --max-wait-ms 60000
    // holds the lone call in the queue until the drain flushes it.
    let mut server = Server::start(
        &common::demo_teacher(),
        &["--http-listen", "127.0.0.1:0", "--max-wait-ms", "60000"],
    );
    let addr = ready(&server).await;
    let long: Vec<u32> = (0..600).map(|i| (i * 7919) % 49_152).collect();
    let queued = {
        let addr = addr.clone();
        let body = json!({"prompt": long, "prompt_logprobs": 2});
        tokio::spawn(async move { post(&addr, "/v1/completions", &body).await })
    };
    server
        .eventually("the call's tokens in the queue gauge", Duration::from_secs(20), || async {
            (server.metric("logitd_queue_tokens").await == Some(600.0)).then_some(())
        })
        .await;
    assert!(!queued.is_finished(), "answered before the signal");
    server.signal(libc::SIGTERM);
    // While draining: health 503, and new work refused with 503.
    server
        .eventually("health 503 while draining", Duration::from_secs(10), || {
            let addr = addr.clone();
            async move { (call(&addr, "GET", "/health", b"", &[]).await.0 == 503).then_some(()) }
        })
        .await;
    let (status, r) = post(&addr, "/generate", &json!({"input_ids": [1, 2]})).await;
    assert!(status == 503 || status == 0, "{status} {r}");
    let (status, r) = tokio::time::timeout(Duration::from_secs(60), queued)
        .await
        .expect("the queued call is answered")
        .unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["prompt_logprobs"].as_array().unwrap().len(), 600);
    let exit = server.wait_exit(Duration::from_secs(60));
    assert!(exit.success(), "{exit:?}; log: {}", server.log());
    assert!(!server.log().contains("drain timeout reached"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_on_the_http_port() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use tokio_rustls::rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    };
    let dir = std::env::temp_dir().join(format!("logitd-http-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A CA and a leaf for localhost, as security.rs makes them.
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "logitd test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let server = Server::start(
        &tiny("llama"),
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    let addr = http(&server);
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let config = ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let answer = server
        .eventually("an HTTPS answer", Duration::from_secs(60), || {
            let (connector, addr) = (connector.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await.ok()?;
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                    .ok()?;
                let (status, _, body) = call_on(
                    tls,
                    &addr,
                    "POST",
                    "/v1/completions",
                    br#"{"prompt": [1, 2], "prompt_logprobs": 1}"#,
                    &[],
                )
                .await;
                (status == 200).then_some(body)
            }
        })
        .await;
    let r: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(r["choices"][0]["prompt_logprobs"].as_array().unwrap().len(), 2);
    // Plaintext to the TLS port gets no HTTP answer.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut buf)).await;
    assert!(!buf.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf));
    std::fs::remove_dir_all(dir).unwrap();
}

/// Rollouts of one prompt (a 20-token prompt, four continuations), as a
/// trainer sends them: each answer equals, bit for bit, that of a server that
/// shares nothing (`--min-shared-prefix 0`), by gRPC, by the stream and by
/// vLLM's HTTP endpoint, and the shared-prefix counter shows the prompt run
/// once per batch: 3 × 20 tokens saved by a batch holding all four rollouts
/// (two requests of two rollouts landing in one batch included).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollouts_of_one_prompt_share_it_by_every_route() {
    use futures::StreamExt;
    let flags = |min: &'static str| {
        ["--http-listen", "127.0.0.1:0", "--max-wait-ms", "300", "--min-shared-prefix", min]
    };
    let shared = Server::start(&tiny("llama"), &flags("8"));
    let plain = Server::start(&tiny("llama"), &flags("0"));
    let prompt: Vec<u32> = (0..20u32).map(|i| (i * 13 + 5) % 96).collect();
    let rollouts: Vec<Vec<u32>> = (0..4u32)
        .map(|r| prompt.iter().copied().chain((0..3 + r).map(|i| (r * 17 + i * 5) % 96)).collect())
        .collect();
    assert!(rollouts.windows(2).all(|w| w[0][20] != w[1][20]), "they part after the prompt");
    let ask = |seqs: &[Vec<u32>], seed: u64| SampleLogitsRequest {
        sequences: seqs
            .iter()
            .map(|t| Sequence { token_ids: t.clone(), first_position: 20, ..Default::default() })
            .collect(),
        num_samples: 16,
        seed: Some(seed),
        ..Default::default()
    };
    let saved =
        || async { shared.metric("logitd_shared_prefix_tokens_total").await.unwrap_or(0.0) };
    let batches = || async { shared.metric_value("logitd_batch_sequences_count").await };

    // gRPC: one request of four rollouts.
    assert_eq!(grpc(&shared, ask(&rollouts, 1)).await, grpc(&plain, ask(&rollouts, 1)).await);
    assert_eq!(saved().await, 60.0, "{}", shared.metrics_text().await);

    // Two requests of two rollouts each, sent together.
    let before = (saved().await, batches().await);
    let (a, b) =
        tokio::join!(grpc(&shared, ask(&rollouts[..2], 2)), grpc(&shared, ask(&rollouts[2..], 3)));
    assert_eq!(a, grpc(&plain, ask(&rollouts[..2], 2)).await);
    assert_eq!(b, grpc(&plain, ask(&rollouts[2..], 3)).await);
    let (now_saved, now_batches) = (saved().await, batches().await);
    let one_batch = now_batches - before.1 == 1.0;
    let want = if one_batch { 60.0 } else { 40.0 };
    assert_eq!(now_saved - before.0, want, "one batch: {one_batch}");
    println!("two requests of two rollouts: one batch {one_batch}, {} tokens saved", want);

    // The stream.
    let requests = vec![ask(&rollouts, 4), ask(&rollouts[1..], 5)];
    let mut client = shared.client().await;
    let mut inbound = client
        .sample_logits_stream(futures::stream::iter(requests.clone()))
        .await
        .unwrap()
        .into_inner();
    for req in requests {
        let reply = inbound.next().await.expect("a reply per request").unwrap();
        assert_eq!(reply, grpc(&plain, req).await);
    }

    // vLLM's /v1/completions with prompt_logprobs.
    let body = json!({"prompt": rollouts, "max_tokens": 1, "prompt_logprobs": 5, "seed": 9});
    let before = saved().await;
    let (status, got) = post(&ready(&shared).await, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{got}");
    let (_, want) = post(&ready(&plain).await, "/v1/completions", &body).await;
    assert_eq!(got["choices"], want["choices"]);
    assert_eq!(saved().await - before, 60.0);
    assert_eq!(plain.metric("logitd_shared_prefix_tokens_total").await, None);
}
