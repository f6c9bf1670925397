//! The host side of the CUDA sampling kernel that needs no GPU: its launch
//! shape, the shared memory a launch needs, and the decoding of what the kernel
//! writes back. The kernel is `cuda/sampler.cu`; the launcher, built with the
//! `cuda` feature, is [`super::gpu`].
//!
//! The kernel writes, for each row r, [`META_WORDS`] words at `meta[r * 8..]`
//! (where its entries start, how many, a status, the failing index and value,
//! the lse as f32 bits) and its entries (id, count, log p) at `start..start +
//! len` of three flat arrays. Rows reserve their entries with an atomic add, so
//! the entries of consecutive rows need not be adjacent or in row order.

use super::{Method, SampledRows, SamplerError};

/// Threads per block (one block per row).
pub const THREADS: u32 = 512;
/// Ids per tile: 32 lanes × 8.
pub const TILE: usize = 256;
/// Words of `meta` per row.
pub const META_WORDS: usize = 8;

const META_START: usize = 0;
const META_LEN: usize = 1;
const META_STATUS: usize = 2;
const META_ERR_INDEX: usize = 3;
const META_ERR_VALUE: usize = 4;
const META_LSE: usize = 5;

/// Row status: sampled.
pub const STATUS_OK: u32 = 0;
/// Row status: a NaN or +inf logit (index and value recorded).
pub const STATUS_NON_FINITE: u32 = 1;
/// Row status: every logit is -inf.
pub const STATUS_ALL_MASKED: u32 = 2;

/// The kernel's `method` argument.
pub fn method_code(method: Method) -> u32 {
    match method {
        Method::Sample => 0,
        // No ids: the kernel's top-k path with k = 1 gives the lse, and the
        // host drops the entry (see `SamplerBackend`).
        Method::TopK | Method::None => 1,
    }
}

/// Bytes of dynamic shared memory one block needs: the tile ends (f64 per
/// tile) and, to sample, the k + 1 thresholds (f64) and k slots of (id, count,
/// log p).
pub fn shared_bytes(method: Method, vocab: usize, k: usize) -> usize {
    let tiles = vocab.div_ceil(TILE) * 8;
    match method {
        Method::Sample => tiles + (k + 1) * 8 + k * 12,
        Method::TopK | Method::None => tiles,
    }
}

/// Entries a chunk of `rows` rows can produce at most (k per row).
pub fn max_entries(rows: usize, k: usize) -> usize {
    rows * k
}

/// Appends the rows the kernel wrote to `out`, in row order. Like the CPU
/// sampler, stops at the first row that failed, with its error, keeping the
/// rows before it.
pub fn decode_rows(
    meta: &[u32],
    ids: &[u32],
    counts: &[u32],
    logprobs: &[f32],
    rows: usize,
    out: &mut SampledRows,
) -> Result<(), SamplerError> {
    assert!(meta.len() >= rows * META_WORDS, "meta holds fewer rows than launched: this is a bug");
    for m in meta.chunks_exact(META_WORDS).take(rows) {
        match m[META_STATUS] {
            STATUS_OK => {}
            STATUS_NON_FINITE => {
                return Err(SamplerError::NonFiniteLogit {
                    index: m[META_ERR_INDEX] as usize,
                    value: f32::from_bits(m[META_ERR_VALUE]),
                });
            }
            STATUS_ALL_MASKED => return Err(SamplerError::AllMasked),
            s => panic!("the CUDA sampler wrote row status {s}: this is a bug"),
        }
        let (start, len) = (m[META_START] as usize, m[META_LEN] as usize);
        let end = start.checked_add(len).filter(|&e| e <= ids.len());
        let end = end.expect("the CUDA sampler wrote entries past its buffer: this is a bug");
        for i in start..end {
            out.push_entry(ids[i], counts[i], logprobs[i]);
        }
        out.finish_row(f32::from_bits(m[META_LSE]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_row(start: u32, len: u32, status: u32, index: u32, value: f32, lse: f32) -> [u32; 8] {
        [start, len, status, index, value.to_bits(), lse.to_bits(), 0, 0]
    }

    #[test]
    fn rows_are_decoded_in_row_order_whatever_order_they_reserved_entries_in() {
        // Row 1 reserved first (entries 0..2), then row 2 (2..3), then row 0 (3..6).
        let meta: Vec<u32> = [
            meta_row(3, 3, STATUS_OK, 0, 0.0, 1.5),
            meta_row(0, 2, STATUS_OK, 0, 0.0, 2.5),
            meta_row(2, 1, STATUS_OK, 0, 0.0, 3.5),
        ]
        .concat();
        let ids = [7, 9, 4, 1, 2, 3, 99];
        let counts = [5, 3, 8, 2, 2, 4, 99];
        let lps = [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, 9.0];
        let mut out = SampledRows::new();
        decode_rows(&meta, &ids, &counts, &lps, 3, &mut out).unwrap();
        assert_eq!(out.offsets, vec![0, 3, 5, 6]);
        assert_eq!(out.token_ids, vec![1, 2, 3, 7, 9, 4]);
        assert_eq!(out.counts, vec![2, 2, 4, 5, 3, 8]);
        assert_eq!(out.logprobs, vec![-0.4, -0.5, -0.6, -0.1, -0.2, -0.3]);
        assert_eq!(out.lse, vec![1.5, 2.5, 3.5]);
    }

    #[test]
    fn decoding_appends_after_rows_already_there() {
        let mut out = SampledRows::new();
        out.push_entry(5, 1, -1.0);
        out.finish_row(0.5);
        let meta = meta_row(0, 1, STATUS_OK, 0, 0.0, 4.0);
        decode_rows(&meta, &[3], &[2], &[-2.0], 1, &mut out).unwrap();
        assert_eq!(out.offsets, vec![0, 1, 2]);
        assert_eq!(out.row(1).token_ids, &[3]);
        assert_eq!(out.row(1).lse, 4.0);
    }

    #[test]
    fn the_first_failing_row_stops_decoding_with_its_error() {
        let meta: Vec<u32> = [
            meta_row(0, 1, STATUS_OK, 0, 0.0, 1.0),
            meta_row(0, 0, STATUS_NON_FINITE, 17, f32::INFINITY, 0.0),
            meta_row(0, 0, STATUS_ALL_MASKED, 0, 0.0, 0.0),
        ]
        .concat();
        let mut out = SampledRows::new();
        let e = decode_rows(&meta, &[3], &[1], &[-0.5], 3, &mut out).unwrap_err();
        assert_eq!(e, SamplerError::NonFiniteLogit { index: 17, value: f32::INFINITY });
        assert_eq!(out.num_rows(), 1, "the row before the failure is kept");
        let mut out = SampledRows::new();
        let e = decode_rows(&meta[16..], &[], &[], &[], 1, &mut out).unwrap_err();
        assert_eq!(e, SamplerError::AllMasked);
        // NaN keeps its bits through the meta word.
        let nan = meta_row(0, 0, STATUS_NON_FINITE, 2, f32::NAN, 0.0);
        match decode_rows(&nan, &[], &[], &[], 1, &mut SampledRows::new()) {
            Err(SamplerError::NonFiniteLogit { index: 2, value }) => assert!(value.is_nan()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    #[should_panic(expected = "past its buffer")]
    fn entries_outside_the_buffer_are_a_bug_not_garbage() {
        let meta = meta_row(1, 2, STATUS_OK, 0, 0.0, 0.0);
        let _ = decode_rows(&meta, &[1, 2], &[1, 1], &[0.0, 0.0], 1, &mut SampledRows::new());
    }

    /// The kernel's `#define`s that this module mirrors.
    #[test]
    fn constants_match_the_kernel_source() {
        let src = include_str!("cuda/sampler.cu");
        let define = |name: &str| -> usize {
            let line = src
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("sampler.cu has no #define {name}"));
            let v = line.split_whitespace().nth(2).unwrap().trim_end_matches('u');
            v.parse().unwrap_or_else(|_| panic!("#define {name}: {v}"))
        };
        assert_eq!(define("LOGITD_THREADS"), THREADS as usize);
        assert_eq!(define("LOGITD_TILE"), TILE);
        assert_eq!(define("META_WORDS"), META_WORDS);
        assert_eq!(define("META_START"), META_START);
        assert_eq!(define("META_LEN"), META_LEN);
        assert_eq!(define("META_STATUS"), META_STATUS);
        assert_eq!(define("META_ERR_INDEX"), META_ERR_INDEX);
        assert_eq!(define("META_ERR_VALUE"), META_ERR_VALUE);
        assert_eq!(define("META_LSE"), META_LSE);
        assert_eq!(define("STATUS_OK"), STATUS_OK as usize);
        assert_eq!(define("STATUS_NON_FINITE"), STATUS_NON_FINITE as usize);
        assert_eq!(define("STATUS_ALL_MASKED"), STATUS_ALL_MASKED as usize);
        assert_eq!(define("METHOD_SAMPLE"), method_code(Method::Sample) as usize);
        assert_eq!(define("METHOD_TOP_K"), method_code(Method::TopK) as usize);
    }

    #[test]
    fn shared_memory_covers_tile_ends_thresholds_and_slots() {
        // V = 262,144: 1,024 tiles of 256 ids, 8 bytes each.
        assert_eq!(shared_bytes(Method::TopK, 262_144, 256), 8192);
        assert_eq!(shared_bytes(Method::Sample, 262_144, 256), 8192 + 257 * 8 + 256 * 12);
        // A partial last tile still has its end.
        assert_eq!(shared_bytes(Method::TopK, 32_001, 1), 126 * 8);
        // The largest default k at V = 262,144 fits the 227 KiB of an H100 block.
        assert!(shared_bytes(Method::Sample, 262_144, 4096) < 227 * 1024);
        assert_eq!(max_entries(128, 256), 32_768);
        assert_eq!(method_code(Method::Sample), 0);
        assert_eq!(method_code(Method::TopK), 1);
    }
}
