//! `recipe-udr`'s TOML configuration (`configs/default.toml`), with `--set a.b=value` overrides.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdrConfig {
    /// `[data]`.
    pub data: DataSection,
    /// `[lm]`: the scoring and inference language model.
    pub lm: LmSection,
    /// `[retriever]`.
    pub retriever: RetrieverSection,
    /// `[eval]`.
    pub eval: EvalSection,
    /// `[output]`.
    pub output: OutputSection,
}

/// Tasks and splits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Registry names (`collie_retrieval::tasks`).
    pub tasks: Vec<String>,
    /// Seed of the splits.
    pub seed: u64,
    /// Test examples per task.
    pub test: usize,
    /// Dev examples per task.
    pub dev: usize,
    /// Demonstration pool per task (the training split, capped).
    pub pool: usize,
    /// Training queries per task (the first of the pool).
    pub train_queries: usize,
}

/// The language model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmSection {
    /// HF directory, GGUF file or asset spec.
    pub model: String,
    /// Pairs per scoring forward pass.
    pub score_batch: usize,
    /// Tokens per scoring row.
    pub max_len: usize,
}

/// Candidates and retriever training.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrieverSection {
    /// The encoder both towers start from.
    pub model: String,
    /// Tokens per text.
    pub max_len: usize,
    /// Pooling of both towers: `cls` (UDR's position-0 vector, for BERT-base) or `mean` (the
    /// pooling sentence-transformers encoders such as all-MiniLM-L6-v2 were trained with).
    #[serde(default = "default_pooling")]
    pub pooling: String,
    /// BM25 candidates per training query (iteration 0).
    pub candidates: usize,
    /// Candidates the trained retriever adds per query when mining.
    pub mine_k: usize,
    /// Mining rounds (each: retrieve, score the new candidates, retrain).
    pub mining_rounds: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Epochs per training round.
    pub epochs: usize,
    /// Queries per batch.
    pub batch_queries: usize,
    /// Candidates per query per step.
    pub per_query: usize,
    /// Weight of the list-wise rank loss.
    pub rank_weight: f64,
    /// Weight of the in-batch loss.
    pub in_batch_weight: f64,
    /// Seed of sampling and batching.
    pub seed: u64,
    /// Checkpoint a training round every N steps (0 = only at its end), so an interrupted
    /// round resumes where it stopped.
    #[serde(default = "default_save_every")]
    pub save_every: u64,
}

fn default_save_every() -> u64 {
    50
}

impl RetrieverSection {
    /// The parsed `pooling` (checked by [`UdrConfig::parse`]).
    pub fn pooling(&self) -> collie_bert::Pooling {
        self.pooling.parse().unwrap_or(collie_bert::Pooling::Cls)
    }
}

fn default_pooling() -> String {
    "cls".into()
}

/// In-context evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Demonstrations per test input.
    pub k: usize,
    /// Prompt token budget (least similar demonstrations are dropped to fit).
    pub max_prompt_tokens: usize,
    /// New tokens for generation tasks.
    pub max_new_tokens: usize,
    /// Methods to compare: random, bm25, sbert, udr_iter0, udr.
    pub methods: Vec<String>,
    /// Bootstrap resamples for the 95 % intervals.
    pub bootstrap: usize,
    /// Task of the loss ablations (single-task retrievers without `L_rank` / without `L_ib`);
    /// none: no ablations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ablation_task: Option<String>,
}

/// Where everything goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Run directory; every stage's outputs live here and make the stage resumable.
    pub dir: PathBuf,
}

/// Methods `eval.methods` may name.
pub const METHODS: &[&str] = &["random", "bm25", "sbert", "udr_iter0", "udr"];

impl UdrConfig {
    /// Parses and checks a config.
    pub fn parse(text: &str, origin: &str, sets: &[String]) -> anyhow::Result<Self> {
        let c: UdrConfig = collie_train::config::parse_toml(text, origin, sets)?;
        let bad = |key: &str, msg: String| {
            anyhow::Error::from(collie_train::config::config_key_error(key, msg))
        };
        if c.data.tasks.is_empty() {
            return Err(bad("data.tasks", "empty: name at least one task".into()));
        }
        for t in &c.data.tasks {
            collie_retrieval::tasks::task(t).map_err(|e| bad("data.tasks", e.to_string()))?;
        }
        if c.data.train_queries == 0 || c.data.train_queries > c.data.pool {
            return Err(bad(
                "data.train_queries",
                format!(
                    "{} (must be 1..=data.pool = {})",
                    c.data.train_queries, c.data.pool
                ),
            ));
        }
        if c.data.test == 0 {
            return Err(bad(
                "data.test",
                "0: the evaluation needs test examples".into(),
            ));
        }
        c.retriever
            .pooling
            .parse::<collie_bert::Pooling>()
            .map_err(|e| bad("retriever.pooling", e))?;
        if c.retriever.per_query < 2 || c.retriever.candidates < c.retriever.per_query {
            return Err(bad(
                "retriever.per_query",
                format!(
                    "{} (must be at least 2 and at most retriever.candidates = {})",
                    c.retriever.per_query, c.retriever.candidates
                ),
            ));
        }
        if let Some(m) = c
            .eval
            .methods
            .iter()
            .find(|m| !METHODS.contains(&m.as_str()))
        {
            return Err(bad(
                "eval.methods",
                format!("unknown method `{m}` (known: {})", METHODS.join(", ")),
            ));
        }
        if let Some(t) = c
            .eval
            .ablation_task
            .as_ref()
            .filter(|t| !c.data.tasks.contains(t))
        {
            return Err(bad(
                "eval.ablation_task",
                format!("`{t}` is not one of data.tasks"),
            ));
        }
        Ok(c)
    }
}
