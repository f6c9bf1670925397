//! The batching queue: a plain struct (no tokio), driven by the scheduler and
//! unit-tested directly.
//!
//! Work arrives a request at a time (one [`WorkItem`] per sequence, accepted
//! all or nothing) and leaves in batches: whole sequences in FIFO order up to
//! `max_batch_tokens`. Entries whose caller went away (cancelled call, or past
//! its deadline) are dropped before they cost any compute.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use crate::{
    sampler::{RowKey, SampledRows, SamplingParams},
    scoring::EngineError,
};

/// What the engine answers for one work item (a failed batch's error is
/// shared by all its items).
pub type ItemResult = Result<SampledRows, Arc<EngineError>>;

/// What a sequence asks to be scored besides the draws (see
/// [`RowQueries`](crate::sampler::RowQueries)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scores {
    /// The realised next token's log p and rank at every returned position.
    pub realised: bool,
    /// Empty, or one offset per returned position plus one, from 0, into
    /// `candidate_ids`.
    pub candidate_offsets: Vec<u32>,
    /// The candidate ids.
    pub candidate_ids: Vec<u32>,
}

/// One sequence of a request: the unit the batcher packs.
#[derive(Debug)]
pub struct WorkItem {
    /// The sequence's tokens.
    pub tokens: Vec<u32>,
    /// First position to sample (earlier ones are context only).
    pub first_position: u32,
    /// How to sample it.
    pub params: SamplingParams,
    /// Philox key of its rows.
    pub seed: u64,
    /// Sequence index in its RowKey (its index in the request, or 0 with its own seed).
    pub key_sequence: u32,
    /// When the caller stops waiting.
    pub deadline: Option<Instant>,
    /// When it was queued.
    pub enqueued: Instant,
    /// What to score besides the draws (nothing by default).
    pub scores: Scores,
    /// Where the result goes.
    pub reply: oneshot::Sender<ItemResult>,
}

impl WorkItem {
    /// An item sampling positions `first_position..` of `tokens` with rows
    /// keyed by `key`'s seed and sequence, queued at `now`, with the receiver
    /// its result arrives on.
    pub fn new(
        tokens: Vec<u32>,
        first_position: u32,
        params: SamplingParams,
        key: RowKey,
        deadline: Option<Instant>,
        now: Instant,
    ) -> (Self, oneshot::Receiver<ItemResult>) {
        let (reply, rx) = oneshot::channel();
        let item = Self {
            tokens,
            first_position,
            params,
            seed: key.seed,
            key_sequence: key.sequence,
            deadline,
            enqueued: now,
            scores: Scores::default(),
            reply,
        };
        (item, rx)
    }

    /// Tokens the item costs in a batch.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the item has no tokens (never true for a validated request).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Why a queued item was dropped without being computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The caller went away (cancelled the call, closed the stream).
    Cancelled,
    /// The caller's deadline passed while the item waited.
    DeadlineExceeded,
}

impl DropReason {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            DropReason::Cancelled => "cancelled",
            DropReason::DeadlineExceeded => "deadline_exceeded",
        }
    }
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue holds too many tokens to take this request now.
    #[error(
        "the server is overloaded: {queued} tokens are queued and this request adds {requested}, over the limit of {capacity}; retry with backoff"
    )]
    Full {
        /// Tokens waiting.
        queued: usize,
        /// Tokens of the request.
        requested: usize,
        /// The limit.
        capacity: usize,
    },
    /// The server is shutting down.
    #[error("the server is shutting down and takes no new requests")]
    Closed,
}

/// Queue state.
#[derive(Debug)]
pub struct BatchQueue {
    items: VecDeque<WorkItem>,
    queued_tokens: usize,
    max_queue_tokens: usize,
    max_batch_tokens: usize,
    closed: bool,
}

impl BatchQueue {
    /// An empty queue holding at most `max_queue_tokens`, giving batches of at
    /// most `max_batch_tokens`.
    pub fn new(max_queue_tokens: usize, max_batch_tokens: usize) -> Self {
        Self {
            items: VecDeque::new(),
            queued_tokens: 0,
            max_queue_tokens,
            max_batch_tokens,
            closed: false,
        }
    }

    /// Queues a request's items, all or none.
    pub fn push(&mut self, items: Vec<WorkItem>) -> Result<(), (SubmitError, Vec<WorkItem>)> {
        if self.closed {
            return Err((SubmitError::Closed, items));
        }
        let requested: usize = items.iter().map(WorkItem::len).sum();
        if self.queued_tokens + requested > self.max_queue_tokens {
            let e = SubmitError::Full {
                queued: self.queued_tokens,
                requested,
                capacity: self.max_queue_tokens,
            };
            return Err((e, items));
        }
        self.queued_tokens += requested;
        self.items.extend(items);
        Ok(())
    }

    /// Tokens waiting.
    pub fn queued_tokens(&self) -> usize {
        self.queued_tokens
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Refuses new work from now on; what is queued still gets served.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether a batch should be taken now: a full batch is waiting, the
    /// oldest item has waited `max_wait`, or the queue is draining.
    pub fn is_ready(&self, now: Instant, max_wait: Duration) -> bool {
        let Some(oldest) = self.items.front() else { return false };
        self.closed
            || self.queued_tokens >= self.max_batch_tokens
            || now >= oldest.enqueued + max_wait
    }

    /// When the oldest item will have waited `max_wait`.
    pub fn next_deadline(&self, max_wait: Duration) -> Option<Instant> {
        self.items.front().map(|i| i.enqueued + max_wait)
    }

    /// Takes the next batch: whole items in FIFO order while they fit in
    /// `max_batch_tokens` (the first item always fits: requests are validated
    /// against it). Items whose caller is gone are dropped and reported to
    /// `dropped` instead.
    pub fn take_batch(
        &mut self,
        now: Instant,
        mut dropped: impl FnMut(DropReason, &WorkItem),
    ) -> Vec<WorkItem> {
        let mut batch = Vec::new();
        let mut tokens = 0;
        while let Some(item) = self.items.front() {
            let reason = if item.deadline.is_some_and(|d| now >= d) {
                Some(DropReason::DeadlineExceeded)
            } else if item.reply.is_closed() {
                Some(DropReason::Cancelled)
            } else {
                None
            };
            if reason.is_none() && !batch.is_empty() && tokens + item.len() > self.max_batch_tokens
            {
                break;
            }
            let item = self.items.pop_front().expect("front exists");
            self.queued_tokens -= item.len();
            match reason {
                Some(r) => dropped(r, &item),
                None => {
                    tokens += item.len();
                    batch.push(item);
                }
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::Method;

    fn item(len: usize, enqueued: Instant) -> (WorkItem, oneshot::Receiver<ItemResult>) {
        let (tx, rx) = oneshot::channel();
        let w = WorkItem {
            tokens: vec![1; len],
            first_position: 0,
            params: SamplingParams::new(Method::Sample, 4, 1.0).unwrap(),
            seed: 0,
            key_sequence: 0,
            deadline: None,
            enqueued,
            scores: Scores::default(),
            reply: tx,
        };
        (w, rx)
    }

    #[test]
    fn packs_whole_sequences_fifo_up_to_the_batch_limit() {
        let now = Instant::now();
        let mut q = BatchQueue::new(1000, 10);
        let mut keep = vec![];
        for len in [4, 5, 3, 2, 10] {
            let (w, rx) = item(len, now);
            keep.push(rx);
            q.push(vec![w]).unwrap();
        }
        let sizes = |b: Vec<WorkItem>| b.iter().map(WorkItem::len).collect::<Vec<_>>();
        assert_eq!(sizes(q.take_batch(now, |_, _| panic!())), vec![4, 5]); // 3 would overflow 10
        assert_eq!(sizes(q.take_batch(now, |_, _| panic!())), vec![3, 2]);
        assert_eq!(sizes(q.take_batch(now, |_, _| panic!())), vec![10]);
        assert!(q.is_empty());
        assert_eq!(q.queued_tokens(), 0);
    }

    #[test]
    fn a_full_queue_refuses_the_whole_request_at_once() {
        let now = Instant::now();
        let mut q = BatchQueue::new(10, 10);
        let (a, _ra) = item(6, now);
        q.push(vec![a]).unwrap();
        let (b, _rb) = item(3, now);
        let (c, _rc) = item(3, now);
        let (e, back) = q.push(vec![b, c]).unwrap_err();
        assert_eq!(e, SubmitError::Full { queued: 6, requested: 6, capacity: 10 });
        assert_eq!(back.len(), 2, "the items come back to the caller");
        assert_eq!(q.len(), 1, "nothing of the refused request was queued");
    }

    #[test]
    fn waits_for_a_fuller_batch_at_most_max_wait() {
        let t0 = Instant::now();
        let wait = Duration::from_millis(5);
        let mut q = BatchQueue::new(100, 10);
        assert!(!q.is_ready(t0, wait), "empty");
        let (a, _ra) = item(3, t0);
        q.push(vec![a]).unwrap();
        assert!(!q.is_ready(t0, wait), "not full and not old");
        assert_eq!(q.next_deadline(wait), Some(t0 + wait));
        assert!(q.is_ready(t0 + wait, wait), "old enough");
        let (b, _rb) = item(7, t0);
        q.push(vec![b]).unwrap();
        assert!(q.is_ready(t0, wait), "a full batch is waiting");
    }

    #[test]
    fn cancelled_and_expired_items_are_dropped_before_compute() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(100, 100);
        let (a, ra) = item(3, t0);
        let (mut b, _rb) = item(4, t0);
        b.deadline = Some(t0 + Duration::from_millis(1));
        let (c, _rc) = item(5, t0);
        q.push(vec![a, b, c]).unwrap();
        drop(ra); // the caller of `a` went away
        let mut dropped = vec![];
        let batch = q.take_batch(t0 + Duration::from_millis(2), |r, w| dropped.push((r, w.len())));
        assert_eq!(batch.iter().map(WorkItem::len).collect::<Vec<_>>(), vec![5]);
        assert_eq!(dropped, vec![(DropReason::Cancelled, 3), (DropReason::DeadlineExceeded, 4)]);
        assert_eq!(q.queued_tokens(), 0);
    }

    #[test]
    fn a_closed_queue_refuses_new_work_and_drains_the_rest_at_once() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(100, 100);
        let (a, _ra) = item(3, t0);
        q.push(vec![a]).unwrap();
        q.close();
        assert!(q.is_ready(t0, Duration::from_secs(60)), "draining does not wait");
        let (b, _rb) = item(1, t0);
        assert_eq!(q.push(vec![b]).unwrap_err().0, SubmitError::Closed);
        assert_eq!(q.take_batch(t0, |_, _| panic!()).len(), 1);
    }

    proptest::proptest! {
        /// Random requests (1–5 items of 1..=max_batch tokens) against a random
        /// capacity, some callers gone and some deadlines passed: a request is
        /// queued whole or refused whole, the token count is exact, batches keep
        /// FIFO order within the limit, and every queued item leaves exactly once
        /// (computed, or dropped for the right reason).
        #[test]
        fn packing_keeps_order_limits_and_accounting(
            requests in proptest::collection::vec(
                proptest::collection::vec((1usize..=16, proptest::bool::weighted(0.15),
                    proptest::bool::weighted(0.15)), 1..=5),
                1..40),
            capacity in 16usize..200,
            max_batch in 16usize..64,
            take_every in 1usize..6,
        ) {
            let t0 = Instant::now();
            let later = t0 + Duration::from_millis(10);
            let mut q = BatchQueue::new(capacity, max_batch);
            let mut keep = Vec::new();
            let (mut queued, mut order, mut out) = (0usize, Vec::new(), Vec::new());
            let mut next_id = 0usize;
            let drain = |q: &mut BatchQueue, out: &mut Vec<(usize, Option<DropReason>)>| {
                let mut dropped = Vec::new();
                let batch = q.take_batch(later, |r, w| dropped.push((w.tokens[0] as usize, r)));
                let tokens: usize = batch.iter().map(WorkItem::len).sum();
                assert!(tokens <= max_batch, "batch of {tokens} > {max_batch}");
                let ids: Vec<usize> = batch.iter().map(|w| w.tokens[0] as usize).collect();
                assert!(ids.windows(2).all(|p| p[0] < p[1]), "batch out of order: {ids:?}");
                // What left in one call is a prefix of the queue: in id order.
                let mut left: Vec<(usize, Option<DropReason>)> =
                    dropped.into_iter().map(|(id, r)| (id, Some(r))).collect();
                left.extend(ids.into_iter().map(|id| (id, None)));
                left.sort_by_key(|(id, _)| *id);
                out.extend(left);
            };
            for (n, req) in requests.iter().enumerate() {
                let mut items = Vec::new();
                for &(len, gone, expired) in req {
                    let (mut w, rx) = item(len, t0);
                    w.tokens[0] = next_id as u32; // identifies the item
                    if expired {
                        w.deadline = Some(t0 + Duration::from_millis(1));
                    }
                    if !gone {
                        keep.push(rx);
                    }
                    items.push((w, gone, expired));
                    next_id += 1;
                }
                let tokens: usize = items.iter().map(|(w, _, _)| w.len()).sum();
                let meta: Vec<_> = items.iter().map(|(w, g, e)| (w.tokens[0] as usize, *g, *e)).collect();
                match q.push(items.into_iter().map(|(w, _, _)| w).collect()) {
                    Ok(()) => {
                        queued += tokens;
                        order.extend(meta);
                    }
                    Err((SubmitError::Full { queued: qd, requested, capacity: c }, back)) => {
                        proptest::prop_assert_eq!(qd, q.queued_tokens());
                        proptest::prop_assert_eq!(requested, tokens);
                        proptest::prop_assert_eq!(c, capacity);
                        proptest::prop_assert!(qd + requested > capacity);
                        proptest::prop_assert_eq!(back.len(), req.len());
                    }
                    Err((e, _)) => proptest::prop_assert!(false, "{:?}", e),
                }
                proptest::prop_assert_eq!(q.queued_tokens(), queued - out_tokens(&out, &requests));
                if n % take_every == 0 {
                    drain(&mut q, &mut out);
                }
            }
            while !q.is_empty() {
                drain(&mut q, &mut out);
            }
            proptest::prop_assert_eq!(q.queued_tokens(), 0);
            // Every queued item left once, in FIFO order, for the right reason.
            let left: Vec<usize> = out.iter().map(|(id, _)| *id).collect();
            let want: Vec<usize> = order.iter().map(|(id, _, _)| *id).collect();
            proptest::prop_assert_eq!(left, want);
            for ((_, reason), (_, gone, expired)) in out.iter().zip(&order) {
                let want = if *expired {
                    Some(DropReason::DeadlineExceeded)
                } else if *gone {
                    Some(DropReason::Cancelled)
                } else {
                    None
                };
                proptest::prop_assert_eq!(*reason, want);
            }
        }
    }

    /// Tokens of the items that have left the queue (ids index `requests`' items).
    fn out_tokens(
        out: &[(usize, Option<DropReason>)],
        requests: &[Vec<(usize, bool, bool)>],
    ) -> usize {
        let lens: Vec<usize> = requests.iter().flatten().map(|(len, _, _)| *len).collect();
        out.iter().map(|(id, _)| lens[*id]).sum()
    }
}
