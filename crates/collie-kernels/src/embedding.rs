//! Embedding lookup and its backward: rows of a `[vocab, d]` table gathered by id, and the
//! output's gradient added back into a `[vocab, d]` gradient, row by row in token order (the
//! order Burn's `select_add` uses, so the sums are the same bits).

use rayon::prelude::*;

/// Checks every id against the table's rows.
///
/// # Panics
/// With the position and value of the first id outside `0..vocab`.
fn check(ids: &[i64], vocab: usize) {
    if let Some((i, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as u64 >= vocab as u64)
    {
        panic!("embedding: id {id} at position {i} is outside the table's {vocab} rows");
    }
}

/// `out[i] = table[ids[i]]` (rows of `d`).
///
/// # Panics
/// If an id is outside the table, or a length disagrees.
pub fn gather(table: &[f32], d: usize, ids: &[i64], out: &mut [f32]) {
    assert!(
        d > 0 && table.len().is_multiple_of(d),
        "embedding: table length"
    );
    assert_eq!(out.len(), ids.len() * d, "embedding: output length");
    check(ids, table.len() / d);
    out.par_chunks_mut(d).zip(ids).for_each(|(row, &id)| {
        let at = id as usize * d;
        row.copy_from_slice(&table[at..at + d]);
    });
}

/// `grad[ids[i]] += dy[i]` for every position `i` in order; `grad` is `[vocab, d]`.
///
/// # Panics
/// If an id is outside the table, or a length disagrees.
pub fn scatter_add(ids: &[i64], dy: &[f32], d: usize, grad: &mut [f32]) {
    assert!(
        d > 0 && grad.len().is_multiple_of(d),
        "embedding backward: gradient length"
    );
    assert_eq!(dy.len(), ids.len() * d, "embedding backward: dy length");
    check(ids, grad.len() / d);
    // Sequential: rows of repeated ids must add in token order.
    for (row, &id) in dy.chunks_exact(d).zip(ids) {
        let at = id as usize * d;
        for (g, &v) in grad[at..at + d].iter_mut().zip(row) {
            *g += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    #[test]
    fn gathers_and_adds_back_in_token_order() {
        let (vocab, d) = (5, 3);
        let table = values(vocab * d, 81, 1.0);
        let ids = [4i64, 0, 4, 2];
        let mut out = vec![0.0; ids.len() * d];
        gather(&table, d, &ids, &mut out);
        assert_eq!(&out[..d], &table[4 * d..5 * d]);
        assert_eq!(&out[d..2 * d], &table[..d]);
        let dy = values(ids.len() * d, 82, 1.0);
        let mut grad = vec![0.0; vocab * d];
        scatter_add(&ids, &dy, d, &mut grad);
        for t in 0..d {
            assert_eq!(grad[4 * d + t], 0.0 + dy[t] + dy[2 * d + t]);
            assert_eq!(grad[d + t], 0.0, "an unused row stays zero");
        }
    }

    #[test]
    #[should_panic(expected = "id 7 at position 1 is outside the table's 5 rows")]
    fn an_id_outside_the_table_is_named() {
        let mut out = vec![0.0; 6];
        gather(&[0.0; 15], 3, &[1, 7], &mut out);
    }
}
