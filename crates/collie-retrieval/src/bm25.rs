//! Okapi BM25 over a small in-memory corpus, scored exactly as `rank_bm25.BM25Okapi` (the
//! reference of the tests): `idf(t) = ln(N − n_t + 0.5) − ln(n_t + 0.5)`, negative values
//! replaced by `epsilon · mean idf`; `score(q, d) = Σ_{t ∈ q} idf(t) · tf·(k1 + 1) /
//! (tf + k1·(1 − b + b·|d|/avgdl))`, query terms counted with multiplicity. UDR's Elasticsearch
//! used k1 = 1.2, b = 0.75 (its default); rank_bm25's default is k1 = 1.5.

use std::collections::HashMap;

/// Lower-cased runs of alphanumeric characters: the analyzer of the index and the queries
/// (close to Elasticsearch's `standard` analyzer, which UDR used).
pub fn tokenize(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// BM25 parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bm25Params {
    /// Term-frequency saturation.
    pub k1: f64,
    /// Length normalization.
    pub b: f64,
    /// Floor for negative idf, as a fraction of the mean idf.
    pub epsilon: f64,
}

impl Default for Bm25Params {
    /// Elasticsearch's k1 and b (what UDR ran), rank_bm25's epsilon.
    fn default() -> Self {
        Bm25Params {
            k1: 1.2,
            b: 0.75,
            epsilon: 0.25,
        }
    }
}

/// An index over tokenized documents.
#[derive(Debug, Clone)]
pub struct Bm25 {
    params: Bm25Params,
    /// Per document: term → frequency.
    docs: Vec<HashMap<String, u32>>,
    doc_len: Vec<f64>,
    avgdl: f64,
    idf: HashMap<String, f64>,
}

impl Bm25 {
    /// Indexes `docs` (already tokenized).
    pub fn new(docs: &[Vec<String>], params: Bm25Params) -> Self {
        let mut df: HashMap<String, u32> = HashMap::new();
        let mut freqs = Vec::with_capacity(docs.len());
        let mut total = 0usize;
        for d in docs {
            let mut tf: HashMap<String, u32> = HashMap::new();
            for t in d {
                *tf.entry(t.clone()).or_default() += 1;
            }
            for t in tf.keys() {
                *df.entry(t.clone()).or_default() += 1;
            }
            total += d.len();
            freqs.push(tf);
        }
        let n = docs.len() as f64;
        let mut idf: HashMap<String, f64> = df
            .iter()
            .map(|(t, &f)| {
                let f = f as f64;
                (t.clone(), (n - f + 0.5).ln() - (f + 0.5).ln())
            })
            .collect();
        if !idf.is_empty() {
            let mean = idf.values().sum::<f64>() / idf.len() as f64;
            for v in idf.values_mut() {
                if *v < 0.0 {
                    *v = params.epsilon * mean;
                }
            }
        }
        Bm25 {
            params,
            doc_len: docs.iter().map(|d| d.len() as f64).collect(),
            avgdl: total as f64 / n.max(1.0),
            docs: freqs,
            idf,
        }
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// The score of every document for `query`.
    pub fn scores(&self, query: &[String]) -> Vec<f64> {
        let Bm25Params { k1, b, .. } = self.params;
        let mut out = vec![0.0; self.docs.len()];
        for t in query {
            let Some(&idf) = self.idf.get(t) else {
                continue;
            };
            for (i, d) in self.docs.iter().enumerate() {
                if let Some(&tf) = d.get(t) {
                    let tf = tf as f64;
                    let norm = k1 * (1.0 - b + b * self.doc_len[i] / self.avgdl);
                    out[i] += idf * tf * (k1 + 1.0) / (tf + norm);
                }
            }
        }
        out
    }

    /// The `k` best documents for `query`, best first, skipping `exclude` (the query's own
    /// example); ties go to the lower index.
    pub fn top_k(&self, query: &[String], k: usize, exclude: Option<usize>) -> Vec<(usize, f64)> {
        let scores = self.scores(query);
        let mut order: Vec<usize> = (0..scores.len()).filter(|&i| Some(i) != exclude).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        order.truncate(k);
        order.into_iter().map(|i| (i, scores[i])).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_lowercases_and_splits_on_punctuation() {
        assert_eq!(
            tokenize("It's a GREAT film -- really!"),
            ["it", "s", "a", "great", "film", "really"]
        );
        assert!(tokenize("  ... ").is_empty());
    }
}
