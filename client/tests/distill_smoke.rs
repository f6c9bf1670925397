//! The distill example in small (CI): the real teacher, a few steps of each
//! target; the training loss must fall for hard labels, Renormalized and Counts.

#[path = "../examples/distill.rs"]
#[allow(dead_code)]
mod distill;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distill_smoke_every_target_lowers_its_loss() {
    let out = std::env::temp_dir().join(format!("logitd-distill-smoke-{}", std::process::id()));
    let args = distill::Args {
        teacher: None,
        server: None,
        corpus: None,
        out: out.clone(),
        steps: 16,
        batch: 4,
        seq_len: 24,
        train_sequences: 8,
        heldout_sequences: 2,
        num_samples: 64,
        hidden: 32,
        layers: 1,
        lr: 1e-2,
        eval_every: 8,
        seed: 3,
    };
    let report = distill::run(&args).await.unwrap();
    assert_eq!(report.train_losses.len(), 3);
    for (name, losses) in &report.train_losses {
        let first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
        let last: f64 = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
        assert!(
            last < first - 0.5,
            "{name}: loss did not fall: {first:.3} → {last:.3} ({losses:?})"
        );
    }
    // Two evaluations per target, finite and below a uniform student's ln V.
    assert_eq!(report.points.len(), 6);
    for p in &report.points {
        assert!(p.heldout_ce.is_finite() && p.heldout_ce < (49_152f64).ln() + 1.0, "{p:?}");
        assert!(p.heldout_kl.is_finite() && p.heldout_kl > 0.0, "{p:?}");
    }
    assert!(report.teacher_ce > 0.0 && report.teacher_ce < 8.0, "teacher CE {}", report.teacher_ce);
    // The teacher pass is cached: a second run reads the shards.
    let again = distill::run(&distill::Args { steps: 1, eval_every: 1, ..args }).await.unwrap();
    assert_eq!(again.train_losses[0].1.len(), 1);
    std::fs::remove_dir_all(&out).unwrap();
}
