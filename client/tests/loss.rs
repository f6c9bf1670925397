//! The distillation loss checked against independent float64 math: values,
//! gradients (closed form and finite differences) and the convergence of the
//! Counts target to the full-distribution cross-entropy.

use candle_core::{DType, Device, Tensor, Var};
use logitd_client::{LossError, LossOptions, Normalization, Target, TeacherTargets, distill_loss};
use rand::{RngExt, SeedableRng, rngs::StdRng};

const ALL_OPTIONS: [LossOptions; 4] = [
    LossOptions { target: Target::Renormalized, normalization: Normalization::FullVocab },
    LossOptions { target: Target::Renormalized, normalization: Normalization::Sampled },
    LossOptions { target: Target::Counts, normalization: Normalization::FullVocab },
    LossOptions { target: Target::Counts, normalization: Normalization::Sampled },
];

fn log_softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    z.iter().map(|v| v - lse).collect()
}

fn random_logits(rng: &mut StdRng, rows: usize, vocab: usize, spread: f64) -> Vec<Vec<f64>> {
    (0..rows).map(|_| (0..vocab).map(|_| spread * (rng.random::<f64>() - 0.5)).collect()).collect()
}

/// Teacher targets drawn by an inverse-CDF multinomial sampler written here
/// (independent of the server's sampler), with exact f64 log-probabilities.
fn draw_targets(rng: &mut StdRng, teacher: &[Vec<f64>], k: u32) -> TeacherTargets {
    let mut t = TeacherTargets {
        num_samples: k,
        first_position: 0,
        offsets: vec![0],
        token_ids: vec![],
        counts: vec![],
        logprobs: vec![],
        lse: vec![],
        ..TeacherTargets::default()
    };
    for z in teacher {
        let lp = log_softmax(z);
        let mut counts = vec![0u32; z.len()];
        for _ in 0..k {
            let u: f64 = rng.random();
            let mut acc = 0.0;
            let id = lp
                .iter()
                .position(|l| {
                    acc += l.exp();
                    u < acc
                })
                .unwrap_or(z.len() - 1);
            counts[id] += 1;
        }
        for (id, &c) in counts.iter().enumerate().filter(|(_, c)| **c > 0) {
            t.token_ids.push(id as u32);
            t.counts.push(c);
            t.logprobs.push(lp[id] as f32);
        }
        t.offsets.push(t.token_ids.len() as u32);
        t.lse.push((z[0] - lp[0]) as f32);
    }
    t
}

/// −Σ w log q per position, weighted mean: plain f64 loops, no candle.
fn reference_loss(student: &[Vec<f64>], t: &TeacherTargets, o: LossOptions, mask: &[f64]) -> f64 {
    let mut total = 0.0;
    for (p, x) in student.iter().enumerate() {
        let r = t.offsets[p] as usize..t.offsets[p + 1] as usize;
        let ids: Vec<usize> = t.token_ids[r.clone()].iter().map(|&i| i as usize).collect();
        let w: Vec<f64> = match o.target {
            Target::Renormalized => {
                let p: Vec<f64> =
                    t.logprobs[r.clone()].iter().map(|&l| f64::from(l).exp()).collect();
                let s: f64 = p.iter().sum();
                p.iter().map(|v| v / s).collect()
            }
            Target::Counts => {
                let s: f64 = t.counts[r.clone()].iter().map(|&c| f64::from(c)).sum();
                t.counts[r.clone()].iter().map(|&c| f64::from(c) / s).collect()
            }
        };
        let logq: Vec<f64> = match o.normalization {
            Normalization::FullVocab => {
                let lq = log_softmax(x);
                ids.iter().map(|&i| lq[i]).collect()
            }
            Normalization::Sampled => log_softmax(&ids.iter().map(|&i| x[i]).collect::<Vec<_>>()),
        };
        total += mask[p] * -w.iter().zip(&logq).map(|(w, l)| w * l).sum::<f64>();
    }
    total / mask.iter().sum::<f64>()
}

fn tensor(rows: &[Vec<f64>], dtype: DType) -> Tensor {
    let flat: Vec<f64> = rows.concat();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
fn loss_value_equals_float64_reference_for_every_target_and_normalisation() {
    let mut rng = StdRng::seed_from_u64(11);
    let teacher = random_logits(&mut rng, 6, 50, 8.0);
    let student = random_logits(&mut rng, 6, 50, 6.0);
    let targets = draw_targets(&mut rng, &teacher, 32);
    let mask = [1.0, 0.0, 1.0, 0.5, 1.0, 2.0];
    for o in ALL_OPTIONS {
        let want = reference_loss(&student, &targets, o, &mask);
        let mask32: Vec<f32> = mask.iter().map(|&m| m as f32).collect();
        let got64 = distill_loss(&tensor(&student, DType::F64), &targets, o, Some(&mask32))
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((got64 - want).abs() < 1e-12, "{o:?}: f64 {got64} vs {want}");
        let got32 = distill_loss(&tensor(&student, DType::F32), &targets, o, Some(&mask32))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (f64::from(got32) - want).abs() < 1e-5 * want.abs().max(1.0),
            "{o:?}: f32 {got32} vs {want}"
        );
    }
}

#[test]
fn unmasked_loss_is_the_plain_mean_over_positions() {
    let mut rng = StdRng::seed_from_u64(12);
    let teacher = random_logits(&mut rng, 4, 30, 5.0);
    let student = random_logits(&mut rng, 4, 30, 5.0);
    let targets = draw_targets(&mut rng, &teacher, 16);
    let o = LossOptions::default();
    let want = reference_loss(&student, &targets, o, &[1.0; 4]);
    let got = distill_loss(&tensor(&student, DType::F64), &targets, o, None).unwrap();
    assert!((got.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
}

/// dL/dx for the weighted mean: (m_p / Σm) · (q − w), where q is the student
/// softmax over the vocabulary (FullVocab) or over S (Sampled, zero elsewhere).
fn closed_form_gradient(
    student: &[Vec<f64>],
    t: &TeacherTargets,
    o: LossOptions,
    mask: &[f64],
) -> Vec<Vec<f64>> {
    let norm: f64 = mask.iter().sum();
    student
        .iter()
        .enumerate()
        .map(|(p, x)| {
            let ids: Vec<usize> = t.token_ids[t.range(p)].iter().map(|&i| i as usize).collect();
            let w = t.weights(p, o.target);
            let mut g = vec![0.0; x.len()];
            match o.normalization {
                Normalization::FullVocab => {
                    for (v, l) in log_softmax(x).iter().enumerate() {
                        g[v] = l.exp();
                    }
                }
                Normalization::Sampled => {
                    let lq = log_softmax(&ids.iter().map(|&i| x[i]).collect::<Vec<_>>());
                    for (j, &i) in ids.iter().enumerate() {
                        g[i] = lq[j].exp();
                    }
                }
            }
            for (j, &i) in ids.iter().enumerate() {
                g[i] -= w[j];
            }
            g.iter().map(|v| v * mask[p] / norm).collect()
        })
        .collect()
}

#[test]
fn gradient_equals_closed_form_q_minus_w() {
    let mut rng = StdRng::seed_from_u64(13);
    let teacher = random_logits(&mut rng, 5, 40, 10.0);
    let student = random_logits(&mut rng, 5, 40, 4.0);
    let targets = draw_targets(&mut rng, &teacher, 64);
    let mask = [1.0, 1.0, 0.0, 3.0, 1.0];
    let mask32: Vec<f32> = mask.iter().map(|&m| m as f32).collect();
    for o in ALL_OPTIONS {
        let x = Var::from_tensor(&tensor(&student, DType::F64)).unwrap();
        let loss = distill_loss(x.as_tensor(), &targets, o, Some(&mask32)).unwrap();
        let grads = loss.backward().unwrap();
        let got = grads
            .get(x.as_tensor())
            .expect("gradient reaches the logits")
            .to_vec2::<f64>()
            .unwrap();
        let want = closed_form_gradient(&student, &targets, o, &mask);
        for (p, (g, w)) in got.iter().zip(&want).enumerate() {
            for (v, (g, w)) in g.iter().zip(w).enumerate() {
                assert!((g - w).abs() < 1e-12, "{o:?} [{p},{v}]: {g} vs {w}");
            }
        }
    }
}

#[test]
fn gradient_agrees_with_finite_differences() {
    let mut rng = StdRng::seed_from_u64(14);
    let teacher = random_logits(&mut rng, 3, 25, 6.0);
    let student = random_logits(&mut rng, 3, 25, 3.0);
    let targets = draw_targets(&mut rng, &teacher, 20);
    let mask = [1.0f32, 0.25, 1.0];
    let mask64: Vec<f64> = mask.iter().map(|&m| f64::from(m)).collect();
    for o in ALL_OPTIONS {
        let x = Var::from_tensor(&tensor(&student, DType::F64)).unwrap();
        let loss = distill_loss(x.as_tensor(), &targets, o, Some(&mask)).unwrap();
        let grad = loss.backward().unwrap().get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
        let h = 1e-6;
        for p in 0..3 {
            for v in 0..25 {
                let mut plus = student.clone();
                plus[p][v] += h;
                let mut minus = student.clone();
                minus[p][v] -= h;
                let fd = (reference_loss(&plus, &targets, o, &mask64)
                    - reference_loss(&minus, &targets, o, &mask64))
                    / (2.0 * h);
                assert!(
                    (fd - grad[p][v]).abs() < 1e-8,
                    "{o:?} [{p},{v}]: fd {fd} vs {}",
                    grad[p][v]
                );
            }
        }
    }
}

#[test]
fn counts_target_converges_to_full_distribution_cross_entropy() {
    let mut rng = StdRng::seed_from_u64(15);
    let vocab = 200;
    let teacher = random_logits(&mut rng, 1, vocab, 9.0);
    let student = random_logits(&mut rng, 1, vocab, 9.0);
    let p: Vec<f64> = log_softmax(&teacher[0]).iter().map(|l| l.exp()).collect();
    let lq = log_softmax(&student[0]);
    let ce: f64 = -p.iter().zip(&lq).map(|(p, l)| p * l).sum::<f64>();
    // Standard deviation of the k-draw estimate: sqrt(Var_p(-log q) / k).
    let second: f64 = p.iter().zip(&lq).map(|(p, l)| p * l * l).sum();
    let sd1 = (second - ce * ce).sqrt();
    let opts = LossOptions { target: Target::Counts, normalization: Normalization::FullVocab };
    let mut errors = vec![];
    for k in [64u32, 4096, 262_144] {
        let targets = draw_targets(&mut rng, &teacher, k);
        let got = distill_loss(&tensor(&student, DType::F64), &targets, opts, None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let sd = sd1 / f64::from(k).sqrt();
        assert!((got - ce).abs() < 5.0 * sd, "k={k}: {got} vs CE {ce} (sd {sd})");
        errors.push((got - ce).abs());
    }
    assert!(errors[2] < 0.01 * ce, "at k=262144 the estimate is within 1% of CE: {errors:?}");
}

/// The exact distribution of the Renormalized loss over the sampled set S of k
/// i.i.d. draws from p: (mean, variance), by enumerating every subset A of a
/// small vocabulary, P(S = A) = Σ_{B⊆A} (−1)^{|A|−|B|} p(B)^k (inclusion–exclusion),
/// and L(A) = Σ_{i∈A} p_i ℓ_i / p(A) with ℓ_i = −log q_i. Plain f64, no candle.
fn renormalized_loss_moments(p: &[f64], nll: &[f64], k: u32) -> (f64, f64) {
    let v = p.len();
    assert!(v <= 12, "enumeration over 2^{v} subsets");
    let mass = |set: usize| (0..v).filter(|i| set >> i & 1 == 1).map(|i| p[i]).sum::<f64>();
    let (mut total, mut mean, mut second) = (0.0, 0.0, 0.0);
    for a in 1usize..1 << v {
        let mut prob = 0.0;
        // Every non-empty subset b of a.
        let mut b = a;
        while b > 0 {
            let sign = if (a.count_ones() - b.count_ones()) % 2 == 0 { 1.0 } else { -1.0 };
            prob += sign * mass(b).powi(k as i32);
            b = (b - 1) & a;
        }
        let loss = (0..v).filter(|i| a >> i & 1 == 1).map(|i| p[i] * nll[i]).sum::<f64>() / mass(a);
        total += prob;
        mean += prob * loss;
        second += prob * loss * loss;
    }
    assert!((total - 1.0).abs() < 1e-12, "P(S = A) sums to {total}");
    (mean, second - mean * mean)
}

/// Renormalized is biased and Counts is not, measured against the sampling
/// error: over N independent draws of k ids, the mean Counts loss lies within
/// 4 standard errors of the full-distribution cross-entropy, the mean
/// Renormalized loss within 4 standard errors of its own exact expectation,
/// and that expectation hundreds of standard errors away from the cross-entropy.
/// Every expected value and variance is exact f64 math on the distribution.
#[test]
fn renormalized_target_is_biased_beyond_sampling_error_and_counts_is_not() {
    let mut rng = StdRng::seed_from_u64(19);
    // A teacher with a head and a thin tail; a student that is badly wrong on
    // the tail, which the Renormalized target under-weights when it is missed.
    let teacher = [3.0, 2.5, 1.0, 0.0, -0.5, -1.5];
    let student = [3.0, 2.0, 0.0, -3.0, -4.0, -5.0];
    let k = 8u32;
    let n = 20_000usize;
    let p: Vec<f64> = log_softmax(&teacher).iter().map(|l| l.exp()).collect();
    let nll: Vec<f64> = log_softmax(&student).iter().map(|l| -l).collect();
    let ce: f64 = p.iter().zip(&nll).map(|(p, l)| p * l).sum();
    let var_counts =
        (p.iter().zip(&nll).map(|(p, l)| p * l * l).sum::<f64>() - ce * ce) / f64::from(k);
    let (mean_renorm, var_renorm) = renormalized_loss_moments(&p, &nll, k);
    let (se_counts, se_renorm) = ((var_counts / n as f64).sqrt(), (var_renorm / n as f64).sqrt());

    let targets = draw_targets(&mut rng, &vec![teacher.to_vec(); n], k);
    let logits = tensor(&vec![student.to_vec(); n], DType::F64);
    let loss = |target| {
        let o = LossOptions { target, normalization: Normalization::FullVocab };
        distill_loss(&logits, &targets, o, None).unwrap().to_scalar::<f64>().unwrap()
    };
    let (got_counts, got_renorm) = (loss(Target::Counts), loss(Target::Renormalized));
    eprintln!(
        "CE {ce:.5}; Counts mean {got_counts:.5} (se {se_counts:.2e}); Renormalized mean \
         {got_renorm:.5}, exact expectation {mean_renorm:.5} (se {se_renorm:.2e}); \
         bias {:.1} standard errors",
        (mean_renorm - ce) / se_renorm
    );
    assert!(
        (got_counts - ce).abs() < 4.0 * se_counts,
        "Counts is unbiased: mean {got_counts} vs CE {ce} (se {se_counts})"
    );
    assert!(
        (got_renorm - mean_renorm).abs() < 4.0 * se_renorm,
        "Renormalized mean {got_renorm} vs its exact expectation {mean_renorm} (se {se_renorm})"
    );
    assert!(
        (mean_renorm - ce).abs() > 100.0 * se_renorm && (got_renorm - ce).abs() > 100.0 * se_renorm,
        "Renormalized is biased: {got_renorm} (expected {mean_renorm}) vs CE {ce} (se {se_renorm})"
    );
}

#[test]
fn mass_covered_is_the_teacher_probability_of_the_sampled_set() {
    let mut rng = StdRng::seed_from_u64(16);
    let teacher = random_logits(&mut rng, 3, 40, 6.0);
    let targets = draw_targets(&mut rng, &teacher, 8);
    let mass = targets.mass_covered();
    for (p, z) in teacher.iter().enumerate() {
        let lp = log_softmax(z);
        let want: f64 =
            targets.token_ids[targets.range(p)].iter().map(|&i| lp[i as usize].exp()).sum();
        assert!((f64::from(mass[p]) - want).abs() < 1e-6, "{} vs {want}", mass[p]);
        assert!(want > 0.0 && want <= 1.0);
    }
}

#[test]
fn all_zero_position_weights_give_zero_loss_and_zero_gradient() {
    let mut rng = StdRng::seed_from_u64(17);
    let teacher = random_logits(&mut rng, 2, 10, 3.0);
    let targets = draw_targets(&mut rng, &teacher, 4);
    let x = Var::from_tensor(&tensor(&random_logits(&mut rng, 2, 10, 3.0), DType::F32)).unwrap();
    let loss =
        distill_loss(x.as_tensor(), &targets, LossOptions::default(), Some(&[0.0, 0.0])).unwrap();
    assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
    let g = loss.backward().unwrap().get(x.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap();
    assert_eq!(g.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn bad_inputs_are_precise_errors() {
    let mut rng = StdRng::seed_from_u64(18);
    let teacher = random_logits(&mut rng, 2, 10, 3.0);
    let targets = draw_targets(&mut rng, &teacher, 4);
    let o = LossOptions::default();
    let wrong_rows = Tensor::zeros((3, 10), DType::F32, &Device::Cpu).unwrap();
    let e = distill_loss(&wrong_rows, &targets, o, None).unwrap_err();
    assert!(matches!(e, LossError::Shape { positions: 2, .. }), "{e}");
    let small_vocab = Tensor::zeros((2, 1), DType::F32, &Device::Cpu).unwrap();
    let e = distill_loss(&small_vocab, &targets, o, None).unwrap_err();
    assert!(matches!(e, LossError::IdOutOfRange { vocab: 1, .. }), "{e}");
    let ok = Tensor::zeros((2, 10), DType::F32, &Device::Cpu).unwrap();
    let e = distill_loss(&ok, &targets, o, Some(&[1.0])).unwrap_err();
    assert!(e.to_string().contains("1 weights for 2 positions"), "{e}");
    let e = distill_loss(&ok, &targets, o, Some(&[1.0, f32::NAN])).unwrap_err();
    assert!(e.to_string().contains("position 1"), "{e}");
    let mut broken = targets.clone();
    broken.offsets[1] = broken.offsets[0];
    let e = distill_loss(&ok, &broken, o, None).unwrap_err();
    assert!(e.to_string().contains("position 0 has no sampled ids"), "{e}");
}
