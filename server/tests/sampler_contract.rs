//! The sampling contract (docs/concepts/sampling.md) checked against exact probabilities
//! computed here in float64: goodness of fit, determinism, batch invariance,
//! log-probabilities, temperature edge cases, masking and top-k.

use logitd::sampler::{
    CpuSampler, Method, NO_TOKEN, RowKey, RowQueries, SampledRows, SamplerError, SamplingParams,
};
use proptest::prelude::*;
use statrs::distribution::{ChiSquared, ContinuousCDF};

const V: usize = 262_144;
const K: u32 = 256;

/// softmax(z / T) in float64, written independently of the sampler.
fn exact_probs(z: &[f32], t: f64) -> Vec<f64> {
    let m = z.iter().map(|&v| f64::from(v)).fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|&v| ((f64::from(v) - m) / t).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|e| e / s).collect()
}

/// log softmax(z / T) in float64, in log space (no underflow to -inf).
fn exact_logprobs(z: &[f32], t: f64) -> Vec<f64> {
    let lse = exact_lse(z, t);
    z.iter().map(|&v| f64::from(v) / t - lse).collect()
}

fn exact_lse(z: &[f32], t: f64) -> f64 {
    let m = z.iter().map(|&v| f64::from(v)).fold(f64::NEG_INFINITY, f64::max);
    m / t + z.iter().map(|&v| ((f64::from(v) - m) / t).exp()).sum::<f64>().ln()
}

/// A fixed pseudo-random value in [0, 1) per index (splitmix64), so the test
/// distributions need no generator of their own.
fn hash01(i: u64) -> f64 {
    let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((x ^ (x >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

fn uniform() -> Vec<f32> {
    vec![0.0; V]
}

/// A few heavy ids scattered over the vocabulary on a noisy floor.
fn peaked() -> Vec<f32> {
    let mut z: Vec<f32> = (0..V).map(|i| hash01(i as u64) as f32 * 2.0 - 1.0).collect();
    z[7] = 12.0;
    z[200_003] = 11.0;
    z[1000..1010].fill(8.0);
    z[V - 1] = 9.0;
    z
}

/// Zipf(1.1) with ranks spread over the vocabulary by a fixed permutation.
fn zipf() -> Vec<f32> {
    (0..V).map(|i| (-1.1 * (((i * 7919) % V) as f64 + 1.0).ln()) as f32).collect()
}

/// Total counts per id over `rows` rows of the same logits (distinct positions).
fn draw_counts(z: &[f32], rows: u32, seed: u64, t: f32) -> Vec<u64> {
    let params = SamplingParams::new(Method::Sample, K, t).unwrap();
    let mut sampler = CpuSampler::new();
    let mut totals = vec![0u64; z.len()];
    for position in 0..rows {
        let mut out = SampledRows::new();
        let key = RowKey { seed, sequence: 3, position };
        sampler.sample_row(z, &params, key, &mut out).unwrap();
        let row = out.row(0);
        assert_eq!(row.counts.iter().sum::<u32>(), K);
        for (&id, &c) in row.token_ids.iter().zip(row.counts) {
            totals[id as usize] += u64::from(c);
        }
    }
    totals
}

/// Pearson chi-square p-value of `counts` against `probs`. Consecutive ids are
/// merged into bins of about 1/1000 of the mass (heavy ids stand alone), so
/// every bin expects well over 5 draws.
fn chi_square_p_value(counts: &[u64], probs: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    let n = n as f64;
    let mut bins: Vec<(f64, f64)> = vec![];
    let (mut e, mut o) = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(probs) {
        assert!(p > 0.0 || c == 0, "an id of probability 0 was drawn");
        e += n * p;
        o += c as f64;
        if e >= n / 1000.0 {
            bins.push((e, o));
            (e, o) = (0.0, 0.0);
        }
    }
    if let Some(last) = bins.last_mut() {
        last.0 += e;
        last.1 += o;
    }
    let chi2: f64 = bins.iter().map(|(e, o)| (o - e) * (o - e) / e).sum();
    let df = (bins.len() - 1) as f64;
    1.0 - ChiSquared::new(df).unwrap().cdf(chi2)
}

fn goodness_of_fit(name: &str, z: &[f32], wrong: &[f32], wrong_t: f32) {
    let probs = exact_probs(z, 1.0);
    let p = chi_square_p_value(&draw_counts(z, 1000, 0xC0FFEE, 1.0), &probs);
    assert!(p > 0.001, "{name}: the sampler fails goodness of fit, p = {p}");
    // The same test must reject a sampler that draws from a slightly wrong
    // distribution (a skewed CDF or a misapplied temperature).
    let p_wrong = chi_square_p_value(&draw_counts(wrong, 1000, 0xC0FFEE, wrong_t), &probs);
    assert!(p_wrong < 0.001, "{name}: the test cannot tell a wrong sampler, p = {p_wrong}");
    eprintln!("{name}: chi-square p = {p:.4} (sampler), {p_wrong:.2e} (wrong sampler)");
}

#[test]
fn sample_counts_fit_exact_probabilities_uniform() {
    let z = uniform();
    // Wrong: a CDF skewed by up to 20% across the vocabulary.
    let skewed: Vec<f32> = (0..V).map(|i| 0.2 * i as f32 / V as f32).collect();
    goodness_of_fit("uniform", &z, &skewed, 1.0);
}

#[test]
fn sample_counts_fit_exact_probabilities_peaked() {
    let z = peaked();
    goodness_of_fit("peaked", &z, &z, 1.1);
}

#[test]
fn sample_counts_fit_exact_probabilities_zipf() {
    let z = zipf();
    goodness_of_fit("zipf", &z, &z, 1.1);
}

#[test]
fn sample_counts_fit_at_temperature() {
    let z = peaked();
    let probs = exact_probs(&z, 2.5);
    let p = chi_square_p_value(&draw_counts(&z, 400, 99, 2.5), &probs);
    assert!(p > 0.001, "T = 2.5: p = {p}");
}

fn sample(z: &[f32], params: &SamplingParams, key: RowKey) -> SampledRows {
    let mut out = SampledRows::new();
    CpuSampler::new().sample_row(z, params, key, &mut out).unwrap();
    out
}

#[test]
fn same_key_gives_the_same_samples_and_another_seed_does_not() {
    let z = zipf();
    let params = SamplingParams::new(Method::Sample, K, 1.0).unwrap();
    let key = RowKey { seed: 5, sequence: 0, position: 9 };
    let a = sample(&z, &params, key);
    assert_eq!(a, sample(&z, &params, key));
    assert_ne!(a, sample(&z, &params, RowKey { seed: 6, ..key }));
    assert_ne!(a, sample(&z, &params, RowKey { position: 10, ..key }));
    assert_ne!(a, sample(&z, &params, RowKey { sequence: 1, ..key }));
}

#[test]
fn a_sequences_samples_do_not_change_when_other_sequences_join_the_batch() {
    let vocab = 5000;
    let seq_a: Vec<f32> = (0..4 * vocab).map(|i| (hash01(i as u64) * 8.0) as f32).collect();
    let seq_b: Vec<f32> = (0..3 * vocab).map(|i| (hash01(i as u64 + 77) * 8.0) as f32).collect();
    let params = SamplingParams::new(Method::Sample, K, 1.0).unwrap();
    let keys = |index: u32, own: Option<u64>, n: u32| -> Vec<RowKey> {
        (0..n).map(|p| RowKey::for_sequence(1234, index, own, p)).collect()
    };
    let run = |logits: &[f32], keys: &[RowKey]| {
        let mut out = SampledRows::new();
        CpuSampler::new().sample_rows(logits, vocab, &params, keys, &mut out).unwrap();
        out
    };
    let alone = run(&seq_a, &keys(0, None, 4));
    // B appended after A: A keeps its index and its samples.
    let both = run(
        &[seq_a.clone(), seq_b.clone()].concat(),
        &[keys(0, None, 4), keys(1, None, 3)].concat(),
    );
    for r in 0..4 {
        assert_eq!(both.row(r), alone.row(r));
    }
    // With its own seed, A's samples do not depend on its index either.
    let own_alone = run(&seq_a, &keys(0, Some(99), 4));
    let own_second =
        run(&[seq_b, seq_a].concat(), &[keys(0, None, 3), keys(1, Some(99), 4)].concat());
    for r in 0..4 {
        assert_eq!(own_second.row(3 + r), own_alone.row(r));
    }
}

#[test]
fn rows_hold_distinct_ascending_ids_and_exact_logprobs_and_lse() {
    for (z, t) in [(zipf(), 1.0f32), (peaked(), 0.7), (peaked(), 3.0)] {
        let params = SamplingParams::new(Method::Sample, K, t).unwrap();
        let out = sample(&z, &params, RowKey { seed: 1, sequence: 0, position: 0 });
        let row = out.row(0);
        assert!(row.token_ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(row.counts.iter().sum::<u32>(), K);
        let logprobs = exact_logprobs(&z, f64::from(t));
        for (&id, &lp) in row.token_ids.iter().zip(row.logprobs) {
            let want = logprobs[id as usize];
            assert!(
                (f64::from(lp) - want).abs() < 2e-5 * want.abs().max(1.0),
                "id {id}: {lp} vs {want}"
            );
        }
        let want = exact_lse(&z, f64::from(t));
        assert!(
            (f64::from(row.lse) - want).abs() < 1e-5 * want.abs().max(1.0),
            "{} vs {want}",
            row.lse
        );
    }
}

#[test]
fn masked_ids_are_never_drawn() {
    // Only every third id is allowed; the rest are -inf.
    let z: Vec<f32> = (0..V)
        .map(|i| if i % 3 == 0 { hash01(i as u64) as f32 } else { f32::NEG_INFINITY })
        .collect();
    let counts = draw_counts(&z, 200, 3, 1.0);
    assert!(counts.iter().enumerate().all(|(i, &c)| i % 3 == 0 || c == 0));
    let p = chi_square_p_value(&counts, &exact_probs(&z, 1.0));
    assert!(p > 0.001, "p = {p}");
}

#[test]
fn non_finite_and_fully_masked_rows_are_errors() {
    let params = SamplingParams::new(Method::Sample, K, 1.0).unwrap();
    let key = RowKey { seed: 0, sequence: 0, position: 0 };
    let mut s = CpuSampler::new();
    let mut out = SampledRows::new();
    let mut z = vec![0.0f32; 100];
    z[42] = f32::NAN;
    assert!(matches!(
        s.sample_row(&z, &params, key, &mut out),
        Err(SamplerError::NonFiniteLogit { index: 42, .. })
    ));
    z[42] = f32::INFINITY;
    let e = s.sample_row(&z, &params, key, &mut out).unwrap_err();
    assert_eq!(e, SamplerError::NonFiniteLogit { index: 42, value: f32::INFINITY });
    assert!(e.to_string().contains("logit 42"));
    let masked = vec![f32::NEG_INFINITY; 100];
    assert_eq!(s.sample_row(&masked, &params, key, &mut out), Err(SamplerError::AllMasked));
    assert_eq!(s.sample_row(&[], &params, key, &mut out), Err(SamplerError::EmptyRow));
    assert_eq!(out.num_rows(), 0, "failed rows leave nothing behind");
    let e = s.sample_rows(&[0.0; 10], 3, &params, &[key; 3], &mut out).unwrap_err();
    assert!(matches!(e, SamplerError::ShapeMismatch { len: 10, rows: 3, vocab: 3 }));
}

#[test]
fn invalid_parameters_are_rejected() {
    assert_eq!(
        SamplingParams::new(Method::Sample, 0, 1.0),
        Err(SamplerError::InvalidNumSamples(0))
    );
    for t in [0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert!(matches!(
            SamplingParams::new(Method::Sample, 1, t),
            Err(SamplerError::InvalidTemperature(_))
        ));
    }
}

#[test]
fn temperature_near_zero_draws_only_the_argmax() {
    let z = peaked();
    let params = SamplingParams::new(Method::Sample, K, 1e-7).unwrap();
    let out = sample(&z, &params, RowKey { seed: 8, sequence: 0, position: 1 });
    let row = out.row(0);
    assert_eq!(row.token_ids, &[7]);
    assert_eq!(row.counts, &[K]);
    assert_eq!(row.logprobs, &[0.0]);
    // lse = 12 / T ≈ 1.2e8, returned as f32 (ulp 8 there).
    let want = 12.0 / f64::from(1e-7f32);
    assert!((f64::from(row.lse) - want).abs() <= want * f64::from(f32::EPSILON), "{}", row.lse);
    // Smallest positive temperature: still finite, still the argmax.
    let tiny = SamplingParams::new(Method::Sample, K, f32::from_bits(1)).unwrap();
    assert_eq!(
        sample(&z, &tiny, RowKey { seed: 8, sequence: 0, position: 1 }).row(0).token_ids,
        &[7]
    );
}

#[test]
fn tied_maxima_share_the_draws_at_low_temperature() {
    let mut z = vec![0.0f32; 1000];
    z[10] = 5.0;
    z[900] = 5.0;
    let params = SamplingParams::new(Method::Sample, 4096, 1e-6).unwrap();
    let out = sample(&z, &params, RowKey { seed: 2, sequence: 0, position: 0 });
    let row = out.row(0);
    assert_eq!(row.token_ids, &[10, 900]);
    // Binomial(4096, 1/2): sd 32; 5 sd bound.
    assert!((i64::from(row.counts[0]) - 2048).abs() < 160, "{:?}", row.counts);
    for lp in row.logprobs {
        assert!((f64::from(*lp) - 0.5f64.ln()).abs() < 1e-6);
    }
}

#[test]
fn huge_temperature_is_nearly_uniform() {
    let z = peaked();
    let params = SamplingParams::new(Method::Sample, K, 1e30).unwrap();
    let out = sample(&z, &params, RowKey { seed: 4, sequence: 0, position: 0 });
    let row = out.row(0);
    assert!(
        row.token_ids.len() > 250,
        "256 draws over 262144 near-equal ids are almost all distinct"
    );
    for lp in row.logprobs {
        assert!((f64::from(*lp) + (V as f64).ln()).abs() < 1e-5);
    }
}

#[test]
fn top_k_takes_the_largest_logits_ties_to_the_lower_id() {
    let mut z: Vec<f32> = (0..V).map(|i| hash01(i as u64 * 3) as f32).collect();
    z[100] = 2.0;
    z[50] = 2.0; // tie with 100: both in
    z[60] = f32::NEG_INFINITY;
    let params = SamplingParams::new(Method::TopK, K, 1.3).unwrap();
    let out = sample(&z, &params, RowKey { seed: 0, sequence: 0, position: 0 });
    let row = out.row(0);
    // Reference: a full sort by (logit desc, id asc).
    let mut order: Vec<usize> = (0..V).collect();
    order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
    // The k largest logits, listed most likely first: by descending f32
    // log-probability, ties by id. That is the logits' order except where two
    // logits round to one log-probability (ids 50 and 100 tie at 2.0, so 50
    // comes first).
    let want: Vec<u32> = order[..K as usize].iter().map(|&i| i as u32).collect();
    let mut got_set = row.token_ids.to_vec();
    let mut want_set = want.clone();
    got_set.sort_unstable();
    want_set.sort_unstable();
    assert_eq!(got_set, want_set);
    assert_eq!(&row.token_ids[..2], &[50, 100]);
    for (w, l) in row.token_ids.windows(2).zip(row.logprobs.windows(2)) {
        assert!(l[0] > l[1] || (l[0] == l[1] && w[0] < w[1]), "{w:?} {l:?}");
        assert!(z[w[0] as usize] >= z[w[1] as usize] || l[0] == l[1], "{w:?} {l:?}");
    }
    let swaps = row.token_ids.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert!(swaps < K as usize / 4, "{swaps} places differ from the logits' order");
    assert!(row.counts.iter().all(|&c| c == 1));
    let logprobs = exact_logprobs(&z, 1.3);
    for (&id, &lp) in row.token_ids.iter().zip(row.logprobs) {
        assert!((f64::from(lp) - logprobs[id as usize]).abs() < 2e-5);
    }
    // Fewer finite logits than k: only those, never a -inf id.
    let z = [1.0, f32::NEG_INFINITY, 3.0, 2.0];
    let out = sample(&z, &params, RowKey { seed: 0, sequence: 0, position: 0 });
    assert_eq!(out.row(0).token_ids, &[2, 3, 0]);
    // Ties at the cut go to the lower id.
    let z = [1.0, 5.0, 1.0, 1.0];
    let two = SamplingParams::new(Method::TopK, 2, 1.0).unwrap();
    assert_eq!(
        sample(&z, &two, RowKey { seed: 0, sequence: 0, position: 0 }).row(0).token_ids,
        &[1, 0]
    );
}

/// Rows sampled with `queries`, in one call of `rows` rows of `z`.
fn scored(
    z: &[f32],
    vocab: usize,
    params: &SamplingParams,
    keys: &[RowKey],
    queries: RowQueries<'_>,
) -> SampledRows {
    let mut out = SampledRows::new();
    CpuSampler::new().sample_rows_scored(z, vocab, params, keys, queries, &mut out).unwrap();
    out
}

/// Rank of `id` written independently: 1 + the ids with a strictly larger logit.
fn exact_rank(z: &[f32], id: usize) -> u32 {
    1 + z.iter().filter(|&&v| v > z[id]).count() as u32
}

#[test]
fn realised_tokens_and_candidates_get_exact_logprobs_and_ranks() {
    let (rows, t) = (6usize, 0.8f32);
    let mut z = Vec::with_capacity(rows * V);
    for r in 0..rows {
        z.extend((0..V).map(|i| (hash01((r * V + i) as u64) * 12.0 - 6.0) as f32));
    }
    z[2 * V + 9] = f32::NEG_INFINITY; // a masked candidate: log p = -inf
    let realised = [5u32, (V - 1) as u32, 9, NO_TOKEN, 0, 123_456];
    let offsets = [0u32, 3, 3, 5, 6, 6, 10];
    let ids = [1u32, 5, 1, (V - 1) as u32, 9, 7, 0, 0, 262_000, 77];
    let queries =
        RowQueries { realised: &realised, candidate_offsets: &offsets, candidate_ids: &ids };
    let keys: Vec<RowKey> =
        (0..rows as u32).map(|p| RowKey { seed: 4, sequence: 1, position: p }).collect();
    for method in [Method::Sample, Method::TopK, Method::None] {
        let params = SamplingParams::new(method, 64, t).unwrap();
        let out = scored(&z, V, &params, &keys, queries);
        assert_eq!(out.token_logprobs.len(), rows);
        assert_eq!(out.candidate_offsets, offsets);
        for r in 0..rows {
            let row = &z[r * V..(r + 1) * V];
            let lp = exact_logprobs(row, f64::from(t));
            if realised[r] == NO_TOKEN {
                assert!(out.token_logprobs[r].is_nan());
                assert_eq!(out.token_ranks[r], 0);
            } else {
                let x = realised[r] as usize;
                let got = f64::from(out.token_logprobs[r]);
                assert!(
                    got == lp[x] || (got - lp[x]).abs() < 2e-6 * lp[x].abs().max(1.0),
                    "row {r}: {got} vs {}",
                    lp[x]
                );
                assert_eq!(out.token_ranks[r], exact_rank(row, x), "row {r}");
            }
            for c in offsets[r] as usize..offsets[r + 1] as usize {
                let want = lp[ids[c] as usize];
                let got = f64::from(out.candidate_logprobs[c]);
                if want == f64::NEG_INFINITY {
                    assert_eq!(got, want);
                } else {
                    assert!(
                        (got - want).abs() < 2e-6 * want.abs().max(1.0),
                        "row {r}: {got} vs {want}"
                    );
                }
            }
            // The realised token's log p is the one its sampled entry carries.
            let entry = out.row(r);
            if let Some(i) = entry.token_ids.iter().position(|&id| id == realised[r]) {
                assert_eq!(entry.logprobs[i].to_bits(), out.token_logprobs[r].to_bits());
            }
        }
        if method == Method::None {
            assert_eq!(out.num_entries(), 0, "scoring alone draws nothing");
            assert_eq!(out.offsets, vec![0; rows + 1]);
        }
        // The draws and lse are those of the same call without queries.
        let plain = scored(&z, V, &params, &keys, RowQueries::NONE);
        assert_eq!(
            (&plain.offsets, &plain.token_ids, &plain.counts),
            (&out.offsets, &out.token_ids, &out.counts)
        );
        assert_eq!(
            plain.logprobs.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            out.logprobs.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(plain.lse, out.lse);
        assert!(plain.token_logprobs.is_empty());
        assert_eq!(plain.candidate_offsets, vec![0; rows + 1]);
    }
}

#[test]
fn ranks_count_ties_as_not_larger() {
    let z = [3.0f32, 1.0, 3.0, 2.0, f32::NEG_INFINITY];
    let params = SamplingParams::new(Method::None, 1, 1.0).unwrap();
    let keys = [RowKey { seed: 0, sequence: 0, position: 0 }; 5];
    let zs: Vec<f32> = z.iter().copied().cycle().take(25).collect();
    let realised = [0u32, 1, 2, 3, 4];
    let q = RowQueries { realised: &realised, ..RowQueries::NONE };
    let out = scored(&zs, 5, &params, &keys, q);
    assert_eq!(out.token_ranks, [1, 4, 1, 3, 5]);
    assert_eq!(out.token_logprobs[4], f32::NEG_INFINITY);
}

#[test]
fn queries_that_do_not_fit_are_errors_not_panics() {
    let z = vec![0.0f32; 30];
    let params = SamplingParams::new(Method::Sample, 4, 1.0).unwrap();
    let keys = [RowKey { seed: 0, sequence: 0, position: 0 }; 3];
    let mut s = CpuSampler::new();
    let mut out = SampledRows::new();
    let run = |s: &mut CpuSampler, out: &mut SampledRows, q: RowQueries<'_>| {
        s.sample_rows_scored(&z, 10, &params, &keys, q, out)
    };
    let realised = [1u32, 10, 2];
    let e = run(&mut s, &mut out, RowQueries { realised: &realised, ..RowQueries::NONE });
    assert_eq!(e, Err(SamplerError::IdOutsideVocabulary { id: 10, vocab: 10 }));
    let short = [1u32, 2];
    let e = run(&mut s, &mut out, RowQueries { realised: &short, ..RowQueries::NONE });
    assert_eq!(e, Err(SamplerError::QueryShape { rows: 3 }));
    let offsets = [0u32, 1, 0, 1];
    let q = RowQueries { candidate_offsets: &offsets, candidate_ids: &[1], ..RowQueries::NONE };
    assert_eq!(run(&mut s, &mut out, q), Err(SamplerError::QueryShape { rows: 3 }));
    let offsets = [0u32, 1, 1, 2];
    let q = RowQueries { candidate_offsets: &offsets, candidate_ids: &[1, 11], ..RowQueries::NONE };
    assert_eq!(
        run(&mut s, &mut out, q),
        Err(SamplerError::IdOutsideVocabulary { id: 11, vocab: 10 })
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_row_yields_a_valid_sample(
        logits in prop::collection::vec(prop_oneof![9 => -30.0f32..30.0, 1 => Just(f32::NEG_INFINITY)], 1..700),
        k in 1u32..600,
        t in 0.05f32..20.0,
        seed: u64,
        top_k: bool,
    ) {
        prop_assume!(logits.iter().any(|v| v.is_finite()));
        let method = if top_k { Method::TopK } else { Method::Sample };
        let params = SamplingParams::new(method, k, t).unwrap();
        let out = sample(&logits, &params, RowKey { seed, sequence: 0, position: 0 });
        let row = out.row(0);
        if top_k {
            // Most likely first, ties by id.
            prop_assert!(row.logprobs.windows(2).zip(row.token_ids.windows(2))
                .all(|(l, i)| l[0] > l[1] || (l[0] == l[1] && i[0] < i[1])));
        } else {
            prop_assert!(row.token_ids.windows(2).all(|w| w[0] < w[1]));
        }
        prop_assert!(row.token_ids.iter().all(|&i| logits[i as usize].is_finite()));
        let finite = logits.iter().filter(|v| v.is_finite()).count() as u32;
        let total: u32 = row.counts.iter().sum();
        prop_assert_eq!(total, if top_k { k.min(finite) } else { k });
        let logprobs = exact_logprobs(&logits, f64::from(t));
        for (&id, &lp) in row.token_ids.iter().zip(row.logprobs) {
            let want = logprobs[id as usize];
            prop_assert!((f64::from(lp) - want).abs() < 1e-4 * want.abs().max(1.0));
        }
    }
}
