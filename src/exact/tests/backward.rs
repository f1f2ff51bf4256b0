//! The backward against the naive twin for every thread count, in query chunks and in tile
//! segments (bit-for-bit repeatable).

use super::forward::{
    blockw_matches_naive_with_bias_and_masks,
    sparse_matches_naive_with_bias_window_and_per_head_tables,
};
use super::*;

#[test]
fn backward_for_every_thread_count_matches_naive_and_repeats_exactly() {
    // Many key tiles: the key chunks and the waves (direct dq and partials) vary with threads.
    let mut prob = problem(60, 400, 8, 4, 2);
    prob.dv = 16;
    prob.causal = true;
    prob.q_offset = 340;
    let d = 8;
    let l = 460usize;
    let support = block_support(&(0..d / 2).map(|m| (2 * m, 2 * m + 1)).collect::<Vec<_>>());
    let mut rng = Rng(31);
    let values = Array3::from_shape_fn((1, 2 * l - 1, support.len()), |_| rng.next());
    let sp = SparseW {
        support,
        values: values.view(),
        index: vec![0; 8],
    };
    for threads in [1, 2, 3] {
        check_threads(&prob, &Position::Rotary(rotary(d)), None, 32, threads);
        check_threads(&prob, &Position::Sparse(sp.clone()), None, 33, threads);
    }
}

#[test]
fn segmented_tables_match_naive() {
    // The forward builds the diagonal sequences per tile, as it does for long calls.
    crate::exact::sparse::FORCE_SEGMENTS.with(|f| f.set(1));
    blockw_matches_naive_with_bias_and_masks();
    sparse_matches_naive_with_bias_window_and_per_head_tables();
    crate::exact::sparse::FORCE_SEGMENTS.with(|f| f.set(2));
    let mut prob = problem(60, 400, 8, 4, 2);
    prob.dv = 16;
    prob.window = Some((300, 40));
    prob.q_offset = 200;
    let d = 8;
    let l = 460usize;
    let support = block_support(&(0..d / 2).map(|m| (m, m + d / 2)).collect::<Vec<_>>());
    let mut rng = Rng(41);
    let values = Array3::from_shape_fn((2, 2 * l - 1, support.len()), |_| rng.next());
    let sp = SparseW {
        support,
        values: values.view(),
        index: vec![0, 1, 1, 0, 1, 1, 0, 0],
    };
    check(&prob, &Position::Sparse(sp.clone()), None, 42);
    prob.nk = 1100;
    prob.q_offset = 1000;
    check(&prob, &Position::Sparse(sp), None, 43);
    crate::exact::sparse::FORCE_SEGMENTS.with(|f| f.set(0));
}

#[test]
fn backward_in_query_chunks_and_tile_segments_matches_naive() {
    // Query chunks of one block (units of a key chunk against a query chunk, some fully
    // masked), with the sparse sequences whole and built per tile.
    crate::exact::backward::PART_BUDGET_OVERRIDE.with(|b| b.set(Some(1)));
    let d = 8;
    let l = 400usize;
    let support = block_support(&(0..d / 2).map(|m| (2 * m, 2 * m + 1)).collect::<Vec<_>>());
    let mut rng = Rng(51);
    let values = Array3::from_shape_fn((2, 2 * l - 1, support.len()), |_| rng.next());
    let sp = SparseW {
        support,
        values: values.view(),
        index: vec![1, 0, 0, 1],
    };
    let bvals = Array2::from_shape_fn((2, 2 * l - 1), |_| 0.3 * rng.next());
    let bias = Bias {
        values: bvals.view(),
        index: vec![0, 1, 1, 0],
    };
    for seg in [0, 1] {
        crate::exact::sparse::FORCE_SEGMENTS.with(|f| f.set(seg));
        let mut prob = problem(300, 270, d, 4, 2);
        prob.batch = 1;
        prob.dv = 16;
        prob.causal = true;
        check_threads(&prob, &Position::Rotary(rotary(d)), None, 52, 2);
        check_threads(&prob, &Position::Sparse(sp.clone()), Some(&bias), 53, 3);
        prob.causal = false;
        prob.window = Some((100, 20));
        prob.q_offset = -20;
        check_threads(&prob, &Position::Sparse(sp.clone()), None, 54, 2);
    }
    crate::exact::sparse::FORCE_SEGMENTS.with(|f| f.set(0));
    crate::exact::backward::PART_BUDGET_OVERRIDE.with(|b| b.set(None));
}

/// Gradients that overflow (`dout` = 1e300 times `v` = ±1e300: `dP` = ±inf, `dS` = NaN) came
/// back NaN from a finite call; the backward now returns the overflow error instead
/// (fuzz/regressions/exact/crash-0666ad…, crash-11597e…, crash-b53f6a…). The same call at
/// ordinary `dout` has finite gradients.
#[test]
fn overflowing_gradients_are_an_error_not_nan() {
    let prob = Problem {
        batch: 1,
        dv: 1,
        ..problem(2, 2, 2, 1, 1)
    };
    let pos = Position::Rotary(rotary(2));
    let mut rng = Rng(77);
    let q = rng.array4((1, 1, 2, 2));
    let k = rng.array4((1, 1, 2, 2));
    let mut v = Array4::<f64>::zeros((1, 1, 2, 1));
    v[[0, 0, 0, 0]] = 1e300;
    v[[0, 0, 1, 0]] = -1e300;
    let ctl = Control::new();
    let (out, lse) =
        attention_forward(&prob, &pos, None, q.view(), k.view(), v.view(), &ctl).unwrap();
    for (big, ok) in [(1e300, false), (1.0, true)] {
        let dout = Array4::from_elem((1, 1, 2, 1), big);
        let inp = BackwardInputs {
            out: out.view(),
            lse: lse.view(),
            dout: dout.view(),
            want_dw: true,
            want_dbias: true,
            threads: 1,
        };
        let g = attention_backward(&prob, &pos, None, q.view(), k.view(), v.view(), &inp, &ctl);
        match g {
            Ok(g) => assert!(ok && g.dq.iter().chain(g.dk.iter()).all(|x| x.is_finite())),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    !ok && e.starts_with("dq, dk, dv, dw, dbias: not finite"),
                    "{e}"
                );
            }
        }
    }
}
