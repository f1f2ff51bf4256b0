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

/// `x` `(m, n, d)` with row `i`'s pairs rotated by the tables `c`, `s` `(n, d/2)`:
/// `x_p' = x_p c - x_r s`, `x_r' = x_p s + x_r c` on the pairs `(2j, 2j+1)` or, with `half`,
/// `(j, j + d/2)`: the arithmetic of the NumPy `_rotate_rows`, operation for operation (so the
/// same bits), without its per-operation overhead on a decode step's single row.
fn rotate_rows_typed<'py, T: crate::arch::Real + numpy::Element>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    c: &Bound<'py, PyAny>,
    s: &Bound<'py, PyAny>,
    half: bool,
) -> PyResult<Bound<'py, PyAny>> {
    use numpy::{IntoPyArray, PyReadonlyArray2, PyReadonlyArray3};
    let bad = |what: &str| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "{what}: expected a float array of x's dtype"
        ))
    };
    let x: PyReadonlyArray3<'py, T> = x.extract().map_err(|_| bad("x"))?;
    let c: PyReadonlyArray2<'py, T> = c.extract().map_err(|_| bad("c"))?;
    let s: PyReadonlyArray2<'py, T> = s.extract().map_err(|_| bad("s"))?;
    let (xv, cv, sv) = (x.as_array(), c.as_array(), s.as_array());
    let (m, n, d) = xv.dim();
    let h = d / 2;
    if d % 2 != 0 || cv.dim() != (n, h) || sv.dim() != (n, h) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "rotate_rows: expected x (m, n, d) with d even and tables (n, d/2), got x {:?}, c {:?}, s {:?}",
            xv.dim(),
            cv.dim(),
            sv.dim()
        )));
    }
    let rotate = || {
        let mut out = ndarray::Array3::<T>::zeros((m, n, d));
        for (xb, mut ob) in xv.outer_iter().zip(out.outer_iter_mut()) {
            for (i, (xr, mut or)) in xb.outer_iter().zip(ob.outer_iter_mut()).enumerate() {
                for j in 0..h {
                    let (p, r) = if half { (j, j + h) } else { (2 * j, 2 * j + 1) };
                    let (xp, xq, cc, ss) = (xr[p], xr[r], cv[[i, j]], sv[[i, j]]);
                    or[p] = xp * cc - xq * ss;
                    or[r] = xp * ss + xq * cc;
                }
            }
        }
        out
    };
    // A large x (a whole cache) is rotated without the GIL, as NumPy's operations were.
    let out = if xv.len() >= 1 << 16 {
        py.detach(rotate)
    } else {
        rotate()
    };
    Ok(out.into_pyarray(py).into_any())
}

/// [`rotate_rows_typed`] for a float32 or float64 `x`.
#[pyfunction]
fn rotate_rows<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    c: &Bound<'py, PyAny>,
    s: &Bound<'py, PyAny>,
    half: bool,
) -> PyResult<Bound<'py, PyAny>> {
    if x.cast::<numpy::PyArray3<f32>>().is_ok() {
        rotate_rows_typed::<f32>(py, x, c, s, half)
    } else {
        rotate_rows_typed::<f64>(py, x, c, s, half)
    }
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
    m.add_function(wrap_pyfunction!(rotate_rows, m)?)?;
    m.add_class::<fast::PlannedCall>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
