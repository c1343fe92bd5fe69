//! Text similarity metrics for generation evaluation, on whitespace tokens.

use std::collections::HashMap;

/// Equal after trimming surrounding whitespace.
pub fn exact_match(prediction: &str, reference: &str) -> bool {
    prediction.trim() == reference.trim()
}

fn ngrams<'a>(tokens: &[&'a str], n: usize) -> HashMap<Vec<&'a str>, usize> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for w in tokens.windows(n) {
            *counts.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    counts
}

/// Corpus-level BLEU-4 (Papineni et al. 2002): clipped n-gram precisions for n = 1..4 summed over
/// the corpus, geometric mean with uniform weights, brevity penalty; no smoothing (0 when some
/// order has no match). In [0, 1].
pub fn corpus_bleu<S: AsRef<str>>(predictions: &[S], references: &[S]) -> f64 {
    let (mut matches, mut totals) = ([0usize; 4], [0usize; 4]);
    let (mut pred_len, mut ref_len) = (0usize, 0usize);
    for (p, r) in predictions.iter().zip(references) {
        let p: Vec<&str> = p.as_ref().split_whitespace().collect();
        let r: Vec<&str> = r.as_ref().split_whitespace().collect();
        pred_len += p.len();
        ref_len += r.len();
        for n in 1..=4 {
            let (pc, rc) = (ngrams(&p, n), ngrams(&r, n));
            matches[n - 1] += pc
                .iter()
                .map(|(g, c)| (*c).min(*rc.get(g).unwrap_or(&0)))
                .sum::<usize>();
            totals[n - 1] += p.len().saturating_sub(n - 1);
        }
    }
    if pred_len == 0 || matches.contains(&0) {
        return 0.0;
    }
    let log_precision: f64 = (0..4)
        .map(|i| (matches[i] as f64 / totals[i] as f64).ln())
        .sum::<f64>()
        / 4.0;
    let bp = if pred_len < ref_len {
        (1.0 - ref_len as f64 / pred_len as f64).exp()
    } else {
        1.0
    };
    bp * log_precision.exp()
}

/// ROUGE-L F1 (Lin 2004): longest common subsequence of the token lists.
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let p: Vec<&str> = prediction.split_whitespace().collect();
    let r: Vec<&str> = reference.split_whitespace().collect();
    if p.is_empty() || r.is_empty() {
        return 0.0;
    }
    let mut dp = vec![vec![0usize; r.len() + 1]; p.len() + 1];
    for i in 1..=p.len() {
        for j in 1..=r.len() {
            dp[i][j] = if p[i - 1] == r[j - 1] {
                dp[i - 1][j - 1] + 1
            } else {
                dp[i - 1][j].max(dp[i][j - 1])
            };
        }
    }
    let lcs = dp[p.len()][r.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (precision, recall) = (lcs / p.len() as f64, lcs / r.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_texts_score_one() {
        let t = ["the cat sat on the mat"];
        assert_eq!(corpus_bleu(&t, &t), 1.0);
        assert_eq!(rouge_l(t[0], t[0]), 1.0);
        assert!(exact_match(" the cat sat on the mat\n", t[0]));
    }

    #[test]
    fn bleu_by_hand() {
        // 1-grams 5/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3, equal lengths (no brevity penalty).
        let p = ["the cat sat on a mat"];
        let r = ["the cat sat on the mat"];
        let expected =
            ((5.0f64 / 6.0).ln() + (3.0f64 / 5.0).ln() + (2.0f64 / 4.0).ln() + (1.0f64 / 3.0).ln())
                / 4.0;
        assert!((corpus_bleu(&p, &r) - expected.exp()).abs() < 1e-12);
        // A short prediction pays exp(1 - 6/4).
        let short = ["the cat sat on"];
        let exp = (1.0f64 - 6.0 / 4.0).exp() * 1.0;
        assert!((corpus_bleu(&short, &r) - exp).abs() < 1e-12);
    }

    #[test]
    fn rouge_l_by_hand() {
        // LCS("police killed the gunman", "police kill the gunman") = 3: P = R = 3/4.
        assert!(
            (rouge_l("police killed the gunman", "police kill the gunman") - 0.75).abs() < 1e-12
        );
        assert_eq!(rouge_l("", "a"), 0.0);
    }
}
