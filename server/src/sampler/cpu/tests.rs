//! The CPU sampler's tests: the vector builds against the portable one, the
//! walk against its plain description, threads against one thread.

use super::*;
use crate::kernels::exp_f32;

#[test]
#[cfg(target_arch = "x86_64")]
fn the_avx2_fma_build_gives_the_same_bits() {
    // Without AVX2 and FMA the "fastest" functions are the portable ones,
    // and this test would compare the portable build with itself: say so
    // loudly instead of passing quietly (LOGITD_REQUIRE_AVX2=1 fails).
    if !avx2_fma() {
        let msg = "the_avx2_fma_build_gives_the_same_bits: this CPU has no AVX2+FMA, \
                   so the AVX2 build was NOT compared with the portable one";
        assert!(std::env::var_os("LOGITD_REQUIRE_AVX2").is_none(), "{msg}");
        eprintln!("\n!!!!! SKIPPED: {msg} !!!!!\n");
        return;
    }
    let z: Vec<f32> =
        (0..5 * BLOCK * GROUP + 77).map(|i| ((i * 7919) % 30_011) as f32 * -0.0037).collect();
    let marks = z.len().div_ceil(BLOCK) * SPANS;
    let mut plain = (vec![0.0; z.len()], vec![0.0; marks], vec![]);
    let mut fast = plain.clone();
    for inv_t in [1.0, 1.0 / 0.7] {
        exps(&z, 0.0, inv_t, &mut plain.0);
        block_sums(&plain.0, &mut plain.1, &mut plain.2);
        // The AVX2 build itself (on an AVX-512 CPU "fastest" is the AVX-512 one).
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        unsafe { exps_and_sums_avx2(&z, 0.0, inv_t, &mut fast.0, &mut fast.1, &mut fast.2) };
        assert_eq!(plain, fast);
    }
    assert_eq!(max_and_bad(&z), max_and_bad_fastest(&z));
    // SAFETY: the CPU has AVX2 and FMA (checked above).
    let compared = sweep_vector_build(|z, m, t, e| unsafe { exps_avx2(z, m, t, e) });
    assert_eq!(compared, u64::from((-104.5f32).to_bits() - 0x8000_0000) + 1 + 6);
    // Zeros of both signs as the max, NaN, ±inf, at every lane and in the tail.
    let specials = [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3.5];
    for len in [1, 15, 16, 17, 40] {
        for at in 0..len {
            for &a in &specials {
                for &b in &specials[..2] {
                    let mut v = vec![-1.0f32; len];
                    v[at] = a;
                    v[(at * 7 + 3) % len] = b;
                    let (want, got) = (max_and_bad(&v), max_and_bad_fastest(&v));
                    assert_eq!((want.0.to_bits(), want.1), (got.0.to_bits(), got.1), "{v:?}");
                }
            }
        }
    }
}

/// Every f32 of [−104.5, 0] (and −0, −inf, large negatives) through `exps` of one
/// vector build, compared bit for bit with the scalar [`exp_f32`]; then a row at
/// T = 1 and T = 0.7 with its block sums. Returns how many inputs were compared.
#[cfg(target_arch = "x86_64")]
fn sweep_vector_build(build: fn(&[f32], f32, f64, &mut [f32])) -> u64 {
    let limit = (-104.5f32).to_bits();
    let mut xs: Vec<f32> = vec![0.0, -0.0, f32::NEG_INFINITY, -1000.0, f32::MIN, -104.0];
    let mut got = vec![0.0f32; 1 << 20];
    let mut compared = 0u64;
    let mut next = 0x8000_0000u32;
    loop {
        while xs.len() < got.len() && next <= limit {
            xs.push(f32::from_bits(next));
            next += 1;
        }
        build(&xs, 0.0, 1.0, &mut got[..xs.len()]);
        for (x, e) in xs.iter().zip(&got) {
            assert_eq!(e.to_bits(), exp_f32(*x).to_bits(), "exp({x:e})");
        }
        compared += xs.len() as u64;
        xs.clear();
        if next > limit {
            return compared;
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn the_avx512_build_gives_the_same_bits_on_every_float_of_the_range() {
    // As for AVX2: say loudly when the CPU cannot run the build under test
    // (LOGITD_REQUIRE_AVX512=1 fails instead).
    if !avx512() {
        let msg = "the_avx512_build_gives_the_same_bits_on_every_float_of_the_range: this \
                   CPU has no AVX-512F, so the AVX-512 build was NOT compared with the scalar one";
        assert!(std::env::var_os("LOGITD_REQUIRE_AVX512").is_none(), "{msg}");
        eprintln!("\n!!!!! SKIPPED: {msg} !!!!!\n");
        return;
    }
    // SAFETY (both closures): the CPU has AVX-512F, AVX2 and FMA (checked above).
    let compared = sweep_vector_build(|z, m, t, e| unsafe { exps_avx512(z, m, t, e) });
    // 0x8000_0000 ..= bits of −104.5: 1,121,320,961 floats, plus 6 specials.
    assert_eq!(compared, u64::from((-104.5f32).to_bits() - 0x8000_0000) + 1 + 6);
    let z: Vec<f32> =
        (0..5 * BLOCK * GROUP + 77).map(|i| ((i * 7919) % 30_011) as f32 * -0.0037).collect();
    let fresh = || (vec![0.0f32; z.len()], vec![0.0f64; z.len().div_ceil(BLOCK) * SPANS], vec![]);
    for inv_t in [1.0, 1.0 / 0.7, 1.0 / 1.3] {
        let (mut plain, mut v512, mut fastest) = (fresh(), fresh(), fresh());
        exps(&z, 0.0, inv_t, &mut plain.0);
        block_sums(&plain.0, &mut plain.1, &mut plain.2);
        unsafe { exps_and_sums_avx512(&z, 0.0, inv_t, &mut v512.0, &mut v512.1, &mut v512.2) };
        assert_eq!(plain, v512);
        let (e, m, b) = &mut fastest;
        exps_and_sums_fastest(&z, 0.0, inv_t, e, m, b);
        assert_eq!(plain, fastest);
    }
}

#[test]
fn block_sums_and_running_sums_are_sequential_per_block() {
    let z: Vec<f32> = (0..3 * BLOCK * GROUP + 300).map(|i| (i % 97) as f32 * -0.05).collect();
    let blocks = z.len().div_ceil(BLOCK);
    let (mut e, mut m, mut b) = (vec![0.0; z.len()], vec![0.0; blocks * SPANS], vec![]);
    exps(&z, 0.0, 1.0, &mut e);
    block_sums(&e, &mut m, &mut b);
    assert_eq!(b.len(), blocks);
    let mut spans_seen = 0;
    for (blk, chunk) in e.chunks(BLOCK).enumerate() {
        let mut acc = 0.0f64;
        for (i, &v) in chunk.iter().enumerate() {
            acc += f64::from(v);
            if i % SPAN == SPAN - 1 || i == chunk.len() - 1 {
                assert_eq!(m[blk * SPANS + i / SPAN], acc, "block {blk}, id {i}");
                spans_seen += 1;
            }
        }
        assert_eq!(b[blk], acc);
    }
    // 3 · GROUP full blocks of 16 spans, one of 256 ids, one of 44 (3 spans).
    assert_eq!(spans_seen, (3 * GROUP + 1) * SPANS + 3);
}

/// Steps 1–4 of the module's description written out plainly, one threshold
/// at a time over every block from the first, every id's running sum kept:
/// no group sums, no skipped work, no search. Returns (id, count, log p)
/// per distinct id, and the lse.
fn plain_sample(z: &[f32], t: f32, k: usize, key: RowKey) -> (Vec<(u32, u32, f32)>, f32) {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    let inv_t = 1.0 / f64::from(t);
    let arg = |v: f32| ((f64::from(v) - f64::from(m)) * inv_t) as f32;
    let e: Vec<f32> = z.iter().map(|&v| exp_f32(arg(v))).collect();
    let (mut l, mut b) = (vec![], vec![]);
    for chunk in e.chunks(BLOCK) {
        let mut acc = 0.0f64;
        for &v in chunk {
            acc += f64::from(v);
            l.push(acc);
        }
        b.push(acc);
    }
    let s = b.iter().fold(0.0f64, |a, &v| a + v);
    let (mut g, mut gs) = (0.0f64, vec![]);
    for j in 0..=k {
        let word = philox4x32_10(key.counter((j / 4) as u32), key.philox_key())[j % 4];
        g += -((f64::from(word) + 0.5) / 4_294_967_296.0).ln();
        gs.push(g);
    }
    let mut ids: Vec<usize> = vec![];
    for &gj in &gs[..k] {
        let tj = gj * (s / g);
        let mut a = 0.0f64;
        let mut found = None;
        for (blk, &bb) in b.iter().enumerate() {
            if tj - a >= bb {
                a += bb;
                continue;
            }
            let x = tj - a;
            let range = blk * BLOCK..(blk * BLOCK + BLOCK).min(z.len());
            found = Some(if x < 0.0 {
                range.clone().find(|&i| e[i] > 0.0).unwrap()
            } else {
                range.clone().find(|&i| l[i] > x && (i == range.start || l[i - 1] <= x)).unwrap()
            });
            break;
        }
        ids.push(found.unwrap_or_else(|| (0..z.len()).rev().find(|&i| e[i] > 0.0).unwrap()));
    }
    let mut rows: Vec<(u32, u32, f32)> = vec![];
    for id in ids {
        match rows.last_mut() {
            Some(r) if r.0 == id as u32 => r.1 += 1,
            _ => rows.push((
                id as u32,
                1,
                ((f64::from(z[id]) - f64::from(m)) * inv_t - s.ln()) as f32,
            )),
        }
    }
    (rows, (f64::from(m) * inv_t + s.ln()) as f32)
}

#[test]
fn the_walk_gives_the_rows_of_the_plain_description() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut rows: Vec<Vec<f32>> = vec![];
    for vocab in [1usize, 2, 255, 256, 257, 3000, BLOCK * GROUP * 2 + 77] {
        // Flat (thresholds in every block), noisy Zipf, one spike, and whole
        // masked blocks and single masked ids in a noisy row.
        rows.push(vec![0.25; vocab]);
        rows.push(
            (0..vocab).map(|i| -1.1 * ((i * 7919 % vocab + 1) as f32).ln() + next()).collect(),
        );
        let mut spike = vec![-3.0f32; vocab];
        spike[vocab * 2 / 3] = 9.0;
        rows.push(spike);
        let masked =
            (0..vocab)
                .map(|i| {
                    if (i / BLOCK) % 3 == 1 || i % 5 == 2 {
                        f32::NEG_INFINITY
                    } else {
                        next() * 8.0
                    }
                })
                .collect::<Vec<_>>();
        if masked.iter().any(|&v| v > f32::NEG_INFINITY) {
            rows.push(masked);
        }
    }
    let mut sampler = CpuSampler::new();
    let mut checked = 0;
    for (r, z) in rows.iter().enumerate() {
        for (t, k) in [(1.0f32, 256usize), (0.5, 7), (3.0, 1024), (1.0, 1)] {
            let key = RowKey { seed: 11, sequence: r as u32, position: k as u32 };
            let params = SamplingParams::new(Method::Sample, k as u32, t).unwrap();
            let mut out = SampledRows::new();
            sampler.sample_row(z, &params, key, &mut out).unwrap();
            let (want, lse) = plain_sample(z, t, k, key);
            let got: Vec<(u32, u32, f32)> = (0..out.token_ids.len())
                .map(|i| (out.token_ids[i], out.counts[i], out.logprobs[i]))
                .collect();
            assert_eq!(got, want, "row {r} (V = {}), T = {t}, k = {k}", z.len());
            assert_eq!(out.lse, vec![lse]);
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * rows.len());
}

#[test]
fn threads_give_the_same_rows_as_one_thread() {
    let vocab = 3000;
    let rows = 37;
    let z: Vec<f32> =
        (0..vocab * rows).map(|i| ((i * 7919 % 10_007) as f32 * 0.001).sin() * 6.0).collect();
    let keys: Vec<RowKey> =
        (0..rows as u32).map(|p| RowKey { seed: 3, sequence: 1, position: p }).collect();
    for params in [
        SamplingParams::new(Method::Sample, 256, 1.0).unwrap(),
        SamplingParams::new(Method::Sample, 64, 0.6).unwrap(),
        SamplingParams::new(Method::TopK, 20, 1.0).unwrap(),
        SamplingParams::new(Method::None, 1, 1.0).unwrap(),
    ] {
        // Every row scores its realised token and row r r % 4 candidates.
        let realised: Vec<u32> = (0..rows as u32).map(|p| p * 13 % vocab as u32).collect();
        let mut offsets = vec![0u32];
        for r in 0..rows as u32 {
            offsets.push(offsets[r as usize] + r % 4);
        }
        let ids: Vec<u32> = (0..offsets[rows]).map(|i| i * 101 % vocab as u32).collect();
        let q =
            RowQueries { realised: &realised, candidate_offsets: &offsets, candidate_ids: &ids };
        for queries in [RowQueries::NONE, q] {
            let mut one = SampledRows::new();
            CpuSampler::new()
                .sample_rows_on(1, &z, vocab, &params, &keys, queries, &mut one)
                .unwrap();
            for threads in [2, 3, 8] {
                // Appended after a row already there, as the engine does per chunk.
                let mut many = SampledRows::new();
                let mut s = CpuSampler::new();
                let first = queries.rows(0..1);
                s.sample_rows_on(1, &z[..vocab], vocab, &params, &keys[..1], first, &mut many)
                    .unwrap();
                s.sample_rows_on(threads, &z, vocab, &params, &keys, queries, &mut many).unwrap();
                assert_eq!(many.slice(1..rows + 1), one, "{threads} threads");
            }
        }
    }
}

#[test]
fn a_failing_row_keeps_the_rows_before_it_with_threads() {
    let vocab = 100;
    let mut z = vec![0.5f32; vocab * 10];
    z[6 * vocab + 3] = f32::NAN;
    let keys = vec![RowKey { seed: 1, sequence: 0, position: 0 }; 10];
    let params = SamplingParams::new(Method::Sample, 8, 1.0).unwrap();
    let mut out = SampledRows::new();
    let e =
        CpuSampler::new().sample_rows_on(4, &z, vocab, &params, &keys, RowQueries::NONE, &mut out);
    assert!(matches!(e, Err(SamplerError::NonFiniteLogit { index: 3, .. })));
    assert_eq!(out.num_rows(), 6);
}
