//! [`Prefetcher`]: keeps `depth` training batches of teacher targets in flight
//! over one `SampleLogitsStream`, so the training step does not wait when the
//! server keeps up.
//!
//! Batches come back in order. At most `depth` batches are in flight plus one
//! ready for the consumer: memory stays bounded however far the server could
//! run ahead. A retryable failure (UNAVAILABLE, RESOURCE_EXHAUSTED: a restart, a
//! drain, overload) reopens the stream after a jittered backoff and re-sends the
//! batches in flight; any other failure is reported on the batch it belongs to,
//! and the rest continue on a new stream.

use std::collections::VecDeque;

use logitd_proto::v1::SampleLogitsRequest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    ClientError, TeacherClient, TeacherTargets,
    client::{RetryPolicy, SampleOptions, seeded_sequences},
};

/// One training batch: token ids per sequence, optional first returned
/// positions and a loss mask the trainer carries along.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainingBatch {
    /// Token ids per sequence.
    pub sequences: Vec<Vec<u32>>,
    /// First returned position per sequence (default 0).
    pub first_positions: Option<Vec<u32>>,
    /// Per-position loss weights the trainer wants back with the targets.
    pub loss_mask: Option<Vec<Vec<f32>>>,
    /// Seed of the batch (each sequence's seed derives from it and its index).
    pub seed: u64,
}

impl TrainingBatch {
    fn request(&self, options: SampleOptions) -> SampleLogitsRequest {
        let sequences =
            seeded_sequences(&self.sequences, self.first_positions.as_deref(), self.seed);
        SampleOptions { seed: self.seed, ..options }.request(sequences)
    }
}

/// A batch with its teacher targets (one per sequence), or the error that
/// belongs to it.
#[derive(Debug)]
pub struct Prefetched {
    /// The batch as given.
    pub batch: TrainingBatch,
    /// Its targets.
    pub targets: Result<Vec<TeacherTargets>, ClientError>,
}

/// Teacher targets fetched ahead of the training loop.
pub struct Prefetcher {
    rx: mpsc::Receiver<Prefetched>,
    task: tokio::task::JoinHandle<()>,
}

impl Prefetcher {
    /// Starts fetching `batches` with `depth` in flight. `options.seed` is not
    /// used: each batch has its own.
    pub fn start<I>(client: TeacherClient, batches: I, depth: usize, options: SampleOptions) -> Self
    where
        I: Iterator<Item = TrainingBatch> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(run(client, batches, depth.max(1), options, tx));
        Self { rx, task }
    }

    /// The next batch in order, or `None` when all are done.
    pub async fn next(&mut self) -> Option<Prefetched> {
        self.rx.recv().await
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Pending {
    batch: TrainingBatch,
    request: SampleLogitsRequest,
    attempts: u32,
}

fn decode(r: &logitd_proto::v1::SampleLogitsResponse) -> Result<Vec<TeacherTargets>, ClientError> {
    r.sequences
        .iter()
        .map(|s| {
            TeacherTargets::from_sequence(s, r.num_samples, r.value_encoding, r.method)
                .map_err(ClientError::from)
        })
        .collect()
}

async fn run<I: Iterator<Item = TrainingBatch>>(
    client: TeacherClient,
    mut source: I,
    depth: usize,
    options: SampleOptions,
    out: mpsc::Sender<Prefetched>,
) {
    let policy = client.config().retry;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut exhausted = false;
    loop {
        // Take batches up to the depth before (re)opening the stream, so that a
        // stream that fails at once (no server, a refusal) has a batch to charge
        // the attempt to: without one, a dead server was retried in a tight
        // loop forever, with no backoff and no error.
        while !exhausted && pending.len() < depth {
            match source.next() {
                Some(batch) => {
                    let request = batch.request(options);
                    pending.push_back(Pending { batch, request, attempts: 1 });
                }
                None => exhausted = true,
            }
        }
        if pending.is_empty() {
            return;
        }
        // (Re)open the stream and send what is in flight.
        let (req_tx, req_rx) = mpsc::channel::<SampleLogitsRequest>(depth);
        for p in &pending {
            let _ = req_tx.try_send(p.request.clone());
        }
        let mut raw = client.raw();
        let failure = match raw.sample_logits_stream(ReceiverStream::new(req_rx)).await {
            Err(status) => status,
            Ok(inbound) => {
                let mut inbound = inbound.into_inner();
                loop {
                    while !exhausted && pending.len() < depth {
                        match source.next() {
                            Some(batch) => {
                                let request = batch.request(options);
                                let _ = req_tx.send(request.clone()).await;
                                pending.push_back(Pending { batch, request, attempts: 1 });
                            }
                            None => exhausted = true,
                        }
                    }
                    if pending.is_empty() {
                        return;
                    }
                    match inbound.message().await {
                        Ok(Some(response)) => {
                            let p =
                                pending.pop_front().expect("a response answers a pending batch");
                            let item = Prefetched { batch: p.batch, targets: decode(&response) };
                            if out.send(item).await.is_err() {
                                return; // the consumer is gone
                            }
                        }
                        Ok(None) => {
                            break tonic::Status::unavailable("the server closed the stream");
                        }
                        Err(status) => break status,
                    }
                }
            }
        };
        // The head batch failed (the stream ends at its first error).
        let head = pending.front_mut().expect("a stream is open only with batches in flight");
        if RetryPolicy::retryable_status(&failure) && head.attempts < policy.max_attempts {
            tokio::time::sleep(policy.backoff(head.attempts)).await;
            head.attempts += 1;
        } else {
            let p = pending.pop_front().expect("head exists");
            let error = ClientError::rpc(failure, p.attempts, &client.config().endpoints);
            if out.send(Prefetched { batch: p.batch, targets: Err(error) }).await.is_err() {
                return;
            }
        }
    }
}
