//! Parquet shards of the trainers' layouts read back into logitd's targets.

use super::*;

/// A shard opened for reading: its footer parsed, once.
fn open_builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, ShardError> {
    let file =
        File::open(path).map_err(|source| ShardError::Io { path: path.to_path_buf(), source })?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| ShardError::Invalid {
        path: path.to_path_buf(),
        message: format!("not a Parquet file ({e})"),
    })
}

/// `leaf` in `depth` levels of lists.
fn nested(depth: usize, leaf: DataType) -> DataType {
    (0..depth).fold(leaf, |t, _| DataType::List(Arc::new(Field::new("item", t, true))))
}

/// Equal types, whatever the list fields' names and nullability.
fn same_type(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::List(x), DataType::List(y)) => same_type(x.data_type(), y.data_type()),
        _ => a == b,
    }
}

/// The metadata, sequence range and layout of a Parquet shard, from its footer.
pub fn read_parquet_header(
    path: &Path,
) -> Result<(ShardMeta, Option<std::ops::Range<u64>>, TargetFormat), ShardError> {
    header_of(&open_builder(path)?, path)
}

/// The metadata, sequence range and layout in an opened shard's footer.
fn header_of(
    builder: &ParquetRecordBatchReaderBuilder<File>,
    path: &Path,
) -> Result<(ShardMeta, Option<std::ops::Range<u64>>, TargetFormat), ShardError> {
    let map: std::collections::HashMap<String, String> = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| kv.iter().filter_map(|e| Some((e.key.clone(), e.value.clone()?))).collect())
        .unwrap_or_default();
    let invalid = |message: String| ShardError::Invalid { path: path.to_path_buf(), message };
    let layout = map
        .get(LAYOUT_KEY)
        .and_then(|l| TargetFormat::from_name(l))
        .filter(|l| *l != TargetFormat::Logitd)
        .ok_or_else(|| invalid(format!("metadata `{LAYOUT_KEY}` names no Parquet layout")))?;
    let (meta, range) = crate::shard::meta_and_range(&map, path)?;
    Ok((meta, range, layout))
}

/// Reads the targets of every sequence of a Parquet shard, in logitd's own
/// order (sampled ids ascending; top-k by descending log p), so that they
/// equal the targets the server gave.
pub fn read_parquet_shard(
    path: &Path,
    num_samples: u32,
) -> Result<Vec<TeacherTargets>, ShardError> {
    let invalid = |message: String| ShardError::Invalid { path: path.to_path_buf(), message };
    let builder = open_builder(path)?;
    let (meta, _, layout) = header_of(&builder, path)?;
    let top_k = meta.method == SamplingMethod::TopK as i32;
    let reader = builder.build().map_err(|e| invalid(e.to_string()))?;
    let (ids_col, values_col, counts_col) = match layout {
        TargetFormat::Distillkit => ("token_ids", "top_values", "counts"),
        _ => ("target_token_ids", "teacher_logprobs", "target_counts"),
    };
    // The columns' types, checked once: the reads below downcast without checking.
    check_columns(&reader.schema(), [ids_col, values_col, counts_col], &invalid)?;
    let mut out = vec![];
    for batch in reader {
        let batch = batch.map_err(|e| invalid(e.to_string()))?;
        let column = |name: &str| {
            batch.column_by_name(name).ok_or_else(|| invalid(format!("no column `{name}`")))
        };
        let list = |name: &str| -> Result<ListArray, ShardError> {
            column(name)?
                .as_list_opt::<i32>()
                .cloned()
                .ok_or_else(|| invalid(format!("column `{name}` is not a list")))
        };
        let (ids, values, counts) = (list(ids_col)?, list(values_col)?, list(counts_col)?);
        let lse = list("teacher_lse")?;
        let first: Int64Array = column("first_position")?
            .as_primitive_opt::<Int64Type>()
            .cloned()
            .ok_or_else(|| invalid("column `first_position` is not int64".into()))?;
        let scores = match (
            batch.column_by_name("teacher_token_logprobs"),
            batch.column_by_name("teacher_token_ranks"),
        ) {
            (Some(a), Some(b)) => Some((a.as_list::<i32>().clone(), b.as_list::<i32>().clone())),
            _ => None,
        };
        for row in 0..batch.num_rows() {
            let bad = |what: &str| invalid(format!("row {row}: {what}"));
            let f = usize::try_from(first.value(row)).map_err(|_| bad("first_position"))?;
            let (ids, values, counts) = (ids.value(row), values.value(row), counts.value(row));
            let (ids, values, counts) =
                (ids.as_list::<i32>(), values.as_list::<i32>(), counts.as_list::<i32>());
            let lse = lse.value(row);
            let lse = lse.as_primitive::<Float32Type>();
            if ids.len() != values.len()
                || ids.len() != counts.len()
                || ids.len() != lse.len()
                || f > ids.len()
            {
                return Err(bad("the columns have other lengths"));
            }
            let mut t = TeacherTargets {
                num_samples,
                first_position: f as u32,
                offsets: vec![0],
                ..Default::default()
            };
            for r in f..ids.len() {
                let (i, v, c) = (ids.value(r), values.value(r), counts.value(r));
                let (i, v, c) = (
                    i.as_primitive::<Int64Type>(),
                    v.as_primitive::<Float32Type>(),
                    c.as_primitive::<UInt32Type>(),
                );
                if i.len() != v.len() || i.len() != c.len() {
                    return Err(bad(&format!("position {r}: the entry lists have other lengths")));
                }
                let mut entries: Vec<(u32, u32, f32)> = Vec::with_capacity(i.len());
                for e in 0..i.len() {
                    if c.value(e) == 0 {
                        continue; // DistillKit's padding
                    }
                    let id = u32::try_from(i.value(e))
                        .map_err(|_| bad(&format!("position {r}: id {}", i.value(e))))?;
                    entries.push((id, c.value(e), v.value(e)));
                }
                if !top_k {
                    entries.sort_by_key(|e| e.0);
                }
                for (id, count, lp) in entries {
                    t.token_ids.push(id);
                    t.counts.push(count);
                    t.logprobs.push(lp);
                }
                t.offsets.push(t.token_ids.len() as u32);
                t.lse.push(lse.value(r));
            }
            if let Some((lp, rank)) = &scores {
                let (lp, rank) = (lp.value(row), rank.value(row));
                let (lp, rank) =
                    (lp.as_primitive::<Float32Type>(), rank.as_primitive::<UInt32Type>());
                if lp.len() != ids.len() || rank.len() != ids.len() {
                    return Err(bad("the token log-probability columns have other lengths"));
                }
                t.token_logprobs = (f..lp.len()).map(|r| lp.value(r)).collect();
                t.token_ranks = (f..rank.len()).map(|r| rank.value(r)).collect();
            }
            t.validate().map_err(|e| bad(&e.to_string()))?;
            out.push(t);
        }
    }
    Ok(out)
}

/// The types of a shard's target columns (`cols`: ids, values, counts, by
/// layout), the first position and the optional token-score columns.
fn check_columns(
    schema: &arrow_schema::Schema,
    [ids_col, values_col, counts_col]: [&str; 3],
    invalid: &dyn Fn(String) -> ShardError,
) -> Result<(), ShardError> {
    let (list1, list2) = (|leaf| nested(1, leaf), |leaf| nested(2, leaf));
    let mut expected = vec![
        (ids_col, list2(DataType::Int64)),
        (values_col, list2(DataType::Float32)),
        (counts_col, list2(DataType::UInt32)),
        ("teacher_lse", list1(DataType::Float32)),
        ("first_position", DataType::Int64),
    ];
    if schema.column_with_name("teacher_token_logprobs").is_some() {
        expected.push(("teacher_token_logprobs", list1(DataType::Float32)));
        expected.push(("teacher_token_ranks", list1(DataType::UInt32)));
    }
    for (name, want) in &expected {
        let Some((_, field)) = schema.column_with_name(name) else {
            return Err(invalid(format!("no column `{name}`")));
        };
        if !same_type(field.data_type(), want) {
            return Err(invalid(format!(
                "column `{name}` is {}, expected {want}",
                field.data_type()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard whose `target_token_ids` holds one level of lists, not two:
    /// the reader says so instead of panicking in a downcast.
    #[test]
    fn a_column_of_another_type_is_named() {
        let dir = std::env::temp_dir().join(format!("logitd-formats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(parquet_file_name(0));
        let meta = ShardMeta { num_samples: 2, method: 1, ..Default::default() };
        let mut kv: Vec<KeyValue> =
            meta.shard_metadata(0, false).into_iter().map(|(k, v)| KeyValue::new(k, v)).collect();
        kv.push(KeyValue::new("sequence_end".to_string(), "1".to_string()));
        kv.push(KeyValue::new(LAYOUT_KEY.to_string(), "axolotl".to_string()));
        let props = WriterProperties::builder().set_key_value_metadata(Some(kv)).build();
        let mut ids = ListBuilder::new(Int64Builder::new());
        ids.values().append_value(3);
        ids.append(true);
        let batch =
            RecordBatch::try_from_iter([("target_token_ids", Arc::new(ids.finish()) as ArrayRef)])
                .unwrap();
        let mut w = ArrowWriter::try_new(File::create(&path).unwrap(), batch.schema(), Some(props))
            .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let err = read_parquet_shard(&path, 2).unwrap_err().to_string();
        assert!(
            err.contains("column `target_token_ids` is List(Int64)")
                && err.contains("expected List(List(Int64))"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
