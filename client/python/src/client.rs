//! `_native.Client`: the Rust `TeacherClient` (balancing, retries, deadlines,
//! tokenizer and vocabulary checks) for Python.

use std::time::Duration;

use logitd_client::{Candidates, ClientConfig, SampleOptions, TeacherClient};
use logitd_proto::v1::{SamplingMethod, ValueEncoding};
use numpy::PyReadonlyArray1;
use pyo3::{prelude::*, types::PyDict};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::{errors, targets::Columns, wait};

/// The Rust [`SampleOptions`] of a call, from the Python arguments. The one
/// place they are built (sample, prefetch).
pub(crate) fn sample_options(
    py: Python<'_>,
    num_samples: u32,
    temperature: Option<f32>,
    seed: u64,
    method: &str,
    value_encoding: &str,
    token_logprobs: bool,
) -> PyResult<SampleOptions> {
    let method = match method {
        "sample" => SamplingMethod::Sample,
        "top_k" => SamplingMethod::TopK,
        "none" => SamplingMethod::None,
        other => {
            return Err(errors::invalid_argument(
                py,
                format!("method {other:?}: expected \"sample\", \"top_k\" or \"none\""),
            ));
        }
    };
    let value_encoding = match value_encoding {
        "f32" => ValueEncoding::F32,
        "f16" => ValueEncoding::F16,
        "bf16" => ValueEncoding::Bf16,
        other => {
            return Err(errors::invalid_argument(
                py,
                format!("value_encoding {other:?}: expected \"f32\", \"f16\" or \"bf16\""),
            ));
        }
    };
    // Scoring alone draws nothing: k is ignored (0 keeps the server's k
    // limit out of the way).
    let num_samples = if method == SamplingMethod::None { 0 } else { num_samples };
    Ok(SampleOptions { num_samples, temperature, seed, method, value_encoding, token_logprobs })
}

/// The candidate ids of a batch, CSR over all its returned positions (sequence
/// b's positions first, in order), as one [`Candidates`] per sequence, checked
/// against the server's vocabulary and `max_candidates`. Errors name the
/// sequence, the position (in the sequence) and the value.
pub(crate) fn split_candidates(
    py: Python<'_>,
    offsets: &[i64],
    ids: &[u32],
    sequences: &[Vec<u32>],
    first: &[u32],
    vocab_size: u32,
    max_candidates: u32,
) -> PyResult<Vec<Candidates>> {
    let positions: usize =
        sequences.iter().zip(first).map(|(s, &f)| s.len().saturating_sub(f as usize)).sum();
    if offsets.len() != positions + 1
        || offsets[0] != 0
        || offsets.windows(2).any(|w| w[1] < w[0])
        || offsets[positions] as usize != ids.len()
    {
        return Err(errors::invalid_argument(
            py,
            format!(
                "candidate offsets ({} entries) do not fit the batch's {positions} returned positions and {} candidate ids",
                offsets.len(),
                ids.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(sequences.len());
    let mut q = 0usize;
    for (b, (s, &f)) in sequences.iter().zip(first).enumerate() {
        let n = s.len().saturating_sub(f as usize);
        let (c0, c1) = (offsets[q] as usize, offsets[q + n] as usize);
        for i in 0..n {
            let row = &ids[offsets[q + i] as usize..offsets[q + i + 1] as usize];
            let position = f as usize + i;
            if row.len() > max_candidates as usize {
                return Err(errors::invalid_argument(
                    py,
                    format!(
                        "sequence {b}, position {position}: {} candidate ids, more than the server's max_candidates of {max_candidates}",
                        row.len()
                    ),
                ));
            }
            if let Some(&id) = row.iter().find(|&&id| id >= vocab_size) {
                return Err(errors::invalid_argument(
                    py,
                    format!(
                        "sequence {b}, position {position}: candidate id {id} is outside the vocabulary (vocab_size {vocab_size})"
                    ),
                ));
            }
        }
        out.push(Candidates {
            offsets: offsets[q..=q + n].iter().map(|&o| (o as usize - c0) as u32).collect(),
            ids: ids[c0..c1].to_vec(),
        });
        q += n;
    }
    Ok(out)
}

/// Token ids in one flat array plus lengths, as one vector per sequence.
pub(crate) fn split_sequences(
    py: Python<'_>,
    flat: &[u32],
    lengths: &[i64],
) -> PyResult<Vec<Vec<u32>>> {
    let total: i64 = lengths.iter().sum();
    if lengths.iter().any(|&l| l < 0) || total != flat.len() as i64 {
        return Err(errors::invalid_argument(
            py,
            format!("lengths sum to {total} but there are {} token ids", flat.len()),
        ));
    }
    let mut out = Vec::with_capacity(lengths.len());
    let mut at = 0usize;
    for &l in lengths {
        out.push(flat[at..at + l as usize].to_vec());
        at += l as usize;
    }
    Ok(out)
}

/// First positions (≥ 0, < 2^32) as u32.
pub(crate) fn first_positions(py: Python<'_>, f: &[i64]) -> PyResult<Vec<u32>> {
    f.iter()
        .enumerate()
        .map(|(i, &v)| {
            u32::try_from(v).map_err(|_| {
                errors::invalid_argument(
                    py,
                    format!("first_position {v} of sequence {i} is not in 0..2^32"),
                )
            })
        })
        .collect()
}

fn contiguous<'a, T: numpy::Element>(
    py: Python<'_>,
    a: &'a PyReadonlyArray1<'_, T>,
    name: &str,
) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| errors::invalid_argument(py, format!("{name} is not contiguous")))
}

/// A connected teacher (see `logitd.TeacherClient`).
#[pyclass(module = "logitd._native", frozen)]
pub struct Client {
    pub(crate) inner: TeacherClient,
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (endpoints, *, bearer_token = None, tls_ca = None, tls_domain = None, tls_cert = None, tls_key = None, expect_tokenizer_sha256 = None, expect_vocab_size = None, timeout_s = 60.0, max_attempts = 8, max_sequences_per_request = 64, max_concurrent_requests = 8))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        endpoints: Vec<String>,
        bearer_token: Option<String>,
        tls_ca: Option<String>,
        tls_domain: Option<String>,
        tls_cert: Option<String>,
        tls_key: Option<String>,
        expect_tokenizer_sha256: Option<String>,
        expect_vocab_size: Option<u32>,
        timeout_s: f64,
        max_attempts: u32,
        max_sequences_per_request: usize,
        max_concurrent_requests: usize,
    ) -> PyResult<Self> {
        if !(timeout_s.is_finite() && timeout_s > 0.0) {
            return Err(errors::invalid_argument(
                py,
                format!("timeout_s = {timeout_s} is not a positive number of seconds"),
            ));
        }
        if max_attempts == 0 {
            return Err(errors::invalid_argument(py, "max_attempts = 0: at least 1".into()));
        }
        let mut config = ClientConfig::new(endpoints);
        config.bearer_token = bearer_token;
        config.timeout = Duration::from_secs_f64(timeout_s);
        config.retry.max_attempts = max_attempts;
        config.max_sequences_per_request = max_sequences_per_request.max(1);
        config.max_concurrent_requests = max_concurrent_requests.max(1);
        config.expect_tokenizer_sha256 = expect_tokenizer_sha256;
        config.expect_vocab_size = expect_vocab_size;
        let read = |what: &str, path: &str| {
            std::fs::read(path).map_err(|e| {
                errors::make(py, "ConfigError", format!("{what} {path:?}: {e}"), None, None)
            })
        };
        if tls_ca.is_some() || tls_domain.is_some() || tls_cert.is_some() || tls_key.is_some() {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &tls_ca {
                tls = tls.ca_certificate(Certificate::from_pem(read("tls CA certificate", ca)?));
            }
            if let Some(d) = tls_domain {
                tls = tls.domain_name(d);
            }
            match (&tls_cert, &tls_key) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(Identity::from_pem(
                        read("tls client certificate", c)?,
                        read("tls client key", k)?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(errors::make(
                        py,
                        "ConfigError",
                        "a TLS client certificate needs both `cert` and `key`".into(),
                        None,
                        None,
                    ));
                }
            }
            config.tls = Some(tls);
        }
        let inner = {
            let _guard = crate::runtime().enter();
            wait(py, TeacherClient::connect(config))?
        }
        .map_err(|e| errors::client_error(py, e))?;
        Ok(Self { inner })
    }

    /// What the server reported on connect, as a dict.
    fn model_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let i = self.inner.model_info();
        let d = PyDict::new(py);
        d.set_item("model_id", &i.model_id)?;
        d.set_item("architecture", &i.architecture)?;
        d.set_item("vocab_size", i.vocab_size)?;
        d.set_item("max_sequence_length", i.max_sequence_length)?;
        d.set_item("dtype", &i.dtype)?;
        d.set_item("device", &i.device)?;
        d.set_item("tokenizer_sha256", &i.tokenizer_sha256)?;
        d.set_item("default_num_samples", i.default_num_samples)?;
        d.set_item("max_num_samples", i.max_num_samples)?;
        d.set_item("max_candidates", i.max_candidates)?;
        Ok(d)
    }

    /// Targets of the sequences `flat` split by `lengths`: the columns tuple
    /// of `logitd.Targets`. `candidate_offsets`/`candidate_ids`: candidate ids
    /// CSR over every returned position of the batch (see `split_candidates`).
    #[pyo3(signature = (flat, lengths, first_positions, *, num_samples, temperature, seed, method, value_encoding, token_logprobs = false, candidate_offsets = None, candidate_ids = None))]
    #[allow(clippy::too_many_arguments)]
    fn sample<'py>(
        &self,
        py: Python<'py>,
        flat: PyReadonlyArray1<'py, u32>,
        lengths: PyReadonlyArray1<'py, i64>,
        first_positions: PyReadonlyArray1<'py, i64>,
        num_samples: u32,
        temperature: Option<f32>,
        seed: u64,
        method: &str,
        value_encoding: &str,
        token_logprobs: bool,
        candidate_offsets: Option<PyReadonlyArray1<'py, i64>>,
        candidate_ids: Option<PyReadonlyArray1<'py, u32>>,
    ) -> PyResult<Bound<'py, pyo3::types::PyTuple>> {
        let options = sample_options(
            py,
            num_samples,
            temperature,
            seed,
            method,
            value_encoding,
            token_logprobs,
        )?;
        let lengths = contiguous(py, &lengths, "lengths")?.to_vec();
        let sequences = split_sequences(py, contiguous(py, &flat, "token ids")?, &lengths)?;
        let first =
            self::first_positions(py, contiguous(py, &first_positions, "first_positions")?)?;
        if first.len() != sequences.len() {
            return Err(errors::invalid_argument(
                py,
                format!("{} first positions for {} sequences", first.len(), sequences.len()),
            ));
        }
        let candidates = match (&candidate_offsets, &candidate_ids) {
            (Some(o), Some(i)) => {
                let info = self.inner.model_info();
                Some(split_candidates(
                    py,
                    contiguous(py, o, "candidate_offsets")?,
                    contiguous(py, i, "candidate_ids")?,
                    &sequences,
                    &first,
                    info.vocab_size,
                    info.max_candidates,
                )?)
            }
            (None, None) => None,
            _ => {
                return Err(errors::invalid_argument(
                    py,
                    "candidate_offsets and candidate_ids go together".into(),
                ));
            }
        };
        let client = &self.inner;
        let call = client.sample_targets_with_candidates(
            &sequences,
            Some(&first),
            candidates.as_deref(),
            options,
        );
        let targets = wait(py, call)?.map_err(|e| errors::client_error(py, e))?;
        // Decoding into the columns needs no GIL.
        let columns = py.detach(|| Columns::new(&targets, Some(lengths)));
        columns.into_py(py)
    }
}

/// A sequence's seed from the batch seed and its index (what the client and
/// `logitd-client dump` send).
#[pyfunction]
pub fn sequence_seed(batch_seed: u64, index: u64) -> u64 {
    logitd_client::sequence_seed(batch_seed, index)
}
