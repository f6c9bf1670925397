//! The client against real servers: balancing, retries, the tokenizer check,
//! splitting, the prefetcher, and target shards.

use crate::common;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use candle_core::{DType, Device, Tensor};
use common::{InProcess, batch, cached, free_low_port, options, tiny};
use logitd_client::{
    ClientConfig, ClientError, LossOptions, Prefetcher, TeacherClient, TrainingBatch, distill_loss,
    shard::{ShardMeta, ShardReader, ShardWriter},
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_are_balanced_across_two_servers() {
    let a = InProcess::start(&tiny("llama"), 0, &["--model-id", "replica-a"]).await;
    let b = InProcess::start(&tiny("llama"), 0, &["--model-id", "replica-b"]).await;
    let client =
        TeacherClient::connect(ClientConfig::new([a.uri.clone(), b.uri.clone()])).await.unwrap();
    let mut seen = std::collections::HashMap::new();
    for i in 0..60u64 {
        let r = client
            .sample(client.requests(&batch(2, i as u32), None, options(i)).remove(0))
            .await
            .unwrap();
        *seen.entry(r.model_id).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both replicas served: {seen:?}");
    assert!(seen.values().all(|&n| n >= 10), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_is_retried_until_the_restarted_server_answers() {
    // Not an ephemeral port: while this server is down, no other test's
    // server (started on port 0) can take it.
    let port = free_low_port();
    let server = InProcess::start(&tiny("gemma2"), port, &[]).await;
    let mut config = ClientConfig::new([server.uri.clone()]);
    config.retry.max_attempts = 40;
    config.retry.max_backoff = std::time::Duration::from_millis(200);
    let client = TeacherClient::connect(config).await.unwrap();
    let want = client.sample_targets(&batch(3, 1), None, options(9)).await.unwrap();
    server.stop().await;
    // The server is down: the call keeps retrying (UNAVAILABLE) until it is back.
    let c = client.clone();
    let call = tokio::spawn(async move { c.sample_targets(&batch(3, 1), None, options(9)).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    if call.is_finished() {
        panic!(
            "the call ended while the server was down: {:?}",
            call.await.unwrap().map(|t| t.len())
        );
    }
    let _restarted = InProcess::start(&tiny("gemma2"), port, &[]).await;
    let got = tokio::time::timeout(common::STARTUP, call)
        .await
        .expect("no answer within 60 s of the restart")
        .unwrap()
        .expect("answered after the restart");
    assert_eq!(got, want, "same targets from the restarted server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_different_tokenizer_or_vocabulary_is_refused() {
    let server = InProcess::start(&cached("SmolLM2-135M-Instruct.Q4_1.gguf"), 0, &[]).await;
    server.ready().await;
    let info = TeacherClient::connect(ClientConfig::new([server.uri.clone()]))
        .await
        .unwrap()
        .model_info()
        .clone();
    assert_eq!(info.tokenizer_sha256.len(), 64);
    let mut config = ClientConfig::new([server.uri.clone()]);
    config.expect_tokenizer_sha256 = Some(info.tokenizer_sha256.to_uppercase());
    config.expect_vocab_size = Some(49_152);
    TeacherClient::connect(config.clone()).await.expect("the same tokenizer is accepted");
    config.expect_tokenizer_sha256 = Some("0".repeat(64));
    let e = TeacherClient::connect(config.clone()).await.err().expect("refused");
    assert!(matches!(e, ClientError::TokenizerMismatch { .. }), "{e}");
    config.expect_tokenizer_sha256 = None;
    config.expect_vocab_size = Some(32_000);
    let e = TeacherClient::connect(config).await.err().expect("refused");
    assert!(matches!(e, ClientError::VocabMismatch { expected: 32_000, server: 49_152 }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_requests_are_not_retried_and_splitting_does_not_change_results() {
    let server = InProcess::start(&tiny("qwen2"), 0, &[]).await;
    let mut config = ClientConfig::new([server.uri.clone()]);
    config.max_sequences_per_request = 100;
    let whole = TeacherClient::connect(config.clone()).await.unwrap();
    config.max_sequences_per_request = 3;
    let split = TeacherClient::connect(config).await.unwrap();
    let b = batch(10, 5);
    assert_eq!(split.requests(&b, None, options(1)).len(), 4);
    let firsts: Vec<u32> = (0..10).map(|i| i % 3).collect();
    let x = whole.sample_targets(&b, Some(&firsts), options(1)).await.unwrap();
    let y = split.sample_targets(&b, Some(&firsts), options(1)).await.unwrap();
    assert_eq!(x, y);
    assert_eq!(x.len(), 10);
    assert_eq!(x[4].first_position, 1);
    let e = whole.sample_targets(&[vec![1, 500]], None, options(1)).await.unwrap_err();
    assert!(matches!(e, ClientError::Rpc { attempts: 1, .. }), "{e}");
    assert_eq!(e.code(), Some(Code::InvalidArgument));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_prefetcher_keeps_order_and_bounds_what_it_holds() {
    let server = InProcess::start(&tiny("mistral"), 0, &[]).await;
    let client = TeacherClient::connect(ClientConfig::new([server.uri.clone()])).await.unwrap();
    let depth = 3;
    let pulled = Arc::new(AtomicUsize::new(0));
    let batches: Vec<TrainingBatch> = (0..20)
        .map(|i| TrainingBatch { sequences: batch(4, i), seed: i as u64, ..Default::default() })
        .collect();
    let source = {
        let pulled = pulled.clone();
        batches.clone().into_iter().inspect(move |_| {
            pulled.fetch_add(1, Ordering::SeqCst);
        })
    };
    let mut prefetcher = Prefetcher::start(client.clone(), source, depth, options(0));
    let mut consumed = 0;
    while let Some(item) = prefetcher.next().await {
        assert_eq!(item.batch, batches[consumed], "batches come back in order");
        let targets = item.targets.unwrap();
        // Same targets as a unary call for the batch.
        let unary = client
            .sample_targets(&item.batch.sequences, None, options(item.batch.seed))
            .await
            .unwrap();
        assert_eq!(targets, unary);
        consumed += 1;
        // A slow training step: the prefetcher may run ahead by at most depth
        // in flight + 1 ready + the one handed over.
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let ahead = pulled.load(Ordering::SeqCst) - consumed;
        assert!(ahead <= depth + 1, "{ahead} batches pulled ahead of the consumer");
    }
    assert_eq!(consumed, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_prefetcher_reports_an_error_on_its_batch_and_goes_on() {
    let server = InProcess::start(&tiny("mistral"), 0, &[]).await;
    let client = TeacherClient::connect(ClientConfig::new([server.uri.clone()])).await.unwrap();
    let mut batches: Vec<TrainingBatch> = (0..6)
        .map(|i| TrainingBatch { sequences: batch(2, i), seed: i as u64, ..Default::default() })
        .collect();
    batches[2].sequences[1] = vec![1, 2, 999]; // outside the vocabulary
    let mut prefetcher = Prefetcher::start(client, batches.into_iter(), 4, options(0));
    let mut results = vec![];
    while let Some(item) = prefetcher.next().await {
        results.push(item.targets.map(|t| t.len()).map_err(|e| e.code()));
    }
    assert_eq!(results, vec![Ok(2), Ok(2), Err(Some(Code::InvalidArgument)), Ok(2), Ok(2), Ok(2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_round_trip_exactly_and_give_the_same_loss_as_live_targets() {
    let server = InProcess::start(&tiny("gemma3"), 0, &[]).await;
    let client = TeacherClient::connect(ClientConfig::new([server.uri.clone()])).await.unwrap();
    let b = batch(9, 3);
    let live = client.sample_targets(&b, None, options(77)).await.unwrap();
    let dir = std::env::temp_dir().join(format!("logitd-shards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let info = client.model_info();
    let meta = ShardMeta {
        model_id: info.model_id.clone(),
        tokenizer_sha256: info.tokenizer_sha256.clone(),
        num_samples: 32,
        temperature: "1".into(),
        seed: 77,
        method: 1,
        value_encoding: 1,
    };
    // Small shards, so the set spans several files.
    let mut writer = ShardWriter::create(&dir, meta.clone(), 300).unwrap();
    for t in &live {
        writer.append(t).unwrap();
    }
    let files = writer.finish().unwrap();
    assert!(files.len() >= 3, "{} shards", files.len());
    let reader = ShardReader::open(&dir).unwrap();
    assert_eq!(reader.meta(), &meta);
    let read: Vec<_> = reader.iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(read, live, "bit-identical after a round trip");
    // The loss from disk equals the loss from the wire.
    for (t_live, t_read) in live.iter().zip(&read) {
        let n = t_live.num_positions();
        let logits: Vec<f32> = (0..n * 96).map(|i| ((i * 37) % 101) as f32 / 25.0).collect();
        let x =
            Tensor::from_vec(logits, (n, 96), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        let a = distill_loss(&x, t_live, LossOptions::default(), None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let b = distill_loss(&x, t_read, LossOptions::default(), None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(a, b);
    }
    // A second run cannot write into the same directory.
    assert!(ShardWriter::create(&dir, meta, 300).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
