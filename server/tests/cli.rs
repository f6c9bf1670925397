//! The `logitd` binary's command line: a `--log` value that is not a filter is
//! refused with exit status 2 before anything starts, and `logitd info` prints
//! the ModelInfo a server would report, as JSON, checked field by field
//! against the fixture's config.json and the flags given.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

/// Runs `logitd ARGS` with `ENV` (and neither LOGITD_LOG nor LOGITD_MODEL
/// from the caller's environment); kills it after 60 s, so a command that
/// wrongly starts serving fails the test instead of hanging it.
fn logitd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_logitd"));
    c.args(args).env_remove("LOGITD_LOG").env_remove("LOGITD_MODEL");
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child =
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("running logitd");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("logitd {args:?} still running after 60 s; stderr: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny").join(name)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A free port, so that a `serve` that wrongly started would be seen serving.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn a_bad_log_filter_is_refused_with_exit_status_2() {
    let model = tiny("llama");
    let model = model.to_str().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    for bad in ["logitd=notalevel", "[unclosed", "info,=warn=x"] {
        for (what, args, env) in [
            (
                "--log on serve",
                vec!["serve", "--model", model, "--listen", &listen, "--log", bad],
                vec![],
            ),
            ("--log on info", vec!["--log", bad, "info", "--model", model], vec![]),
            (
                "LOGITD_LOG",
                vec!["serve", "--model", model, "--listen", &listen],
                vec![("LOGITD_LOG", bad)],
            ),
        ] {
            let started = Instant::now();
            let out = logitd(&args, &env);
            let stderr = text(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{what} {bad:?}: {:?}, stderr: {stderr}",
                out.status
            );
            assert!(
                stderr.contains("is not a log filter") && stderr.contains(bad),
                "{what} {bad:?}: the message names the value: {stderr}"
            );
            assert!(out.stdout.is_empty(), "{what} {bad:?}: printed {}", text(&out.stdout));
            assert!(started.elapsed().as_secs() < 30, "{what} {bad:?}: not refused at once");
        }
    }
    // A good filter with the same command starts (info prints and exits 0).
    let out = logitd(&["--log", "logitd=debug,warn", "info", "--model", model], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn info_json(args: &[&str]) -> serde_json::Value {
    let out = logitd(&[&["info"], args].concat(), &[("LOGITD_LOG", "warn")]);
    assert!(out.status.success(), "logitd info {args:?}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("logitd info {args:?} printed no JSON ({e}): {}", text(&out.stdout))
    })
}

/// The fixture's own config.json: (model_type, vocab_size, max_position_embeddings).
fn fixture_config(name: &str) -> (String, u64, u64) {
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny(name).join("config.json")).unwrap())
            .unwrap();
    let t = c.get("text_config").unwrap_or(&c);
    (
        c["model_type"].as_str().unwrap().to_string(),
        t["vocab_size"].as_u64().unwrap(),
        t["max_position_embeddings"].as_u64().unwrap(),
    )
}

#[test]
fn info_prints_the_model_info_of_each_fixture() {
    const FIELDS: [&str; 10] = [
        "model_id",
        "architecture",
        "vocab_size",
        "max_sequence_length",
        "dtype",
        "device",
        "tokenizer_sha256",
        "default_num_samples",
        "max_num_samples",
        "max_candidates",
    ];
    // The digests: SHA-256 over the tensors in name order (name, NUL, dtype,
    // shape as u64 LE, bytes), computed from the files by a Python script
    // reading the safetensors header itself.
    for (name, arch, digest) in [
        ("llama", "llama", "2eeb6259b860"),
        ("mistral", "mistral", "3026528c44c8"),
        ("qwen2", "qwen2", "70f31b468847"),
        ("qwen3", "qwen3", "bcafec594b23"),
        ("gemma2", "gemma2", "ce759b60f4e3"),
        ("gemma3", "gemma3", "755e5d29d15f"),
        ("gemma3_multimodal", "gemma3", "d828319fc95d"),
    ] {
        let (model_type, vocab, context) = fixture_config(name);
        let j = info_json(&["--model", tiny(name).to_str().unwrap()]);
        let keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = FIELDS.to_vec();
        want.sort();
        assert_eq!(keys, want, "{name}: exactly the ModelInfo fields");
        assert_eq!(
            j["model_id"],
            format!("{name}@{digest}"),
            "{name}: the directory name and digest"
        );
        assert_eq!(j["architecture"], arch, "{name} (model_type {model_type})");
        assert_eq!(j["vocab_size"], vocab, "{name}: vocab_size of config.json");
        assert_eq!(j["max_sequence_length"], context, "{name}: the context length (< 8192)");
        assert_eq!(j["dtype"], "f32", "{name}: auto on the CPU");
        assert_eq!(j["device"], "cpu");
        assert_eq!(j["tokenizer_sha256"], "", "{name}: the fixture has no tokenizer.json");
        assert_eq!(j["default_num_samples"], 256);
        assert_eq!(j["max_num_samples"], 4096);
    }
}

#[test]
fn info_reflects_the_flags_and_the_tokenizer_digest() {
    // The llama fixture with a tokenizer.json of known bytes.
    let dir = std::env::temp_dir().join(format!("logitd-info-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny("llama").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("tokenizer.json"),
        b"{\"logitd\": \"a stand-in tokenizer.json for the info test\"}\n",
    )
    .unwrap();
    let j = info_json(&[
        "--model",
        dir.to_str().unwrap(),
        "--model-id",
        "teacher-under-test",
        "--max-batch-tokens",
        "32",
        "--default-num-samples",
        "64",
        "--max-num-samples",
        "128",
        "--dtype",
        "bf16",
    ]);
    assert_eq!(j["model_id"], "teacher-under-test");
    assert_eq!(j["max_sequence_length"], 32, "the context (64) capped by --max-batch-tokens");
    assert_eq!(j["default_num_samples"], 64);
    assert_eq!(j["max_num_samples"], 128);
    assert_eq!(j["dtype"], "bf16");
    // sha256 of the bytes above (Python: hashlib.sha256(...).hexdigest()).
    assert_eq!(
        j["tokenizer_sha256"],
        "7111ff2fcf8bd616c42d742e633386f141d9af61eafd820f798347449f96f2ef"
    );
    // The environment sets the same flags.
    let out = logitd(
        &["info"],
        &[("LOGITD_MODEL", dir.to_str().unwrap()), ("LOGITD_MAX_SEQUENCE_LENGTH", "20")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["max_sequence_length"], 20);
    let name = dir.file_name().unwrap().to_str().unwrap();
    assert_eq!(j["model_id"], format!("{name}@2eeb6259b860"), "the llama fixture's digest");
    // Errors: a missing model and an inconsistent k exit 1 and say why.
    let out = logitd(&["info", "--model", "/nonexistent/model-dir"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/model-dir"), "{}", text(&out.stderr));
    let out =
        logitd(&["info", "--model", dir.to_str().unwrap(), "--default-num-samples", "0"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--default-num-samples 0"), "{}", text(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}
