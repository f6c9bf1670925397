//! The engine, which owns the scoring backend (the teacher and the sampler
//! backend of its device) and runs packed batches on it; the engine thread,
//! which owns the engine; and the batcher thread, which forms batches from
//! the queue while the engine computes the previous one (one batch is
//! prefetched). Only plain vectors cross into async code: a [`WorkItem`] in, a
//! [`SampledRows`] or an [`EngineError`] out. The engine never touches the
//! model's weights or the sampler's arithmetic: it packs, groups by sampling
//! parameters and splits the results back per item.

use std::{
    sync::{
        Arc, Condvar, Mutex,
        mpsc::{Receiver, SyncSender, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    metrics as m,
    model::{PackedBatch, Teacher},
    queue::{BatchQueue, SubmitError, WorkItem},
    sampler::{Method, NO_TOKEN, RowKey, RowQueries, SampledRows, SamplingParams},
    scoring::{EngineError, ScoringBackend, ScoringError, TeacherBackend},
};

/// Runs batches on a scoring backend (by default the teacher).
pub struct Engine<B: ScoringBackend = TeacherBackend> {
    backend: B,
    batches: u64,
    faults: Vec<u64>,
    min_shared_prefix: usize,
}

/// Leading tokens that sequences of one batch must have in common before the
/// forward computes them once for all ([`Engine::set_min_shared_prefix`]).
pub const DEFAULT_MIN_SHARED_PREFIX: usize = 32;

impl Engine<TeacherBackend> {
    /// An engine for `teacher`, sampling `head_chunk_rows` rows per LM-head
    /// chunk (by default the sampler backend's choice for the device).
    pub fn new(teacher: Teacher, head_chunk_rows: Option<usize>) -> Result<Self, ScoringError> {
        Ok(Self::with_backend(TeacherBackend::new(teacher, head_chunk_rows)?))
    }

    /// The teacher.
    pub fn teacher(&self) -> &Teacher {
        self.backend.teacher()
    }
}

impl<B: ScoringBackend> Engine<B> {
    /// An engine running batches on `backend`.
    pub fn with_backend(backend: B) -> Self {
        Self {
            backend,
            batches: 0,
            faults: Vec::new(),
            min_shared_prefix: DEFAULT_MIN_SHARED_PREFIX,
        }
    }

    /// Sequences of one batch whose first `tokens` tokens are equal share
    /// their common prefix in the forward (computed once, returned to each);
    /// 0 turns sharing off. Default [`DEFAULT_MIN_SHARED_PREFIX`].
    pub fn set_min_shared_prefix(&mut self, tokens: usize) {
        self.min_shared_prefix = tokens;
    }

    /// Testing only: batches (1-based, counted from the next one) that fail as
    /// a device error would.
    pub fn inject_faults(&mut self, batches: Vec<u64>) {
        self.batches = 0;
        self.faults = batches;
    }

    /// One short sequence through forward, head and sampler, then waits for
    /// the device, so that the first request does not pay for the set-up.
    pub fn warm_up(&mut self) -> Result<(), EngineError> {
        let params = SamplingParams::new(Method::Sample, 8, 1.0).expect("valid warm-up parameters");
        let key = RowKey { seed: 0, sequence: 0, position: 0 };
        let (item, _reply) = WorkItem::new(vec![0; 4], 0, params, key, None, Instant::now());
        self.score(&[item])?;
        self.batches -= 1; // the warm-up is not a served batch
        self.backend.settle()?;
        Ok(())
    }

    /// Runs one packed batch: forward, then the chunked head and the sampler for
    /// every returned position, grouped by sampling parameters. One result per
    /// item, in order.
    pub fn score(&mut self, items: &[WorkItem]) -> Result<Vec<SampledRows>, EngineError> {
        self.batches += 1;
        if self.faults.contains(&self.batches) {
            return Err(EngineError::InjectedFault(self.batches));
        }
        let sequences: Vec<&[u32]> = items.iter().map(|i| i.tokens.as_slice()).collect();
        let share = if self.backend.shares_prefixes() { self.min_shared_prefix } else { 0 };
        let batch = PackedBatch::sharing_prefixes(&sequences, share)?;
        let shared = batch.tokens_shared();
        if shared > 0 {
            metrics::counter!(m::SHARED_PREFIX_TOKENS).increment(shared as u64);
        }
        let started = Instant::now();
        let hidden = self.backend.forward(&batch)?;
        metrics::histogram!(m::FORWARD_DURATION).record(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let mut results = Vec::with_capacity(items.len());
        let mut i = 0;
        while i < items.len() {
            // A run of consecutive items with the same parameters is one head pass.
            let params = items[i].params;
            let end = i + items[i..].iter().take_while(|w| w.params == params).count();
            self.score_run(&batch, &hidden, items, i..end, &mut results)?;
            i = end;
        }
        metrics::histogram!(m::SAMPLE_DURATION).record(started.elapsed().as_secs_f64());
        Ok(results)
    }

    /// Samples the items `run` of the batch (all with the same parameters) in
    /// one pass, pushing one result per item.
    fn score_run(
        &mut self,
        batch: &PackedBatch,
        hidden: &B::Hidden,
        items: &[WorkItem],
        run: std::ops::Range<usize>,
        results: &mut Vec<SampledRows>,
    ) -> Result<(), EngineError> {
        let (mut rows, mut keys, mut counts) = (vec![], vec![], vec![]);
        let run_items = &items[run.clone()];
        let realised = run_items.iter().any(|i| i.scores.realised);
        let candidates = run_items.iter().any(|i| !i.scores.candidate_offsets.is_empty());
        let (mut q_realised, mut q_offsets, mut q_ids) = (vec![], vec![0u32], vec![]);
        for s in run.clone() {
            let item = &items[s];
            let len = item.tokens.len() as u32;
            for p in item.first_position..len {
                rows.push(batch.row(s, p as usize) as u32);
                keys.push(RowKey { seed: item.seed, sequence: item.key_sequence, position: p });
                if realised {
                    let next =
                        item.tokens.get(p as usize + 1).copied().filter(|_| item.scores.realised);
                    q_realised.push(next.unwrap_or(NO_TOKEN));
                }
            }
            if candidates {
                let o = &item.scores.candidate_offsets;
                if o.is_empty() {
                    let last = *q_offsets.last().expect("starts with 0");
                    q_offsets
                        .extend(std::iter::repeat_n(last, (len - item.first_position) as usize));
                } else {
                    logitd_proto::csr::append(&mut q_offsets, o);
                    q_ids.extend_from_slice(&item.scores.candidate_ids);
                }
            }
            counts.push(item.tokens.len() - item.first_position as usize);
        }
        let queries = RowQueries {
            realised: &q_realised,
            candidate_offsets: if candidates { &q_offsets } else { &[] },
            candidate_ids: &q_ids,
        };
        let mut out = SampledRows::new();
        self.backend.sample(hidden, &rows, &keys, queries, &items[run.start].params, &mut out)?;
        let mut r = 0;
        for n in counts {
            results.push(out.slice(r..r + n));
            r += n;
        }
        Ok(())
    }
}

/// Shared queue state and its wake-up signal.
struct Shared {
    queue: Mutex<BatchQueue>,
    wake: Condvar,
}

/// The cloneable handle request handlers submit work through.
#[derive(Clone)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
}

impl SchedulerHandle {
    /// Queues a request's items, all or none; refused at once when full or closed.
    pub fn submit(&self, items: Vec<WorkItem>) -> Result<(), SubmitError> {
        let mut q = self.shared.queue.lock().expect("queue lock poisoned: this is a bug");
        let result = q.push(items).map_err(|(e, _)| e);
        metrics::gauge!(m::QUEUE_TOKENS).set(q.queued_tokens() as f64);
        drop(q);
        self.shared.wake.notify_one();
        result
    }

    /// Stops taking new work; queued work is still served.
    pub fn close(&self) {
        self.shared.queue.lock().expect("queue lock poisoned: this is a bug").close();
        self.shared.wake.notify_all();
    }

    /// Tokens waiting.
    pub fn queued_tokens(&self) -> usize {
        self.shared.queue.lock().expect("queue lock poisoned: this is a bug").queued_tokens()
    }
}

/// The batcher and engine threads (joined on shutdown).
pub struct WorkerThreads {
    batcher: JoinHandle<()>,
    engine: JoinHandle<()>,
}

impl WorkerThreads {
    /// Starts the threads; returns the handle to submit work and the threads to join.
    pub fn start<B: ScoringBackend>(
        engine: Engine<B>,
        max_queue_tokens: usize,
        max_batch_tokens: usize,
        max_wait: Duration,
    ) -> (SchedulerHandle, Self) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(BatchQueue::new(max_queue_tokens, max_batch_tokens)),
            wake: Condvar::new(),
        });
        // Capacity 1: the next batch is formed while the engine runs this one.
        let (tx, rx) = sync_channel::<Vec<WorkItem>>(1);
        let s = shared.clone();
        let batcher = std::thread::Builder::new()
            .name("logitd-batcher".into())
            .spawn(move || batcher_loop(&s, max_wait, tx))
            .expect("spawning the batcher thread");
        let engine = std::thread::Builder::new()
            .name("logitd-engine".into())
            .spawn(move || engine_loop(engine, rx))
            .expect("spawning the engine thread");
        (SchedulerHandle { shared }, Self { batcher, engine })
    }

    /// Waits until the queue was closed and everything in it served.
    pub fn join(self) {
        let _ = self.batcher.join();
        let _ = self.engine.join();
    }
}

fn batcher_loop(shared: &Shared, max_wait: Duration, tx: SyncSender<Vec<WorkItem>>) {
    loop {
        let batch = {
            let mut q = shared.queue.lock().expect("queue lock poisoned: this is a bug");
            loop {
                let now = Instant::now();
                if q.is_ready(now, max_wait) {
                    let batch = q.take_batch(now, |reason, _| {
                        metrics::counter!(m::DROPPED, "reason" => reason.label()).increment(1);
                    });
                    metrics::gauge!(m::QUEUE_TOKENS).set(q.queued_tokens() as f64);
                    break batch;
                }
                if q.is_closed() && q.is_empty() {
                    return; // drained: dropping tx ends the engine loop
                }
                let timeout = q
                    .next_deadline(max_wait)
                    .map_or(Duration::from_secs(1), |d| d.saturating_duration_since(now));
                q = shared
                    .wake
                    .wait_timeout(q, timeout)
                    .expect("queue lock poisoned: this is a bug")
                    .0;
            }
        };
        if batch.is_empty() {
            continue;
        }
        let now = Instant::now();
        for item in &batch {
            metrics::histogram!(m::QUEUE_DURATION)
                .record(now.duration_since(item.enqueued).as_secs_f64());
        }
        if tx.send(batch).is_err() {
            return;
        }
    }
}

fn engine_loop<B: ScoringBackend>(mut engine: Engine<B>, rx: Receiver<Vec<WorkItem>>) {
    for batch in rx {
        let tokens: usize = batch.iter().map(WorkItem::len).sum();
        metrics::histogram!(m::BATCH_TOKENS).record(tokens as f64);
        metrics::histogram!(m::BATCH_SEQUENCES).record(batch.len() as f64);
        match engine.score(&batch) {
            Ok(results) => {
                metrics::counter!(m::TOKENS).increment(tokens as u64);
                for (item, rows) in batch.into_iter().zip(results) {
                    record_row_metrics(&rows);
                    let _ = item.reply.send(Ok(rows));
                }
            }
            Err(e) => {
                // The batch fails; the server keeps serving the next one.
                tracing::error!(error = %e, sequences = batch.len(), tokens, "batch failed");
                let e = Arc::new(e);
                for item in batch {
                    let _ = item.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn record_row_metrics(rows: &SampledRows) {
    if rows.num_entries() == 0 {
        return; // scoring alone: no ids drawn
    }
    for r in 0..rows.num_rows() {
        let row = rows.row(r);
        metrics::histogram!(m::SAMPLED_UNIQUE_IDS).record(row.token_ids.len() as f64);
        let mass: f64 = row.logprobs.iter().map(|&l| f64::from(l).exp()).sum();
        metrics::histogram!(m::TEACHER_MASS_COVERED).record(mass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend with no model: the "hidden state" of a token is the token,
    /// and a sampled row is one entry holding the row's token, k draws of it,
    /// a logprob of minus its position and an lse of its key's seed, so a
    /// result shows which row of which sequence it came from. It records the
    /// parameters and row count of every sample call, and fails where told.
    #[derive(Default)]
    struct Fake {
        calls: Vec<(SamplingParams, usize)>,
        fail_sample_with_k: Option<u32>,
        settled: std::cell::Cell<usize>,
        /// Whether it claims to share prefixes; the tokens it forwards.
        share: bool,
        forwarded: usize,
    }

    impl ScoringBackend for Fake {
        type Hidden = Vec<u32>;

        fn forward(&mut self, batch: &PackedBatch) -> Result<Vec<u32>, ScoringError> {
            self.forwarded += batch.num_tokens();
            Ok(batch.tokens().to_vec())
        }

        fn shares_prefixes(&self) -> bool {
            self.share
        }

        fn sample(
            &mut self,
            hidden: &Vec<u32>,
            rows: &[u32],
            keys: &[RowKey],
            queries: RowQueries<'_>,
            params: &SamplingParams,
            out: &mut SampledRows,
        ) -> Result<(), ScoringError> {
            self.calls.push((*params, rows.len()));
            queries.check(rows.len(), 1000)?;
            if self.fail_sample_with_k == Some(params.num_samples()) {
                return Err(crate::sampler::SamplerError::NonFiniteLogit {
                    index: 0,
                    value: f32::NAN,
                }
                .into());
            }
            // Scores echo what was asked: the realised id and the candidate
            // ids as values.
            for (i, (&r, key)) in rows.iter().zip(keys).enumerate() {
                out.push_entry(hidden[r as usize], params.num_samples(), -(key.position as f32));
                let (realised, candidates) = queries.row(i);
                if let Some(id) = realised {
                    let v = if id == NO_TOKEN { f32::NAN } else { id as f32 };
                    out.token_logprobs.push(v);
                    out.token_ranks.push(id);
                }
                out.candidate_logprobs.extend(candidates.iter().map(|&c| c as f32));
                out.finish_row(key.seed as f32);
            }
            Ok(())
        }

        fn settle(&self) -> Result<(), ScoringError> {
            self.settled.set(self.settled.get() + 1);
            Ok(())
        }
    }

    fn params(k: u32) -> SamplingParams {
        SamplingParams::new(Method::Sample, k, 1.0).unwrap()
    }

    fn item(tokens: Vec<u32>, first: u32, k: u32, seed: u64) -> WorkItem {
        let key = RowKey { seed, sequence: 0, position: 0 };
        WorkItem::new(tokens, first, params(k), key, None, Instant::now()).0
    }

    #[test]
    fn shared_prefixes_reach_every_sequence_at_its_positions() {
        let prompt: Vec<u32> = (100..140).collect();
        let with = |tail: &[u32]| prompt.iter().chain(tail).copied().collect::<Vec<u32>>();
        let items = vec![
            item(with(&[1, 2]), 38, 4, 1),
            item(vec![7, 8, 9], 0, 4, 2),
            item(with(&[3]), 0, 4, 3),
            item(prompt.clone(), 39, 4, 4),
        ];
        for share in [false, true] {
            let mut engine = Engine::with_backend(Fake { share, ..Fake::default() });
            let results = engine.score(&items).unwrap();
            for (item, rows) in items.iter().zip(&results) {
                // The fake's row is its token: every position of every item.
                assert_eq!(rows.token_ids, item.tokens[item.first_position as usize..]);
            }
            // 3 × 40 + 3 + 2 + 1 tokens, the prompt run once when shared.
            let want = if share { 40 + 3 + 2 + 1 } else { 3 * 40 + 3 + 2 + 1 };
            assert_eq!(engine.backend.forwarded, want, "share {share}");
            // A minimum above the prompt shares nothing.
            engine.set_min_shared_prefix(41);
            engine.backend.forwarded = 0;
            engine.score(&items).unwrap();
            assert_eq!(engine.backend.forwarded, 3 * 40 + 3 + 2 + 1);
        }
    }

    #[test]
    fn results_come_back_one_per_item_in_order_with_their_own_rows() {
        let mut engine = Engine::with_backend(Fake::default());
        let items = vec![
            item(vec![10, 11, 12], 0, 4, 1),
            item(vec![20], 0, 4, 2),
            item(vec![30, 31, 32, 33], 2, 4, 3),
        ];
        let results = engine.score(&items).unwrap();
        assert_eq!(results.len(), 3);
        assert_eq!(results[0].token_ids, [10, 11, 12]);
        assert_eq!(results[0].logprobs, [0.0, -1.0, -2.0]);
        assert_eq!(results[1].token_ids, [20]);
        // Positions before first_position are context only.
        assert_eq!(results[2].token_ids, [32, 33]);
        assert_eq!(results[2].logprobs, [-2.0, -3.0]);
        assert_eq!(results[2].offsets, [0, 1, 2]);
        let seeds: Vec<Vec<f32>> = results.iter().map(|r| r.lse.clone()).collect();
        assert_eq!(seeds, [vec![1.0; 3], vec![2.0], vec![3.0; 2]]);
    }

    #[test]
    fn realised_tokens_and_candidates_reach_the_rows_they_belong_to() {
        let mut engine = Engine::with_backend(Fake::default());
        let mut items = vec![
            item(vec![10, 11, 12], 0, 4, 1),
            item(vec![20, 21], 0, 4, 2),
            item(vec![30, 31, 32, 33], 2, 4, 3),
        ];
        items[0].scores.realised = true;
        items[2].scores.realised = true;
        items[2].scores.candidate_offsets = vec![0, 2, 3];
        items[2].scores.candidate_ids = vec![7, 8, 9];
        let results = engine.score(&items).unwrap();
        // Position t's realised token is token t + 1; the last position has none.
        let nan_is = |v: &[f32], want: &[f32]| {
            v.len() == want.len()
                && v.iter().zip(want).all(|(a, b)| a == b || (a.is_nan() && b.is_nan()))
        };
        assert!(nan_is(&results[0].token_logprobs, &[11.0, 12.0, f32::NAN]));
        assert!(nan_is(&results[2].token_logprobs, &[33.0, f32::NAN]));
        // An item that did not ask shares the run but gets nothing real.
        assert!(nan_is(&results[1].token_logprobs, &[f32::NAN, f32::NAN]));
        assert_eq!(results[2].candidate_offsets, [0, 2, 3]);
        assert_eq!(results[2].candidate_logprobs, [7.0, 8.0, 9.0]);
        assert_eq!(results[0].candidate_offsets, [0, 0, 0, 0]);
        assert_eq!(results[1].candidate_offsets, [0, 0, 0]);
        assert!(results[1].candidate_logprobs.is_empty());
    }

    #[test]
    fn consecutive_items_with_the_same_parameters_share_one_head_pass() {
        let mut engine = Engine::with_backend(Fake::default());
        let items = vec![
            item(vec![1, 2], 0, 4, 0),
            item(vec![3], 0, 4, 0),
            item(vec![4, 5, 6], 1, 8, 0),
            item(vec![7], 0, 4, 0),
        ];
        let results = engine.score(&items).unwrap();
        assert_eq!(engine.backend.calls, [(params(4), 3), (params(8), 2), (params(4), 1)]);
        let counts: Vec<Vec<u32>> = results.iter().map(|r| r.counts.clone()).collect();
        assert_eq!(counts, [vec![4, 4], vec![4], vec![8, 8], vec![4]]);
        assert_eq!(results[3].token_ids, [7]);
    }

    #[test]
    fn a_failed_batch_fails_alone_and_the_next_one_is_served() {
        let mut engine = Engine::with_backend(Fake::default());
        engine.inject_faults(vec![2]);
        assert!(engine.score(&[item(vec![1], 0, 4, 0)]).is_ok());
        let e = engine.score(&[item(vec![1], 0, 4, 0)]).unwrap_err();
        assert!(matches!(e, EngineError::InjectedFault(2)), "{e}");
        assert_eq!(e.to_string(), "injected device fault on batch 2");
        assert!(engine.score(&[item(vec![1], 0, 4, 0)]).is_ok());

        // A sampler error (non-finite logits) fails its batch, not the next.
        engine.backend.fail_sample_with_k = Some(8);
        let e = engine.score(&[item(vec![1], 0, 4, 0), item(vec![2], 0, 8, 0)]).unwrap_err();
        assert!(matches!(e, EngineError::Scoring(ScoringError::Sampler(_))), "{e}");
        assert_eq!(engine.score(&[item(vec![3], 0, 4, 0)]).unwrap()[0].token_ids, [3]);
    }

    #[test]
    fn the_engine_thread_answers_every_item_of_a_failed_batch_and_keeps_serving() {
        let mut engine = Engine::with_backend(Fake::default());
        engine.inject_faults(vec![1]);
        let (handle, threads) = WorkerThreads::start(engine, 1000, 1000, Duration::ZERO);
        // One request of `sequences`, queued at once (so one batch).
        let submit = |sequences: Vec<Vec<u32>>| {
            let key = RowKey { seed: 0, sequence: 0, position: 0 };
            let (items, replies): (Vec<_>, Vec<_>) = sequences
                .into_iter()
                .map(|t| WorkItem::new(t, 0, params(4), key, None, Instant::now()))
                .unzip();
            handle.submit(items).unwrap();
            replies.into_iter().map(|rx| rx.blocking_recv().unwrap()).collect::<Vec<_>>()
        };
        let failed = submit(vec![vec![1, 2], vec![3]]);
        assert_eq!(failed.len(), 2);
        for r in &failed {
            let e = r.as_ref().unwrap_err();
            assert!(matches!(**e, EngineError::InjectedFault(1)), "{e}");
        }
        let served = submit(vec![vec![5], vec![6, 7]]);
        let ids: Vec<Vec<u32>> = served.into_iter().map(|r| r.unwrap().token_ids).collect();
        assert_eq!(ids, [vec![5], vec![6, 7]], "the next batch is served");
        handle.close();
        threads.join();
    }

    #[test]
    fn warm_up_runs_one_batch_and_settles_without_counting_it() {
        let mut engine = Engine::with_backend(Fake::default());
        engine.warm_up().unwrap();
        assert_eq!(engine.backend.calls, [(params(8), 4)]);
        assert_eq!(engine.backend.settled.get(), 1);
        engine.inject_faults(vec![1]);
        assert!(engine.score(&[item(vec![1], 0, 4, 0)]).is_err());
    }
}
