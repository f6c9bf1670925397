//! `logitd-client dump` over whole corpora against a real (in-process) tiny
//! server: samples keyed by sequence index (batching and workers do not change
//! them), JSON lines and Parquet alike, resume after SIGKILL bit for bit, a
//! damaged last shard redone, other arguments refused, bad input named; the
//! Axolotl and DistillKit layouts (`--format`) read back as the live targets,
//! resumed bit for bit, their preconditions refused by name.
//!
//! The reference targets are the server's own answer to the whole corpus as one
//! batch with per-sequence seeds `sequence_seed(seed, n)` (what the dump's
//! documentation promises), fetched live by the library client.

use crate::common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use logitd_client::{
    SampleOptions, SamplingMethod, TeacherClient, TeacherTargets, ValueEncoding, shard::ShardReader,
};

pub mod pq {
    //! Parquet files written with the parquet crate's low-level writer, laid
    //! out as pyarrow (and so Hugging Face `datasets`) lays out a list column:
    //! `optional group (LIST) { repeated group list { optional element } }`.
    use std::{path::Path, sync::Arc};

    use parquet::{
        basic::Compression,
        data_type::{Int32Type, Int64Type},
        file::{properties::WriterProperties, writer::SerializedFileWriter},
        schema::parser::parse_message_type,
    };

    /// One row: the ids (None: a null list; a None id: a null element) and
    /// the first position column (None: no such column).
    pub struct Row {
        pub ids: Option<Vec<Option<i32>>>,
        pub first_position: Option<i64>,
        pub loss_mask: Option<Vec<i32>>,
    }

    fn list_levels(rows: &[Option<Vec<Option<i32>>>]) -> (Vec<i32>, Vec<i16>, Vec<i16>) {
        let (mut values, mut def, mut rep) = (vec![], vec![], vec![]);
        for row in rows {
            match row {
                None => {
                    def.push(0);
                    rep.push(0);
                }
                Some(v) if v.is_empty() => {
                    def.push(1);
                    rep.push(0);
                }
                Some(v) => {
                    for (j, x) in v.iter().enumerate() {
                        rep.push(if j == 0 { 0 } else { 1 });
                        match x {
                            Some(x) => {
                                def.push(3);
                                values.push(*x);
                            }
                            None => def.push(2),
                        }
                    }
                }
            }
        }
        (values, def, rep)
    }

    /// Writes `rows` in row groups of `group` rows, snappy-compressed;
    /// `ids_column` names the ids column.
    pub fn write(path: &Path, ids_column: &str, rows: &[Row], group: usize) {
        let with_first = rows.iter().any(|r| r.first_position.is_some());
        let with_mask = rows.iter().any(|r| r.loss_mask.is_some());
        let mut schema = format!(
            "message m {{ optional group {ids_column} (LIST) {{ repeated group list {{ optional int32 element; }} }}"
        );
        if with_first {
            schema += " optional int64 first_position;";
        }
        if with_mask {
            schema += " optional group loss_mask (LIST) { repeated group list { optional int32 element; } }";
        }
        schema += " }";
        let schema = Arc::new(parse_message_type(&schema).unwrap());
        let props =
            Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
        let file = std::fs::File::create(path).unwrap();
        let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
        for chunk in rows.chunks(group.max(1)) {
            let mut rg = w.next_row_group().unwrap();
            let mut index = 0;
            while let Some(mut col) = rg.next_column().unwrap() {
                let name = if index == 0 {
                    "ids"
                } else if index == 1 && with_first {
                    "first"
                } else {
                    "mask"
                };
                match name {
                    "first" => {
                        let v: Vec<i64> = chunk.iter().filter_map(|r| r.first_position).collect();
                        let def: Vec<i16> =
                            chunk.iter().map(|r| i16::from(r.first_position.is_some())).collect();
                        col.typed::<Int64Type>().write_batch(&v, Some(&def), None).unwrap();
                    }
                    _ => {
                        let lists: Vec<Option<Vec<Option<i32>>>> = if name == "ids" {
                            chunk.iter().map(|r| r.ids.clone()).collect()
                        } else {
                            chunk
                                .iter()
                                .map(|r| {
                                    r.loss_mask
                                        .as_ref()
                                        .map(|m| m.iter().map(|&x| Some(x)).collect())
                                })
                                .collect()
                        };
                        let (v, def, rep) = list_levels(&lists);
                        col.typed::<Int32Type>().write_batch(&v, Some(&def), Some(&rep)).unwrap();
                    }
                }
                col.close().unwrap();
                index += 1;
            }
            rg.close().unwrap();
        }
        w.close().unwrap();
    }
}

/// A test's scratch folder, removed when the test passes.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("logitd-dump-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A corpus of `n` sequences: ids, first position.
fn corpus(n: usize, salt: u32) -> Vec<(Vec<u32>, u32)> {
    (0..n as u32)
        .map(|i| {
            let len = 3 + (i * 7 + salt) % 9;
            let ids = (0..len).map(|p| (i * 13 + p * 29 + salt) % 96).collect();
            (ids, (i + salt) % 3)
        })
        .collect()
}

fn write_jsonl(path: &Path, corpus: &[(Vec<u32>, u32)]) {
    let mut text = String::new();
    for (i, (ids, first)) in corpus.iter().enumerate() {
        // Both line forms, and a blank line now and then (not a sequence).
        if i % 2 == 0 {
            text += &serde_json::json!({"token_ids": ids, "first_position": first, "text": "x"})
                .to_string();
        } else {
            assert_eq!(*first, first % 3);
            text += &serde_json::json!({"input_ids": ids, "first_position": first}).to_string();
        }
        text += if i % 17 == 5 { "\n\n" } else { "\n" };
    }
    std::fs::write(path, text).unwrap();
}

fn dump(uri: &str, inputs: &[&Path], out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_logitd-client"));
    c.args(["dump", "--server", uri, "--out", out.to_str().unwrap(), "--input"]);
    c.args(inputs.iter().map(|p| p.to_str().unwrap()));
    c.args(["--num-samples", "8"]);
    if !extra.contains(&"--seed") {
        c.args(["--seed", "5"]);
    }
    c.args(extra);
    c.env_remove("JOB_COMPLETION_INDEX");
    c
}

fn ok(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "dump failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn failed(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        !out.status.success(),
        "the dump should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn read_set(dirs: &[&Path]) -> Vec<TeacherTargets> {
    ShardReader::open_many(dirs).unwrap().iter().collect::<Result<_, _>>().unwrap()
}

/// The server's targets for the whole corpus as one batch, seed 5, k = 8.
async fn reference(client: &TeacherClient, corpus: &[(Vec<u32>, u32)]) -> Vec<TeacherTargets> {
    reference_with(client, corpus, SamplingMethod::Sample, false).await
}

/// [`reference`] with another method, and the realised tokens' log p if asked.
async fn reference_with(
    client: &TeacherClient,
    corpus: &[(Vec<u32>, u32)],
    method: SamplingMethod,
    token_logprobs: bool,
) -> Vec<TeacherTargets> {
    let seqs: Vec<Vec<u32>> = corpus.iter().map(|(t, _)| t.clone()).collect();
    let firsts: Vec<u32> = corpus.iter().map(|(_, f)| *f).collect();
    let opts = SampleOptions {
        num_samples: 8,
        temperature: Some(1.0),
        seed: 5,
        method,
        value_encoding: ValueEncoding::F32,
        token_logprobs,
    };
    client.sample_targets(&seqs, Some(&firsts), opts).await.unwrap()
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// The corpus `c` as Parquet (a first-position column, then a loss mask over
/// two workers) gives the targets `want`.
fn parquet_gives_the_same_targets(
    uri: &str,
    s: &Scratch,
    c: &[(Vec<u32>, u32)],
    want: &[TeacherTargets],
) {
    // The same corpus as Parquet: a first-position column, then a loss mask.
    let rows = |mask: bool| -> Vec<pq::Row> {
        c.iter()
            .map(|(ids, f)| pq::Row {
                ids: Some(ids.iter().map(|&x| Some(x as i32)).collect()),
                first_position: (!mask).then_some(i64::from(*f)),
                loss_mask: mask
                    .then(|| (0..ids.len() as u32).map(|p| i32::from(p >= *f)).collect()),
            })
            .collect()
    };
    pq::write(&s.path("c.parquet"), "input_ids", &rows(false), 16);
    pq::write(&s.path("m.parquet"), "input_ids", &rows(true), 40);
    let out = s.path("pq");
    ok(dump(uri, &[&s.path("c.parquet")], &out, &["--first-position-column", "first_position"]));
    common::same_targets(&read_set(&[&out]), want, "Parquet with a first-position column");
    let out = s.path("pq-mask");
    ok(dump(
        uri,
        &[&s.path("m.parquet")],
        &out,
        &["--loss-mask-column", "loss_mask", "--workers", "2", "--worker", "1"],
    ));
    ok(dump(
        uri,
        &[&s.path("m.parquet")],
        &out,
        &["--loss-mask-column", "loss_mask", "--workers", "2", "--worker", "0"],
    ));
    common::same_targets(&read_set(&[&out]), want, "Parquet with a loss mask, two workers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn targets_depend_only_on_the_sequence_index() {
    let (uri, mut server) = common::tiny_server().await;
    let client = common::connect(&uri, &mut server).await;
    let s = Scratch::new("keys");
    let c = corpus(150, 0);
    // Two files, named by a glob.
    write_jsonl(&s.path("part-0.jsonl"), &c[..70]);
    write_jsonl(&s.path("part-1.jsonl"), &c[70..]);
    let glob = s.path("part-*.jsonl");
    let want = reference(&client, &c).await;
    assert_eq!(want.len(), 150);

    for (name, batch, depth) in [("b1", "1", "8"), ("b16", "16", "2")] {
        let out = s.path(name);
        let run = ok(dump(
            &uri,
            &[&glob],
            &out,
            &["--batch-sequences", batch, "--depth", depth, "--shard-entries", "500"],
        ));
        let line = String::from_utf8_lossy(&run.stdout);
        assert!(line.contains("wrote 150 sequences (150 in this run)"), "{line}");
        common::same_targets(&read_set(&[&out]), &want, &format!("--batch-sequences {batch}"));
    }

    // Two servers, calls balanced over them.
    let (uri2, mut server2) = common::tiny_server().await;
    let _ = common::connect(&uri2, &mut server2).await;
    let out = s.path("two-servers");
    ok(dump(&format!("{uri},{uri2}"), &[&glob], &out, &["--batch-sequences", "2", "--depth", "8"]));
    common::same_targets(&read_set(&[&out]), &want, "two servers");
    server2.abort();

    // Three workers into one folder, at once.
    let out = s.path("w3");
    let children: Vec<_> = (0..3)
        .map(|i| {
            let i = i.to_string();
            dump(
                &uri,
                &[&glob],
                &out,
                &["--worker", &i, "--workers", "3", "--shard-entries", "500"],
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for child in children {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let reader = ShardReader::open(&out).unwrap();
    assert_eq!(reader.sequences(), Some(0..150));
    assert!(reader.files().len() > 3, "{} shards", reader.files().len());
    common::same_targets(&read_set(&[&out]), &want, "--workers 3");
    for (i, range) in [(0, [0, 50]), (1, [50, 100]), (2, [100, 150])] {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join(format!("manifest-0000{i}-of-00003.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(m["sequences"], serde_json::json!(range));
        assert_eq!(m["complete"], true);
    }
    // A worker's part missing: the reader names the gap.
    for f in reader.files() {
        let start = logitd_client::shard::read_header(f).unwrap().1.unwrap().start;
        if (50..100).contains(&start) {
            std::fs::remove_file(f).unwrap();
        }
    }
    let err = ShardReader::open(&out).err().expect("a gap is an error").to_string();
    assert!(err.contains("sequences 50..100 are missing"), "{err}");

    parquet_gives_the_same_targets(&uri, &s, &c, &want);
    server.abort();
}

/// Waits until the manifest of `out` lists at least `n` shards.
fn wait_for_shards(out: &Path, n: usize, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = std::fs::read(out.join("manifest-00000-of-00001.json")).ok();
        let shards = m
            .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok())
            .and_then(|m| m["shards"].as_array().map(Vec::len))
            .unwrap_or(0);
        if shards >= n {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "the dump ended before it could be killed");
        assert!(Instant::now() < deadline, "no {n} shards within 120 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_run_resumes_to_the_same_bytes() {
    let (uri, mut server) = common::tiny_server().await;
    let _client = common::connect(&uri, &mut server).await;
    let s = Scratch::new("kill");
    let input = s.path("c.jsonl");
    write_jsonl(&input, &corpus(1500, 3));
    // One sequence per request, one request at a time: the server computes each
    // sequence alone, so its values are the same bits in every run (see
    // `same_targets`) and the bytes on disk can be compared.
    let args = ["--shard-entries", "4000", "--batch-sequences", "1", "--depth", "1"];
    let (whole, resumed) = (s.path("whole"), s.path("resumed"));
    ok(dump(&uri, &[&input], &whole, &args));
    let reference = files_of(&whole);
    assert!(reference.len() > 10, "{} files", reference.len());

    // Killed twice (SIGKILL) at different points, resumed each time.
    for n in [3, 9] {
        let mut child = dump(&uri, &[&input], &resumed, &args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_for_shards(&resumed, n, &mut child);
        child.kill().unwrap();
        assert!(!child.wait().unwrap().success());
    }
    // A half-written shard of the killed run is discarded.
    std::fs::write(resumed.join("targets-000000001490.safetensors.partial"), b"half").unwrap();
    let run = ok(dump(&uri, &[&input], &resumed, &args));
    let line = String::from_utf8_lossy(&run.stdout);
    assert!(line.contains("wrote 1500 sequences"), "{line}");
    assert!(!line.contains("(1500 in this run)"), "it resumed: {line}");
    assert_eq!(files_of(&resumed), reference, "killed and resumed = uninterrupted, bit for bit");

    // The last shard damaged (same size, one byte changed): detected and redone.
    let last = ShardReader::open(&resumed).unwrap().files().last().unwrap().clone();
    let mut bytes = std::fs::read(&last).unwrap();
    let mid = bytes.len() - 7;
    bytes[mid] ^= 0x55;
    std::fs::write(&last, &bytes).unwrap();
    let run = dump(&uri, &[&input], &resumed, &args).output().unwrap();
    assert!(run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("is damaged (its checksum differs"), "{err}");
    assert_eq!(files_of(&resumed), reference, "the damaged shard was redone");

    // A shard in the middle gone: it and every one after are redone.
    let files = ShardReader::open(&resumed).unwrap().files().to_vec();
    std::fs::remove_file(&files[files.len() / 2]).unwrap();
    let err =
        String::from_utf8_lossy(&dump(&uri, &[&input], &resumed, &args).output().unwrap().stderr)
            .into_owned();
    assert!(err.contains("(missing)"), "{err}");
    assert_eq!(files_of(&resumed), reference);

    // Other arguments are refused, naming the difference; nothing is touched.
    for (extra, says) in [
        (vec!["--seed", "6", "--shard-entries", "4000"], "--seed was 5, now it is 6"),
        (vec!["--shard-entries", "999"], "--shard-entries was 4000, now it is 999"),
        (vec!["--shard-entries", "4000", "--workers", "2"], "--workers was 1, now it is 2"),
        (
            vec!["--shard-entries", "4000", "--top-k"],
            "the method (--top-k) was \"sample\", now it is \"top_k\"",
        ),
    ] {
        let err = failed(dump(&uri, &[&input], &resumed, &extra));
        assert!(err.contains(says), "{extra:?}: {err}");
    }
    let mut text = std::fs::read_to_string(&input).unwrap();
    text += "[1, 2, 3]\n";
    std::fs::write(&input, text).unwrap();
    let err = failed(dump(&uri, &[&input], &resumed, &args));
    assert!(err.contains("changed: it had") && err.contains("1500 sequences, now"), "{err}");
    assert_eq!(files_of(&resumed), reference);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_named_and_complete_shards_are_kept() {
    let (uri, mut server) = common::tiny_server().await;
    let client = common::connect(&uri, &mut server).await;
    let s = Scratch::new("bad");
    let good = corpus(40, 1);
    let want = reference(&client, &good).await;
    let good_lines: String = good
        .iter()
        .map(|(ids, f)| {
            serde_json::json!({"token_ids": ids, "first_position": f}).to_string() + "\n"
        })
        .collect();
    let cases = [
        (r#"{"ids": [1]}"#, "the object has no `token_ids`"),
        (r#""hello""#, "expected an array of token ids or an object with `token_ids`"),
        ("[1, -2]", "token id -2 (at index 1) is negative"),
        ("[1, 2, 96]", "token id 96 (at index 2) is not below the vocabulary size 96"),
        ("[]", "the sequence is empty"),
        (
            r#"{"token_ids": [1, 2], "first_position": 2}"#,
            "first_position 2 is not a position of the sequence (0..2)",
        ),
        ("[1, 2.5]", "expected a token id (an integer)"),
        ("[1, 2", "EOF while parsing"),
    ];
    for (i, (line, says)) in cases.iter().enumerate() {
        let input = s.path(&format!("bad-{i}.jsonl"));
        std::fs::write(&input, format!("{good_lines}{line}\n[3, 4]\n")).unwrap();
        let out = s.path(&format!("out-{i}"));
        let err = failed(dump(
            &uri,
            &[&input],
            &out,
            &["--shard-entries", "300", "--batch-sequences", "4"],
        ));
        let at = format!("bad-{i}.jsonl:41");
        let at2 = format!("bad-{i}.jsonl: line 41 (sequence 40)");
        assert!(err.contains(&at) || err.contains(&at2), "{line}: names no file and line: {err}");
        assert!(err.contains(says), "{line}: says not {says:?}: {err}");
        assert!(err.contains("complete shards"), "{err}");
        // What was complete before the bad line is on disk and right.
        let kept = read_set(&[&out]);
        assert!(kept.len() >= 20, "{line}: {} sequences kept", kept.len());
        common::same_targets(&kept, &want[..kept.len()], line);
    }

    // Parquet.
    let row =
        |ids: Option<Vec<Option<i32>>>| pq::Row { ids, first_position: Some(0), loss_mask: None };
    let mut rows: Vec<pq::Row> = (0..20).map(|i| row(Some(vec![Some(i), Some(i + 1)]))).collect();
    let file = s.path("c.parquet");
    pq::write(&file, "input_ids", &rows, 8);
    let out = s.path("pq-missing");
    let err = failed(dump(&uri, &[&file], &out, &["--ids-column", "tokens"]));
    assert!(
        err.contains("c.parquet: no column `tokens` (the file has: input_ids, first_position)"),
        "{err}"
    );
    let err = failed(dump(&uri, &[&file], &out, &["--ids-column", "first_position"]));
    assert!(err.contains("column `first_position` is not a list of integers"), "{err}");
    let text = s.path("text.parquet");
    std::fs::write(&text, "[1, 2, 3]\n").unwrap();
    let err = failed(dump(&uri, &[&text], &out, &[]));
    assert!(err.contains("text.parquet: not a Parquet file"), "{err}");

    for (i, (bad, says)) in [
        (Some(vec![Some(3), None]), "row group 1, row 3 (sequence 11): the ids column: a null value in the list"),
        (Some(vec![Some(3), Some(-7)]), "row group 1, row 3 (sequence 11): token id -7 (at index 1) is negative"),
        (Some(vec![Some(96)]), "row group 1, row 3 (sequence 11): token id 96 (at index 0) is not below the vocabulary size 96"),
        (Some(vec![]), "row group 1, row 3 (sequence 11): the sequence is empty"),
        (None, "row group 1, row 3 (sequence 11): the sequence is empty"),
    ]
    .into_iter()
    .enumerate()
    {
        rows[11] = row(bad);
        let file = s.path(&format!("bad-{i}.parquet"));
        pq::write(&file, "input_ids", &rows, 8);
        let err = failed(dump(&uri, &[&file], &s.path(&format!("pq-{i}")), &[]));
        assert!(err.contains(&format!("bad-{i}.parquet: {says}")), "{err}");
    }
    server.abort();
}

/// The fixtures' sequences, read from their JSON lines with plain serde_json.
fn fixture_expected() -> Vec<(Vec<u32>, u32)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf-parquet-expected.jsonl"
    ))
    .unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let ids = v["token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32);
            (ids.collect(), v["first_position"].as_u64().unwrap() as u32)
        })
        .collect()
}

fn read_range(
    paths: &[PathBuf],
    columns: logitd_client_tools::corpus::Columns,
    range: std::ops::Range<u64>,
) -> Vec<(Vec<u32>, u32)> {
    let c = logitd_client_tools::corpus::Corpus::open(paths, columns).unwrap();
    c.records(range, Some(96), Default::default())
        .map(|r| r.map(|r| (r.tokens, r.first_position)).unwrap())
        .collect()
}

#[test]
fn parquet_written_by_pyarrow_reads_as_written() {
    use logitd_client_tools::corpus::Columns;
    let fx = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"));
    let want = fixture_expected();
    assert_eq!(want.len(), 55);
    let (a, b) = (vec![fx.join("hf-int32-mask.parquet")], vec![fx.join("hf-int64-first.parquet")]);
    let mask = Columns { loss_mask: Some("loss_mask".into()), ..Columns::default() };
    let first = Columns { first_position: Some("first_position".into()), ..Columns::default() };
    assert_eq!(read_range(&a, mask.clone(), 0..30), want[..30]);
    assert_eq!(read_range(&b, first.clone(), 0..25), want[30..]);
    // From the middle of a row group, across row groups (7 rows each).
    assert_eq!(read_range(&a, mask, 9..23), want[9..23]);
    assert_eq!(read_range(&b, first, 24..25), want[54..]);
}

#[test]
fn jsonl_ranges_start_anywhere() {
    let s = Scratch::new("ranges");
    let c = corpus(40_000, 7);
    let path = s.path("c.jsonl");
    write_jsonl(&path, &c);
    let cols = logitd_client_tools::corpus::Columns::default();
    for range in [0..3, 16_383..16_386, 20_000..20_010, 39_990..40_000, 32_768..32_769] {
        let (a, b) = (range.start as usize, range.end as usize);
        assert_eq!(
            read_range(std::slice::from_ref(&path), cols.clone(), range),
            c[a..b],
            "{a}..{b}"
        );
    }
    // Two files: the ranges run on from one into the next.
    let (p1, p2) = (s.path("a.jsonl"), s.path("b.jsonl"));
    write_jsonl(&p1, &c[..17_000]);
    write_jsonl(&p2, &c[17_000..]);
    assert_eq!(read_range(&[p1, p2], cols, 16_990..17_010), c[16_990..17_010]);
}

/// `n` sequences of `len` tokens each (DistillKit's rows are of one length).
fn corpus_of_one_length(n: usize, len: u32) -> Vec<(Vec<u32>, u32)> {
    (0..n as u32).map(|i| ((0..len).map(|p| (i * 17 + p * 31 + 5) % 96).collect(), i % 3)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trainer_layouts_read_back_as_the_live_targets() {
    let (uri, mut server) = common::tiny_server().await;
    let client = common::connect(&uri, &mut server).await;
    let s = Scratch::new("formats");
    let c = corpus(90, 2);
    write_jsonl(&s.path("c.jsonl"), &c);
    let fixed = corpus_of_one_length(40, 10);
    write_jsonl(&s.path("fixed.jsonl"), &fixed);
    let (sample, top_k) = (SamplingMethod::Sample, SamplingMethod::TopK);
    for (format, input, corpus, extra, method, scores) in [
        ("axolotl", "c.jsonl", &c, vec![], sample, false),
        ("axolotl", "c.jsonl", &c, vec!["--top-k"], top_k, false),
        ("axolotl", "c.jsonl", &c, vec!["--token-logprobs", "--workers", "2"], sample, true),
        ("distillkit", "fixed.jsonl", &fixed, vec![], sample, false),
        ("distillkit", "fixed.jsonl", &fixed, vec!["--top-k", "--token-logprobs"], top_k, true),
    ] {
        let what = format!("--format {format} {extra:?}");
        let out = s.path(&format!("{format}-{}", extra.join("")));
        let mut args = vec!["--format", format, "--shard-entries", "700", "--batch-sequences", "7"];
        args.extend(&extra);
        if extra.contains(&"--workers") {
            for w in ["1", "0"] {
                let mut a = args.clone();
                a.extend(["--worker", w]);
                ok(dump(&uri, &[&s.path(input)], &out, &a));
            }
        } else {
            ok(dump(&uri, &[&s.path(input)], &out, &args));
        }
        let reader = ShardReader::open(&out).unwrap();
        assert!(reader.files().len() > 2, "{what}: {} shards", reader.files().len());
        assert!(reader.files().iter().all(|f| f.extension().unwrap() == "parquet"), "{what}");
        let want = reference_with(&client, corpus, method, scores).await;
        common::same_targets(&read_set(&[&out]), &want, &what);
    }

    // DistillKit's preconditions, refused by name.
    let err = failed(dump(
        &uri,
        &[&s.path("c.jsonl")],
        &s.path("dk-lengths"),
        &["--format", "distillkit"],
    ));
    let says = "3 tokens, but sequence 0 has 5: DistillKit reads rows of one length";
    assert!(err.contains("0: sequence 1") && err.contains(says), "{err}");
    let err = failed(dump(
        &uri,
        &[&s.path("fixed.jsonl")],
        &s.path("dk-t"),
        &["--format", "distillkit", "--temperature", "0.7"],
    ));
    assert!(err.contains("--format distillkit needs --temperature 1"), "{err}");
    assert!(err.contains("not 0.7"), "{err}");
    // Another layout into a folder written with one is refused.
    let err =
        failed(dump(&uri, &[&s.path("c.jsonl")], &s.path("axolotl-"), &["--shard-entries", "700"]));
    assert!(err.contains("--format was \"axolotl\", now it is \"logitd\""), "{err}");

    // Killed (SIGKILL) and resumed: the same Parquet bytes as an uninterrupted run.
    let input = s.path("kill.jsonl");
    write_jsonl(&input, &corpus(300, 4));
    let args =
        ["--format", "axolotl", "--shard-entries", "500", "--batch-sequences", "1", "--depth", "1"];
    let (whole, resumed) = (s.path("kill-whole"), s.path("kill-resumed"));
    ok(dump(&uri, &[&input], &whole, &args));
    let reference = files_of(&whole);
    assert!(reference.len() > 5, "{} files", reference.len());
    let mut child = dump(&uri, &[&input], &resumed, &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_shards(&resumed, 3, &mut child);
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success());
    std::fs::write(resumed.join("targets-000000000290.parquet.partial"), b"half").unwrap();
    let run = ok(dump(&uri, &[&input], &resumed, &args));
    let line = String::from_utf8_lossy(&run.stdout);
    assert!(line.contains("wrote 300 sequences") && !line.contains("(300 in this run)"), "{line}");
    assert_eq!(files_of(&resumed), reference, "killed and resumed = uninterrupted, bit for bit");
    server.abort();
}
