//! The canonical call description shared by the entry points, read from the arguments that
//! `python/fastrope/_api.py` prepares, and the array extraction.

use crate::arch::Real;
use crate::fast::FastLimits;
use crate::position::{Position, RotaryW, SparseW};
use crate::problem::Problem;
use numpy::{Element, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyReadonlyArray4};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Canonical call description shared by the entry points: the keyword arguments that
/// `Call.native_args()` (`python/fastrope/_api.py`) passes to every one of them.
pub(super) struct Spec<'py> {
    pub prob: Problem,
    pub rotary: Option<RotaryW>,
    pub support: Vec<(usize, usize)>,
    pub w_index: Vec<usize>,
    pub bias_index: Vec<usize>,
    /// `(tables, 2L-1, |S|)` position values of a stored `w`, in q's dtype.
    pub values: Option<Bound<'py, PyAny>>,
    /// `(tables, 2L_b-1)` bias values, in q's dtype.
    pub bias: Option<Bound<'py, PyAny>>,
}

/// The tables of a [`Spec`] as `T` arrays.
pub(super) type Tables<'py, T> = (
    Option<PyReadonlyArray3<'py, T>>,
    Option<PyReadonlyArray2<'py, T>>,
);

impl<'py> Spec<'py> {
    /// Reads the call description from the keyword arguments `kw`.
    pub fn from_kwargs(kw: Option<&Bound<'py, PyDict>>) -> PyResult<Spec<'py>> {
        let kw = kw.ok_or_else(|| PyTypeError::new_err("the call description is missing"))?;
        let get = |key: &str| -> PyResult<Bound<'py, PyAny>> {
            kw.get_item(key)?
                .ok_or_else(|| PyTypeError::new_err(format!("the call description has no {key:?}")))
        };
        let opt = |key: &str| -> PyResult<Option<Bound<'py, PyAny>>> {
            Ok(kw.get_item(key)?.filter(|x| !x.is_none()))
        };
        let known = [
            "shape",
            "scale",
            "causal",
            "window",
            "q_offset",
            "k_offset",
            "rotary",
            "support",
            "values",
            "w_index",
            "bias",
            "bias_index",
        ];
        for key in kw.keys() {
            let key: String = key.extract()?;
            if !known.contains(&key.as_str()) {
                return Err(PyTypeError::new_err(format!(
                    "unexpected keyword argument {key:?}"
                )));
            }
        }
        let mut sp = spec(
            get("shape")?.extract()?,
            get("scale")?.extract()?,
            get("causal")?.extract()?,
            get("window")?.extract()?,
            get("q_offset")?.extract()?,
            get("k_offset")?.extract()?,
            get("rotary")?.extract()?,
            get("support")?.extract()?,
            get("w_index")?.extract()?,
            get("bias_index")?.extract()?,
        )?;
        sp.values = opt("values")?;
        sp.bias = opt("bias")?;
        Ok(sp)
    }

    /// The position and bias tables in q's dtype `T`.
    pub fn tables<T: Element>(&self) -> PyResult<Tables<'py, T>> {
        let values = self.values.as_ref().map(|x| x.extract()).transpose()?;
        let bias = self.bias.as_ref().map(|x| x.extract()).transpose()?;
        Ok((values, bias))
    }

    /// The bias of the call, on the table `arr` from [`Spec::tables`].
    pub fn bias_of<'a, T: Element>(
        &self,
        arr: Option<&'a PyReadonlyArray2<'_, T>>,
    ) -> Option<crate::position::Bias<'a, T>> {
        arr.map(|b| crate::position::Bias {
            values: b.as_array(),
            index: self.bias_index.clone(),
        })
    }
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
fn spec<'py>(
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
) -> PyResult<Spec<'py>> {
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
        values: None,
        bias: None,
    })
}

pub(super) fn dtype_of(x: &Bound<'_, PyAny>) -> PyResult<&'static str> {
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

pub(super) fn arr4<'py, T: Element>(
    x: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadonlyArray4<'py, T>> {
    x.extract::<PyReadonlyArray4<'py, T>>().map_err(|_| {
        PyTypeError::new_err(format!("{name}: expected a 4-d array of the dtype of q"))
    })
}

pub(super) fn position<'a, T: Real + Element>(
    sp: &Spec<'_>,
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

pub(super) fn limits(
    max_terms: usize,
    max_degree: usize,
    memory_limit: usize,
    threads: usize,
) -> FastLimits {
    FastLimits {
        max_degree,
        max_terms,
        // One head's working set per thread, within the call's memory limit.
        max_working_bytes: (memory_limit / threads.max(1)).max(1 << 20),
    }
}
