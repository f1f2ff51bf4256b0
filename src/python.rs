//! The only code that knows about Python: NumPy views in, the GIL released while the core runs,
//! owned arrays out, and every `Error` mapped to a Python exception in one place.
//!
//! The Python package (`python/fastrope/_api.py`) validates and normalises arguments; these
//! functions take canonical shapes: q `(B, Hq, n_q, d)`, k `(B, Hk, n_k, d)`,
//! v `(B, Hk, n_k, d_v)`, position tables `(tables, 2L-1, |S|)`, bias `(tables, 2L_b-1)`.

use crate::arch::Real;
use crate::dispatch::{plan_fast, plan_fast_from, run_fast, BoundsFrom, FastCall};
use crate::dispatch_backward::{plan_fast_backward, run_fast_backward, FastBackwardCall};
use crate::error::Error;
use crate::exact::backward::BackwardInputs;
use crate::fast::FastLimits;
use crate::poly::PolyKind;
use crate::position::{Bias, Position, RotaryW, SparseW};
use crate::problem::{Control, Problem};
use numpy::{
    Element, IntoPyArray, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyReadonlyArray4,
};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    match e {
        Error::Value(m) => PyValueError::new_err(m),
        Error::Memory(m) => PyMemoryError::new_err(m),
        Error::Approximation(m) => match py
            .import("fastrope._types")
            .and_then(|m| m.getattr("ApproximationError"))
        {
            Ok(cls) => PyErr::from_type(
                cls.cast_into()
                    .map_err(PyErr::from)
                    .unwrap_or_else(|_| py.get_type::<PyValueError>()),
                m,
            ),
            Err(_) => PyValueError::new_err(m),
        },
        Error::Cancelled => match py.check_signals() {
            Err(e) => e,
            Ok(()) => {
                pyo3::exceptions::PyKeyboardInterrupt::new_err("fastrope: computation cancelled")
            }
        },
    }
}

/// Thread pools by size, for `num_threads=`; `None` uses rayon's global pool (which honours
/// `RAYON_NUM_THREADS`), except in a forked child, where that pool has no threads: a pool of
/// the same size started in the child instead ([`crate::fork`]).
fn pool(n: Option<usize>) -> PyResult<Option<Arc<rayon::ThreadPool>>> {
    let n = match n {
        None if crate::fork::forked() => rayon::current_num_threads(),
        None => return Ok(None),
        Some(n) => {
            // `available_parallelism` reads the cgroup files on Linux (~30 us): once per process.
            static CORES: OnceLock<usize> = OnceLock::new();
            let cores =
                *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |c| c.get()));
            let limit = (4 * cores).max(64);
            if n == 0 || n > limit {
                return Err(PyValueError::new_err(format!(
                    "num_threads: expected an int in [1, {limit}], got {n}"
                )));
            }
            n
        }
    };
    crate::fork::pool(n)
        .map(Some)
        .map_err(|e| PyRuntimeError::new_err(format!("num_threads: cannot start {n} threads: {e}")))
}

/// Calls estimated below this many flops (about 2 ms on one core) run on the calling thread,
/// without the signal-polling thread: its spawn and the two wake-ups it adds cost ~0.1 ms per
/// call, a quarter of a small call's time (n = 64, 8 heads).
const POLL_ABOVE_FLOPS: f64 = 2e8;

/// Runs `f` without the GIL on a worker thread, polling for Python signals (Ctrl-C) every 50 ms:
/// on a pending signal the kernels are told to stop at their next tile and the signal's
/// exception is raised. A panic becomes a `RuntimeError`, never an abort of the interpreter.
/// `flops` estimates the work: short calls (below [`POLL_ABOVE_FLOPS`]) run on the calling
/// thread with no polling (a Ctrl-C is then seen right after them). A `serial` call (a small
/// decode step, [`crate::exact::decode`]) does not use the pool either: its kernels iterate.
fn run<R: Send>(
    py: Python<'_>,
    threads: Option<usize>,
    flops: f64,
    serial: bool,
    f: impl FnOnce(&Control) -> crate::Result<R> + Send,
) -> PyResult<R> {
    let pool = pool(threads)?;
    let ctl = if serial {
        Control::serial()
    } else {
        Control::new()
    };
    // `f` on the pool (or on this thread), a panic caught. A serial call stays on this thread
    // whatever the pool: handing it to a pool and back costs two thread wake-ups, 70-100 us on
    // this VM, more than a small decode step takes.
    let work = |ctl: &Control| {
        std::panic::catch_unwind(AssertUnwindSafe(|| match pool.as_deref() {
            Some(p) if !serial => p.install(|| f(ctl)),
            _ => f(ctl),
        }))
    };
    let mut interrupt: Option<PyErr> = None;
    let res = if flops < POLL_ABOVE_FLOPS {
        py.detach(|| work(&ctl))
    } else {
        py.detach(|| {
            std::thread::scope(|scope| {
                let (tx, rx) = mpsc::channel::<()>();
                let ctl_ref = &ctl;
                let worker = scope.spawn(move || {
                    let r = work(ctl_ref);
                    let _ = tx.send(());
                    r
                });
                loop {
                    match rx.recv_timeout(Duration::from_millis(50)) {
                        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            if interrupt.is_none() {
                                if let Err(e) = Python::attach(|py| py.check_signals()) {
                                    interrupt = Some(e);
                                    ctl.cancel();
                                }
                            }
                        }
                    }
                }
                worker.join().and_then(|r| r)
            })
        })
    };
    if let Some(e) = interrupt {
        return Err(e);
    }
    match res {
        Ok(r) => r.map_err(|e| to_pyerr(py, e)),
        Err(_) => Err(PyRuntimeError::new_err(
            "fastrope: internal error (a Rust panic); please report it",
        )),
    }
}

/// Canonical call description shared by the entry points.
struct Spec {
    prob: Problem,
    rotary: Option<RotaryW>,
    support: Vec<(usize, usize)>,
    w_index: Vec<usize>,
    bias_index: Vec<usize>,
}

fn usize_vec(a: Option<PyReadonlyArray1<'_, i64>>, what: &str) -> PyResult<Vec<usize>> {
    match a {
        None => Ok(Vec::new()),
        Some(a) => a
            .as_array()
            .iter()
            .map(|&x| {
                usize::try_from(x)
                    .map_err(|_| PyValueError::new_err(format!("{what}: negative index {x}")))
            })
            .collect(),
    }
}

#[allow(clippy::too_many_arguments)]
fn spec(
    shape: (usize, usize, usize, usize, usize, usize, usize),
    scale: f64,
    causal: bool,
    window: Option<(i64, i64)>,
    q_offset: i64,
    k_offset: i64,
    rotary: Option<(PyReadonlyArray1<'_, f64>, f64, PyReadonlyArray2<'_, i64>)>,
    support: Option<PyReadonlyArray2<'_, i64>>,
    w_index: Option<PyReadonlyArray1<'_, i64>>,
    bias_index: Option<PyReadonlyArray1<'_, i64>>,
) -> PyResult<Spec> {
    let (batch, hq, hk, nq, nk, d, dv) = shape;
    let prob = Problem {
        batch,
        hq,
        hk,
        nq,
        nk,
        d,
        dv,
        scale,
        causal,
        window,
        q_offset,
        k_offset,
    };
    let rotary = match rotary {
        None => None,
        Some((theta, factor, pairs)) => {
            let pairs = pairs.as_array();
            if pairs.ncols() != 2 {
                return Err(PyValueError::new_err(
                    "w: rotary pairs must have shape (d/2, 2)",
                ));
            }
            let p: PyResult<Vec<(usize, usize)>> = pairs
                .outer_iter()
                .map(|r| {
                    Ok((
                        usize::try_from(r[0]).map_err(|_| PyValueError::new_err("w: bad pair"))?,
                        usize::try_from(r[1]).map_err(|_| PyValueError::new_err("w: bad pair"))?,
                    ))
                })
                .collect();
            Some(RotaryW {
                theta: theta.as_array().to_vec(),
                factor,
                pairs: p?,
            })
        }
    };
    let support = match support {
        None => Vec::new(),
        Some(s) => {
            let s = s.as_array();
            if s.ncols() != 2 {
                return Err(PyValueError::new_err(format!(
                    "w: support must have shape (|S|, 2), got {:?}",
                    s.dim()
                )));
            }
            s.outer_iter()
                .map(|r| match (usize::try_from(r[0]), usize::try_from(r[1])) {
                    (Ok(a), Ok(b)) => Ok((a, b)),
                    _ => Err(PyValueError::new_err(format!(
                        "w: support entries must be >= 0, got ({}, {})",
                        r[0], r[1]
                    ))),
                })
                .collect::<PyResult<_>>()?
        }
    };
    Ok(Spec {
        prob,
        rotary,
        support,
        w_index: usize_vec(w_index, "w")?,
        bias_index: usize_vec(bias_index, "bias")?,
    })
}

fn dtype_of(x: &Bound<'_, PyAny>) -> PyResult<&'static str> {
    if x.cast::<numpy::PyArray4<f32>>().is_ok() {
        Ok("float32")
    } else if x.cast::<numpy::PyArray4<f64>>().is_ok() {
        Ok("float64")
    } else {
        Err(PyTypeError::new_err(
            "q: expected a 4-d float32 or float64 array",
        ))
    }
}

fn arr4<'py, T: Element>(x: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArray4<'py, T>> {
    x.extract::<PyReadonlyArray4<'py, T>>().map_err(|_| {
        PyTypeError::new_err(format!("{name}: expected a 4-d array of the dtype of q"))
    })
}

fn position<'a, T: Real + Element>(
    sp: &Spec,
    values: Option<&'a PyReadonlyArray3<'_, T>>,
) -> PyResult<Position<'a, T>> {
    match (&sp.rotary, values) {
        (Some(r), _) => Ok(Position::Rotary(r.clone())),
        (None, Some(vals)) => Ok(Position::Sparse(SparseW {
            support: sp.support.clone(),
            values: vals.as_array(),
            index: sp.w_index.clone(),
        })),
        (None, None) => Err(PyValueError::new_err(
            "w: expected rotary parameters or a table of values",
        )),
    }
}

macro_rules! dispatch {
    ($q:expr, $body:ident, $($args:expr),*) => {
        match dtype_of($q)? {
            "float32" => $body::<f32>($($args),*),
            _ => $body::<f64>($($args),*),
        }
    };
}

#[allow(clippy::type_complexity)]
#[allow(clippy::too_many_arguments)]
fn forward_typed<'py, T: Real + Element>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    values: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    sp: &Spec,
    threads: Option<usize>,
    check_kv: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let (q, k, v) = (arr4::<T>(q, "q")?, arr4::<T>(k, "k")?, arr4::<T>(v, "v")?);
    let values: Option<PyReadonlyArray3<'py, T>> = values.map(|x| x.extract()).transpose()?;
    let bias_arr: Option<PyReadonlyArray2<'py, T>> = bias.map(|x| x.extract()).transpose()?;
    let pos = position(sp, values.as_ref())?;
    let bias = bias_arr.as_ref().map(|b| Bias {
        values: b.as_array(),
        index: sp.bias_index.clone(),
    });
    let (qv, kv, vv) = (q.as_array(), k.as_array(), v.as_array());
    let serial = crate::exact::decode::runs_serial(&sp.prob, &pos);
    let (out, lse) = run(py, threads, sp.prob.exact_flops(false), serial, |ctl| {
        crate::exact::attention_forward_checked(
            &sp.prob,
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

#[allow(clippy::type_complexity)]
fn backward_typed<'py, T: Real + Element>(
    py: Python<'py>,
    arrays: [&Bound<'py, PyAny>; 6],
    values: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    want: (bool, bool),
    sp: &Spec,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyTuple>> {
    let [q, k, v, out, lse, dout] = arrays;
    let (q, k, v) = (arr4::<T>(q, "q")?, arr4::<T>(k, "k")?, arr4::<T>(v, "v")?);
    let (out, dout) = (arr4::<T>(out, "out")?, arr4::<T>(dout, "dout")?);
    let lse: PyReadonlyArray3<'py, T> = lse
        .extract()
        .map_err(|_| PyTypeError::new_err("lse: expected a 3-d array of the dtype of q"))?;
    let values: Option<PyReadonlyArray3<'py, T>> = values.map(|x| x.extract()).transpose()?;
    let bias_arr: Option<PyReadonlyArray2<'py, T>> = bias.map(|x| x.extract()).transpose()?;
    let pos = position(sp, values.as_ref())?;
    let bias = bias_arr.as_ref().map(|b| Bias {
        values: b.as_array(),
        index: sp.bias_index.clone(),
    });
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
    let g = run(py, threads, sp.prob.exact_flops(true), false, |ctl| {
        crate::exact::attention_backward(&sp.prob, &pos, bias.as_ref(), qv, kv, vv, &inp, ctl)
    })?;
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

/// Exact forward on canonical arrays; returns `(out, lse)`.
#[pyfunction]
#[pyo3(signature = (q, k, v, shape, scale, causal, window, q_offset, k_offset, rotary, support, values, w_index, bias, bias_index, num_threads, check_kv=false))]
#[allow(clippy::too_many_arguments)]
fn exact_forward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    shape: (usize, usize, usize, usize, usize, usize, usize),
    scale: f64,
    causal: bool,
    window: Option<(i64, i64)>,
    q_offset: i64,
    k_offset: i64,
    rotary: Option<(PyReadonlyArray1<'py, f64>, f64, PyReadonlyArray2<'py, i64>)>,
    support: Option<PyReadonlyArray2<'py, i64>>,
    values: Option<&Bound<'py, PyAny>>,
    w_index: Option<PyReadonlyArray1<'py, i64>>,
    bias: Option<&Bound<'py, PyAny>>,
    bias_index: Option<PyReadonlyArray1<'py, i64>>,
    num_threads: Option<usize>,
    check_kv: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let sp = spec(
        shape, scale, causal, window, q_offset, k_offset, rotary, support, w_index, bias_index,
    )?;
    dispatch!(
        q,
        forward_typed,
        py,
        q,
        k,
        v,
        values,
        bias,
        &sp,
        num_threads,
        check_kv
    )
}

/// Exact backward on canonical arrays; returns `(dq, dk, dv, dw, dbias)`.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, dout, shape, scale, causal, window, q_offset, k_offset, rotary, support, values, w_index, bias, bias_index, want_dw, want_dbias, num_threads))]
#[allow(clippy::too_many_arguments)]
fn exact_backward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    lse: &Bound<'py, PyAny>,
    dout: &Bound<'py, PyAny>,
    shape: (usize, usize, usize, usize, usize, usize, usize),
    scale: f64,
    causal: bool,
    window: Option<(i64, i64)>,
    q_offset: i64,
    k_offset: i64,
    rotary: Option<(PyReadonlyArray1<'py, f64>, f64, PyReadonlyArray2<'py, i64>)>,
    support: Option<PyReadonlyArray2<'py, i64>>,
    values: Option<&Bound<'py, PyAny>>,
    w_index: Option<PyReadonlyArray1<'py, i64>>,
    bias: Option<&Bound<'py, PyAny>>,
    bias_index: Option<PyReadonlyArray1<'py, i64>>,
    want_dw: bool,
    want_dbias: bool,
    num_threads: Option<usize>,
) -> PyResult<Bound<'py, PyTuple>> {
    let sp = spec(
        shape, scale, causal, window, q_offset, k_offset, rotary, support, w_index, bias_index,
    )?;
    dispatch!(
        q,
        backward_typed,
        py,
        [q, k, v, out, lse, dout],
        values,
        bias,
        (want_dw, want_dbias),
        &sp,
        num_threads
    )
}

fn limits(max_terms: usize, max_degree: usize, memory_limit: usize, threads: usize) -> FastLimits {
    FastLimits {
        max_degree,
        max_terms,
        // One head's working set per thread, within the call's memory limit.
        max_working_bytes: (memory_limit / threads.max(1)).max(1 << 20),
    }
}

fn plan_dict<'py>(py: Python<'py>, call: &FastCall) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let Some(p) = call.representative() else {
        return Err(PyValueError::new_err("fast plan: no heads"));
    };
    d.set_item("degree", p.poly.degree)?;
    d.set_item(
        "path",
        if p.lowrank.is_some() {
            "lowrank"
        } else {
            "toeplitz"
        },
    )?;
    d.set_item(
        "poly_kind",
        match p.poly.kind {
            PolyKind::Taylor => "taylor",
            PolyKind::Chebyshev => "chebyshev",
        },
    )?;
    let r = call
        .groups
        .iter()
        .map(|g| g.plan.bounds.r)
        .fold(0.0, f64::max);
    d.set_item("bound_r", r)?;
    d.set_item("rho", p.poly.rho)?;
    d.set_item("terms", p.counts.terms)?;
    d.set_item("n_alpha", p.counts.n_alpha)?;
    d.set_item("n_beta", p.counts.n_beta)?;
    d.set_item("n_pairs", p.counts.n_pairs)?;
    d.set_item("fft_len", p.fft_len)?;
    d.set_item("column_tile", p.column_tile)?;
    d.set_item("groups", call.groups.len())?;
    d.set_item("support_size", call.support.len())?;
    d.set_item("flops", call.flops)?;
    d.set_item("working_bytes", call.working_bytes)?;
    d.set_item("certified_error", call.certified_error)?;
    d.set_item("certified_lse_error", call.certified_lse_error)?;
    d.set_item(
        "approximation_error",
        call.groups
            .iter()
            .map(|g| g.plan.approximation_error)
            .fold(0.0, f64::max),
    )?;
    d.set_item(
        "rounding_error",
        call.groups
            .iter()
            .map(|g| g.plan.rounding_error)
            .fold(0.0, f64::max),
    )?;
    Ok(d)
}

#[allow(clippy::too_many_arguments)]
fn fast_typed<'py, T: Real + Element>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    values: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    sp: &Spec,
    eps: f64,
    lim: (usize, usize, usize),
    run_it: bool,
    given: Option<(f64, f64)>,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyTuple>> {
    let (q, k, v) = (arr4::<T>(q, "q")?, arr4::<T>(k, "k")?, arr4::<T>(v, "v")?);
    let values: Option<PyReadonlyArray3<'py, T>> = values.map(|x| x.extract()).transpose()?;
    let bias_arr: Option<PyReadonlyArray2<'py, T>> = bias.map(|x| x.extract()).transpose()?;
    let pos = position(sp, values.as_ref())?;
    let bias = bias_arr.as_ref().map(|b| Bias {
        values: b.as_array(),
        index: sp.bias_index.clone(),
    });
    let (qv, kv, vv) = (q.as_array(), k.as_array(), v.as_array());
    let nthreads = threads.unwrap_or_else(rayon::current_num_threads);
    let limits = limits(lim.0, lim.1, lim.2, nthreads);
    let (call, res) = run(py, threads, f64::INFINITY, false, |ctl| {
        let call = match given {
            Some((r, v_max)) => {
                let from = BoundsFrom::Given { r, v_max };
                plan_fast_from(&sp.prob, &pos, bias.as_ref(), from, eps, &limits, nthreads)?
            }
            None => plan_fast(
                &sp.prob,
                &pos,
                bias.as_ref(),
                qv.view(),
                kv.view(),
                vv.view(),
                eps,
                &limits,
                nthreads,
            )?,
        };
        if !run_it || given.is_some() {
            return Ok((call, None));
        }
        let r = run_fast(
            &call,
            &sp.prob,
            &pos,
            bias.as_ref(),
            qv,
            kv,
            vv,
            &limits,
            ctl,
        )?;
        Ok((call, Some(r)))
    })?;
    let info = plan_dict(py, &call)?.into_any();
    match res {
        None => PyTuple::new(
            py,
            [py.None().into_bound(py), py.None().into_bound(py), info],
        ),
        Some((out, lse)) => PyTuple::new(
            py,
            [
                out.into_pyarray(py).into_any(),
                lse.into_pyarray(py).into_any(),
                info,
            ],
        ),
    }
}

/// The fast method on canonical arrays: `(out, lse, plan)`, or `(None, None, plan)` with
/// `run=False`. Raises `ApproximationError` when `eps` cannot be certified.
#[pyfunction]
#[pyo3(signature = (q, k, v, shape, scale, causal, window, q_offset, k_offset, rotary, support, values, w_index, bias, bias_index, eps, max_terms, max_degree, memory_limit, run, num_threads, bounds=None))]
#[allow(clippy::too_many_arguments)]
fn fast_forward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    shape: (usize, usize, usize, usize, usize, usize, usize),
    scale: f64,
    causal: bool,
    window: Option<(i64, i64)>,
    q_offset: i64,
    k_offset: i64,
    rotary: Option<(PyReadonlyArray1<'py, f64>, f64, PyReadonlyArray2<'py, i64>)>,
    support: Option<PyReadonlyArray2<'py, i64>>,
    values: Option<&Bound<'py, PyAny>>,
    w_index: Option<PyReadonlyArray1<'py, i64>>,
    bias: Option<&Bound<'py, PyAny>>,
    bias_index: Option<PyReadonlyArray1<'py, i64>>,
    eps: f64,
    max_terms: usize,
    max_degree: usize,
    memory_limit: usize,
    run: bool,
    num_threads: Option<usize>,
    bounds: Option<(f64, f64)>,
) -> PyResult<Bound<'py, PyTuple>> {
    let sp = spec(
        shape, scale, causal, window, q_offset, k_offset, rotary, support, w_index, bias_index,
    )?;
    let lim = (max_terms, max_degree, memory_limit);
    dispatch!(
        q,
        fast_typed,
        py,
        q,
        k,
        v,
        values,
        bias,
        &sp,
        eps,
        lim,
        run,
        bounds,
        num_threads
    )
}

fn grad_dict<'py>(py: Python<'py>, g: &crate::fast::Grad5) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, x) in crate::fast::grad::GRAD_NAMES.iter().zip(g.to_array()) {
        d.set_item(*name, x)?;
    }
    Ok(d)
}

fn backward_plan_dict<'py>(
    py: Python<'py>,
    call: &FastBackwardCall,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let Some(p) = call.representative() else {
        return Err(PyValueError::new_err("fast backward plan: no heads"));
    };
    d.set_item("degree", p.poly.degree)?;
    d.set_item(
        "poly_kind",
        match p.poly.kind {
            PolyKind::Taylor => "taylor",
            PolyKind::Chebyshev => "chebyshev",
        },
    )?;
    d.set_item("poly_family", p.family)?;
    let lowrank = call.groups.iter().all(|g| g.plan.lowrank.is_some());
    d.set_item("path", if lowrank { "lowrank" } else { "toeplitz" })?;
    let r = call
        .groups
        .iter()
        .map(|g| g.plan.bounds.r)
        .fold(0.0, f64::max);
    d.set_item("bound_r", r)?;
    d.set_item("rho", p.poly.rho)?;
    d.set_item("rho_derivative", p.rho_d)?;
    d.set_item("terms", p.counts.terms)?;
    d.set_item("n_alpha", p.counts.n_alpha)?;
    d.set_item("n_beta", p.counts.n_beta)?;
    d.set_item("n_pairs", p.counts.n_pairs)?;
    d.set_item("fft_len", p.fft_len)?;
    d.set_item("column_tile", p.column_tile)?;
    d.set_item("groups", call.groups.len())?;
    d.set_item("support_size", call.support.len())?;
    d.set_item("flops", call.flops)?;
    d.set_item("working_bytes", call.working_bytes)?;
    d.set_item("deferred", call.deferred)?;
    d.set_item("want_dw", call.want.dw)?;
    d.set_item("want_dbias", call.want.db)?;
    d.set_item("certified", grad_dict(py, &call.certified)?)?;
    d.set_item("approximation", grad_dict(py, &call.approximation)?)?;
    d.set_item("rounding", grad_dict(py, &call.rounding)?)?;
    d.set_item("multiplicity", grad_dict(py, &call.multiplicity)?)?;
    let ce = call.certified.to_array().into_iter().fold(0.0, f64::max);
    d.set_item("certified_error", ce)?;
    Ok(d)
}

#[allow(clippy::too_many_arguments)]
fn fast_backward_typed<'py, T: Real + Element>(
    py: Python<'py>,
    arrays: [&Bound<'py, PyAny>; 3],
    dout: Option<&Bound<'py, PyAny>>,
    dlse: Option<&Bound<'py, PyAny>>,
    values: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    sp: &Spec,
    eps: f64,
    want: (bool, bool),
    lim: (usize, usize, usize),
    run_it: bool,
    threads: Option<usize>,
    poly: Option<crate::poly::Polynomial>,
    given: Option<(f64, f64)>,
) -> PyResult<Bound<'py, PyTuple>> {
    let [q, k, v] = arrays;
    let (q, k, v) = (arr4::<T>(q, "q")?, arr4::<T>(k, "k")?, arr4::<T>(v, "v")?);
    let dout = dout.map(|d| arr4::<T>(d, "dout")).transpose()?;
    let dlse: Option<PyReadonlyArray3<'py, T>> = dlse
        .map(|x| {
            x.extract()
                .map_err(|_| PyTypeError::new_err("dlse: expected a 3-d array of q's dtype"))
        })
        .transpose()?;
    let dlse_v = dlse.as_ref().map(|g| g.as_array());
    let values: Option<PyReadonlyArray3<'py, T>> = values.map(|x| x.extract()).transpose()?;
    let bias_arr: Option<PyReadonlyArray2<'py, T>> = bias.map(|x| x.extract()).transpose()?;
    let pos = position(sp, values.as_ref())?;
    let bias = bias_arr.as_ref().map(|b| Bias {
        values: b.as_array(),
        index: sp.bias_index.clone(),
    });
    let (qv, kv, vv) = (q.as_array(), k.as_array(), v.as_array());
    let dv = dout.as_ref().map(|d| d.as_array());
    let nthreads = threads.unwrap_or_else(rayon::current_num_threads);
    let limits = limits(lim.0, lim.1, lim.2, nthreads);
    let want = crate::fast::Want {
        dw: want.0,
        db: want.1,
    };
    if run_it && dv.is_none() {
        return Err(PyValueError::new_err(
            "dout: needed to run the fast backward",
        ));
    }
    let (call, res) = run(py, threads, f64::INFINITY, false, |ctl| {
        let call = plan_fast_backward(
            &sp.prob,
            &pos,
            bias.as_ref(),
            qv.view(),
            kv.view(),
            vv.view(),
            dv.as_ref().map(|d| d.view()),
            dlse_v.as_ref().map(|g| g.view()),
            given,
            eps,
            want,
            &limits,
            nthreads,
            poly.as_ref(),
        )?;
        if !run_it {
            return Ok((call, None));
        }
        let dv = dv
            .as_ref()
            .map(|d| d.view())
            .ok_or_else(|| Error::Value("dout: missing".into()))?;
        let r = run_fast_backward(
            &call,
            &sp.prob,
            &pos,
            bias.as_ref(),
            qv,
            kv,
            vv,
            dv,
            dlse_v.as_ref().map(|g| g.view()),
            &limits,
            ctl,
        )?;
        Ok((call, Some(r)))
    })?;
    let info = backward_plan_dict(py, &call)?;
    let none = || py.None().into_bound(py);
    match res {
        None => PyTuple::new(
            py,
            [
                none(),
                none(),
                none(),
                none(),
                none(),
                none(),
                none(),
                info.into_any(),
            ],
        ),
        Some((g, out, lse, cert)) => {
            info.set_item("certified_run", grad_dict(py, &cert)?)?;
            PyTuple::new(
                py,
                [
                    g.dq.into_pyarray(py).into_any(),
                    g.dk.into_pyarray(py).into_any(),
                    g.dv.into_pyarray(py).into_any(),
                    g.dw.map_or_else(none, |x| x.into_pyarray(py).into_any()),
                    g.dbias.map_or_else(none, |x| x.into_pyarray(py).into_any()),
                    out.into_pyarray(py).into_any(),
                    lse.into_pyarray(py).into_any(),
                    info.into_any(),
                ],
            )
        }
    }
}

/// The fast backward on canonical arrays: `(dq, dk, dv, dw, dbias, out, lse, plan)` — `out` and
/// `lse` of the approximate forward the gradients belong to — or `None`s and the plan with
/// `run=False` (then `dout` may be None: the plan assumes entries of `dout` at most 1).
/// `poly=(kind, degree, r)` forces a polynomial (a test hook); `bounds=(r, v_max)` plans from
/// those bounds instead of the data (`run=False` only). Raises `ApproximationError` when the
/// gradients cannot be certified to `eps`.
#[pyfunction]
#[pyo3(signature = (q, k, v, dout, shape, scale, causal, window, q_offset, k_offset, rotary, support, values, w_index, bias, bias_index, eps, want_dw, want_dbias, max_terms, max_degree, memory_limit, run, num_threads, poly=None, bounds=None, dlse=None))]
#[allow(clippy::too_many_arguments)]
fn fast_backward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    dout: Option<&Bound<'py, PyAny>>,
    shape: (usize, usize, usize, usize, usize, usize, usize),
    scale: f64,
    causal: bool,
    window: Option<(i64, i64)>,
    q_offset: i64,
    k_offset: i64,
    rotary: Option<(PyReadonlyArray1<'py, f64>, f64, PyReadonlyArray2<'py, i64>)>,
    support: Option<PyReadonlyArray2<'py, i64>>,
    values: Option<&Bound<'py, PyAny>>,
    w_index: Option<PyReadonlyArray1<'py, i64>>,
    bias: Option<&Bound<'py, PyAny>>,
    bias_index: Option<PyReadonlyArray1<'py, i64>>,
    eps: f64,
    want_dw: bool,
    want_dbias: bool,
    max_terms: usize,
    max_degree: usize,
    memory_limit: usize,
    run: bool,
    num_threads: Option<usize>,
    poly: Option<(String, usize, f64)>,
    bounds: Option<(f64, f64)>,
    dlse: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    if run && bounds.is_some() {
        return Err(PyValueError::new_err(
            "bounds: only for plans (run=False); a computation reads its bounds from the data",
        ));
    }
    let sp = spec(
        shape, scale, causal, window, q_offset, k_offset, rotary, support, w_index, bias_index,
    )?;
    let lim = (max_terms, max_degree, memory_limit);
    let poly = match poly {
        None => None,
        Some((kind, degree, r)) => Some(
            match kind.as_str() {
                "taylor" => crate::poly::taylor(r, degree),
                "chebyshev" => crate::poly::chebyshev(r, degree),
                other => {
                    return Err(PyValueError::new_err(format!(
                        "poly: expected kind 'taylor' or 'chebyshev', got {other:?}"
                    )))
                }
            }
            .map_err(|e| to_pyerr(py, e))?,
        ),
    };
    dispatch!(
        q,
        fast_backward_typed,
        py,
        [q, k, v],
        dout,
        dlse,
        values,
        bias,
        &sp,
        eps,
        (want_dw, want_dbias),
        lim,
        run,
        num_threads,
        poly,
        bounds
    )
}

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

/// Threads rayon's global pool runs (what `num_threads=None` uses).
#[pyfunction]
fn default_num_threads() -> usize {
    rayon::current_num_threads()
}

#[pymodule]
fn _fastrope(m: &Bound<'_, PyModule>) -> PyResult<()> {
    crate::fork::install();
    m.add_function(wrap_pyfunction!(exact_forward, m)?)?;
    m.add_function(wrap_pyfunction!(exact_backward, m)?)?;
    m.add_function(wrap_pyfunction!(fast_forward, m)?)?;
    m.add_function(wrap_pyfunction!(fast_backward, m)?)?;
    m.add_function(wrap_pyfunction!(default_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(clear_cache, m)?)?;
    m.add_function(wrap_pyfunction!(cache_info, m)?)?;
    m.add_function(wrap_pyfunction!(set_cache_limit, m)?)?;
    m.add_function(wrap_pyfunction!(_inject_alloc_failure, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
