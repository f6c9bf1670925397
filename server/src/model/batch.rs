//! The packed batch: sequences concatenated into one token stream, nothing
//! padded, and the leading tokens that several sequences share packed once
//! ([`PackedBatch::sharing_prefixes`]).

use std::ops::Range;

use super::{ModelError, attention_cpu::Segment};

/// Sequences concatenated into one token stream, nothing padded. Without
/// sharing ([`PackedBatch::new`]) sequence s is one [`Segment`] of its own,
/// positions and causal attention restarting at its first token. With sharing
/// ([`PackedBatch::sharing_prefixes`]) the leading tokens that several
/// sequences have in common are packed once, as a segment of their own, and
/// each sequence's remaining tokens follow as a segment whose context is that
/// prefix: it attends to the prefix's keys and its own, its positions continue
/// from the prefix's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedBatch {
    tokens: Vec<u32>,
    segments: Vec<Segment>,
    /// Per sequence: its shared prefix's tokens (empty when it shares none)
    /// and the tokens after it (empty when the prefix is all of it).
    sequences: Vec<(Range<usize>, Range<usize>)>,
}

impl PackedBatch {
    /// Packs `sequences`, none of them empty, one segment each.
    pub fn new<S: AsRef<[u32]>>(sequences: &[S]) -> Result<Self, ModelError> {
        Self::sharing_prefixes(sequences, 0)
    }

    /// Packs `sequences`, none of them empty, sharing prefixes: sequences
    /// whose leading tokens are equal for at least `min_prefix` tokens form
    /// groups, and each group packs its members' longest common prefix once.
    /// `min_prefix` 0 shares nothing. See [`share_groups`] for how groups are
    /// chosen; the packing depends only on the sequences.
    pub fn sharing_prefixes<S: AsRef<[u32]>>(
        sequences: &[S],
        min_prefix: usize,
    ) -> Result<Self, ModelError> {
        if let Some(i) = sequences.iter().position(|s| s.as_ref().is_empty()) {
            return Err(ModelError::Batch(format!("sequence {i} is empty")));
        }
        if sequences.is_empty() {
            return Err(ModelError::Batch("no sequences".into()));
        }
        let slices: Vec<&[u32]> = sequences.iter().map(AsRef::as_ref).collect();
        // The shared prefix length of each sequence's group (0: none), and
        // the group's first member.
        let mut shared = vec![(0usize, 0usize); sequences.len()];
        for (len, members) in share_groups(&slices, min_prefix) {
            let leader = *members.iter().min().expect("groups have two members or more");
            for m in members {
                shared[m] = (len, leader);
            }
        }
        let mut tokens = Vec::new();
        let mut segments = Vec::new();
        let mut packed: Vec<(Range<usize>, Range<usize>)> = Vec::with_capacity(sequences.len());
        for (i, s) in sequences.iter().enumerate() {
            let s = s.as_ref();
            let (len, leader) = shared[i];
            let prefix = if len == 0 {
                tokens.len()..tokens.len()
            } else if leader == i {
                let at = tokens.len();
                tokens.extend_from_slice(&s[..len]);
                segments.push(Segment::alone(at..tokens.len()));
                at..tokens.len()
            } else {
                packed[leader].0.clone()
            };
            let at = tokens.len();
            tokens.extend_from_slice(&s[len..]);
            let own = at..tokens.len();
            if !own.is_empty() {
                segments.push(Segment { tokens: own.clone(), context: prefix.clone() });
            }
            packed.push((prefix, own));
        }
        Ok(Self { tokens, segments, sequences: packed })
    }

    /// All tokens, as packed.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of tokens packed (a shared prefix counted once).
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Tokens of all the sequences, a shared prefix counted for each.
    pub fn num_sequence_tokens(&self) -> usize {
        (0..self.num_sequences()).map(|s| self.sequence_len(s)).sum()
    }

    /// Tokens not packed because they were shared: the forward's saving.
    pub fn tokens_shared(&self) -> usize {
        self.num_sequence_tokens() - self.num_tokens()
    }

    /// Number of sequences.
    pub fn num_sequences(&self) -> usize {
        self.sequences.len()
    }

    /// The segments the attention runs over, in packed order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The length of sequence `s`.
    pub fn sequence_len(&self, s: usize) -> usize {
        let (prefix, own) = &self.sequences[s];
        prefix.len() + own.len()
    }

    /// The packed tokens of sequence `s` after its shared prefix, i.e. all of
    /// them when it shares none (always so in a batch from [`Self::new`]).
    pub fn sequence(&self, s: usize) -> Range<usize> {
        self.sequences[s].1.clone()
    }

    /// The packed token (the row of the forward's output) at position `p` of
    /// sequence `s`; the rows of a shared prefix serve every sequence in its group.
    pub fn row(&self, s: usize, p: usize) -> usize {
        let (prefix, own) = &self.sequences[s];
        if p < prefix.len() { prefix.start + p } else { own.start + (p - prefix.len()) }
    }

    /// The longest sequence.
    pub fn max_len(&self) -> usize {
        (0..self.num_sequences()).map(|s| self.sequence_len(s)).max().unwrap_or(0)
    }

    /// Whether a prefix is shared.
    pub fn shares_prefixes(&self) -> bool {
        self.segments.iter().any(|s| !s.context.is_empty())
    }

    /// The same sequences packed without sharing, and for every packed token
    /// of this batch a row of that one holding the same position of a
    /// sequence it serves.
    pub fn unshared(&self) -> Result<(PackedBatch, Vec<u32>), ModelError> {
        let sequences: Vec<Vec<u32>> = (0..self.num_sequences())
            .map(|s| (0..self.sequence_len(s)).map(|p| self.tokens[self.row(s, p)]).collect())
            .collect();
        let flat = PackedBatch::new(&sequences)?;
        let mut rows = vec![0u32; self.num_tokens()];
        for (s, seq) in sequences.iter().enumerate() {
            for p in 0..seq.len() {
                rows[self.row(s, p)] = flat.row(s, p) as u32;
            }
        }
        Ok((flat, rows))
    }

    pub(super) fn positions(&self) -> Vec<u32> {
        self.segments
            .iter()
            .flat_map(|s| {
                let first = s.first_position() as u32;
                first..first + s.tokens.len() as u32
            })
            .collect()
    }
}

/// Most sequences in one shared-prefix group (a larger group is split, its
/// prefix packed once per part).
const MAX_GROUP: usize = 1024;

/// The groups of [`PackedBatch::sharing_prefixes`]: (shared length, members),
/// each of two members or more, every length at least `min_prefix` (> 0).
///
/// The sequences of at least `min_prefix` tokens are sorted, so that those
/// with a common prefix are neighbours and the common prefix of a run of
/// neighbours is the shortest common prefix of adjacent pairs in it. The runs
/// are then chosen to save the most tokens ((members − 1) × shared length),
/// by dynamic programming over the sorted order: rollouts of two prompts that
/// begin with the same system prompt form two groups, one per prompt, rather
/// than one group sharing the system prompt only. A group holds at most
/// [`MAX_GROUP`] sequences, so the work is O(n · MAX_GROUP) in the sequences
/// of at least `min_prefix` tokens, whatever the batch limits.
fn share_groups(sequences: &[&[u32]], min_prefix: usize) -> Vec<(usize, Vec<usize>)> {
    if min_prefix == 0 {
        return vec![];
    }
    let mut order: Vec<usize> =
        (0..sequences.len()).filter(|&i| sequences[i].len() >= min_prefix).collect();
    order.sort_by(|&a, &b| sequences[a].cmp(sequences[b]).then(a.cmp(&b)));
    let n = order.len();
    // lcp[i]: common prefix of sorted neighbours i and i + 1.
    let lcp: Vec<usize> = order
        .windows(2)
        .map(|w| {
            let (a, b) = (sequences[w[0]], sequences[w[1]]);
            a.iter().zip(b).take_while(|(x, y)| x == y).count()
        })
        .collect();
    // best[j]: most tokens saved by the first j sorted sequences; from[j]:
    // where the last run of that choice starts, and its shared length.
    let mut best = vec![0usize; n + 1];
    let mut from = vec![(0usize, 0usize); n + 1];
    for j in 1..=n {
        best[j] = best[j - 1];
        from[j] = (j - 1, 0);
        // Runs i..j of two sequences or more, their shared length falling
        // as the run grows to the left.
        let mut len = usize::MAX;
        for i in (j.saturating_sub(MAX_GROUP)..j - 1).rev() {
            len = len.min(lcp[i]);
            if len < min_prefix {
                break;
            }
            let saved = best[i] + (j - 1 - i) * len;
            if saved > best[j] {
                best[j] = saved;
                from[j] = (i, len);
            }
        }
    }
    let mut groups = vec![];
    let mut j = n;
    while j > 0 {
        let (i, len) = from[j];
        if j - i >= 2 {
            groups.push((len, order[i..j].to_vec()));
        }
        j = i;
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_batch_positions_restart_at_each_sequence() {
        let b = PackedBatch::new(&[vec![5, 6, 7], vec![1], vec![2, 3]]).unwrap();
        assert_eq!(b.positions(), vec![0, 1, 2, 0, 0, 1]);
        assert_eq!(b.sequence(2), 4..6);
        assert_eq!(b.max_len(), 3);
        assert!(PackedBatch::new(&[vec![1], vec![]]).is_err());
        assert!(PackedBatch::new::<Vec<u32>>(&[]).is_err());
    }

    /// Every sequence's tokens and positions are where `row` says, whatever
    /// was shared; the packed stream is shorter by exactly what was shared.
    fn assert_packs(sequences: &[Vec<u32>], b: &PackedBatch) {
        let positions = b.positions();
        assert_eq!(positions.len(), b.num_tokens());
        assert_eq!(b.num_sequences(), sequences.len());
        for (s, seq) in sequences.iter().enumerate() {
            assert_eq!(b.sequence_len(s), seq.len());
            for (p, &t) in seq.iter().enumerate() {
                assert_eq!(b.tokens()[b.row(s, p)], t, "sequence {s} position {p}");
                assert_eq!(positions[b.row(s, p)] as usize, p, "sequence {s} position {p}");
            }
        }
        let total: usize = sequences.iter().map(Vec::len).sum();
        assert_eq!(b.num_sequence_tokens(), total);
        assert_eq!(b.num_tokens() + b.tokens_shared(), total);
        // Segments tile the stream; a context is a whole segment of no context.
        let mut next = 0;
        for seg in b.segments() {
            assert_eq!(seg.tokens.start, next);
            next = seg.tokens.end;
            if !seg.context.is_empty() {
                assert!(
                    b.segments().iter().any(|o| o.tokens == seg.context && o.context.is_empty())
                );
            }
        }
        assert_eq!(next, b.num_tokens());
    }

    #[test]
    fn shared_prefixes_are_packed_once_and_every_position_stays_reachable() {
        let system: Vec<u32> = (100..140).collect(); // 40 tokens every sequence has
        let prompt = |p: u32| -> Vec<u32> {
            system.iter().copied().chain((0..60).map(|i| p * 1000 + i)).collect()
        };
        let rollout = |p: u32, r: u32, len: u32| -> Vec<u32> {
            prompt(p).into_iter().chain((0..len).map(|i| 50_000 + r * 100 + i)).collect()
        };
        // Two prompts' rollouts, interleaved, plus a sequence of the system
        // prompt alone, a short one and a copy of prompt 1 with nothing after.
        let mut seqs = vec![rollout(1, 0, 5), rollout(2, 0, 7), rollout(1, 1, 3)];
        seqs.extend([rollout(2, 1, 1), system.clone(), vec![7, 8], prompt(1), rollout(1, 2, 9)]);
        let b = PackedBatch::sharing_prefixes(&seqs, 32).unwrap();
        assert_packs(&seqs, &b);
        // Prompt 1 (100 tokens) is shared by 4 sequences, prompt 2 by 2. The
        // system prompt alone joins neither: with it a group would share 40
        // tokens, not 100.
        assert_eq!(b.tokens_shared(), 3 * 100 + 100);
        assert!(b.shares_prefixes());
        // A sequence that is its group's prefix packs no tokens of its own.
        assert!(b.sequence(6).is_empty());
        assert_eq!(b.row(6, 99), b.row(0, 99));

        // Nothing shared below the minimum, or with 0, or in groups of one.
        for min in [0, 101] {
            let b = PackedBatch::sharing_prefixes(&seqs, min).unwrap();
            assert_packs(&seqs, &b);
            assert_eq!(b.tokens_shared(), 0, "min {min}");
            assert!(!b.shares_prefixes());
        }
        assert_eq!(b.segments().len(), 2 + 8 - 1, "two prefixes, seven continuations");

        // Prefixes that differ in their last token share one token less.
        let mut a = rollout(3, 0, 4);
        let mut c = a.clone();
        c[99] += 1;
        a.truncate(100);
        let seqs = vec![a, c];
        let b = PackedBatch::sharing_prefixes(&seqs, 32).unwrap();
        assert_packs(&seqs, &b);
        assert_eq!(b.tokens_shared(), 99);

        // A group larger than MAX_GROUP is split (in sorted order), its prefix
        // packed once per part.
        let many: Vec<Vec<u32>> = (0..1100u32).map(|i| vec![7, 8, 1000 + i]).collect();
        let b2 = PackedBatch::sharing_prefixes(&many, 2).unwrap();
        assert_packs(&many, &b2);
        assert_eq!(b2.tokens_shared(), (1023 + 75) * 2);

        // The unshared batch holds every sequence whole; its rows map back.
        let (flat, rows) = b.unshared().unwrap();
        assert!(!flat.shares_prefixes());
        assert_eq!(flat.num_tokens(), b.num_sequence_tokens());
        for (r, &f) in rows.iter().enumerate() {
            assert_eq!(flat.tokens()[f as usize], b.tokens()[r]);
            assert_eq!(flat.positions()[f as usize], b.positions()[r]);
        }
    }
}
