//! The engine thread, which owns the teacher and its device, and the batcher
//! thread, which forms batches from the queue while the engine computes the
//! previous one (one batch is prefetched). Only plain vectors cross into async
//! code: a [`WorkItem`] in, a [`SampledRows`] or an error message out.

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
    model::{ModelError, PackedBatch, Teacher},
    queue::{BatchQueue, SubmitError, WorkItem},
    sampler::{CpuSampler, RowKey, SampledRows},
};

/// Runs batches on the teacher.
pub struct Engine {
    teacher: Teacher,
    sampler: CpuSampler,
    head_chunk_rows: usize,
    batches: u64,
    faults: Vec<u64>,
}

impl Engine {
    /// An engine for `teacher`, sampling `head_chunk_rows` rows per LM-head chunk.
    pub fn new(teacher: Teacher, head_chunk_rows: Option<usize>) -> Self {
        let head_chunk_rows = head_chunk_rows.unwrap_or_else(|| teacher.default_head_chunk_rows());
        Self {
            teacher,
            sampler: CpuSampler::new(),
            head_chunk_rows,
            batches: 0,
            faults: Vec::new(),
        }
    }

    /// Testing only: batches (1-based, counted from the next one) that fail as
    /// a device error would.
    pub fn inject_faults(&mut self, batches: Vec<u64>) {
        self.batches = 0;
        self.faults = batches;
    }

    /// The teacher.
    pub fn teacher(&self) -> &Teacher {
        &self.teacher
    }

    /// Runs one packed batch: forward, then the chunked head and the sampler for
    /// every returned position, grouped by sampling parameters. One result per
    /// item, in order.
    pub fn run(&mut self, items: &[WorkItem]) -> Result<Vec<SampledRows>, ModelError> {
        self.batches += 1;
        if self.faults.contains(&self.batches) {
            return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "injected device fault on batch {}",
                self.batches
            ))));
        }
        let sequences: Vec<&[u32]> = items.iter().map(|i| i.tokens.as_slice()).collect();
        let batch = PackedBatch::new(&sequences)?;
        let started = Instant::now();
        let hidden = self.teacher.hidden_states(&batch)?;
        metrics::histogram!(m::FORWARD_DURATION).record(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let mut results = Vec::with_capacity(items.len());
        let mut i = 0;
        while i < items.len() {
            // A run of consecutive items with the same parameters is one head pass.
            let params = items[i].params;
            let end = i + items[i..].iter().take_while(|w| w.params == params).count();
            let (mut rows, mut keys, mut counts) = (vec![], vec![], vec![]);
            for (s, item) in items.iter().enumerate().take(end).skip(i) {
                let start = batch.sequence(s).start as u32;
                let n = item.tokens.len() as u32 - item.first_position;
                for p in item.first_position..item.tokens.len() as u32 {
                    rows.push(start + p);
                    keys.push(RowKey { seed: item.seed, sequence: item.key_sequence, position: p });
                }
                counts.push(n as usize);
            }
            let mut out = SampledRows::new();
            self.teacher.sample(
                &hidden,
                &rows,
                &keys,
                &params,
                self.head_chunk_rows,
                &mut self.sampler,
                &mut out,
            )?;
            let mut r = 0;
            for n in counts {
                results.push(out.slice(r..r + n));
                r += n;
            }
            i = end;
        }
        metrics::histogram!(m::SAMPLE_DURATION).record(started.elapsed().as_secs_f64());
        Ok(results)
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

/// The batcher and engine threads.
pub struct Scheduler {
    batcher: JoinHandle<()>,
    engine: JoinHandle<()>,
}

impl Scheduler {
    /// Starts the threads; returns the handle to submit work and the threads to join.
    pub fn start(
        engine: Engine,
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

fn engine_loop(mut engine: Engine, rx: Receiver<Vec<WorkItem>>) {
    for batch in rx {
        let tokens: usize = batch.iter().map(WorkItem::len).sum();
        metrics::histogram!(m::BATCH_TOKENS).record(tokens as f64);
        metrics::histogram!(m::BATCH_SEQUENCES).record(batch.len() as f64);
        match engine.run(&batch) {
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
                let message = e.to_string();
                for item in batch {
                    let _ = item.reply.send(Err(message.clone()));
                }
            }
        }
    }
}

fn record_row_metrics(rows: &SampledRows) {
    for r in 0..rows.num_rows() {
        let row = rows.row(r);
        metrics::histogram!(m::SAMPLED_UNIQUE_IDS).record(row.token_ids.len() as f64);
        let mass: f64 = row.logprobs.iter().map(|&l| f64::from(l).exp()).sum();
        metrics::histogram!(m::TEACHER_MASS_COVERED).record(mass);
    }
}
