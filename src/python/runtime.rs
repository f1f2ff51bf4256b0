//! The runtime of a native call: the thread pool (`num_threads=`), the GIL released while the
//! core runs with Ctrl-C polling, a panic turned into a `RuntimeError`, and every [`Error`]
//! mapped to a Python exception in one place.

use crate::error::Error;
use crate::problem::Control;
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

pub(super) fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
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
pub(super) const POLL_ABOVE_FLOPS: f64 = 2e8;

/// Runs `f` without the GIL on a worker thread, polling for Python signals (Ctrl-C) every 50 ms:
/// on a pending signal the kernels are told to stop at their next tile and the signal's
/// exception is raised. A panic becomes a `RuntimeError`, never an abort of the interpreter.
/// `flops` estimates the work: short calls (below [`POLL_ABOVE_FLOPS`]) run on the calling
/// thread with no polling (a Ctrl-C is then seen right after them). A `serial` call (a small
/// decode step, [`crate::exact::decode`]) does not use the pool either: its kernels iterate.
pub(super) fn run<R: Send>(
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
