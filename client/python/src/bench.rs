//! Helpers for client/python/bench (not part of the public API): decoding a
//! serialized reply, and the Rust prefetcher driven from Rust only.

use std::time::Instant;

use logitd_client::{Prefetcher, TeacherTargets, TrainingBatch};
use logitd_proto::v1::SampleLogitsResponse;
use numpy::PyReadonlyArray1;
use prost::Message;
use pyo3::{exceptions::PyValueError, prelude::*, types::PyTuple};

use crate::{
    client::{Client, sample_options, split_sequences},
    errors,
    targets::Columns,
    wait,
};

/// A serialized `SampleLogitsResponse` decoded into the columns of
/// `logitd.Targets` (what `TeacherClient.sample` does with a reply; sequence
/// lengths are first_position + positions).
#[pyfunction]
pub fn decode_response<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyTuple>> {
    let columns = py.detach(|| -> Result<Columns, String> {
        let r = SampleLogitsResponse::decode(data).map_err(|e| e.to_string())?;
        let targets = r
            .sequences
            .iter()
            .map(|s| TeacherTargets::from_sequence(s, r.num_samples, r.value_encoding, r.method))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        Ok(Columns::new(&targets, None))
    });
    columns.map_err(PyValueError::new_err)?.into_py(py)
}

/// The Rust `Prefetcher` over `batches` copies of one batch (batch i with seed
/// `seed + i`), drained in Rust with `depth` in flight: (positions, seconds).
#[pyfunction]
#[pyo3(signature = (client, flat, lengths, batches, depth, num_samples, seed = 0))]
#[allow(clippy::too_many_arguments)]
pub fn rust_prefetch(
    py: Python<'_>,
    client: &Client,
    flat: PyReadonlyArray1<'_, u32>,
    lengths: PyReadonlyArray1<'_, i64>,
    batches: u64,
    depth: usize,
    num_samples: u32,
    seed: u64,
) -> PyResult<(u64, f64)> {
    let bad = || PyValueError::new_err("arrays must be contiguous");
    let sequences = split_sequences(
        py,
        flat.as_slice().map_err(|_| bad())?,
        lengths.as_slice().map_err(|_| bad())?,
    )?;
    let options = sample_options(py, num_samples, Some(1.0), seed, "sample", "f32", false)?;
    let inner = client.inner.clone();
    let run = async move {
        let source = (0..batches).map(move |i| TrainingBatch {
            sequences: sequences.clone(),
            first_positions: None,
            loss_mask: None,
            seed: seed.wrapping_add(i),
        });
        let start = Instant::now();
        let mut p = Prefetcher::start(inner, source, depth, options);
        let mut positions = 0u64;
        while let Some(item) = p.next().await {
            let t = item.targets?;
            positions += t.iter().map(|t| t.num_positions() as u64).sum::<u64>();
        }
        Ok::<_, logitd_client::ClientError>((positions, start.elapsed().as_secs_f64()))
    };
    wait(py, run)?.map_err(|e| errors::client_error(py, e))
}
