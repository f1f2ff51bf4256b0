//! The fast method's entry points on canonical arrays: plans (`run=False`), returned as a dict
//! with an opaque handle, and runs, which execute the handle's plan without planning again.

use super::args::{arr4, dtype_of, limits, position, Spec};
use super::runtime::{run, to_pyerr};
use crate::arch::Real;
use crate::error::Error;
use crate::exact::check_rows;
use crate::fast::toeplitz::backward_pair_chunk;
use crate::fast::GradContract;
use crate::plan::backward::{plan_fast_backward, FastBackwardCall};
use crate::plan::backward_run::run_fast_backward;
use crate::plan::cost::{self, FastOffer, MAX_DEGREE, MAX_TERMS};
use crate::plan::forward::{plan_fast, plan_fast_from, run_fast, BoundsFrom, FastCall};
use crate::plan::{Refusal, Route};
use crate::poly::PolyKind;
use numpy::{Element, IntoPyArray, PyReadonlyArray3};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

/// A fast plan made by `fast_forward`/`fast_backward` with `run=False`, opaque to Python. Passed
/// back as `plan=` to a run with the same arguments, it is executed as it is: a call plans once.
#[pyclass(frozen, module = "fastrope._fastrope")]
pub(super) struct PlannedCall {
    made: Made,
    /// What the plan was made for: the call description, eps, limits, route and the addresses and
    /// shapes of the arrays it read its bounds from.
    key: String,
}

enum Made {
    Forward(FastCall),
    Backward(FastBackwardCall),
}

#[pymethods]
impl PlannedCall {
    fn __repr__(&self) -> String {
        let what = match &self.made {
            Made::Forward(_) => "forward",
            Made::Backward(_) => "backward",
        };
        format!("<fastrope fast {what} plan>")
    }
}

/// The key of a plan: everything the planner read.
fn plan_key<T: Element>(
    sp: &Spec,
    eps: f64,
    lim: (usize, usize, usize),
    route: Route,
    threads: usize,
    arrays: &[Option<&Bound<'_, PyAny>>],
) -> String {
    let ids: Vec<(usize, String)> = arrays
        .iter()
        .map(|a| match a {
            None => (0, String::new()),
            Some(a) => {
                let addr = a.as_ptr() as usize;
                let shape = a
                    .getattr("shape")
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                (addr, shape)
            }
        })
        .collect();
    format!(
        "{:?} {:?} {:?} {:?} {:?} {} {:?} {:?} {:?}",
        sp.prob,
        sp.support,
        sp.w_index,
        sp.bias_index,
        sp.rotary.as_ref().map(|r| (&r.theta, r.factor, &r.pairs)),
        eps.to_bits(),
        (lim, threads),
        route,
        (std::any::type_name::<T>(), ids),
    )
}

/// The plan of `planned` to run (`None` without one): refused unless it was made with `key`, for
/// a run (`ok`), and of the kind `pick` takes.
fn reuse<T>(
    planned: Option<&Bound<'_, PlannedCall>>,
    key: &str,
    ok: bool,
    pick: impl Fn(&Made) -> Option<T>,
) -> PyResult<Option<T>> {
    let Some(p) = planned else {
        return Ok(None);
    };
    match pick(&p.get().made) {
        Some(call) if ok && p.get().key == key => Ok(Some(call)),
        _ => Err(PyValueError::new_err(
            "plan: made for other arguments (pass the handle of a plan made with the same \
             arrays and options)",
        )),
    }
}

fn kind_name(kind: PolyKind) -> &'static str {
    match kind {
        PolyKind::Taylor => "taylor",
        PolyKind::Chebyshev => "chebyshev",
    }
}

/// What the cost model reads of a plan: its representative polynomial, route, largest bound,
/// flops, working set and predicted seconds (`certified` left 0).
fn offer(made: &Made) -> PyResult<FastOffer<'static>> {
    let (backward, poly, terms, lowrank, bound_r, flops, working_bytes) = match made {
        Made::Forward(call) => {
            let p = call
                .representative()
                .ok_or_else(|| PyValueError::new_err("fast plan: no heads"))?;
            let r = call.groups.iter().map(|g| g.plan.bounds.r);
            let lowrank = p.lowrank.is_some();
            (
                false,
                &p.poly,
                p.counts.terms,
                lowrank,
                r.fold(0.0, f64::max),
                call.flops,
                call.working_bytes,
            )
        }
        Made::Backward(call) => {
            let p = call
                .representative()
                .ok_or_else(|| PyValueError::new_err("fast backward plan: no heads"))?;
            let r = call.groups.iter().map(|g| g.plan.bounds.r);
            let lowrank = call.groups.iter().all(|g| g.plan.lowrank.is_some());
            (
                true,
                &p.poly,
                p.counts.terms,
                lowrank,
                r.fold(0.0, f64::max),
                call.flops,
                call.working_bytes,
            )
        }
    };
    Ok(FastOffer {
        backward,
        seconds: cost::fast_seconds(flops, backward, lowrank),
        working_bytes,
        degree: poly.degree,
        poly_kind: kind_name(poly.kind),
        bound_r,
        terms,
        lowrank,
        certified: 0.0,
    })
}

/// Sets the figures every plan dict shares: the polynomial, route, bound, flops, working set
/// and predicted seconds of the fast plan.
fn set_offer(d: &Bound<'_, PyDict>, o: &FastOffer<'_>) -> PyResult<()> {
    d.set_item("degree", o.degree)?;
    d.set_item("poly_kind", o.poly_kind)?;
    d.set_item("path", if o.lowrank { "lowrank" } else { "toeplitz" })?;
    d.set_item("bound_r", o.bound_r)?;
    d.set_item("terms", o.terms)?;
    d.set_item("working_bytes", o.working_bytes)?;
    d.set_item("seconds", o.seconds)
}

/// Exact or fast for a call the fast plan `plan` (a `run=False` handle) certifies:
/// `(method, why, (method not taken, reason))`. `method` is `"auto"` or `"fast"` (forced);
/// `certified` is what a fast result guarantees; `exact_seconds` the exact method's prediction
/// ([`exact_cost`](super::exact::exact_cost)). A forced fast plan over `memory_limit` raises
/// `ApproximationError`.
#[pyfunction]
#[pyo3(signature = (plan, *, method, eps, certified, exact_seconds, memory_limit))]
pub(super) fn choose_method(
    py: Python<'_>,
    plan: &Bound<'_, PlannedCall>,
    method: &str,
    eps: f64,
    certified: f64,
    exact_seconds: f64,
    memory_limit: usize,
) -> PyResult<(&'static str, String, (&'static str, String))> {
    let forced = match method {
        "auto" => false,
        "fast" => true,
        other => {
            return Err(PyValueError::new_err(format!(
                "method: expected 'auto' or 'fast', got {other:?}"
            )))
        }
    };
    let offer = FastOffer {
        certified,
        ..offer(&plan.get().made)?
    };
    let c = cost::choose(&offer, exact_seconds, eps, memory_limit, forced)
        .map_err(|e| to_pyerr(py, e))?;
    Ok((c.method, c.why, c.refused))
}

/// The routes refused by a plan, as `[(route, reason), ...]`.
fn refused_list<'py>(py: Python<'py>, refused: &[Refusal]) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, refused.iter().map(|r| (r.route, r.reason.as_str())))
}

/// The low-rank route's band as the plan shows it: `{"slope", "window", "bias_deviation"}`
/// (None off the low-rank route or without a window or ALiBi bias).
fn band_dict<'py>(
    py: Python<'py>,
    band: Option<crate::fast::Band>,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let Some(b) = band.filter(|b| !b.is_plain()) else {
        return Ok(None);
    };
    let d = PyDict::new(py);
    d.set_item("slope", b.slope)?;
    d.set_item("window", b.window)?;
    d.set_item("bias_deviation", b.bias_eta)?;
    Ok(Some(d))
}

/// How a Toeplitz call holds its kernel spectra (None for the low-rank route): `mode` `"held"`
/// (built once per group of heads) or `"streamed"` (rebuilt `pair_chunk` pairs at a time for
/// every column tile of every head, as all of them do not fit `memory_limit`), with the
/// representative group's `pair_chunk`, `n_pairs` and `column_tile` and the number of groups
/// streamed.
fn spectra_dict<'py>(
    py: Python<'py>,
    chunk: Option<usize>,
    n_pairs: usize,
    column_tile: usize,
    streamed_groups: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("mode", if chunk.is_some() { "streamed" } else { "held" })?;
    d.set_item("pair_chunk", chunk.unwrap_or(n_pairs))?;
    d.set_item("n_pairs", n_pairs)?;
    d.set_item("column_tile", column_tile)?;
    d.set_item("streamed_groups", streamed_groups)?;
    Ok(d)
}

fn forward_spectra<'py>(py: Python<'py>, call: &FastCall) -> PyResult<Option<Bound<'py, PyDict>>> {
    let Some(p) = call.representative().filter(|p| p.lowrank.is_none()) else {
        return Ok(None);
    };
    let chunk = p.streamed().then(|| p.pair_chunk());
    let streamed = call.groups.iter().filter(|g| g.plan.streamed()).count();
    spectra_dict(py, chunk, p.counts.n_pairs, p.column_tile, streamed).map(Some)
}

fn backward_spectra<'py>(
    py: Python<'py>,
    call: &FastBackwardCall,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let Some(p) = call.representative().filter(|p| p.lowrank.is_none()) else {
        return Ok(None);
    };
    let ns = call.support.len();
    let chunk = backward_pair_chunk(p, ns);
    let streamed = call
        .groups
        .iter()
        .filter(|g| backward_pair_chunk(&g.plan, ns).is_some())
        .count();
    spectra_dict(py, chunk, p.counts.n_pairs, p.column_tile, streamed).map(Some)
}

fn plan_dict<'py>(py: Python<'py>, made: &Made) -> PyResult<Bound<'py, PyDict>> {
    let Made::Forward(call) = made else {
        return Err(PyValueError::new_err("fast plan: a backward plan"));
    };
    let d = PyDict::new(py);
    d.set_item("refused", refused_list(py, &call.refused)?)?;
    let Some(p) = call.representative() else {
        return Err(PyValueError::new_err("fast plan: no heads"));
    };
    set_offer(&d, &offer(made)?)?;
    d.set_item("rho", p.poly.rho)?;
    d.set_item("n_alpha", p.counts.n_alpha)?;
    d.set_item("n_beta", p.counts.n_beta)?;
    d.set_item("n_pairs", p.counts.n_pairs)?;
    d.set_item("fft_len", p.fft_len)?;
    d.set_item("column_tile", p.column_tile)?;
    d.set_item("kernel_spectra", forward_spectra(py, call)?)?;
    d.set_item("band", band_dict(py, p.lowrank.map(|l| l.band))?)?;
    d.set_item("groups", call.groups.len())?;
    d.set_item("support_size", call.support.len())?;
    d.set_item("flops", call.flops)?;
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

/// The options every fast entry point takes besides the arrays and the call description.
struct FastOpts {
    eps: f64,
    /// `(max_terms, max_degree, memory_limit)`.
    lim: (usize, usize, usize),
    run_it: bool,
    /// `(bound_r, v_max)`: plan from these bounds instead of the data (`run=False` only).
    given: Option<(f64, f64)>,
    threads: Option<usize>,
    route: Route,
    /// Scan k and v for NaN and Inf before planning (the caller scanned q).
    check_kv: bool,
}

fn fast_typed<'py, T: Real + Element>(
    py: Python<'py>,
    [q, k, v]: [&Bound<'py, PyAny>; 3],
    sp: &Spec<'py>,
    o: &FastOpts,
    planned: Option<&Bound<'py, PlannedCall>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let (eps, lim, run_it, given, threads, route, check_kv) = (
        o.eps, o.lim, o.run_it, o.given, o.threads, o.route, o.check_kv,
    );
    let (values, bias) = (sp.values.as_ref(), sp.bias.as_ref());
    let nthreads = threads.unwrap_or_else(rayon::current_num_threads);
    let key = plan_key::<T>(
        sp,
        eps,
        lim,
        route,
        nthreads,
        &[Some(q), Some(k), Some(v), values, bias],
    );
    let reuse = reuse(planned, &key, run_it && given.is_none(), |m| match m {
        Made::Forward(call) => Some(call.clone()),
        Made::Backward(_) => None,
    })?;
    let (q, k, v) = (arr4::<T>(q, "q")?, arr4::<T>(k, "k")?, arr4::<T>(v, "v")?);
    let (values, bias_arr) = sp.tables::<T>()?;
    let pos = position(sp, values.as_ref())?;
    let bias = sp.bias_of(bias_arr.as_ref());
    let prob = &sp.prob;
    let (qv, kv, vv) = (q.as_array(), k.as_array(), v.as_array());
    let limits = limits(lim.0, lim.1, lim.2, nthreads);
    let (call, res) = run(py, threads, f64::INFINITY, false, |ctl| {
        let call = match (reuse, given) {
            (Some(call), _) => call,
            (None, Some((r, v_max))) => {
                let from = BoundsFrom::Given { r, v_max };
                plan_fast_from(
                    prob,
                    &pos,
                    bias.as_ref(),
                    from,
                    eps,
                    &limits,
                    nthreads,
                    route,
                )?
            }
            (None, None) => {
                if check_kv {
                    // The caller checked q; k and v are scanned here, in parallel, without
                    // NumPy's boolean temporaries.
                    check_rows("k", &kv, 0, prob.nk)?;
                    check_rows("v", &vv, 0, prob.nk)?;
                }
                let mut call = plan_fast(
                    prob,
                    &pos,
                    bias.as_ref(),
                    qv.view(),
                    kv.view(),
                    vv.view(),
                    eps,
                    &limits,
                    nthreads,
                    route,
                )?;
                // Its bounds are those of these arrays, and its handle runs only on the same
                // array objects (the key), handed back by the `attention` call that made it.
                call.data_checked = true;
                call
            }
        };
        if !run_it || given.is_some() {
            return Ok((call, None));
        }
        let r = run_fast(&call, prob, &pos, bias.as_ref(), qv, kv, vv, &limits, ctl)?;
        Ok((call, Some(r)))
    })?;
    let made = Made::Forward(call);
    let info = plan_dict(py, &made)?;
    if res.is_none() {
        info.set_item("handle", Bound::new(py, PlannedCall { made, key })?)?;
    }
    let info = info.into_any();
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
#[pyo3(signature = (q, k, v, *, eps, memory_limit, run, num_threads, max_terms=MAX_TERMS, max_degree=MAX_DEGREE, bounds=None, route="auto", plan=None, check_kv=false, **call))]
#[allow(clippy::too_many_arguments)]
pub(super) fn fast_forward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    eps: f64,
    memory_limit: usize,
    run: bool,
    num_threads: Option<usize>,
    max_terms: usize,
    max_degree: usize,
    bounds: Option<(f64, f64)>,
    route: &str,
    plan: Option<&Bound<'py, PlannedCall>>,
    check_kv: bool,
    call: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let sp = Spec::from_kwargs(call)?;
    let opts = FastOpts {
        check_kv,
        eps,
        lim: (max_terms, max_degree, memory_limit),
        run_it: run,
        given: bounds,
        threads: num_threads,
        route: Route::parse(route).map_err(|e| to_pyerr(py, e))?,
    };
    dispatch!(q, fast_typed, py, [q, k, v], &sp, &opts, plan)
}

fn grad_dict<'py>(py: Python<'py>, g: &crate::fast::Grad5) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, x) in crate::fast::grad::GRAD_NAMES.iter().zip(g.to_array()) {
        d.set_item(*name, x)?;
    }
    Ok(d)
}

fn backward_plan_dict<'py>(py: Python<'py>, made: &Made) -> PyResult<Bound<'py, PyDict>> {
    let Made::Backward(call) = made else {
        return Err(PyValueError::new_err("fast backward plan: a forward plan"));
    };
    let d = PyDict::new(py);
    d.set_item("refused", refused_list(py, &call.refused)?)?;
    let Some(p) = call.representative() else {
        return Err(PyValueError::new_err("fast backward plan: no heads"));
    };
    set_offer(&d, &offer(made)?)?;
    d.set_item("poly_family", p.family)?;
    d.set_item("rho", p.poly.rho)?;
    d.set_item("rho_derivative", p.rho_d)?;
    d.set_item("n_alpha", p.counts.n_alpha)?;
    d.set_item("n_beta", p.counts.n_beta)?;
    d.set_item("n_pairs", p.counts.n_pairs)?;
    d.set_item("fft_len", p.fft_len)?;
    d.set_item("column_tile", p.column_tile)?;
    d.set_item("kernel_spectra", backward_spectra(py, call)?)?;
    d.set_item("band", band_dict(py, p.lowrank.map(|l| l.lr.band))?)?;
    d.set_item("groups", call.groups.len())?;
    d.set_item("support_size", call.support.len())?;
    d.set_item("flops", call.flops)?;
    d.set_item("deferred", call.deferred)?;
    d.set_item("want_dw", call.want.dw)?;
    d.set_item("want_dbias", call.want.db)?;
    d.set_item("certified", grad_dict(py, &call.certified)?)?;
    d.set_item("approximation", grad_dict(py, &call.approximation)?)?;
    d.set_item("rounding", grad_dict(py, &call.rounding)?)?;
    d.set_item("multiplicity", grad_dict(py, &call.multiplicity)?)?;
    d.set_item("grad_error", call.contract.name())?;
    d.set_item("grad_scale", grad_dict(py, &call.scale)?)?;
    // What `eps` is compared with: the largest error, or the largest error relative to its
    // gradient's scale (an exactly zero gradient, scale 0, certified 0, counts as 0).
    let ce = match call.contract {
        GradContract::Absolute => call.certified.to_array().into_iter().fold(0.0, f64::max),
        GradContract::Relative => call
            .certified
            .zip(call.scale, |c, s| if c == 0.0 { 0.0 } else { c / s })
            .to_array()
            .into_iter()
            .fold(0.0, f64::max),
    };
    d.set_item("certified_error", ce)?;
    Ok(d)
}

fn fast_backward_typed<'py, T: Real + Element>(
    py: Python<'py>,
    [q, k, v]: [&Bound<'py, PyAny>; 3],
    [dout, dlse]: [Option<&Bound<'py, PyAny>>; 2],
    sp: &Spec<'py>,
    o: &FastOpts,
    (want, poly, contract): ((bool, bool), Option<crate::poly::Polynomial>, GradContract),
    planned: Option<&Bound<'py, PlannedCall>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let (eps, lim, run_it, given, threads, route) =
        (o.eps, o.lim, o.run_it, o.given, o.threads, o.route);
    let (values, bias) = (sp.values.as_ref(), sp.bias.as_ref());
    let nthreads = threads.unwrap_or_else(rayon::current_num_threads);
    let key = plan_key::<T>(
        sp,
        eps,
        lim,
        route,
        nthreads,
        &[Some(q), Some(k), Some(v), dout, dlse, values, bias],
    ) + &format!(" {want:?} {poly:?} {given:?} {contract:?}");
    let reuse = reuse(planned, &key, run_it, |m| match m {
        Made::Backward(call) => Some(call.clone()),
        Made::Forward(_) => None,
    })?;
    let (q, k, v) = (arr4::<T>(q, "q")?, arr4::<T>(k, "k")?, arr4::<T>(v, "v")?);
    let dout = dout.map(|d| arr4::<T>(d, "dout")).transpose()?;
    let dlse: Option<PyReadonlyArray3<'py, T>> = dlse
        .map(|x| {
            x.extract()
                .map_err(|_| PyTypeError::new_err("dlse: expected a 3-d array of q's dtype"))
        })
        .transpose()?;
    let dlse_v = dlse.as_ref().map(|g| g.as_array());
    let (values, bias_arr) = sp.tables::<T>()?;
    let pos = position(sp, values.as_ref())?;
    let bias = sp.bias_of(bias_arr.as_ref());
    let prob = &sp.prob;
    let (qv, kv, vv) = (q.as_array(), k.as_array(), v.as_array());
    let dv = dout.as_ref().map(|d| d.as_array());
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
        let call = match reuse {
            Some(call) => call,
            None => plan_fast_backward(
                prob,
                &pos,
                bias.as_ref(),
                qv.view(),
                kv.view(),
                vv.view(),
                dv.as_ref().map(|d| d.view()),
                dlse_v.as_ref().map(|g| g.view()),
                given,
                eps,
                contract,
                want,
                &limits,
                nthreads,
                poly.as_ref(),
                route,
            )
            .map(|mut c| {
                // Bounds read from these arrays (dout included); a handle runs only on the
                // same array objects (the key).
                c.data_checked = given.is_none() && dv.is_some();
                c
            })?,
        };
        if !run_it {
            return Ok((call, None));
        }
        let dv = dv
            .as_ref()
            .map(|d| d.view())
            .ok_or_else(|| Error::Value("dout: missing".into()))?;
        let r = run_fast_backward(
            &call,
            prob,
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
    let made = Made::Backward(call);
    let info = backward_plan_dict(py, &made)?;
    if res.is_none() {
        info.set_item("handle", Bound::new(py, PlannedCall { made, key })?)?;
    }
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
/// those bounds instead of the data (`run=False` only). `grad_error` is `"relative"` (each
/// gradient's error at most `eps` times its certified magnitude `grad_scale`) or `"absolute"`
/// (at most `eps`). Raises `ApproximationError` when the gradients cannot be certified to `eps`.
#[pyfunction]
#[pyo3(signature = (q, k, v, dout, *, eps, want_dw, want_dbias, memory_limit, run, num_threads, max_terms=MAX_TERMS, max_degree=MAX_DEGREE, poly=None, bounds=None, dlse=None, route="auto", plan=None, grad_error="relative", **call))]
#[allow(clippy::too_many_arguments)]
pub(super) fn fast_backward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    dout: Option<&Bound<'py, PyAny>>,
    eps: f64,
    want_dw: bool,
    want_dbias: bool,
    memory_limit: usize,
    run: bool,
    num_threads: Option<usize>,
    max_terms: usize,
    max_degree: usize,
    poly: Option<(String, usize, f64)>,
    bounds: Option<(f64, f64)>,
    dlse: Option<&Bound<'py, PyAny>>,
    route: &str,
    plan: Option<&Bound<'py, PlannedCall>>,
    grad_error: &str,
    call: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let contract = GradContract::parse(grad_error).ok_or_else(|| {
        PyValueError::new_err(format!(
            "grad_error: expected 'relative' or 'absolute', got {grad_error:?}"
        ))
    })?;
    if run && bounds.is_some() {
        return Err(PyValueError::new_err(
            "bounds: only for plans (run=False); a computation reads its bounds from the data",
        ));
    }
    let sp = Spec::from_kwargs(call)?;
    let opts = FastOpts {
        eps,
        lim: (max_terms, max_degree, memory_limit),
        run_it: run,
        given: bounds,
        threads: num_threads,
        route: Route::parse(route).map_err(|e| to_pyerr(py, e))?,
        check_kv: false,
    };
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
    let want = (want_dw, want_dbias);
    dispatch!(
        q,
        fast_backward_typed,
        py,
        [q, k, v],
        [dout, dlse],
        &sp,
        &opts,
        (want, poly, contract),
        plan
    )
}
