//! Request decoding + validation + packing: any bytes a client can send as a
//! `SampleLogitsRequest` body either fail to decode, fail validation with
//! INVALID_ARGUMENT, or become work items that the queue packs into batches
//! holding every token exactly once, in order, within the batch limit.

#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use logitd::{
    error::ServiceError,
    model::PackedBatch,
    queue::BatchQueue,
    service::{Limits, work_items},
};
use logitd_proto::v1::SampleLogitsRequest;
use prost::Message;

const MAX_BATCH_TOKENS: usize = 96;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = SampleLogitsRequest::decode(data) else { return };
    let limits = Limits {
        vocab_size: 1000,
        max_sequence_length: 64,
        default_num_samples: 16,
        max_num_samples: 300,
        max_candidates: 8,
        max_request_tokens: 512,
        default_timeout: Duration::from_secs(1),
    };
    let request = match limits.validate(req) {
        Ok(v) => v,
        Err(e) => {
            // The one way a validation error reaches the wire.
            let status = tonic::Status::from(ServiceError::from(e));
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(!status.message().is_empty());
            return;
        }
    };
    // What validation promises.
    assert!(!request.sequences.is_empty());
    let mut total = 0;
    for s in &request.sequences {
        assert!(!s.token_ids.is_empty() && s.token_ids.len() <= 64);
        assert!(s.token_ids.iter().all(|&t| t < 1000));
        assert!((s.first_position as usize) < s.token_ids.len());
        // Candidates: none, or CSR over the returned positions, within limits.
        let positions = s.token_ids.len() - s.first_position as usize;
        let o = &s.candidate_offsets;
        if o.is_empty() {
            assert!(s.candidate_ids.is_empty());
        } else {
            assert_eq!(o.len(), positions + 1);
            assert_eq!(o[0], 0);
            assert!(o.windows(2).all(|w| w[0] <= w[1] && w[1] - w[0] <= 8));
            assert_eq!(*o.last().unwrap() as usize, s.candidate_ids.len());
            assert!(s.candidate_ids.iter().all(|&t| t < 1000));
        }
        total += s.token_ids.len();
    }
    assert!(total <= 512);
    assert!((1..=300).contains(&request.params.num_samples()));

    let expected: Vec<Vec<u32>> = request.sequences.iter().map(|s| s.token_ids.clone()).collect();
    let now = Instant::now();
    let offsets: Vec<Vec<u32>> =
        request.sequences.iter().map(|s| s.candidate_offsets.clone()).collect();
    let (items, _receivers) = work_items(
        request.sequences,
        request.params,
        request.token_logprobs,
        request.seed.unwrap_or(0),
        None,
        now,
    );
    for (item, o) in items.iter().zip(&offsets) {
        assert_eq!(&item.scores.candidate_offsets, o);
        assert_eq!(item.scores.realised, request.token_logprobs);
    }
    let mut queue = BatchQueue::new(512, MAX_BATCH_TOKENS);
    queue.push(items).expect("a validated request fits an empty queue");
    assert_eq!(queue.queued_tokens(), total);
    let mut packed: Vec<Vec<u32>> = Vec::new();
    while !queue.is_empty() {
        let batch = queue.take_batch(now, |_, _| panic!("nothing may be dropped"));
        assert!(!batch.is_empty());
        let tokens: usize = batch.iter().map(|i| i.len()).sum();
        // A batch is within the limit, or one sequence longer than it.
        assert!(tokens <= MAX_BATCH_TOKENS || batch.len() == 1);
        let sequences: Vec<&[u32]> = batch.iter().map(|i| i.tokens.as_slice()).collect();
        let p = PackedBatch::new(&sequences).expect("packs");
        assert_eq!(p.num_tokens(), tokens);
        assert_eq!(p.num_sequences(), batch.len());
        for (s, item) in batch.iter().enumerate() {
            assert_eq!(&p.tokens()[p.sequence(s)], item.tokens.as_slice());
        }
        // Shared prefixes (any minimum): every position where `row` says,
        // the stream shorter by exactly what was shared.
        for min in [1, 2, 4] {
            let shared = PackedBatch::sharing_prefixes(&sequences, min).expect("packs");
            assert_eq!(shared.num_tokens() + shared.tokens_shared(), tokens);
            for (s, item) in batch.iter().enumerate() {
                for (pos, &t) in item.tokens.iter().enumerate() {
                    assert_eq!(shared.tokens()[shared.row(s, pos)], t);
                }
            }
        }
        packed.extend(batch.into_iter().map(|i| i.tokens));
    }
    assert_eq!(packed, expected, "every sequence once, in order");
    assert_eq!(queue.queued_tokens(), 0);
});
