//! `logitd._native`: the Rust client crate (`logitd-client`) as a Python
//! extension module. The Python package `logitd` (client/python/python/logitd)
//! wraps it; see its `__init__.py` for the public API.
//!
//! - The module owns one multi-threaded tokio runtime; every call that waits on
//!   the network releases the GIL and checks for signals every 50 ms, so
//!   Ctrl-C raises `KeyboardInterrupt` (the call is cancelled) and other Python
//!   threads keep running.
//! - Arrays cross the boundary as numpy arrays built from Rust vectors (no
//!   per-element Python objects).

use std::{future::Future, sync::OnceLock, time::Duration};

use pyo3::prelude::*;

mod bench;
mod client;
mod errors;
mod loss;
mod prefetch;
mod shards;
mod targets;

/// The package's runtime (started on first use).
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("logitd-client")
            .enable_all()
            .build()
            .expect("the logitd client runtime starts")
    })
}

/// How often a waiting call looks for signals (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// Runs `fut` to completion on the package runtime with the GIL released,
/// checking for signals in between: a pending `KeyboardInterrupt` (or any
/// exception a signal handler raises) cancels `fut` and is returned.
pub(crate) fn wait<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let rt = runtime();
    let mut fut = std::pin::pin!(fut);
    loop {
        let done = py.detach(|| {
            rt.block_on(async { tokio::time::timeout(SIGNAL_CHECK, fut.as_mut()).await.ok() })
        });
        match done {
            Some(out) => return Ok(out),
            None => py.check_signals()?,
        }
    }
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::Client>()?;
    m.add_class::<prefetch::NativePrefetcher>()?;
    m.add_class::<shards::ShardIter>()?;
    m.add_function(wrap_pyfunction!(loss::distill_loss_reference, m)?)?;
    m.add_function(wrap_pyfunction!(targets::pad, m)?)?;
    m.add_function(wrap_pyfunction!(client::sequence_seed, m)?)?;
    m.add_function(wrap_pyfunction!(bench::decode_response, m)?)?;
    m.add_function(wrap_pyfunction!(bench::rust_prefetch, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
