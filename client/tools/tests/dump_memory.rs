//! `logitd-client dump` memory is bounded whatever the corpus size: 1,000,000
//! short sequences (JSON lines and Parquet) against the in-process tiny server
//! with a peak RSS (VmHWM of the dump process, read from /proc while it runs)
//! under 100 MiB, and, in each format, no larger for 1,000,000 sequences than
//! for 100,000 (within 16 MiB).
//!
//! What memory the dump needs is set by `--depth`, `--batch-sequences` and
//! `--shard-entries` (the shard being filled: 12 bytes an entry, 48 MiB at the
//! default 4 Mi entries). The two sizes of each format are compared with shards
//! of 256 Ki entries, so that both runs fill whole shards (at the default,
//! 100,000 of these sequences fill less than one, and 1,000,000 not quite one:
//! their peaks differ by the shard being filled, not by the reader). One more
//! Parquet run of 1,000,000 rows uses the default shard size: one 48 MiB shard
//! on top of the rest, under the same cap. Measured 2026-12-07 (AMD EPYC, 2
//! cores; the test prints its figures with `--nocapture`): 17.1 and 19.9 MiB
//! (JSON lines, 100,000 and 1,000,000), 16.4 and 19.8 MiB (Parquet), 79.1 MiB
//! (Parquet, default shards). Takes about 2 minutes on 2 cores (the tiny
//! server answers ~30,000 of these sequences per second).
//!
//! `--format axolotl` (and distillkit, the same writer) streams its shard a
//! row group at a time, so its peak does not depend on the shard size: it is
//! compared at the default shard size, 100,000 against 1,000,000 sequences.
//! Measured 2026-12-07 (the same machine): 29.3 MiB and 32.0 MiB.

use crate::common;

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const LIMIT_MIB: f64 = 100.0;
/// Allowed growth of the peak from 100,000 to 1,000,000 sequences (noise).
const GROWTH_MIB: f64 = 16.0;

/// Short sequences (2 to 4 tokens) that return their last position only.
fn sequence(i: u64) -> (Vec<u32>, u32) {
    let len = 2 + (i % 3) as u32;
    ((0..len).map(|p| ((i * 31 + u64::from(p) * 17) % 96) as u32).collect(), len - 1)
}

fn write_jsonl(path: &Path, n: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..n {
        let (ids, first) = sequence(i);
        writeln!(f, "{{\"token_ids\":{ids:?},\"first_position\":{first}}}").unwrap();
    }
    f.flush().unwrap();
}

fn write_parquet(path: &Path, n: u64) {
    use parquet::{
        data_type::{Int32Type, Int64Type},
        file::{properties::WriterProperties, writer::SerializedFileWriter},
        schema::parser::parse_message_type,
    };
    use std::sync::Arc;
    let schema = "message m { optional group input_ids (LIST) { repeated group list { optional int32 element; } } optional int64 first_position; }";
    let schema = Arc::new(parse_message_type(schema).unwrap());
    let props = Arc::new(WriterProperties::builder().build());
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for start in (0..n).step_by(100_000) {
        let rows: Vec<(Vec<u32>, u32)> = (start..(start + 100_000).min(n)).map(sequence).collect();
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let (mut v, mut def, mut rep) = (vec![], vec![], vec![]);
        for (ids, _) in &rows {
            for (j, &x) in ids.iter().enumerate() {
                v.push(x as i32);
                def.push(3);
                rep.push(i16::from(j > 0));
            }
        }
        col.typed::<Int32Type>().write_batch(&v, Some(&def), Some(&rep)).unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let firsts: Vec<i64> = rows.iter().map(|(_, f)| i64::from(*f)).collect();
        col.typed::<Int64Type>().write_batch(&firsts, Some(&vec![1; rows.len()]), None).unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
}

/// VmHWM of a live process, in MiB.
fn vm_hwm_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Dumps `input`; returns (peak RSS seen from /proc, the dump's own VmHWM at
/// its end, wall seconds).
fn dump_peak(uri: &str, input: &Path, out: &Path, extra: &[&str], n: u64) -> (f64, f64, f64) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_logitd-client"))
        .args(["dump", "--server", uri, "--input", input.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap(), "--num-samples", "4", "--seed", "1"])
        .args(["--batch-sequences", "512", "--depth", "4"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = vm_hwm_mib(pid).expect("VmHWM of the dump process is readable in /proc");
    while child.try_wait().unwrap().is_none() {
        if let Some(m) = vm_hwm_mib(pid) {
            peak = peak.max(m);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains(&format!("wrote {n} sequences")), "{stdout}");
    let own: f64 = stdout
        .split("peak RSS ")
        .nth(1)
        .and_then(|s| s.split(" MiB").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {stdout}"));
    (peak, own, started.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_sequences_in_bounded_memory() {
    let (uri, mut server) = common::tiny_server().await;
    let _client = common::connect(&uri, &mut server).await;
    let dir = std::env::temp_dir().join(format!("logitd-dump-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut report = vec![];
    let mut peaks = vec![];
    let small_shards: &[&str] = &["--shard-entries", "262144"];
    let parquet_small: &[&str] =
        &["--first-position-column", "first_position", "--shard-entries", "262144"];
    let parquet: &[&str] = &["--first-position-column", "first_position"];
    let axolotl: &[&str] = &["--format", "axolotl"];
    for (run, (n, format, extra)) in [
        (100_000u64, "jsonl", small_shards),
        (1_000_000, "jsonl", small_shards),
        (100_000, "parquet", parquet_small),
        (1_000_000, "parquet", parquet_small),
        (1_000_000, "parquet", parquet),
        (100_000, "jsonl", axolotl),
        (1_000_000, "jsonl", axolotl),
    ]
    .into_iter()
    .enumerate()
    {
        let input = dir.join(format!("c{n}.{format}"));
        if !input.exists() {
            if format == "jsonl" {
                write_jsonl(&input, n);
            } else {
                write_parquet(&input, n);
            }
        }
        let out = dir.join(format!("out-{run}"));
        let (peak, own, secs) = dump_peak(&uri, &input, &out, extra, n);
        report.push(format!(
            "{n} sequences ({format}, {extra:?}): peak RSS {peak:.1} MiB from /proc (the dump's own VmHWM {own:.1} MiB), {secs:.1} s"
        ));
        peaks.push(peak.max(own));
        std::fs::remove_dir_all(&out).unwrap();
    }
    // Independent of the corpus size: ten times the sequences, not more memory
    // (allowing GROWTH_MIB of noise), in each format.
    let growth = [
        ("jsonl (256 Ki-entry shards)", peaks[1] - peaks[0]),
        ("parquet (256 Ki-entry shards)", peaks[3] - peaks[2]),
        ("jsonl to --format axolotl (default shards)", peaks[6] - peaks[5]),
    ];
    for (format, g) in growth {
        report.push(format!("{format}: 100,000 -> 1,000,000 sequences: peak {g:+.1} MiB"));
    }
    let report = report.join("\n");
    eprintln!("{report}");
    for (format, g) in growth {
        assert!(g < GROWTH_MIB, "{format}: memory grows with the corpus:\n{report}");
    }
    for p in &peaks {
        assert!(*p < LIMIT_MIB, "over {LIMIT_MIB} MiB:\n{report}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    server.abort();
}
