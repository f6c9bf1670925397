//! Replies that ask for none of the on-policy fields (realised-token and
//! candidate log-probabilities) are the bytes the release before them sent.
//!
//! The sampler and the reply encoding run on deterministic synthetic logits
//! (no model: the forward is not what changed, and its bits depend on the CPU's
//! matmul kernels, while the sampler's are the same on every x86-64 and
//! aarch64 build). `fixtures/replies/previous.json` holds what the previous
//! release (commit 25297a9) made of the same cases: the SHA-256 of every
//! encoded sample-mode reply, and the whole bytes of the top-k replies, which
//! now list ids by descending log-probability and leave the counts off.
//!
//! To record (only ever at a release that is to be the reference):
//! `LOGITD_RECORD_REPLIES=1 cargo test -p logitd --test replies`.

use logitd::{
    response::{Asked, sampled_sequence},
    sampler::{CpuSampler, Method, RowKey, SampledRows, SamplingParams},
};
use logitd_proto::v1::{SampleLogitsResponse, SamplingMethod, ValueEncoding};
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/replies/previous.json");

/// One recorded reply.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Recorded {
    case: String,
    sha256: String,
    len: usize,
    /// Hex of the whole reply (top-k cases only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hex: Option<String>,
}

/// splitmix64: the synthetic logits' generator.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform on [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// `rows` rows of `vocab` logits: a sum of uniforms (roughly normal) times
/// `scale`, a few large ones, and every `mask_every`-th id of every other row
/// masked with -inf.
fn logits(seed: u64, rows: usize, vocab: usize, scale: f32, mask_every: usize) -> Vec<f32> {
    let mut g = Mix(seed);
    let mut z = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        for i in 0..vocab {
            let mut v = (g.unit() + g.unit() + g.unit() - 1.5) * scale;
            if g.next().is_multiple_of(997) {
                v += 4.0 * scale;
            }
            if mask_every > 0 && r % 2 == 1 && i % mask_every == 3 {
                v = f32::NEG_INFINITY;
            }
            z.push(v);
        }
    }
    z
}

struct Case {
    name: &'static str,
    method: Method,
    k: u32,
    temperature: f32,
    encoding: ValueEncoding,
    vocab: usize,
    rows: usize,
    scale: f32,
    mask_every: usize,
    first_position: u32,
}

fn cases() -> Vec<Case> {
    use Method::{Sample, TopK};
    use ValueEncoding::{Bf16, F16, F32};
    let c = |name, method, k, temperature, encoding, vocab, rows, scale, mask_every, first| Case {
        name,
        method,
        k,
        temperature,
        encoding,
        vocab,
        rows,
        scale,
        mask_every,
        first_position: first,
    };
    vec![
        c("sample-k256-t1-f32", Sample, 256, 1.0, F32, 49_152, 12, 3.0, 0, 0),
        c("sample-k256-t0.7-f32-masked", Sample, 256, 0.7, F32, 49_152, 8, 3.0, 5, 4),
        c("sample-k64-t1.3-bf16", Sample, 64, 1.3, Bf16, 32_000, 8, 2.0, 0, 1),
        c("sample-k32-t1-f16-peaked", Sample, 32, 1.0, F16, 1_000, 16, 9.0, 7, 0),
        c("sample-k4096-t1-f32", Sample, 4096, 1.0, F32, 4_099, 4, 1.0, 0, 2),
        c("topk-k20-t1-f32", TopK, 20, 1.0, F32, 49_152, 8, 3.0, 0, 0),
        c("topk-k256-t0.5-bf16-masked", TopK, 256, 0.5, Bf16, 5_000, 6, 2.0, 3, 3),
        c("topk-k8-t1-f32-ties", TopK, 8, 1.0, F32, 300, 6, 0.0, 0, 0),
    ]
}

/// The reply one case encodes to.
fn reply(case: &Case, seed: u64) -> SampleLogitsResponse {
    let z = logits(seed, case.rows, case.vocab, case.scale, case.mask_every);
    let params = SamplingParams::new(case.method, case.k, case.temperature).unwrap();
    let keys: Vec<RowKey> = (0..case.rows as u32)
        .map(|p| RowKey { seed, sequence: 1, position: case.first_position + p })
        .collect();
    let mut rows = SampledRows::new();
    CpuSampler::new().sample_rows(&z, case.vocab, &params, &keys, &mut rows).unwrap();
    let asked = Asked { method: case.method, ..Asked::samples(case.first_position) };
    SampleLogitsResponse {
        sequences: vec![sampled_sequence(rows, asked, case.encoding)],
        seed,
        model_id: "replies@000000000000".into(),
        num_samples: case.k,
        temperature: case.temperature,
        method: match case.method {
            Method::TopK => SamplingMethod::TopK,
            _ => SamplingMethod::Sample,
        } as i32,
        value_encoding: case.encoding as i32,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn record() -> Vec<Recorded> {
    cases()
        .iter()
        .enumerate()
        .map(|(i, case)| {
            let bytes = reply(case, 1000 + i as u64).encode_to_vec();
            Recorded {
                case: case.name.into(),
                sha256: hex(&Sha256::digest(&bytes)),
                len: bytes.len(),
                hex: (case.method == Method::TopK).then(|| hex(&bytes)),
            }
        })
        .collect()
}

fn previous() -> Vec<Recorded> {
    let text = std::fs::read_to_string(FIXTURE).unwrap_or_else(|e| panic!("{FIXTURE}: {e}"));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn sample_mode_replies_are_the_previous_releases_bytes() {
    if std::env::var_os("LOGITD_RECORD_REPLIES").is_some() {
        let json = serde_json::to_string_pretty(&record()).unwrap();
        std::fs::create_dir_all(std::path::Path::new(FIXTURE).parent().unwrap()).unwrap();
        std::fs::write(FIXTURE, json + "\n").unwrap();
        panic!("recorded {FIXTURE}; unset LOGITD_RECORD_REPLIES to test against it");
    }
    let (now, before) = (record(), previous());
    assert_eq!(now.len(), before.len());
    let mut compared = 0;
    for (now, before) in now.iter().zip(&before) {
        assert_eq!(now.case, before.case);
        if before.hex.is_none() {
            assert_eq!(now, before, "case {}: the bytes changed", now.case);
            compared += 1;
        }
    }
    assert_eq!(compared, 5, "every sample-mode case compared");
}

#[test]
fn top_k_replies_differ_from_the_previous_release_only_in_order_and_counts() {
    let now = record();
    let mut compared = 0;
    for (now, before) in now.iter().zip(previous()) {
        let Some(old) = before.hex else { continue };
        let old = SampleLogitsResponse::decode(unhex(&old).as_slice()).unwrap();
        let new =
            SampleLogitsResponse::decode(unhex(now.hex.as_ref().unwrap()).as_slice()).unwrap();
        assert_ne!(old, new, "case {}: expected a change of order", now.case);
        let (o, n) = (&old.sequences[0], &new.sequences[0]);
        assert_eq!((o.first_position, &o.offsets, &o.lse), (n.first_position, &n.offsets, &n.lse));
        assert!(o.counts.iter().all(|&c| c == 1), "the old top-k counts were all 1");
        assert!(n.counts.is_empty(), "case {}: top-k replies leave the counts off", now.case);
        let values = |s: &logitd_proto::v1::SampledSequence, enc| {
            logitd_proto::decode_values(s, enc).unwrap()
        };
        let (ov, nv) = (values(o, old.value_encoding), values(n, new.value_encoding));
        for r in 0..o.offsets.len() - 1 {
            let e = o.offsets[r] as usize..o.offsets[r + 1] as usize;
            let mut old_row: Vec<(u32, u32)> =
                e.clone().map(|i| (o.token_ids[i], ov[i].to_bits())).collect();
            let new_row: Vec<(u32, f32)> = e.map(|i| (n.token_ids[i], nv[i])).collect();
            // Descending log-probability, ties by ascending id (the order is
            // that of the f32 values: f16 and bf16 may round two of them to
            // one value, which then keep the f32 order).
            let f32_values = new.value_encoding == ValueEncoding::F32 as i32;
            for w in new_row.windows(2) {
                assert!(
                    w[0].1 > w[1].1 || (w[0].1 == w[1].1 && (w[0].0 < w[1].0 || !f32_values)),
                    "case {}, row {r}: {:?} before {:?}",
                    now.case,
                    w[0],
                    w[1]
                );
            }
            // The same ids with the same values.
            let mut new_set: Vec<(u32, u32)> =
                new_row.iter().map(|&(id, v)| (id, v.to_bits())).collect();
            old_row.sort_unstable();
            new_set.sort_unstable();
            assert_eq!(old_row, new_set, "case {}, row {r}", now.case);
        }
        let strip = |mut r: SampleLogitsResponse| {
            r.sequences.clear();
            r
        };
        assert_eq!(strip(old), strip(new));
        compared += 1;
    }
    assert_eq!(compared, 3, "every top-k case compared");
}
