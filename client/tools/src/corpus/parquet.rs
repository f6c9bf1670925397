//! Parquet corpora through the low-level column reader: a few hundred rows at
//! a time, row group by row group, without arrow.

use std::{
    collections::VecDeque,
    fs::File,
    path::{Path, PathBuf},
};

use parquet::{
    basic::Repetition,
    column::reader::{ColumnReader, ColumnReaderImpl},
    data_type::{BoolType, Int32Type, Int64Type},
    file::reader::{FileReader, SerializedFileReader},
    schema::types::SchemaDescriptor,
};

use super::{Columns, CorpusError, Raw};

/// Rows decoded per read.
const CHUNK: usize = 256;

fn open(path: &Path) -> Result<SerializedFileReader<File>, CorpusError> {
    let file = File::open(path).map_err(CorpusError::io("opening", path))?;
    SerializedFileReader::new(file)
        .map_err(|source| CorpusError::NotParquet { path: path.to_path_buf(), source })
}

/// What is wrong with the file's columns or row groups.
fn invalid(path: &Path, message: String) -> CorpusError {
    CorpusError::Parquet { path: path.to_path_buf(), message }
}

/// A column to read: its leaf index and levels.
#[derive(Clone, Copy)]
struct Leaf {
    index: usize,
    max_def: i16,
    /// Lists: the definition level at which the list is present (its
    /// repeated node); a lower one is a null or empty list.
    list_def: Option<i16>,
}

/// Finds the leaf column of top-level field `name`: a list of integers
/// (`list`) or a plain integer.
fn leaf(
    schema: &SchemaDescriptor,
    path: &Path,
    name: &str,
    list: bool,
) -> Result<Leaf, CorpusError> {
    let found = (0..schema.num_columns()).find(|&i| schema.column(i).path().parts()[0] == name);
    let Some(index) = found else {
        let names: Vec<&str> = schema.root_schema().get_fields().iter().map(|f| f.name()).collect();
        return Err(invalid(
            path,
            format!("no column `{name}` (the file has: {})", names.join(", ")),
        ));
    };
    let col = schema.column(index);
    let integer = matches!(
        col.physical_type(),
        parquet::basic::Type::INT32 | parquet::basic::Type::INT64 | parquet::basic::Type::BOOLEAN
    );
    let want = usize::from(list);
    if !integer
        || col.max_rep_level() as usize != want
        || (want == 0 && col.path().parts().len() > 1)
    {
        return Err(invalid(
            path,
            format!(
                "column `{name}` is not {} (its values are {}, in {} nested list(s))",
                if list { "a list of integers" } else { "an integer column" },
                col.physical_type(),
                col.max_rep_level()
            ),
        ));
    }
    // Walk the path from the top-level field to find the repeated node's level.
    let mut node = schema.get_column_root(index);
    let mut def = 0i16;
    let mut list_def = None;
    for (depth, part) in col.path().parts().iter().enumerate() {
        if depth > 0 {
            node = node
                .get_fields()
                .iter()
                .find(|f| f.name() == part)
                .ok_or_else(|| invalid(path, format!("bad schema at `{part}`")))?;
        }
        let info = node.get_basic_info();
        if info.has_repetition() && info.repetition() != Repetition::REQUIRED {
            def += 1;
        }
        if info.has_repetition() && info.repetition() == Repetition::REPEATED {
            list_def = Some(def);
        }
    }
    Ok(Leaf { index, max_def: col.max_def_level(), list_def })
}

/// The columns of a file, checked.
struct Layout {
    ids: Leaf,
    first_position: Option<Leaf>,
    loss_mask: Option<Leaf>,
}

fn layout(
    reader: &SerializedFileReader<File>,
    path: &Path,
    c: &Columns,
) -> Result<Layout, CorpusError> {
    let schema = reader.metadata().file_metadata().schema_descr();
    Ok(Layout {
        ids: leaf(schema, path, &c.ids, true)?,
        first_position: c
            .first_position
            .as_deref()
            .map(|n| leaf(schema, path, n, false))
            .transpose()?,
        loss_mask: c.loss_mask.as_deref().map(|n| leaf(schema, path, n, true)).transpose()?,
    })
}

/// Checks the columns of `path` and returns its row count (from the metadata).
pub(crate) fn count(path: &Path, columns: &Columns) -> Result<u64, CorpusError> {
    let reader = open(path)?;
    layout(&reader, path, columns)?;
    Ok(reader.metadata().file_metadata().num_rows().max(0) as u64)
}

/// A typed column reader whose values come out as i64.
enum Ints {
    I32(ColumnReaderImpl<Int32Type>),
    I64(ColumnReaderImpl<Int64Type>),
    Bool(ColumnReaderImpl<BoolType>),
}

impl Ints {
    fn new(r: ColumnReader) -> Self {
        match r {
            ColumnReader::Int32ColumnReader(r) => Ints::I32(r),
            ColumnReader::Int64ColumnReader(r) => Ints::I64(r),
            ColumnReader::BoolColumnReader(r) => Ints::Bool(r),
            _ => unreachable!("checked by `leaf`"),
        }
    }

    fn skip(&mut self, n: usize) -> parquet::errors::Result<usize> {
        match self {
            Ints::I32(r) => r.skip_records(n),
            Ints::I64(r) => r.skip_records(n),
            Ints::Bool(r) => r.skip_records(n),
        }
    }

    /// Reads up to `n` rows: definition and repetition levels and the values.
    fn read(
        &mut self,
        n: usize,
        def: &mut Vec<i16>,
        rep: &mut Vec<i16>,
        out: &mut Vec<i64>,
    ) -> parquet::errors::Result<usize> {
        def.clear();
        rep.clear();
        out.clear();
        macro_rules! read {
            ($r:expr, $conv:expr) => {{
                let mut v = Vec::new();
                let (rows, _, _) = $r.read_records(n, Some(def), Some(rep), &mut v)?;
                out.extend(v.into_iter().map($conv));
                Ok(rows)
            }};
        }
        match self {
            Ints::I32(r) => read!(r, i64::from),
            Ints::I64(r) => read!(r, |x| x),
            Ints::Bool(r) => read!(r, i64::from),
        }
    }
}

/// One column of one row group being read.
struct ColumnCursor {
    leaf: Leaf,
    reader: Ints,
    def: Vec<i16>,
    rep: Vec<i16>,
    values: Vec<i64>,
}

/// Splits levels and values into rows: `Ok(values)` per row, or what is wrong
/// with it. A column without repetition has one value per row.
fn rows(c: &ColumnCursor, list: bool) -> Vec<Result<Vec<i64>, &'static str>> {
    let mut rows: Vec<Result<Vec<i64>, &'static str>> = vec![];
    let mut values = c.values.iter();
    let levels = c.def.len().max(c.values.len());
    for i in 0..levels {
        let def = c.def.get(i).copied().unwrap_or(c.leaf.max_def);
        if !list || c.rep.get(i).copied().unwrap_or(0) == 0 {
            rows.push(Ok(vec![]));
        }
        let row = rows.last_mut().expect("a row was started");
        if def == c.leaf.max_def {
            let v = *values.next().expect("a value per full definition level");
            if let Ok(r) = row {
                r.push(v);
            }
        } else if list && def >= c.leaf.list_def.unwrap_or(0) {
            *row = Err("a null value in the list");
        } else if !list {
            *row = Err("a null value");
        }
        // else: a null or empty list (checked as an empty sequence later).
    }
    rows
}

/// Reads the rows of one file from a given one on.
pub(crate) struct Reader {
    path: PathBuf,
    file: SerializedFileReader<File>,
    layout: Layout,
    /// The row group being read, and the index of the next row in it.
    group: usize,
    row: u64,
    columns: Vec<ColumnCursor>,
    pending: VecDeque<Raw>,
}

impl Reader {
    /// A reader whose next row is the file's `local`-th.
    pub(crate) fn at(path: &Path, columns: &Columns, local: u64) -> Result<Self, CorpusError> {
        let file = open(path)?;
        let layout = layout(&file, path, columns)?;
        let mut r = Reader {
            path: path.to_path_buf(),
            file,
            layout,
            group: 0,
            row: 0,
            columns: vec![],
            pending: VecDeque::new(),
        };
        let mut skip = local;
        while r.group < r.file.num_row_groups() {
            let rows = r.file.metadata().row_group(r.group).num_rows().max(0) as u64;
            if skip < rows {
                break;
            }
            skip -= rows;
            r.group += 1;
        }
        if r.group < r.file.num_row_groups() {
            r.open_group()?;
            for c in &mut r.columns {
                let skipped = c.reader.skip(skip as usize).map_err(|e| r_err(path, r.group, e))?;
                if skipped as u64 != skip {
                    return Err(invalid(path, format!("row group {} is short", r.group)));
                }
            }
            r.row = skip;
        }
        Ok(r)
    }

    fn open_group(&mut self) -> Result<(), CorpusError> {
        let g =
            self.file.get_row_group(self.group).map_err(|e| r_err(&self.path, self.group, e))?;
        let leaves = [Some(self.layout.ids), self.layout.first_position, self.layout.loss_mask];
        self.columns = leaves
            .into_iter()
            .flatten()
            .map(|leaf| {
                let reader = g
                    .get_column_reader(leaf.index)
                    .map_err(|e| r_err(&self.path, self.group, e))?;
                Ok(ColumnCursor {
                    leaf,
                    reader: Ints::new(reader),
                    def: vec![],
                    rep: vec![],
                    values: vec![],
                })
            })
            .collect::<Result<_, CorpusError>>()?;
        self.row = 0;
        Ok(())
    }

    /// Decodes the next rows of the current row group into `pending`.
    fn fill(&mut self) -> Result<bool, CorpusError> {
        let rows_in_group = loop {
            if self.group >= self.file.num_row_groups() {
                return Ok(false);
            }
            let n = self.file.metadata().row_group(self.group).num_rows().max(0) as u64;
            if self.columns.is_empty() {
                self.open_group()?;
            }
            if self.row < n {
                break n;
            }
            self.group += 1;
            self.columns.clear();
        };
        let n = CHUNK.min((rows_in_group - self.row) as usize);
        let (path, group) = (self.path.clone(), self.group);
        let mut decoded = vec![];
        for (i, c) in self.columns.iter_mut().enumerate() {
            let got = c
                .reader
                .read(n, &mut c.def, &mut c.rep, &mut c.values)
                .map_err(|e| r_err(&path, group, e))?;
            if got != n {
                return Err(invalid(
                    &path,
                    format!("row group {group} ended after {} of its rows", self.row + got as u64),
                ));
            }
            decoded.push(rows(c, i != 1 || self.layout.first_position.is_none()));
        }
        self.assemble(decoded, n);
        Ok(true)
    }

    /// Turns decoded columns (ids, then the first position or loss mask) into rows.
    fn assemble(&mut self, decoded: Vec<Vec<Result<Vec<i64>, &'static str>>>, n: usize) {
        let mut decoded = decoded.into_iter();
        let ids = decoded.next().expect("the ids column");
        let extra = decoded.next();
        let by_mask = self.layout.first_position.is_none();
        for (i, ids) in ids.into_iter().enumerate() {
            let location = format!("row group {}, row {}", self.group, self.row + i as u64);
            let mut raw = Raw { ids: vec![], first_position: 0, location, problem: None };
            match ids {
                Ok(ids) => raw.ids = ids,
                Err(what) => raw.problem = Some(format!("the ids column: {what}")),
            }
            match extra.as_ref().map(|e| &e[i]) {
                None => {}
                Some(Err(what)) => {
                    raw.problem = Some(format!("the first position or loss mask: {what}"))
                }
                Some(Ok(v)) if !by_mask => raw.first_position = v[0],
                Some(Ok(mask)) if mask.len() != raw.ids.len() => {
                    raw.problem = Some(format!(
                        "the loss mask has {} values for {} ids",
                        mask.len(),
                        raw.ids.len()
                    ));
                }
                Some(Ok(mask)) => match mask.iter().position(|&m| m != 0) {
                    Some(p) => raw.first_position = p as i64,
                    None => raw.problem = Some("the loss mask selects no position".into()),
                },
            }
            self.pending.push_back(raw);
        }
        self.row += n as u64;
    }

    /// The next row, or None at the end of the file.
    pub(crate) fn next(&mut self) -> Result<Option<Raw>, CorpusError> {
        if self.pending.is_empty() && !self.fill()? {
            return Ok(None);
        }
        Ok(self.pending.pop_front())
    }
}

fn r_err(path: &Path, group: usize, e: parquet::errors::ParquetError) -> CorpusError {
    invalid(path, format!("row group {group}: {e}"))
}
