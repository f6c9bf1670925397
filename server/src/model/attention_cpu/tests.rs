//! The fused CPU attention against an f64 reference, with and without
//! contexts, and its blocks against whole sequences bit for bit.

use super::*;
use candle_core::{Device, Tensor};
use rand::{RngExt, SeedableRng, rngs::StdRng};

/// The attention in f64 from its definition, one query at a time: the keys
/// of a segment's token are its context's, then its own up to itself, the
/// key at list index j being at position j.
fn reference(q: &[f32], k: &[f32], v: &[f32], op: &PackedCausalAttention) -> Vec<f64> {
    let (nh, nkv, hd) = (op.heads, op.kv_heads, op.head_dim);
    let n = q.len() / (nh * hd);
    let mut out = vec![0f64; n * nh * hd];
    for seg in &op.segments {
        for i in seg.tokens.clone() {
            let keys: Vec<usize> = seg.context.clone().chain(seg.tokens.start..=i).collect();
            let pos = keys.len() - 1; // the query's position
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let visible: Vec<usize> = keys
                    .iter()
                    .enumerate()
                    .filter(|&(p, _)| op.window.is_none_or(|w| pos - p < w))
                    .map(|(_, &j)| j)
                    .collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        let dot: f64 = (0..hd)
                            .map(|d| {
                                f64::from(q[(i * nh + h) * hd + d])
                                    * f64::from(k[(j * nkv + kvh) * hd + d])
                            })
                            .sum();
                        let s = dot * f64::from(op.scale);
                        match op.softcap {
                            Some(c) => (s / c).tanh() * c,
                            None => s,
                        }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    out[(i * nh + h) * hd + d] = visible
                        .iter()
                        .zip(&e)
                        .map(|(&j, e)| e / sum * f64::from(v[(j * nkv + kvh) * hd + d]))
                        .sum();
                }
            }
        }
    }
    out
}

fn random(len: usize, rng: &mut StdRng, spread: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-spread..spread)).collect()
}

fn run_op(op: &PackedCausalAttention, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let n = q.len() / (op.heads * op.head_dim);
    let dev = Device::Cpu;
    let t = |x: &[f32], h: usize| Tensor::from_slice(x, (n, h, op.head_dim), &dev).unwrap();
    let (q, k, v) = (t(q, op.heads), t(k, op.kv_heads), t(v, op.kv_heads));
    let out = q.apply_op3_no_bwd(&k, &v, op).unwrap();
    assert_eq!(out.dims(), [n, op.heads * op.head_dim]);
    out.flatten_all().unwrap().to_vec1().unwrap()
}

/// Segments (1 token to a few blocks), grouped heads, every query block
/// size from one row up, with and without a window and a soft-cap, and
/// segments that continue a shared prefix packed elsewhere (a long one, a
/// one-token one, one whose window reaches into the prefix for some rows
/// only): within 2e-6 of the f64 attention (relative to the largest
/// |value|).
#[test]
fn matches_the_attention_computed_in_f64() {
    let mut rng = StdRng::seed_from_u64(7);
    // (length, index of the earlier segment whose tokens are the context)
    let shape: [(usize, Option<usize>); 9] = [
        (1, None),
        (37, None),
        (130, None),
        (64, None),
        (5, None),
        (70, Some(1)),
        (1, Some(1)),
        (3, Some(4)),
        (66, Some(2)),
    ];
    let mut segments: Vec<Segment> = vec![];
    let mut next = 0;
    for (l, ctx) in shape {
        let tokens = next..next + l;
        let context = ctx.map_or(next..next, |c| segments[c].tokens.clone());
        segments.push(Segment { tokens, context });
        next += l;
    }
    let n = next;
    for (heads, kv_heads, hd) in [(4, 2, 16), (3, 3, 8), (6, 1, 32)] {
        let q = random(n * heads * hd, &mut rng, 1.5);
        let k = random(n * kv_heads * hd, &mut rng, 1.5);
        let v = random(n * kv_heads * hd, &mut rng, 1.0);
        for window in [None, Some(1), Some(4), Some(50)] {
            for softcap in [None, Some(3.0)] {
                let mut op = PackedCausalAttention {
                    segments: segments.clone(),
                    heads,
                    kv_heads,
                    head_dim: hd,
                    window,
                    scale: 1.0 / (hd as f32).sqrt(),
                    softcap,
                    query_block: 1,
                };
                let want = reference(&q, &k, &v, &op);
                let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
                for block in [1, 3, 16, DEFAULT_QUERY_BLOCK, 1000] {
                    op.query_block = block;
                    let got = run_op(&op, &q, &k, &v);
                    for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                        let d = (f64::from(*g) - w).abs() / scale;
                        assert!(
                            d <= 2e-6,
                            "heads {heads}/{kv_heads} hd {hd} window {window:?} softcap \
                             {softcap:?} block {block}: element {idx}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

/// Continuations of a shared prefix get what the prefix followed by each
/// continuation gets packed whole, bit for bit, with a window that reaches
/// into the prefix and without, and a prefix that ends inside a query
/// block; a segment that saw a sibling's keys would not.
#[test]
fn a_continuation_equals_its_prefix_and_itself_packed_whole() {
    let mut rng = StdRng::seed_from_u64(11);
    let (heads, kv_heads, hd) = (2, 1, 8);
    let (p, a, b) = (21, 9, 7);
    // One token's q, k and v.
    type Token = (Vec<f32>, Vec<f32>, Vec<f32>);
    let mut token = || -> Token {
        (
            random(heads * hd, &mut rng, 1.5),
            random(kv_heads * hd, &mut rng, 1.5),
            random(kv_heads * hd, &mut rng, 1.0),
        )
    };
    let pre: Vec<_> = (0..p).map(|_| token()).collect();
    let ca: Vec<_> = (0..a).map(|_| token()).collect();
    let cb: Vec<_> = (0..b).map(|_| token()).collect();
    let flat = |parts: &[&[Token]]| {
        let (mut q, mut k, mut v) = (vec![], vec![], vec![]);
        for t in parts.iter().flat_map(|p| p.iter()) {
            q.extend_from_slice(&t.0);
            k.extend_from_slice(&t.1);
            v.extend_from_slice(&t.2);
        }
        (q, k, v)
    };
    let shared = flat(&[&pre, &ca, &cb]);
    let whole = flat(&[&pre, &ca, &pre, &cb]);
    for window in [None, Some(5), Some(12)] {
        let op = |segments| PackedCausalAttention {
            segments,
            heads,
            kv_heads,
            head_dim: hd,
            window,
            scale: 0.5,
            softcap: Some(4.0),
            query_block: 4,
        };
        let got = run_op(
            &op(vec![
                Segment::alone(0..p),
                Segment { tokens: p..p + a, context: 0..p },
                Segment { tokens: p + a..p + a + b, context: 0..p },
            ]),
            &shared.0,
            &shared.1,
            &shared.2,
        );
        let want = run_op(
            &op(vec![Segment::alone(0..p + a), Segment::alone(p + a..2 * p + a + b)]),
            &whole.0,
            &whole.1,
            &whole.2,
        );
        let w = heads * hd;
        // Shared rows: prefix, a, b; whole rows: prefix, a, (prefix), b.
        let want_rows: Vec<&[f32]> =
            want[..(p + a) * w].chunks(w).chain(want[(2 * p + a) * w..].chunks(w)).collect();
        for (r, (g, wr)) in got.chunks(w).zip(want_rows).enumerate() {
            assert_eq!(g, wr, "window {window:?} row {r}: shared vs packed whole");
        }
    }
}

/// Scores far apart (a row whose max is 80 above the rest) still give a
/// softmax of 1 on the max and 0 elsewhere, and nothing is NaN.
#[test]
fn a_dominant_key_takes_all_the_weight() {
    let (heads, hd) = (1, 4);
    let n = 3;
    // Query 2 sees keys 0, 1, 2; key 1 scores 80 · 4 = 320 higher.
    let q = vec![1f32; n * hd];
    let mut k = vec![0f32; n * hd];
    k[hd..2 * hd].fill(80.0);
    let v: Vec<f32> = (0..n * hd).map(|x| x as f32).collect();
    let op = PackedCausalAttention {
        segments: vec![Segment::alone(0..n)],
        heads,
        kv_heads: 1,
        head_dim: hd,
        window: None,
        scale: 1.0,
        softcap: None,
        query_block: 2,
    };
    let got = run_op(&op, &q, &k, &v);
    assert_eq!(&got[0..hd], &v[0..hd], "query 0 sees only key 0");
    assert_eq!(&got[2 * hd..3 * hd], &v[hd..2 * hd], "query 2 is all key 1");
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let dev = Device::Cpu;
    let op = PackedCausalAttention {
        segments: vec![Segment::alone(0..2), Segment::alone(2..4)],
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        window: None,
        scale: 1.0,
        softcap: None,
        query_block: 64,
    };
    let q = Tensor::zeros((4, 2, 4), candle_core::DType::F32, &dev).unwrap();
    let kv = Tensor::zeros((4, 1, 4), candle_core::DType::F32, &dev).unwrap();
    assert!(q.apply_op3_no_bwd(&kv, &kv, &op).is_ok());
    let short = Tensor::zeros((3, 1, 4), candle_core::DType::F32, &dev).unwrap();
    let e = q.apply_op3_no_bwd(&short, &kv, &op).unwrap_err().to_string();
    assert!(e.contains("not [4, 1, 4]"), "{e}");
    let mut gaps = op.clone();
    gaps.segments = vec![Segment::alone(0..2), Segment::alone(3..4)];
    let e = q.apply_op3_no_bwd(&kv, &kv, &gaps).unwrap_err().to_string();
    assert!(e.contains("does not follow"), "{e}");
    let f64q = q.to_dtype(candle_core::DType::F64).unwrap();
    let e = f64q.apply_op3_no_bwd(&kv, &kv, &op).unwrap_err().to_string();
    assert!(e.contains("not f32"), "{e}");
}
