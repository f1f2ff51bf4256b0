//! The exact method's entry points (forward, backward, decode) on canonical arrays.

use super::args::{arr4, dtype_of, position, Spec};
use super::runtime::run;
use crate::arch::Real;
use crate::exact::backward::BackwardInputs;
use crate::plan::cost;
use numpy::{Element, IntoPyArray, PyReadonlyArray3};
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

fn forward_typed<'py, T: Real + Element>(
    py: Python<'py>,
    [q, k, v]: [&Bound<'py, PyAny>; 3],
    sp: &Spec<'py>,
    threads: Option<usize>,
    [check_q, check_kv]: [bool; 2],
    memory_limit: Option<usize>,
) -> PyResult<Bound<'py, PyTuple>> {
    if let Some(limit) = memory_limit {
        let ws = cost_of(sp, std::mem::size_of::<T>(), false)?.working_bytes;
        if let Some(msg) = cost::exact_memory_refusal(&sp.prob, ws, limit) {
            return Err(PyMemoryError::new_err(msg));
        }
    }
    let (q, k, v) = (arr4::<T>(q, "q")?, arr4::<T>(k, "k")?, arr4::<T>(v, "v")?);
    let (values, bias_arr) = sp.tables::<T>()?;
    let pos = position(sp, values.as_ref())?;
    let bias = sp.bias_of(bias_arr.as_ref());
    let (qv, kv, vv) = (q.as_array(), k.as_array(), v.as_array());
    if check_q {
        crate::exact::check_rows_of("q", &qv, 0, qv.dim().2, true)
            .map_err(|e| super::runtime::to_pyerr(py, e))?;
    }
    let prob = &sp.prob;
    let flops = cost::exact_flops_bound(prob, false);
    let serial = crate::exact::forward::runs_serial(prob, &pos, flops);
    let (out, lse) = run(py, threads, flops, serial, |ctl| {
        crate::exact::attention_forward_checked(
            prob,
            &pos,
            bias.as_ref(),
            qv,
            kv,
            vv,
            ctl,
            check_kv,
        )
    })?;
    PyTuple::new(
        py,
        [
            out.into_pyarray(py).into_any(),
            lse.into_pyarray(py).into_any(),
        ],
    )
}

fn backward_typed<'py, T: Real + Element>(
    py: Python<'py>,
    arrays: [&Bound<'py, PyAny>; 6],
    want: (bool, bool),
    sp: &Spec<'py>,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyTuple>> {
    let [q, k, v, out, lse, dout] = arrays;
    let (q, k, v) = (arr4::<T>(q, "q")?, arr4::<T>(k, "k")?, arr4::<T>(v, "v")?);
    let (out, dout) = (arr4::<T>(out, "out")?, arr4::<T>(dout, "dout")?);
    let lse: PyReadonlyArray3<'py, T> = lse
        .extract()
        .map_err(|_| PyTypeError::new_err("lse: expected a 3-d array of the dtype of q"))?;
    let (values, bias_arr) = sp.tables::<T>()?;
    let pos = position(sp, values.as_ref())?;
    let bias = sp.bias_of(bias_arr.as_ref());
    let nthreads = threads.unwrap_or_else(rayon::current_num_threads);
    let inp = BackwardInputs {
        out: out.as_array(),
        lse: lse.as_array(),
        dout: dout.as_array(),
        want_dw: want.0,
        want_dbias: want.1,
        threads: nthreads,
    };
    let (qv, kv, vv) = (q.as_array(), k.as_array(), v.as_array());
    let prob = &sp.prob;
    let g = run(
        py,
        threads,
        cost::exact_flops_bound(prob, true),
        false,
        |ctl| crate::exact::attention_backward(prob, &pos, bias.as_ref(), qv, kv, vv, &inp, ctl),
    )?;
    let none = || py.None().into_bound(py);
    PyTuple::new(
        py,
        [
            g.dq.into_pyarray(py).into_any(),
            g.dk.into_pyarray(py).into_any(),
            g.dv.into_pyarray(py).into_any(),
            g.dw.map_or_else(none, |x| x.into_pyarray(py).into_any()),
            g.dbias.map_or_else(none, |x| x.into_pyarray(py).into_any()),
        ],
    )
}

/// Exact forward on canonical arrays; returns `(out, lse)`. `**call`: the call description
/// ([`Spec`]). With `memory_limit`, a working set above it raises `MemoryError` before anything
/// is allocated. `check_q` scans `q` for NaN/Inf (the plain-call path of `attention`, which
/// skips the Python scan); `check_kv` scans the rows of `k` and `v` some query sees.
#[pyfunction]
#[pyo3(signature = (q, k, v, *, num_threads, check_kv=false, check_q=false, memory_limit=None, **call))]
#[allow(clippy::too_many_arguments)]
pub(super) fn exact_forward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    num_threads: Option<usize>,
    check_kv: bool,
    check_q: bool,
    memory_limit: Option<usize>,
    call: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let sp = Spec::from_kwargs(call)?;
    dispatch!(
        q,
        forward_typed,
        py,
        [q, k, v],
        &sp,
        num_threads,
        [check_q, check_kv],
        memory_limit
    )
}

/// `bytes` as messages write them (`"512 bytes"`, `"3.0 MiB"`, `"2.10 GiB"`).
#[pyfunction]
pub(super) fn format_bytes(bytes: usize) -> String {
    cost::format_bytes(bytes)
}

/// Exact backward on canonical arrays; returns `(dq, dk, dv, dw, dbias)`.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, dout, *, want_dw, want_dbias, num_threads, **call))]
#[allow(clippy::too_many_arguments)]
pub(super) fn exact_backward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    lse: &Bound<'py, PyAny>,
    dout: &Bound<'py, PyAny>,
    want_dw: bool,
    want_dbias: bool,
    num_threads: Option<usize>,
    call: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let sp = Spec::from_kwargs(call)?;
    let arrays = [q, k, v, out, lse, dout];
    dispatch!(
        q,
        backward_typed,
        py,
        arrays,
        (want_dw, want_dbias),
        &sp,
        num_threads
    )
}

/// The exact method's predicted `(flops, seconds, working_bytes)` for a call with inputs of
/// `dtype` (`"float32"` or `"float64"`), from the call description alone.
#[pyfunction]
#[pyo3(signature = (*, dtype, backward, **call))]
pub(super) fn exact_cost(
    dtype: &str,
    backward: bool,
    call: Option<&Bound<'_, PyDict>>,
) -> PyResult<(f64, f64, usize)> {
    let sp = Spec::from_kwargs(call)?;
    let item = match dtype {
        "float32" => 4,
        "float64" => 8,
        other => {
            return Err(PyValueError::new_err(format!(
                "dtype: expected 'float32' or 'float64', got {other:?}"
            )))
        }
    };
    let c = cost_of(&sp, item, backward)?;
    Ok((c.flops, c.seconds, c.working_bytes))
}

/// The exact method's cost model ([`cost::exact`]) for the call `sp` with elements of `item`
/// bytes.
fn cost_of(sp: &Spec<'_>, item: usize, backward: bool) -> PyResult<cost::Cost> {
    let support = match sp.rotary {
        Some(_) => None,
        None => {
            let mut tables = sp.w_index.clone();
            tables.sort_unstable();
            tables.dedup();
            Some((sp.support.len(), tables.len()))
        }
    };
    let bias_tables = match &sp.bias {
        Some(b) => b.getattr("shape")?.get_item(0)?.extract()?,
        None => 0,
    };
    let values = match &sp.values {
        Some(x) => x.getattr("size")?.extract()?,
        None => 0,
    };
    Ok(cost::exact(
        &sp.prob,
        &cost::ExactCall {
            support,
            item,
            bias_tables,
            values,
        },
        backward,
    ))
}
