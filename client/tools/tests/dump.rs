//! `logitd-client dump` end to end: a corpus through a real (in-process) server
//! into shards equal to what the client fetches live.

use crate::common;

use std::process::Command;

use logitd_client::{SampleOptions, SamplingMethod, ValueEncoding, shard::ShardReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dump_writes_the_targets_the_server_gives() {
    let (uri, mut server) = common::tiny_server().await;

    let dir = std::env::temp_dir().join(format!("logitd-dump-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let corpus: Vec<(Vec<u32>, u32)> = (0..23u32)
        .map(|i| ((0..(5 + i % 7)).map(|p| (i * 11 + p * 5) % 96).collect(), i % 2))
        .collect();
    let lines: Vec<String> = corpus
        .iter()
        .enumerate()
        .map(|(i, (t, f))| {
            if i % 2 == 0 {
                serde_json::json!({"token_ids": t, "first_position": f}).to_string()
            } else {
                serde_json::to_string(t).unwrap()
            }
        })
        .collect();
    let input = dir.join("corpus.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = dir.join("targets");
    // Wait until the model is loaded before dumping.
    let client = common::connect(&uri, &mut server).await;
    let run = Command::new(env!("CARGO_BIN_EXE_logitd-client"))
        .args([
            "dump",
            "--server",
            &uri,
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args([
            "--num-samples",
            "16",
            "--seed",
            "5",
            "--batch-sequences",
            "4",
            "--shard-entries",
            "400",
        ])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stdout).contains("wrote 23 sequences"));

    let reader = ShardReader::open(&out).unwrap();
    assert_eq!(reader.meta().num_samples, 16);
    // The server's id: the directory name, "@" and 12 hex digits of the weights' digest.
    let id = &reader.meta().model_id;
    let digest = id.strip_prefix("llama@").unwrap_or_else(|| panic!("model_id {id:?}"));
    assert!(digest.len() == 12 && digest.bytes().all(|b| b.is_ascii_hexdigit()), "{id:?}");
    assert!(reader.files().len() > 1);
    let stored: Vec<_> = reader.iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(stored.len(), 23);
    // The same targets, fetched live: sequence n's samples depend only on the
    // run seed and n (its seed is sequence_seed(5, n)), as for the whole corpus
    // sent as one batch with seed 5, whatever --batch-sequences is.
    let firsts: Vec<u32> =
        corpus.iter().enumerate().map(|(i, (_, f))| if i % 2 == 0 { *f } else { 0 }).collect();
    let seqs: Vec<Vec<u32>> = corpus.iter().map(|(t, _)| t.clone()).collect();
    let opts = SampleOptions {
        num_samples: 16,
        temperature: Some(1.0),
        seed: 5,
        method: SamplingMethod::Sample,
        value_encoding: ValueEncoding::F32,
        ..Default::default()
    };
    let live = client.sample_targets(&seqs, Some(&firsts), opts).await.unwrap();
    // Samples bit for bit, the teacher's values within 1e-5 (see same_targets).
    common::same_targets(&stored, &live, "dump vs live");
    server.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}
