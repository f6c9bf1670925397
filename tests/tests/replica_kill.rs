//! A replica killed (SIGKILL, no drain) while the client is balancing calls
//! over it and another: every call still gets its answer, the same answer
//! the surviving replica gives alone.

use crate::common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{first_line, tiny};
use logitd_client::{ClientConfig, SampleOptions, TeacherClient};
use logitd_proto::v1::SampleLogitsResponse;

/// The `logitd` binary next to this test's `deps/` directory.
fn logitd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let bin = exe.parent().and_then(Path::parent).expect("target/<profile>/deps").join("logitd");
    assert!(bin.is_file(), "{} is missing: `cargo build -p logitd`", bin.display());
    bin
}

/// A `logitd serve` process on 127.0.0.1 (stderr to `log`), killed when dropped.
struct Replica {
    child: Child,
    uri: String,
    log: PathBuf,
}

impl Replica {
    fn start(model: &Path, name: &str) -> Replica {
        let log = std::env::temp_dir()
            .join(format!("logitd-replica-kill-{}-{name}.log", std::process::id()));
        let mut child = Command::new(logitd_bin())
            .args(["serve", "--model"])
            .arg(model)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--model-id", "tiny", "--max-wait-ms", "2"])
            .env("LOGITD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting logitd");
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        let line = first_line(&mut child, read_log);
        let Some(addr) = line.split("gRPC on ").nth(1).and_then(|s| s.split(',').next()) else {
            panic!("{name}: first line {line:?}; log:\n{}", read_log())
        };
        Replica { child, uri: format!("http://{addr}"), log }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- {}:\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn same(a: &SampleLogitsResponse, b: &SampleLogitsResponse) -> bool {
    a.sequences.len() == b.sequences.len()
        && a.sequences.iter().zip(&b.sequences).all(|(x, y)| {
            x.offsets == y.offsets
                && x.token_ids == y.token_ids
                && x.counts == y.counts
                && x.logprobs.iter().zip(&y.logprobs).all(|(p, q)| (p - q).abs() < 1e-5)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_loses_no_call() {
    let mut a = Replica::start(&tiny("llama"), "a");
    let b = Replica::start(&tiny("llama"), "b");
    let mut config = ClientConfig::new([a.uri.clone(), b.uri.clone()]);
    config.retry.max_attempts = 30;
    config.retry.max_backoff = Duration::from_millis(200);
    let client = TeacherClient::connect(config).await.unwrap();
    let alone = TeacherClient::connect(ClientConfig::new([b.uri.clone()])).await.unwrap();
    let batches: Vec<Vec<Vec<u32>>> = (0..200u32)
        .map(|i| (0..3).map(|s| (0..24).map(|p| (i * 7 + s * 13 + p * 5) % 96).collect()).collect())
        .collect();
    let request = |c: &TeacherClient, i: usize| {
        let options = SampleOptions { num_samples: 64, seed: i as u64, ..Default::default() };
        c.requests(&batches[i], None, options).remove(0)
    };
    let mut want = Vec::new();
    for i in 0..batches.len() {
        want.push(alone.sample(request(&alone, i)).await.unwrap());
    }
    // 200 calls at once; replica A dies once 40 have been answered.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let calls = futures::future::join_all((0..batches.len()).map(|i| {
        let (client, done) = (client.clone(), done.clone());
        let req = request(&client, i);
        async move {
            let r = client.sample(req).await;
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            r
        }
    }));
    let killer = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while done.load(std::sync::atomic::Ordering::SeqCst) < 40 {
            assert!(std::time::Instant::now() < deadline, "40 calls not answered within 120 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        a.child.kill().unwrap();
        a.child.wait().unwrap();
    };
    let (results, ()) = tokio::join!(calls, killer);
    let answered_after_kill = done.load(std::sync::atomic::Ordering::SeqCst);
    for (i, (r, w)) in results.into_iter().zip(&want).enumerate() {
        let r = r.unwrap_or_else(|e| panic!("call {i} was lost: {e}"));
        assert!(same(&r, w), "call {i}: a different answer");
    }
    assert_eq!(answered_after_kill, 200);
}
