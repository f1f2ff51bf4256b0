//! The argument checks of the Rust API on arbitrary descriptions (any sizes, offsets, windows,
//! scales, rotary tables, supports and table indices): `Problem::validate`, `Position::validate`
//! and `Bias::validate` return `Ok` or `Err` and never panic, and a problem they accept has a
//! consistent diagonal indexing.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use fastrope::{Bias, Position, Problem, RotaryW, SparseW};
use libfuzzer_sys::fuzz_target;
use ndarray::{Array2, Array3};

fn size(u: &mut Unstructured<'_>) -> arbitrary::Result<usize> {
    Ok(if u.ratio(1, 8)? { usize::arbitrary(u)? } else { u.int_in_range(0..=70)? })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(prob) = (|| -> arbitrary::Result<Problem> {
        Ok(Problem {
            batch: size(&mut u)?,
            hq: size(&mut u)?,
            hk: size(&mut u)?,
            nq: size(&mut u)?,
            nk: size(&mut u)?,
            d: size(&mut u)?,
            dv: size(&mut u)?,
            scale: f64::arbitrary(&mut u)?,
            causal: bool::arbitrary(&mut u)?,
            window: Option::<(i64, i64)>::arbitrary(&mut u)?,
            q_offset: i64::arbitrary(&mut u)?,
            k_offset: i64::arbitrary(&mut u)?,
        })
    })() else {
        return;
    };
    let Ok((theta, factor, pairs)) = <(Vec<f64>, f64, Vec<(usize, usize)>)>::arbitrary(&mut u) else { return };
    let Ok((support, index, dims)) = <(Vec<(usize, usize)>, Vec<usize>, (u8, u8, u8))>::arbitrary(&mut u) else { return };
    let Ok((bias_index, bdims)) = <(Vec<usize>, (u8, u8))>::arbitrary(&mut u) else { return };
    let values = Array3::<f64>::zeros((dims.0 as usize % 4, dims.1 as usize, dims.2 as usize % 40));
    let bvalues = Array2::<f32>::zeros((bdims.0 as usize % 4, bdims.1 as usize));

    let valid = prob.validate().is_ok();
    let rot: Position<'_, f64> = Position::Rotary(RotaryW { theta, factor, pairs });
    let sp: Position<'_, f64> = Position::Sparse(SparseW { support, values: values.view(), index });
    let bias = Bias { values: bvalues.view(), index: bias_index };
    let (_, _) = (rot.validate(&prob), sp.validate(&prob));
    let bias_ok = bias.validate(&prob).is_ok();
    if !valid {
        return;
    }
    // An accepted problem indexes its diagonals without overflow, and a visible range lies on
    // diagonals that exist.
    let glen = prob.glen();
    if glen > 0 {
        let (first, last) = (prob.delta(0), prob.delta(glen - 1));
        assert!(first >= last);
        if let Some((lo, hi)) = prob.visible_delta_range() {
            assert!(last <= lo && lo <= hi && hi <= first, "{prob:?}: [{lo}, {hi}] not in [{last}, {first}]");
            assert!(prob.keeps(lo) && prob.keeps(hi));
        }
    }
    let _ = (fastrope::plan::cost::exact_flops_bound(&prob, true), bias_ok);
});
