//! The only code that knows about Python: NumPy views in, the GIL released while the core runs,
//! owned arrays out.
//!
//! The Python package (`python/fastrope/_api.py`) validates and normalises arguments; these
//! functions take canonical shapes: q `(B, Hq, n_q, d)`, k `(B, Hk, n_k, d)`,
//! v `(B, Hk, n_k, d_v)`, position tables `(tables, 2L-1, |S|)`, bias `(tables, 2L_b-1)`.
//!
//! * [`runtime`]: pools, Ctrl-C polling, panic capture, the error mapping;
//! * [`args`]: the call description ([`args::Spec`]) and array extraction;
//! * [`exact`], [`fast`]: the entry points of each method.

/// Calls `$body::<f32>` or `$body::<f64>` by the dtype of `$q`.
macro_rules! dispatch {
    ($q:expr, $body:ident, $($args:expr),*) => {
        match dtype_of($q)? {
            "float32" => $body::<f32>($($args),*),
            _ => $body::<f64>($($args),*),
        }
    };
}

mod args;
mod exact;
mod fast;
mod runtime;

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Empties the kernel-spectra cache of the fast method and resets its counters.
#[pyfunction]
fn clear_cache() {
    crate::fast::cache::global().clear();
}

/// The kernel-spectra cache's state: `hits`, `misses`, `evictions`, `entries`, `bytes`, `limit`.
#[pyfunction]
fn cache_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let i = crate::fast::cache::global().info();
    let d = PyDict::new(py);
    d.set_item("hits", i.hits)?;
    d.set_item("misses", i.misses)?;
    d.set_item("evictions", i.evictions)?;
    d.set_item("entries", i.entries)?;
    d.set_item("bytes", i.bytes)?;
    d.set_item("limit", i.limit)?;
    Ok(d)
}

/// Sets the kernel-spectra cache's byte limit (0 disables and empties it), evicting down to it.
#[pyfunction]
fn set_cache_limit(limit: usize) {
    crate::fast::cache::global().set_limit(limit);
}

/// Test hook: the `nth` next fallible allocation of the fast method fails (0 disarms).
#[pyfunction]
fn _inject_alloc_failure(nth: usize) {
    crate::fast::toeplitz::blocks::inject_alloc_failure(nth);
}

/// How many fast plans (forward or backward) this process has made (a test counter: a call
/// plans once).
#[pyfunction]
fn planner_calls() -> u64 {
    crate::plan::planner_calls()
}

/// Turns the phase timers on or off (`on=None`: leaves them) and returns the totals since the
/// last call, in seconds of thread time per phase, resetting them (`crate::profile`).
#[pyfunction]
#[pyo3(signature = (on=None))]
fn profile_phases(py: Python<'_>, on: Option<bool>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (name, t) in crate::profile::take() {
        d.set_item(name, t)?;
    }
    if let Some(on) = on {
        crate::profile::set(on);
    }
    Ok(d)
}

/// Threads rayon's global pool runs (what `num_threads=None` uses).
#[pyfunction]
fn default_num_threads() -> usize {
    rayon::current_num_threads()
}

#[pymodule]
fn _fastrope(m: &Bound<'_, PyModule>) -> PyResult<()> {
    crate::fork::install();
    m.add_function(wrap_pyfunction!(exact::exact_forward, m)?)?;
    m.add_function(wrap_pyfunction!(exact::exact_backward, m)?)?;
    m.add_function(wrap_pyfunction!(exact::exact_cost, m)?)?;
    m.add_function(wrap_pyfunction!(exact::format_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(fast::fast_forward, m)?)?;
    m.add_function(wrap_pyfunction!(fast::choose_method, m)?)?;
    m.add_function(wrap_pyfunction!(fast::fast_backward, m)?)?;
    m.add_function(wrap_pyfunction!(default_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(clear_cache, m)?)?;
    m.add_function(wrap_pyfunction!(cache_info, m)?)?;
    m.add_function(wrap_pyfunction!(set_cache_limit, m)?)?;
    m.add_function(wrap_pyfunction!(_inject_alloc_failure, m)?)?;
    m.add_function(wrap_pyfunction!(planner_calls, m)?)?;
    m.add_function(wrap_pyfunction!(profile_phases, m)?)?;
    m.add_class::<fast::PlannedCall>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
