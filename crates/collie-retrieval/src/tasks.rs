//! The task registry: where each task's examples come from, how an example is written for the
//! retriever and for the language model, and how predictions are scored.
//!
//! Sentiment tasks come from the human ratings of Hutto & Gilbert (ICWSM 2014), shipped in the
//! `vadersentiment==3.3.2` source archive (`*_GroundTruth.txt`: id, mean rating in [−4, 4],
//! sentence): two classes (rating > 0.5 → `great`, < −0.5 → `terrible`, the rest dropped) or five
//! equal-width bins of the rating (`terrible` < −2.4 ≤ `bad` < −0.8 ≤ `okay` ≤ 0.8 < `good` ≤ 2.4
//! < `great`), verbalized as UDR's SST templates (`It was great .`). `chatqa` pairs the first
//! two turns of each chatterbot-corpus conversation and is scored by ROUGE-L.

use std::collections::HashSet;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::RetrievalError;

/// The hutto_ICWSM_2014 directory inside the vadersentiment source archive.
const VADER: &str = "pypi-sdist:vadersentiment==3.3.2/vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz/hutto_ICWSM_2014";
/// The English chatterbot corpus.
const CHATTERBOT: &str = "pypi:chatterbot-corpus==1.3.3/chatterbot_corpus/data/english";

/// How predictions of a task are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Fraction of test examples whose label has the lowest LM loss.
    Accuracy,
    /// ROUGE-L F of the greedy continuation against the reference.
    RougeL,
}

/// Where a task's examples come from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    /// A vader ground-truth file, split into two classes or five bins.
    Vader { file: &'static str, five: bool },
    /// Chatterbot question → answer pairs.
    Chatterbot,
}

/// One task of the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Registry name (`movie2`, …).
    pub name: &'static str,
    /// Prefix of the demonstration text the retriever's demonstration tower reads (UDR's task
    /// instruction).
    pub instruction: &'static str,
    /// Label words (classification); empty for generation.
    pub labels: &'static [&'static str],
    /// How predictions are scored.
    pub metric: Metric,
    source: Source,
}

/// One example: the input, the output as the LM sees it, the label index (classification).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Position in the task's full example list (stable across runs).
    pub id: usize,
    /// The input text (what the query tower reads).
    pub input: String,
    /// The output text (`It was great .`, or the answer).
    pub output: String,
    /// Index into [`Task::labels`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<usize>,
}

const SENTIMENT: &str = "Sentiment of the sentence: ";
const TWO: &[&str] = &["terrible", "great"];
const FIVE: &[&str] = &["terrible", "bad", "okay", "good", "great"];

/// Every task collie-rs knows.
pub fn registry() -> Vec<Task> {
    let vader = |name, file, five| Task {
        name,
        instruction: SENTIMENT,
        labels: if five { FIVE } else { TWO },
        metric: Metric::Accuracy,
        source: Source::Vader { file, five },
    };
    vec![
        vader("movie2", "movieReviewSnippets_GroundTruth.txt", false),
        vader("movie5", "movieReviewSnippets_GroundTruth.txt", true),
        vader("product2", "amazonReviewSnippets_GroundTruth.txt", false),
        vader("tweet2", "tweets_GroundTruth.txt", false),
        vader("editorial2", "nytEditorialSnippets_GroundTruth.txt", false),
        Task {
            name: "chatqa",
            instruction: "Answer the question: ",
            labels: &[],
            metric: Metric::RougeL,
            source: Source::Chatterbot,
        },
    ]
}

/// The task called `name`, or an error listing the known ones.
pub fn task(name: &str) -> Result<Task, RetrievalError> {
    registry()
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = registry().iter().map(|t| t.name).collect();
            RetrievalError::Config(format!(
                "unknown task `{name}` (known: {})",
                names.join(", ")
            ))
        })
}

impl Task {
    /// Whether the task picks one of its labels.
    pub fn is_classification(&self) -> bool {
        !self.labels.is_empty()
    }

    /// The output text of label `i` (`It was great .`).
    pub fn verbalize(&self, i: usize) -> String {
        format!("It was {} .", self.labels[i])
    }

    /// What the retriever's demonstration tower reads: `{instruction}{input}\t{output}`.
    pub fn demonstration(&self, e: &Example) -> String {
        format!("{}{}\t{}", self.instruction, e.input, e.output)
    }

    /// An example as a demonstration in the LM prompt: `{input}\t{output}`.
    pub fn prompt_block(&self, e: &Example) -> String {
        format!("{}\t{}", e.input, e.output)
    }

    /// Every example of the task, read from its asset (inputs de-duplicated, first kept).
    pub fn load(&self) -> Result<Vec<Example>, RetrievalError> {
        let raw: Vec<(String, String, Option<usize>)> = match self.source {
            Source::Vader { file, five } => {
                let path = collie_core::asset::resolve(&format!("{VADER}/{file}"))?;
                let text =
                    std::fs::read_to_string(&path).map_err(|e| RetrievalError::io(&path, e))?;
                let mut out = Vec::new();
                for (n, line) in text.lines().enumerate() {
                    let line = line.trim_end_matches('\r');
                    if line.trim().is_empty() {
                        continue;
                    }
                    let mut parts = line.splitn(3, '\t');
                    let (_, rating, sentence) = (parts.next(), parts.next(), parts.next());
                    let (Some(rating), Some(sentence)) = (rating, sentence) else {
                        return Err(RetrievalError::Data(format!(
                            "{}:{}: expected `id<TAB>rating<TAB>sentence`",
                            path.display(),
                            n + 1
                        )));
                    };
                    let rating: f64 = rating.trim().parse().map_err(|_| {
                        RetrievalError::Data(format!(
                            "{}:{}: rating `{rating}` is not a number",
                            path.display(),
                            n + 1
                        ))
                    })?;
                    let label = if five {
                        Some(match rating {
                            r if r < -2.4 => 0,
                            r if r < -0.8 => 1,
                            r if r <= 0.8 => 2,
                            r if r <= 2.4 => 3,
                            _ => 4,
                        })
                    } else if rating > 0.5 {
                        Some(1)
                    } else if rating < -0.5 {
                        Some(0)
                    } else {
                        None
                    };
                    if let Some(l) = label {
                        out.push((sentence.trim().to_string(), self.verbalize(l), Some(l)));
                    }
                }
                out
            }
            Source::Chatterbot => {
                let dir = collie_core::asset::resolve(CHATTERBOT)?;
                collie_data::corpora::chatterbot_conversations(&dir)
                    .map_err(|e| RetrievalError::Data(e.to_string()))?
                    .into_iter()
                    .map(|turns| (turns[0].clone(), turns[1].clone(), None))
                    .collect()
            }
        };
        let mut seen = HashSet::new();
        Ok(raw
            .into_iter()
            .filter(|(input, _, _)| !input.is_empty() && seen.insert(input.clone()))
            .enumerate()
            .map(|(id, (input, output, label))| Example {
                id,
                input,
                output,
                label,
            })
            .collect())
    }
}

/// A task's examples divided into the demonstration/training pool, dev and test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Splits {
    /// Training queries and the demonstration pool.
    pub train: Vec<Example>,
    /// Held out for choosing settings.
    pub dev: Vec<Example>,
    /// Held out for the reported numbers.
    pub test: Vec<Example>,
}

/// Splits `examples` by a seeded shuffle: the first `test` go to test, the next `dev` to dev,
/// up to `max_train` of the rest to train. Errors when a split would be empty.
pub fn split(
    task: &str,
    mut examples: Vec<Example>,
    seed: u64,
    test: usize,
    dev: usize,
    max_train: usize,
) -> Result<Splits, RetrievalError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    examples.shuffle(&mut rng);
    let n = examples.len();
    if n < test + dev + 2 {
        return Err(RetrievalError::Data(format!(
            "task `{task}` has {n} examples: too few for {test} test + {dev} dev + a training pool \
             of at least 2"
        )));
    }
    let rest = examples.split_off(test + dev);
    let dev_part = examples.split_off(test);
    let mut train = rest;
    train.truncate(max_train.max(2));
    Ok(Splits {
        train,
        dev: dev_part,
        test: examples,
    })
}
