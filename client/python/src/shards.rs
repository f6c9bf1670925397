//! `_native.ShardIter`: target shards written by `logitd-client dump`, read by
//! the Rust `ShardReader`, in batches of sequences.

use std::{
    path::PathBuf,
    sync::{Mutex, mpsc},
};

use logitd_client::{
    TeacherTargets,
    shard::{ShardError, ShardReader},
};
use pyo3::{
    exceptions::{PyStopIteration, PyValueError},
    prelude::*,
    types::{PyDict, PyTuple},
};

use crate::{errors, targets::Columns};

/// Sequences of a target set, in corpus order, `batch_size` at a time. A
/// reader thread decodes ahead (a bounded queue of sequences).
#[pyclass(module = "logitd._native")]
pub struct ShardIter {
    rx: Mutex<mpsc::Receiver<Result<TeacherTargets, ShardError>>>,
    batch_size: usize,
    meta: logitd_client::shard::ShardMeta,
    files: Vec<PathBuf>,
    done: bool,
}

#[pymethods]
impl ShardIter {
    #[new]
    #[pyo3(signature = (dirs, batch_size = 64))]
    fn new(py: Python<'_>, dirs: Vec<PathBuf>, batch_size: usize) -> PyResult<Self> {
        if batch_size == 0 {
            return Err(PyValueError::new_err("batch_size = 0: at least 1"));
        }
        let reader = ShardReader::open_many(&dirs).map_err(|e| errors::shard_error(py, e))?;
        let meta = reader.meta().clone();
        let files = reader.files().to_vec();
        let (tx, rx) = mpsc::sync_channel(batch_size.max(256));
        std::thread::Builder::new()
            .name("logitd-shards".into())
            .spawn(move || {
                for t in reader.iter() {
                    let stop = t.is_err();
                    if tx.send(t).is_err() || stop {
                        return;
                    }
                }
            })
            .map_err(|e| PyValueError::new_err(format!("cannot start the shard reader: {e}")))?;
        Ok(Self { rx: Mutex::new(rx), batch_size, meta, files, done: false })
    }

    /// What produced the targets (the shards' metadata).
    #[getter]
    fn meta<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = &self.meta;
        let d = PyDict::new(py);
        d.set_item("model_id", &m.model_id)?;
        d.set_item("tokenizer_sha256", &m.tokenizer_sha256)?;
        d.set_item("num_samples", m.num_samples)?;
        d.set_item("temperature", &m.temperature)?;
        d.set_item("seed", m.seed)?;
        d.set_item(
            "method",
            match m.method {
                2 => "top_k",
                3 => "none",
                _ => "sample",
            },
        )?;
        d.set_item(
            "value_encoding",
            match m.value_encoding {
                2 => "f16",
                3 => "bf16",
                _ => "f32",
            },
        )?;
        Ok(d)
    }

    /// The shard files, in corpus order.
    #[getter]
    fn files(&self) -> Vec<PathBuf> {
        self.files.clone()
    }

    /// The columns tuple of the next `batch_size` sequences.
    fn next_targets<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        if self.done {
            return Err(PyStopIteration::new_err(()));
        }
        let want = self.batch_size;
        let rx = &self.rx;
        let got: Result<Vec<TeacherTargets>, ShardError> = py.detach(|| {
            let rx = rx.lock().expect("not poisoned");
            let mut out = Vec::with_capacity(want);
            while out.len() < want {
                match rx.recv() {
                    Ok(Ok(t)) => out.push(t),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => break,
                }
            }
            Ok(out)
        });
        let targets = got.map_err(|e| {
            self.done = true;
            errors::shard_error(py, e)
        })?;
        if targets.len() < want {
            self.done = true;
        }
        if targets.is_empty() {
            return Err(PyStopIteration::new_err(()));
        }
        let columns = py.detach(|| Columns::new(&targets, None));
        columns.into_py(py)
    }
}
