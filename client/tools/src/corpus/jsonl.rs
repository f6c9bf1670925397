//! JSON lines, parsed straight into ids (no intermediate JSON value).

use std::{
    fmt,
    fs::File,
    io::{BufRead, BufReader, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{CorpusError, InputFile, Raw};

const BUFFER: usize = 256 << 10;

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Counts the sequences (non-blank lines) of `path`; returns the count and
/// the (byte offset, line number) of every `step`-th sequence.
pub(crate) fn count(path: &Path, step: u64) -> Result<(u64, Vec<(u64, u64)>), CorpusError> {
    let file = File::open(path).map_err(CorpusError::io("opening", path))?;
    let mut reader = BufReader::with_capacity(BUFFER, file);
    let (mut sequences, mut offset, mut line) = (0u64, 0u64, 0u64);
    let mut checkpoints = vec![];
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(CorpusError::io("reading", path))?;
        if n == 0 {
            return Ok((sequences, checkpoints));
        }
        if !is_blank(&buf) {
            if sequences.is_multiple_of(step) {
                checkpoints.push((offset, line));
            }
            sequences += 1;
        }
        offset += n as u64;
        line += 1;
    }
}

/// Reads the sequences of one file from a given one on.
pub(crate) struct Reader {
    path: PathBuf,
    inner: BufReader<File>,
    offset: u64,
    /// Lines read so far (the 1-based number of the last one).
    line: u64,
    buf: Vec<u8>,
}

impl Reader {
    /// A reader whose next sequence is the file's `local`-th.
    pub(crate) fn at(f: &InputFile, local: u64, step: u64) -> Result<Self, CorpusError> {
        let file = File::open(&f.path).map_err(CorpusError::io("opening", &f.path))?;
        let mut r = Reader {
            path: f.path.clone(),
            inner: BufReader::with_capacity(BUFFER, file),
            offset: 0,
            line: 0,
            buf: Vec::new(),
        };
        let mut skip = local;
        if let Some(&(offset, line)) = f.checkpoints.get((local / step) as usize) {
            r.inner.seek(SeekFrom::Start(offset)).map_err(CorpusError::io("seeking", &f.path))?;
            (r.offset, r.line, skip) = (offset, line, local % step);
        }
        for _ in 0..skip {
            if !r.next_line()? {
                return Err(CorpusError::Changed {
                    path: f.path.clone(),
                    message: format!("ended before sequence {local}; did it change?"),
                });
            }
        }
        Ok(r)
    }

    /// Bytes consumed.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads the next non-blank line into `buf`; false at the end.
    fn next_line(&mut self) -> Result<bool, CorpusError> {
        loop {
            self.buf.clear();
            let n = self
                .inner
                .read_until(b'\n', &mut self.buf)
                .map_err(CorpusError::io("reading", &self.path))?;
            if n == 0 {
                return Ok(false);
            }
            self.offset += n as u64;
            self.line += 1;
            if !is_blank(&self.buf) {
                return Ok(true);
            }
        }
    }

    /// The next sequence, or None at the end of the file.
    pub(crate) fn next(&mut self) -> Result<Option<Raw>, CorpusError> {
        if !self.next_line()? {
            return Ok(None);
        }
        let line: Line = serde_json::from_slice(&self.buf).map_err(|source| CorpusError::Json {
            path: self.path.clone(),
            line: self.line,
            source,
        })?;
        Ok(Some(Raw {
            ids: line.ids,
            first_position: line.first_position,
            location: format!("line {}", self.line),
            problem: None,
        }))
    }
}

/// One line: an array of ids, or an object with them.
struct Line {
    ids: Vec<i64>,
    first_position: i64,
}

/// A token id as written: any integer (range checks come later).
struct Id(i64);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a token id (an integer)")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                Ok(Id(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                Ok(Id(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        d.deserialize_any(V)
    }
}

/// An array of ids.
struct Ids(Vec<i64>);

impl<'de> Deserialize<'de> for Ids {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ids;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of token ids")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ids, A::Error> {
                let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(64));
                while let Some(Id(id)) = seq.next_element()? {
                    ids.push(id);
                }
                Ok(Ids(ids))
            }
        }
        d.deserialize_seq(V)
    }
}

impl<'de> Deserialize<'de> for Line {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Line;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of token ids or an object with `token_ids`")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Line, A::Error> {
                let Ids(ids) = Ids::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(Line { ids, first_position: 0 })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Line, A::Error> {
                let (mut ids, mut first_position) = (None, 0);
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "token_ids" | "input_ids" => ids = Some(map.next_value::<Ids>()?.0),
                        "first_position" => first_position = map.next_value::<Id>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                let ids = ids.ok_or_else(|| de::Error::custom("the object has no `token_ids`"))?;
                Ok(Line { ids, first_position })
            }
        }
        d.deserialize_any(V)
    }
}
