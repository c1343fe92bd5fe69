//! JSONL training data: formats, tokenization, and a line-offset index for streaming.
//!
//! Four line formats ([`DataFormat`]):
//! - `text`: `{"text": ...}` — loss on every token.
//! - `input_output`: `{"input": ..., "output": ...}` — tokenized separately and concatenated, so
//!   the boundary is exact; BOS only where the tokenizer adds it (start of the input); EOS appended
//!   to the output; loss on output tokens only.
//! - `chat`: `{"messages": [{"role", "content"}, ...]}` — rendered with the model's chat template;
//!   loss on the assistant turns (each turn's span is what rendering it adds after the generation
//!   prompt of the turns before it, up to and including the tokenizer's EOS token when the turn
//!   contains it: ChatML's newline after `<|im_end|>` carries no loss).
//! - `tokens`: `{"input_ids": [...], "labels": [...]?}` — already tokenized.
//!
//! Labels follow HF: `labels[t]` is the target of position `t` (`-100` = none); position `t − 1`
//! predicts it. The file is indexed by line offsets once and lines are read on demand, so a file
//! larger than memory works.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use collie_io::tokenizer::TokenizerBundle;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chat::{render, BuiltinTemplate, ChatMessage, TemplateTokens};

/// Label of a token that carries no loss.
pub const IGNORE: i64 = -100;

/// Line format of a training file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// `{"text"}`.
    #[default]
    Text,
    /// `{"input", "output"}`.
    InputOutput,
    /// `{"messages": [...]}`.
    Chat,
    /// `{"input_ids", "labels"?}`.
    Tokens,
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Targets, same length (`IGNORE` = no loss).
    pub labels: Vec<i64>,
}

/// Data errors; each names the file and, for content, the line.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file cannot be read.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// A line that cannot be used.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// A problem with the dataset as a whole.
    #[error("{path}: {message}")]
    Dataset {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Turns parsed lines into [`Example`]s.
#[derive(Clone)]
pub struct Encoder {
    format: DataFormat,
    tokenizer: Option<TokenizerBundle>,
    template: String,
    eos_id: Option<u32>,
    seq_len: usize,
}

impl Encoder {
    /// An encoder for `format`, truncating to `seq_len`. Every format but `tokens` needs a
    /// tokenizer; `chat` uses the tokenizer's template (ChatML when it has none).
    pub fn new(format: DataFormat, tokenizer: Option<TokenizerBundle>, seq_len: usize) -> Self {
        let template = tokenizer
            .as_ref()
            .and_then(|t| t.chat_template.clone())
            .unwrap_or_else(|| BuiltinTemplate::ChatMl.source().to_string());
        let eos_id = tokenizer
            .as_ref()
            .and_then(|t| t.eos_token.as_deref().and_then(|e| t.token_id(e)));
        Encoder {
            format,
            tokenizer,
            template,
            eos_id,
            seq_len,
        }
    }

    /// The line format.
    pub fn format(&self) -> DataFormat {
        self.format
    }

    fn tok(&self) -> Result<&TokenizerBundle, String> {
        self.tokenizer.as_ref().ok_or_else(|| {
            format!(
                "format `{:?}` needs a tokenizer and the model has none",
                self.format
            )
        })
    }

    /// Tokenizes one parsed line (errors are messages; the caller adds file and line).
    pub fn encode(&self, value: &Value) -> Result<Example, String> {
        let field = |name: &str| -> Result<&str, String> {
            value
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("expected a string field \"{name}\""))
        };
        let mut ex = match self.format {
            DataFormat::Text => {
                let ids = self
                    .tok()?
                    .encode(field("text")?, true)
                    .map_err(|e| e.to_string())?;
                let labels = ids.iter().map(|&t| t as i64).collect();
                Example {
                    input_ids: ids,
                    labels,
                }
            }
            DataFormat::InputOutput => {
                let tok = self.tok()?;
                let input = tok
                    .encode(field("input")?, true)
                    .map_err(|e| e.to_string())?;
                let mut output = tok
                    .encode(field("output")?, false)
                    .map_err(|e| e.to_string())?;
                output.push(
                    self.eos_id
                        .ok_or("the tokenizer has no EOS token to end the output with")?,
                );
                let labels = std::iter::repeat_n(IGNORE, input.len())
                    .chain(output.iter().map(|&t| t as i64))
                    .collect();
                Example {
                    input_ids: [input, output].concat(),
                    labels,
                }
            }
            DataFormat::Chat => self.encode_chat(value)?,
            DataFormat::Tokens => {
                let ids: Vec<u32> =
                    serde_json::from_value(value.get("input_ids").cloned().unwrap_or(Value::Null))
                        .map_err(|_| {
                            "expected \"input_ids\": an array of non-negative integers".to_string()
                        })?;
                let labels: Vec<i64> = match value.get("labels") {
                    None | Some(Value::Null) => ids.iter().map(|&t| t as i64).collect(),
                    Some(l) => serde_json::from_value(l.clone())
                        .map_err(|_| "expected \"labels\": an array of integers".to_string())?,
                };
                if labels.len() != ids.len() {
                    return Err(format!(
                        "\"labels\" has {} entries, \"input_ids\" {}",
                        labels.len(),
                        ids.len()
                    ));
                }
                Example {
                    input_ids: ids,
                    labels,
                }
            }
        };
        ex.input_ids.truncate(self.seq_len);
        ex.labels.truncate(self.seq_len);
        Ok(ex)
    }

    fn encode_chat(&self, value: &Value) -> Result<Example, String> {
        let tok = self.tok()?;
        let messages: Vec<ChatMessage> =
            serde_json::from_value(value.get("messages").cloned().unwrap_or(Value::Null)).map_err(
                |_| "expected \"messages\": a list of {\"role\", \"content\"} objects".to_string(),
            )?;
        if messages.is_empty() {
            return Err("\"messages\" is empty".into());
        }
        for (i, m) in messages.iter().enumerate() {
            if !["system", "user", "assistant"].contains(&m.role.as_str()) {
                return Err(format!(
                    "message {i} has unknown role \"{}\" (system, user, assistant)",
                    m.role
                ));
            }
        }
        let tokens = TemplateTokens {
            bos_token: tok.bos_token.clone(),
            eos_token: tok.eos_token.clone(),
        };
        let full = render(&self.template, &messages, false, &tokens).map_err(|e| e.to_string())?;
        // Byte spans of the assistant turns in `full`.
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before =
                render(&self.template, &messages[..i], true, &tokens).map_err(|e| e.to_string())?;
            let through = render(&self.template, &messages[..=i], false, &tokens)
                .map_err(|e| e.to_string())?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(
                    "the chat template does not render an assistant turn as an extension of the \
                            conversation before it, so its tokens cannot be told apart"
                        .into(),
                );
            }
            // The turn's labels end with its end token: what the template writes after it (the
            // newline of ChatML) is never generated, so it carries no loss.
            let turn = &full[before.len()..through.len()];
            let end = tokens
                .eos_token
                .as_deref()
                .filter(|e| !e.is_empty())
                .and_then(|e| turn.rfind(e).map(|i| i + e.len()))
                .unwrap_or(turn.len());
            spans.push(before.len()..before.len() + end);
        }
        let (ids, offsets) = tok.encode_with_offsets(&full).map_err(|e| e.to_string())?;
        let labels = ids
            .iter()
            .zip(&offsets)
            .map(|(&id, &(start, _))| {
                if spans.iter().any(|s| s.contains(&start)) {
                    id as i64
                } else {
                    IGNORE
                }
            })
            .collect();
        Ok(Example {
            input_ids: ids,
            labels,
        })
    }
}

/// A JSONL file indexed by the byte offset of each non-blank line.
pub struct JsonlDataset {
    path: PathBuf,
    file: File,
    /// `(offset, length, 1-based line number)`.
    lines: Vec<(u64, u32, u64)>,
    encoder: Encoder,
}

impl JsonlDataset {
    /// Indexes `path`. Fails if it cannot be read or has no non-blank line.
    pub fn open(path: &Path, encoder: Encoder) -> Result<Self, DataError> {
        let io = |cause| DataError::Io {
            path: path.to_path_buf(),
            cause,
        };
        let file = File::open(path).map_err(io)?;
        let mut reader = BufReader::new(file.try_clone().map_err(io)?);
        let mut lines = Vec::new();
        let (mut offset, mut number) = (0u64, 0u64);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            number += 1;
            if !buf.iter().all(|b| b.is_ascii_whitespace()) {
                lines.push((offset, n as u32, number));
            }
            offset += n as u64;
        }
        if lines.is_empty() {
            return Err(DataError::Dataset {
                path: path.to_path_buf(),
                message: "the dataset is empty (no non-blank lines)".into(),
            });
        }
        Ok(JsonlDataset {
            path: path.to_path_buf(),
            file,
            lines,
            encoder,
        })
    }

    /// Number of examples (non-blank lines).
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Always false: an empty file is refused by [`JsonlDataset::open`].
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and tokenizes example `i`.
    pub fn get(&self, i: usize) -> Result<Example, DataError> {
        let (offset, len, line) = self.lines[i];
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|cause| DataError::Io {
                path: self.path.clone(),
                cause,
            })?;
        let at = |message: String| DataError::Line {
            path: self.path.clone(),
            line,
            message,
        };
        let text = std::str::from_utf8(&buf).map_err(|_| at("not valid UTF-8".into()))?;
        let value: Value =
            serde_json::from_str(text).map_err(|e| at(format!("invalid JSON ({e})")))?;
        if !value.is_object() {
            return Err(at("expected a JSON object".into()));
        }
        self.encoder.encode(&value).map_err(at)
    }

    /// Tokenizes every line once, so a malformed line fails before training starts.
    pub fn validate(&self) -> Result<(), DataError> {
        (0..self.len()).try_for_each(|i| self.get(i).map(|_| ()))
    }
}

/// Writes one JSON value per line to `path` (through a temporary file renamed into place).
pub fn write_jsonl(path: &Path, values: &[Value]) -> Result<(), DataError> {
    let io = |cause| DataError::Io {
        path: path.to_path_buf(),
        cause,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut text = String::new();
    for v in values {
        text.push_str(&v.to_string());
        text.push('\n');
    }
    // One temporary name per process: the ranks of a parallel run write the same files.
    let tmp = path.with_extension(format!("jsonl.partial.{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Splits `items` into `(train, held_out)` with a seeded shuffle; `fraction` of them (at least
/// one, when there are two or more) are held out.
pub fn holdout_split<T>(mut items: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    items.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let n = items.len();
    let held = if n < 2 {
        0
    } else {
        ((n as f64 * fraction).round() as usize).clamp(1, n - 1)
    };
    let train = items.split_off(held);
    (train, items)
}
