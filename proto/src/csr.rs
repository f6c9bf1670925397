//! Row arithmetic of the CSR layout of sampled targets (`SampledSequence`'s
//! `offsets`): row r owns entries `offsets[r]..offsets[r + 1]` of the entry
//! columns, and `offsets` has one more element than there are rows, the first
//! being 0. The server's `SampledRows` and the client's `TeacherTargets` both
//! use it; they stay two types because they hold different things (the client's
//! adds k and the first position, the server's is built row by row and then
//! moved into the wire message), but the arithmetic on offsets is this one.

use std::ops::Range;

/// The entries of rows `rows`: `offsets[rows.start]..offsets[rows.end]`.
/// Panics if `rows.end >= offsets.len()`.
#[inline]
pub fn entries(offsets: &[u32], rows: Range<usize>) -> Range<usize> {
    offsets[rows.start] as usize..offsets[rows.end] as usize
}

/// The offsets of rows `rows` on their own, rebased to start at 0.
/// Panics if `rows.end >= offsets.len()`.
pub fn rebased(offsets: &[u32], rows: Range<usize>) -> Vec<u32> {
    let base = offsets[rows.start];
    offsets[rows.start..=rows.end].iter().map(|o| o - base).collect()
}

/// Appends the rows whose offsets are `more` after those of `offsets`
/// (`more` rebased onto the last offset; its leading 0 is dropped).
pub fn append(offsets: &mut Vec<u32>, more: &[u32]) {
    let base = *offsets.last().expect("offsets start with 0");
    offsets.extend(more[1..].iter().map(|o| o + base));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of 2, 3, 1 and 4 entries.
    const OFFSETS: [u32; 5] = [0, 2, 5, 6, 10];

    #[test]
    fn entries_are_the_rows_span_of_the_columns() {
        assert_eq!(entries(&OFFSETS, 0..1), 0..2);
        assert_eq!(entries(&OFFSETS, 1..2), 2..5);
        assert_eq!(entries(&OFFSETS, 1..3), 2..6);
        assert_eq!(entries(&OFFSETS, 2..2), 5..5);
        assert_eq!(entries(&OFFSETS, 0..4), 0..10);
    }

    #[test]
    fn rebased_rows_start_at_zero_and_keep_their_lengths() {
        assert_eq!(rebased(&OFFSETS, 1..3), vec![0, 3, 4]);
        assert_eq!(rebased(&OFFSETS, 0..2), vec![0, 2, 5]);
        assert_eq!(rebased(&OFFSETS, 3..4), vec![0, 4]);
        assert_eq!(rebased(&OFFSETS, 2..2), vec![0]);
    }

    #[test]
    fn appended_rows_follow_the_last_entry() {
        let mut offsets = vec![0, 2, 5];
        append(&mut offsets, &[0, 1, 5]);
        assert_eq!(offsets, vec![0, 2, 5, 6, 10]);
        append(&mut offsets, &[0]);
        assert_eq!(offsets, vec![0, 2, 5, 6, 10]);
        let mut empty = vec![0];
        append(&mut empty, &[0, 3]);
        assert_eq!(empty, vec![0, 3]);
    }
}
