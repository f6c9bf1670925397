//! The one place where logitd's positions become the token indices of vLLM,
//! SGLang and TRL.
//!
//! logitd's position `t` is the teacher's distribution for token `t + 1`
//! given tokens `0..=t` (`proto/logitd/v1/teacher.proto`). vLLM's
//! `prompt_logprobs[j]`, SGLang's `input_*_logprobs` and TRL's completion
//! rows index a log-probability by the token it scores: entry `j` is
//! `log p(token j | tokens 0..j)`, and entry 0 (no context) is a
//! placeholder. So token `j` is scored by position `j - 1`, and that
//! subtraction is written once, in [`Scored::token`]. Everything else asks
//! for tokens by their index.

use logitd_proto::v1::{
    SampleLogitsRequest, SampledSequence, SamplingMethod, Sequence, ValueEncoding,
};

/// One sequence to score, in token indices: tokens `first_token..len` get
/// a score (token 0 never can).
#[derive(Debug, Clone)]
pub struct ToScore {
    /// The token ids.
    pub tokens: Vec<u32>,
    /// The first token whose score is wanted (0 is allowed: it has none).
    pub first_token: usize,
    /// Candidate ids scored at every scored position (SGLang's
    /// `token_ids_logprob`), empty for none.
    pub candidates: Vec<u32>,
}

/// The logitd request that scores `sequences`: top-`k` at temperature
/// `temperature`, the realised tokens' log-probabilities and ranks, and
/// the candidates. Every position from the one that scores `first_token`
/// to the sequence's last is returned; the last one is the distribution
/// of the token after the sequence (what a generated token is drawn from).
pub fn request(
    sequences: &[ToScore],
    k: u32,
    temperature: f32,
    seed: Option<u64>,
) -> SampleLogitsRequest {
    SampleLogitsRequest {
        sequences: sequences
            .iter()
            .map(|s| {
                let first_position = first_position(s.first_token, s.tokens.len());
                let positions = s.tokens.len().saturating_sub(first_position as usize);
                let (candidate_offsets, candidate_ids) =
                    if s.candidates.is_empty() || positions == 0 {
                        (Vec::new(), Vec::new())
                    } else {
                        let n = s.candidates.len() as u32;
                        (
                            (0..=positions as u32).map(|i| i * n).collect(),
                            s.candidates.repeat(positions),
                        )
                    };
                Sequence {
                    token_ids: s.tokens.clone(),
                    first_position,
                    seed: None,
                    candidate_offsets,
                    candidate_ids,
                }
            })
            .collect(),
        num_samples: k,
        temperature: Some(temperature),
        seed,
        method: SamplingMethod::TopK as i32,
        value_encoding: ValueEncoding::F32 as i32,
        return_token_logprobs: true,
    }
}

/// The position that scores token `first_token`, kept inside the sequence
/// (token 0 has no position; a sequence always returns at least its last).
fn first_position(first_token: usize, len: usize) -> u32 {
    first_token.saturating_sub(1).min(len.saturating_sub(1)) as u32
}

/// What the teacher says about one token of a sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenScore<'a> {
    /// The token (the sequence's own, the realised one).
    pub token: u32,
    /// Its log-probability at the request's temperature.
    pub logprob: f32,
    /// Its rank: 1 + the number of ids with a larger logit.
    pub rank: u32,
    /// The top-k ids at its position, by descending log-probability (ties
    /// by ascending id).
    pub top_ids: &'a [u32],
    /// Their log-probabilities.
    pub top_logprobs: &'a [f32],
    /// The candidates' log-probabilities, in the request's order.
    pub candidate_logprobs: &'a [f32],
}

/// The top-k and candidates of one position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row<'a> {
    /// The top-k ids, by descending log-probability.
    pub top_ids: &'a [u32],
    /// Their log-probabilities.
    pub top_logprobs: &'a [f32],
    /// The candidates' log-probabilities.
    pub candidate_logprobs: &'a [f32],
}

/// A reply's sequence read by token index.
#[derive(Debug, Clone, Copy)]
pub struct Scored<'a> {
    seq: &'a SampledSequence,
    tokens: &'a [u32],
}

impl<'a> Scored<'a> {
    /// `seq` answers the request [`request`] made for `tokens`.
    pub fn new(seq: &'a SampledSequence, tokens: &'a [u32]) -> Self {
        Self { seq, tokens }
    }

    /// The tokens.
    pub fn tokens(&self) -> &'a [u32] {
        self.tokens
    }

    /// Returned position `row` (position `first_position + row`).
    fn row(&self, row: usize) -> Row<'a> {
        let s = self.seq;
        let (a, b) = (s.offsets[row] as usize, s.offsets[row + 1] as usize);
        let candidate_logprobs = match s.candidate_offsets.get(row..row + 2) {
            Some(w) => &s.candidate_logprobs[w[0] as usize..w[1] as usize],
            None => &[],
        };
        Row { top_ids: &s.token_ids[a..b], top_logprobs: &s.logprobs[a..b], candidate_logprobs }
    }

    /// The score of token `index`: `None` for token 0, which has no
    /// context, and for tokens before those that were asked for.
    pub fn token(&self, index: usize) -> Option<TokenScore<'a>> {
        // Token `index` is scored by position `index - 1`: the shift.
        let position = index.checked_sub(1)?;
        let row = position.checked_sub(self.seq.first_position as usize)?;
        let logprob = *self.seq.token_logprobs.get(row)?;
        let rank = self.seq.token_ranks[row];
        let Row { top_ids, top_logprobs, candidate_logprobs } = self.row(row);
        Some(TokenScore {
            token: self.tokens[index],
            logprob,
            rank,
            top_ids,
            top_logprobs,
            candidate_logprobs,
        })
    }

    /// The distribution after the last token (the sequence's last
    /// position): where a generated token comes from.
    pub fn next(&self) -> Row<'a> {
        self.row(self.seq.offsets.len() - 2)
    }
}

/// vLLM's entries of one position of `prompt_logprobs`, in its dict order:
/// the realised token first with its own rank, then the top `k` with ranks
/// 1..=k; a realised token among the top k stays first and takes its top-k
/// rank (vLLM builds the dict from `[token] + top-k` with the later
/// duplicate overwriting the value, `vllm/logprobs.py`,
/// `append_logprobs_for_next_position`).
pub fn vllm_entries(t: &TokenScore<'_>, k: usize) -> Vec<(u32, f32, u32)> {
    let k = k.min(t.top_ids.len());
    let mut out = Vec::with_capacity(k + 1);
    let in_top = t.top_ids[..k].iter().position(|&id| id == t.token);
    out.push((t.token, t.logprob, in_top.map_or(t.rank, |i| i as u32 + 1)));
    for (i, (&id, &lp)) in t.top_ids[..k].iter().zip(&t.top_logprobs[..k]).enumerate() {
        if Some(i) != in_top {
            out.push((id, lp, i as u32 + 1));
        }
    }
    out
}

/// vLLM's dict entries sorted by rank (a stable sort, as Python's `sorted`
/// on the dict's items), which is how TRL reads them.
pub fn by_rank(mut entries: Vec<(u32, f32, u32)>) -> Vec<(u32, f32, u32)> {
    entries.sort_by_key(|e| e.2);
    entries
}

/// A token drawn from `row`'s top-k, renormalised, with a generator keyed
/// by `seed` and the sequence's index; `greedy` takes the most likely one.
/// Returns its index in the row. The distribution is the top-k's, not the
/// whole vocabulary's: logitd scores and does not generate, and this token
/// exists only so that a `max_tokens: 1` call gets an answer shaped as a
/// generator's.
pub fn draw(row: &Row<'_>, seed: u64, sequence: usize, greedy: bool) -> Option<usize> {
    if row.top_ids.is_empty() {
        return None;
    }
    if greedy {
        return Some(0);
    }
    let top = row.top_logprobs[0] as f64;
    let weights: Vec<f64> = row.top_logprobs.iter().map(|&lp| (lp as f64 - top).exp()).collect();
    let total: f64 = weights.iter().sum();
    let u = unit(splitmix64(seed ^ splitmix64(sequence as u64))) * total;
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if u < acc {
            return Some(i);
        }
    }
    Some(weights.len() - 1)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply for tokens [10, 11, 12, 13] from position 1 on: position p's
    /// top-1 is id 100 + p with log-probability -p, the realised token's
    /// log-probability is -(p + 1) / 10 and its rank p + 2.
    fn reply() -> (SampledSequence, Vec<u32>) {
        let tokens = vec![10, 11, 12, 13];
        let seq = SampledSequence {
            first_position: 1,
            offsets: vec![0, 1, 2, 3],
            token_ids: vec![101, 102, 103],
            logprobs: vec![-1.0, -2.0, -3.0],
            token_logprobs: vec![-0.2, -0.3],
            token_ranks: vec![3, 4],
            ..Default::default()
        };
        (seq, tokens)
    }

    #[test]
    fn token_j_is_scored_by_position_j_minus_1() {
        let (seq, tokens) = reply();
        let s = Scored::new(&seq, &tokens);
        // Token 0 has no context; token 1 would be position 0, not returned.
        assert_eq!(s.token(0), None);
        assert_eq!(s.token(1), None);
        // Token 2 (id 12) is scored by position 1: realised -0.2, top-1 101.
        let t = s.token(2).unwrap();
        assert_eq!(
            (t.token, t.logprob, t.rank, t.top_ids, t.top_logprobs),
            (12, -0.2, 3, &[101][..], &[-1.0][..])
        );
        let t = s.token(3).unwrap();
        assert_eq!((t.token, t.logprob, t.rank, t.top_ids), (13, -0.3, 4, &[102][..]));
        // There is no token 4: position 3 is the distribution after the sequence.
        assert_eq!(s.token(4), None);
        assert_eq!(s.next().top_ids, &[103]);
    }

    #[test]
    fn the_request_starts_at_the_position_before_the_first_token() {
        let one = |first_token, len| {
            let s = ToScore { tokens: (0..len).collect(), first_token, candidates: vec![] };
            request(&[s], 5, 1.0, None).sequences[0].first_position
        };
        assert_eq!(one(0, 4), 0);
        assert_eq!(one(1, 4), 0);
        assert_eq!(one(3, 4), 2);
        // Past the end: the last position still comes back (the next token).
        assert_eq!(one(4, 4), 3);
        assert_eq!(one(9, 4), 3);
        assert_eq!(one(0, 1), 0);
    }

    #[test]
    fn candidates_repeat_per_returned_position() {
        let s = ToScore { tokens: vec![1, 2, 3], first_token: 2, candidates: vec![7, 8] };
        let r = request(&[s], 1, 1.0, None);
        assert_eq!(r.sequences[0].first_position, 1);
        assert_eq!(r.sequences[0].candidate_offsets, vec![0, 2, 4]);
        assert_eq!(r.sequences[0].candidate_ids, vec![7, 8, 7, 8]);
    }

    #[test]
    fn vllm_puts_the_realised_token_first() {
        let ids = [5, 6, 7];
        let lps = [-0.1, -0.2, -0.3];
        let t = |token, rank| TokenScore {
            token,
            logprob: -0.25,
            rank,
            top_ids: &ids,
            top_logprobs: &lps,
            candidate_logprobs: &[],
        };
        // Outside the top k: first, with its own rank, then ranks 1..=k.
        assert_eq!(
            vllm_entries(&t(9, 40), 3),
            vec![(9, -0.25, 40), (5, -0.1, 1), (6, -0.2, 2), (7, -0.3, 3)]
        );
        // Inside: still first, once, with its top-k rank.
        assert_eq!(vllm_entries(&t(6, 2), 3), vec![(6, -0.25, 2), (5, -0.1, 1), (7, -0.3, 3)]);
        // k = 0: the realised token alone.
        assert_eq!(vllm_entries(&t(6, 2), 0), vec![(6, -0.25, 2)]);
        assert_eq!(
            by_rank(vllm_entries(&t(9, 40), 2)),
            vec![(5, -0.1, 1), (6, -0.2, 2), (9, -0.25, 40)]
        );
    }

    #[test]
    fn draws_are_seeded_and_greedy_takes_the_first() {
        let ids = [1, 2, 3];
        let lps = [-0.1f32, -2.5, -3.0];
        let row = Row { top_ids: &ids, top_logprobs: &lps, candidate_logprobs: &[] };
        assert_eq!(draw(&row, 1, 0, true), Some(0));
        assert_eq!(draw(&row, 7, 0, false), draw(&row, 7, 0, false));
        let hits = (0..2000).filter(|&s| draw(&row, s, 0, false) == Some(0)).count();
        // p(first | top-3) = 1 / (1 + e^-2.4 + e^-2.9) = 0.8728: 1745.6 of
        // 2000 draws, sigma 14.9; within 5 sigma.
        assert!((1671..1821).contains(&hits), "{hits}");
        let empty = Row { top_ids: &[], top_logprobs: &[], candidate_logprobs: &[] };
        assert_eq!(draw(&empty, 1, 0, false), None);
    }
}
