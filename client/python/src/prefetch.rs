//! `_native.Prefetcher`: the Rust `Prefetcher` over a Python iterator of
//! batches, on the package runtime.

use std::sync::{Arc, Mutex};

use logitd_client::{Prefetcher, TrainingBatch};
use numpy::PyReadonlyArray1;
use pyo3::{exceptions::PyStopIteration, prelude::*, types::PyTuple};

use crate::{
    client::{Client, first_positions, sample_options, split_sequences},
    errors,
    targets::Columns,
    wait,
};

/// The Python iterator as the Rust prefetcher's batch source. Each item is a
/// tuple `(flat uint32 ids, lengths int64, first_positions int64, seed)`; it is
/// pulled on a runtime thread, with the GIL taken for the pull only. An
/// exception ends the source and is kept for the consumer.
struct Source {
    iter: Py<PyAny>,
    error: Arc<Mutex<Option<PyErr>>>,
}

impl Source {
    fn pull(&self, py: Python<'_>) -> PyResult<Option<TrainingBatch>> {
        let item = match self.iter.bind(py).call_method0("__next__") {
            Ok(item) => item,
            Err(e) if e.is_instance_of::<PyStopIteration>(py) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (flat, lengths, first, seed): (
            PyReadonlyArray1<'_, u32>,
            PyReadonlyArray1<'_, i64>,
            PyReadonlyArray1<'_, i64>,
            u64,
        ) = item.extract()?;
        let bad = |name: &str| errors::invalid_argument(py, format!("{name} is not contiguous"));
        let lengths = lengths.as_slice().map_err(|_| bad("lengths"))?;
        let sequences =
            split_sequences(py, flat.as_slice().map_err(|_| bad("token ids"))?, lengths)?;
        let first = first_positions(py, first.as_slice().map_err(|_| bad("first_positions"))?)?;
        Ok(Some(TrainingBatch { sequences, first_positions: Some(first), loss_mask: None, seed }))
    }
}

impl Iterator for Source {
    type Item = TrainingBatch;

    fn next(&mut self) -> Option<TrainingBatch> {
        if self.error.lock().expect("not poisoned").is_some() {
            return None;
        }
        Python::attach(|py| match self.pull(py) {
            Ok(b) => b,
            Err(e) => {
                *self.error.lock().expect("not poisoned") = Some(e);
                None
            }
        })
    }
}

/// Batches with their targets, fetched ahead (see `logitd.Prefetcher`).
#[pyclass(module = "logitd._native")]
pub struct NativePrefetcher {
    inner: Option<Prefetcher>,
    source_error: Arc<Mutex<Option<PyErr>>>,
}

#[pymethods]
impl NativePrefetcher {
    #[new]
    #[pyo3(signature = (client, source, depth, *, num_samples, temperature, method, value_encoding, token_logprobs = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        client: &Client,
        source: Py<PyAny>,
        depth: usize,
        num_samples: u32,
        temperature: Option<f32>,
        method: &str,
        value_encoding: &str,
        token_logprobs: bool,
    ) -> PyResult<Self> {
        if depth == 0 {
            return Err(errors::invalid_argument(py, "depth = 0: at least 1".into()));
        }
        // Each batch brings its own seed; this one is not used.
        let options = sample_options(
            py,
            num_samples,
            temperature,
            0,
            method,
            value_encoding,
            token_logprobs,
        )?;
        let source_error = Arc::new(Mutex::new(None));
        let src = Source { iter: source, error: source_error.clone() };
        let _guard = crate::runtime().enter();
        let inner = Prefetcher::start(client.inner.clone(), src, depth, options);
        Ok(Self { inner: Some(inner), source_error })
    }

    /// The next batch's targets (the columns tuple of `logitd.Targets`);
    /// raises the batch's error, the source's exception after the last batch,
    /// or StopIteration.
    fn next_targets<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let Some(inner) = self.inner.as_mut() else {
            return Err(PyStopIteration::new_err(()));
        };
        match wait(py, inner.next())? {
            Some(item) => {
                let targets = item.targets.map_err(|e| errors::client_error(py, e))?;
                let lengths = item.batch.sequences.iter().map(|s| s.len() as i64).collect();
                let columns = py.detach(|| Columns::new(&targets, Some(lengths)));
                columns.into_py(py)
            }
            None => {
                self.inner = None;
                match self.source_error.lock().expect("not poisoned").take() {
                    Some(e) => Err(e),
                    None => Err(PyStopIteration::new_err(())),
                }
            }
        }
    }

    /// Stops fetching (the batches in flight are dropped).
    fn close(&mut self) {
        self.inner = None;
    }
}
