//! Tokenizers: HF `tokenizer.json` (+ `tokenizer_config.json`), or rebuilt from GGUF metadata.
//!
//! Encoding goes through the tokenizer's own post-processor, so `encode(text, true)` adds exactly
//! the special tokens HF's `tokenizer(text)` adds. A GGUF carries no `tokenizer.json`: its
//! vocabulary, merges (or scores) and token types are turned into the same `tokenizer.json` that
//! transformers' GGUF loader builds: byte-level BPE with the pre-tokenizer split its `pre` name
//! implies (`gpt2`), or SentencePiece BPE with byte fallback (`llama`); control tokens become
//! special tokens and BOS/EOS are added per the `add_bos_token` / `add_eos_token` flags.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{json, Value};

use crate::error::{IoError, Result};
use crate::gguf::{GgufSource, MetaValue};
use crate::json::{read_json, write_json};

/// Token ids and the byte range of each in the encoded text.
pub type EncodedSpans = (Vec<u32>, Vec<(usize, usize)>);

/// A tokenizer with what HF keeps beside it in `tokenizer_config.json`.
#[derive(Clone)]
pub struct TokenizerBundle {
    /// The HF tokenizers pipeline.
    pub tokenizer: tokenizers::Tokenizer,
    /// Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    /// BOS token text.
    pub bos_token: Option<String>,
    /// EOS token text.
    pub eos_token: Option<String>,
    /// Where it was loaded from (for messages).
    pub source: PathBuf,
}

impl std::fmt::Debug for TokenizerBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerBundle")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// Reads a token from `tokenizer_config.json`: a string or an `AddedToken` dict.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Picks the default template out of a `chat_template` value (a string, or a list of named ones).
fn template_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| items.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

impl TokenizerBundle {
    /// Loads `tokenizer.json` from an HF model directory, with `tokenizer_config.json` and
    /// `chat_template.jinja` when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(IoError::Tokenizer {
                path,
                message: "file not found".into(),
            });
        }
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| IoError::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
        // transformers ignores the truncation and padding saved in tokenizer.json (they apply
        // only when a call asks for them); so do we: callers truncate and pad themselves.
        tokenizer
            .with_truncation(None)
            .map_err(|e| IoError::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?
            .with_padding(None);
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| IoError::io(&jinja, e))?)
        } else {
            template_text(config.get("chat_template"))
        };
        Ok(TokenizerBundle {
            tokenizer,
            chat_template,
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
            source: path,
        })
    }

    /// Rebuilds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(gguf: &GgufSource) -> Result<Self> {
        let path = gguf.path().to_path_buf();
        let err = |message: String| IoError::Tokenizer {
            path: path.clone(),
            message,
        };
        let model = gguf.get_str("tokenizer.ggml.model").ok_or_else(|| {
            err("no `tokenizer.ggml.model` metadata: the file carries no tokenizer".into())
        })?;
        let arch = gguf.get_str("general.architecture").unwrap_or("");
        let gemma = matches!(arch, "gemma" | "gemma2" | "gemma3");
        if model == "llama" && (arch.starts_with("gemma") && !gemma || arch == "phi3") {
            return Err(err(format!(
                "the {arch} SentencePiece vocabulary needs model-specific rules that are not implemented; \
                 pass an HF directory with tokenizer.json instead"
            )));
        }
        let tokens = gguf
            .get_str_array("tokenizer.ggml.tokens")
            .ok_or_else(|| err("`tokenizer.ggml.tokens` is missing".into()))?;
        let types = gguf
            .get_i64_array("tokenizer.ggml.token_type")
            .unwrap_or_default();
        let merges = gguf.get_str_array("tokenizer.ggml.merges");
        let special_id = |key: &str| {
            gguf.get_u64(&format!("tokenizer.ggml.{key}"))
                .map(|v| v as usize)
        };
        let token_at = |id: Option<usize>| id.and_then(|i| tokens.get(i)).map(|t| t.to_string());
        let bos_token = token_at(special_id("bos_token_id"));
        let eos_token = token_at(special_id("eos_token_id"));
        let specials: Vec<usize> = [
            "bos_token_id",
            "eos_token_id",
            "unknown_token_id",
            "padding_token_id",
        ]
        .iter()
        .filter_map(|k| special_id(k))
        .collect();
        // SentencePiece vocabularies get BOS unless the file says otherwise, as in llama.cpp.
        let add_bos = gguf
            .get_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(model == "llama");
        let add_eos = gguf
            .get_bool("tokenizer.ggml.add_eos_token")
            .unwrap_or(false);
        let vocab = Vocab {
            tokens: &tokens,
            types: &types,
            specials: &specials,
            add_bos: bos_token.as_deref().filter(|_| add_bos),
            add_eos: eos_token.as_deref().filter(|_| add_eos),
        };
        let json = match model {
            "gpt2" => {
                let merges = merges.ok_or_else(|| err("`tokenizer.ggml.merges` is missing".into()))?;
                byte_level_json(&vocab, &merges, gguf.get_str("tokenizer.ggml.pre"))
            }
            "llama" if gemma => gemma_json(&vocab),
            "llama" => {
                let scores = match &merges {
                    Some(_) => Vec::new(),
                    None => gguf.get_f64_array("tokenizer.ggml.scores").ok_or_else(|| {
                        err("a SentencePiece vocabulary needs `tokenizer.ggml.merges` or `tokenizer.ggml.scores`".into())
                    })?,
                };
                sentencepiece_json(&vocab, merges.as_deref(), &scores)
            }
            other => {
                return Err(err(format!(
                    "tokenizer model `{other}` is not supported (byte-level BPE `gpt2` and SentencePiece \
                     `llama` are); pass an HF directory with tokenizer.json instead"
                )))
            }
        };
        let tokenizer = tokenizers::Tokenizer::from_str(&json.to_string())
            .map_err(|e| err(format!("cannot build the tokenizer from metadata: {e}")))?;
        Ok(TokenizerBundle {
            tokenizer,
            chat_template: gguf.get_str("tokenizer.chat_template").map(str::to_string),
            bos_token,
            eos_token,
            source: path,
        })
    }

    /// llama.cpp's `tokenizer.*` metadata for this tokenizer, for writing a GGUF file: byte-level
    /// BPE vocabularies (`tokenizer.ggml.model = "gpt2"`), with the `pre` name of the
    /// pre-tokenizer split (the inverse of what [`TokenizerBundle::from_gguf`] builds), token
    /// types (special added tokens as control, other added tokens as user-defined), merges,
    /// BOS/EOS ids, whether BOS is added, and the chat template. `pad_id` comes from the model
    /// config. Other tokenizer kinds are an error naming the kind.
    pub fn gguf_metadata(&self, pad_id: Option<u32>) -> Result<Vec<(String, MetaValue)>> {
        let json: Value = serde_json::from_str(
            &self
                .tokenizer
                .to_string(false)
                .map_err(|e| self.error(format!("cannot serialize: {e}")))?,
        )
        .map_err(|e| self.error(format!("cannot serialize: {e}")))?;
        let model = &json["model"];
        let kind = model["type"].as_str().unwrap_or("?");
        let pre = gguf_pre_name(&json["pre_tokenizer"]);
        let (true, Some(pre)) = (kind == "BPE", pre) else {
            return Err(self.error(format!(
                "only byte-level BPE tokenizers can be written to GGUF (this one is {kind} with                  pre-tokenizer {})",
                json["pre_tokenizer"]
            )));
        };
        let vocab = self.tokenizer.get_vocab(true);
        let n = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
        let mut tokens: Vec<Option<String>> = vec![None; n];
        for (t, id) in vocab {
            tokens[id as usize] = Some(t);
        }
        const NORMAL: i32 = 1;
        const UNUSED: i32 = 5;
        let mut types: Vec<i32> = tokens
            .iter()
            .map(|t| if t.is_some() { NORMAL } else { UNUSED })
            .collect();
        for a in json["added_tokens"].as_array().into_iter().flatten() {
            if let Some(id) = a["id"].as_u64().filter(|&i| (i as usize) < n) {
                let special = a["special"].as_bool().unwrap_or(false);
                types[id as usize] = if special { CONTROL } else { USER_DEFINED } as i32;
            }
        }
        // Ids no token holds (a vocabulary with holes) get llama.cpp's converter's filler.
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
            .collect();
        let merges: Vec<String> = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| match m {
                Value::String(s) => Some(s.clone()),
                Value::Array(p) => {
                    let p: Vec<&str> = p.iter().filter_map(Value::as_str).collect();
                    Some(p.join(" "))
                }
                _ => None,
            })
            .collect();
        let strings = |items: &[String]| {
            MetaValue::Array(items.iter().map(|s| MetaValue::String(s.clone())).collect())
        };
        let mut out = vec![
            (
                "tokenizer.ggml.model".into(),
                MetaValue::String("gpt2".into()),
            ),
            ("tokenizer.ggml.pre".into(), MetaValue::String(pre.into())),
            ("tokenizer.ggml.tokens".into(), strings(&tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
            ),
        ];
        if !merges.is_empty() {
            out.push(("tokenizer.ggml.merges".into(), strings(&merges)));
        }
        let id_of = |t: &Option<String>| t.as_deref().and_then(|t| self.token_id(t));
        let bos = id_of(&self.bos_token);
        let first_special = json["post_processor"]["single"][0]["SpecialToken"]["id"].as_str();
        let add_bos = bos.is_some() && first_special == self.bos_token.as_deref();
        for (key, id) in [
            ("bos_token_id", bos),
            ("eos_token_id", id_of(&self.eos_token)),
            ("padding_token_id", pad_id),
        ] {
            if let Some(id) = id {
                out.push((format!("tokenizer.ggml.{key}"), MetaValue::U32(id)));
            }
        }
        out.push((
            "tokenizer.ggml.add_bos_token".into(),
            MetaValue::Bool(add_bos),
        ));
        out.push((
            "tokenizer.ggml.add_eos_token".into(),
            MetaValue::Bool(false),
        ));
        if let Some(t) = &self.chat_template {
            out.push((
                "tokenizer.chat_template".into(),
                MetaValue::String(t.clone()),
            ));
        }
        Ok(out)
    }

    /// Token ids of `text`; with `add_special_tokens` the post-processor adds BOS/EOS as HF does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(format!("cannot encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` (no special tokens added) with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<EncodedSpans> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| self.error(format!("cannot encode: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(format!("cannot decode: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Id of a token's text.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Fails unless every token id fits in a model vocabulary of `model_vocab` rows.
    pub fn check_fits(&self, model_vocab: usize) -> Result<()> {
        let max_id = self
            .tokenizer
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        if max_id > model_vocab {
            return Err(self.error(format!(
                "tokenizer has ids up to {} but the model's vocab_size is {model_vocab}: \
                 tokenizer and model do not belong together",
                max_id - 1
            )));
        }
        Ok(())
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.tokenizer
            .save(&path, true)
            .map_err(|e| self.error(format!("cannot write {}: {e}", path.display())))?;
        let mut config = serde_json::Map::new();
        // The generic fast-tokenizer class loads tokenizer.json as is, without model-specific
        // rewrites of its pipeline.
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        if let Some(bos) = &self.bos_token {
            config.insert("bos_token".into(), json!(bos));
        }
        if let Some(eos) = &self.eos_token {
            config.insert("eos_token".into(), json!(eos));
        }
        if let Some(t) = &self.chat_template {
            config.insert("chat_template".into(), json!(t));
        }
        write_json(&dir.join("tokenizer_config.json"), &Value::Object(config))
    }

    fn error(&self, message: String) -> IoError {
        IoError::Tokenizer {
            path: self.source.clone(),
            message,
        }
    }
}

/// GPT-2's reversible byte → printable-character table.
fn bytes_to_unicode() -> HashMap<u8, char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = printable.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (b as u8, char::from_u32(c).expect("valid char")))
        .collect()
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex llama.cpp's `tokenizer.ggml.pre` name stands for; `None` means GPT-2's own
/// byte-level regex.
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// llama.cpp's `pre` name of a byte-level pre-tokenizer: `gpt-2` for GPT-2's own split, the
/// name whose regex [`split_regex`] gives for a split followed by a byte-level step, `smollm`
/// for single digits split before GPT-2's; `None` for anything else.
fn gguf_pre_name(pre: &Value) -> Option<&'static str> {
    let byte_level = |v: &Value, regex: bool| {
        v["type"] == "ByteLevel" && v["use_regex"].as_bool().unwrap_or(true) == regex
    };
    if byte_level(pre, true) {
        // llama.cpp's name of GPT-2's own split (it refuses `gpt2`).
        return Some("gpt-2");
    }
    let steps = pre["pretokenizers"]
        .as_array()
        .filter(|_| pre["type"] == "Sequence")?;
    match steps.as_slice() {
        [split, last] if split["type"] == "Split" && byte_level(last, false) => {
            let regex = split["pattern"]["Regex"].as_str()?;
            ["llama-bpe", "qwen2", "tekken", "gpt-4o"]
                .into_iter()
                .find(|name| split_regex(name) == Some(regex))
        }
        [digits, last] if digits["type"] == "Digits" && byte_level(last, true) => digits
            ["individual_digits"]
            .as_bool()
            .filter(|b| *b)
            .map(|_| "smollm"),
        _ => None,
    }
}

/// A GGUF vocabulary and the special-token facts both tokenizer kinds need.
struct Vocab<'a> {
    tokens: &'a [&'a str],
    types: &'a [i64],
    /// Ids of the BOS/EOS/UNK/PAD tokens: special whatever their type says.
    specials: &'a [usize],
    add_bos: Option<&'a str>,
    add_eos: Option<&'a str>,
}

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

impl Vocab<'_> {
    /// `added_tokens`: control and special tokens as special, user-defined ones as plain added
    /// tokens. `keep(token)` can veto a control token (transformers skips mislabelled ones).
    fn added_tokens(
        &self,
        in_vocab: impl Fn(&str) -> bool,
        keep_control: impl Fn(&str) -> bool,
    ) -> Vec<Value> {
        let mut added = Vec::new();
        for (id, token) in self.tokens.iter().enumerate() {
            let kind = self.types.get(id).copied().unwrap_or(1);
            let special = (kind == CONTROL && keep_control(token)) || self.specials.contains(&id);
            if special || (kind == USER_DEFINED && in_vocab(token)) {
                added.push(json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special,
                }));
            }
        }
        added
    }
}

/// `tokenizer.json` for a byte-level BPE vocabulary (transformers' `GPT2Tokenizer` from GGUF).
fn byte_level_json(v: &Vocab, merges: &[&str], pre: Option<&str>) -> Value {
    let spelling = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.values().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    // A token written in raw text (not the byte alphabet) is respelled byte by byte.
    let spelled: Vec<String> = v
        .tokens
        .iter()
        .map(|t| {
            if in_alphabet(t) {
                t.to_string()
            } else {
                t.bytes().map(|b| spelling[&b]).collect()
            }
        })
        .collect();
    let vocab: serde_json::Map<String, Value> = spelled
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| json!(m.split(' ').collect::<Vec<_>>()))
        .collect();
    // A control token outside the byte alphabet is a llama.cpp mislabel; transformers skips it.
    let added = v.added_tokens(|t| vocab.contains_key(t), in_alphabet);
    let pre_tokenizer = match pre.and_then(split_regex) {
        Some(regex) => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            ],
        }),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
    };
    let post_processor = template_processing(v.add_bos, v.add_eos, &vocab);
    tokenizer_json(
        added,
        pre_tokenizer,
        post_processor,
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        json!({
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        }),
    )
}

/// A whole `tokenizer.json` from its parts (no normalizer, truncation or padding).
fn tokenizer_json(
    added: Vec<Value>,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: Value,
) -> Value {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model,
    })
}

/// transformers' `generate_merges`: every split of a token into two vocabulary pieces, ordered by
/// the token's score (highest first), then by the pieces' lengths in characters; ties keep
/// vocabulary order.
fn merges_from_scores(
    tokens: &[&str],
    scores: &[f64],
    index: &HashMap<&str, usize>,
) -> Vec<(String, String)> {
    // Python's dict(zip(tokens, scores)): first position, last score.
    let mut order: Vec<&str> = Vec::new();
    let mut score: HashMap<&str, f64> = HashMap::new();
    for (t, s) in tokens.iter().zip(scores) {
        if score.insert(t, *s).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for token in order {
        let mut local: Vec<(&str, &str, f64)> = token
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&token[..i], &token[i..]))
            .filter(|(l, r)| index.contains_key(l) && index.contains_key(r))
            .map(|(l, r)| (l, r, score[token]))
            .collect();
        local.sort_by_key(|(l, r, _)| (index[l], index[r]));
        merges.extend(local);
    }
    let chars = |s: &str| s.chars().count();
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then(chars(b.0).cmp(&chars(a.0)))
            .then(chars(b.1).cmp(&chars(a.1)))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// `tokenizer.json` for a SentencePiece BPE vocabulary (transformers' `LlamaTokenizer` from GGUF):
/// `▁` for spaces, prefixed to the text, bytes as `<0xNN>` fallback tokens.
fn sentencepiece_json(v: &Vocab, merges: Option<&[&str]>, scores: &[f64]) -> Value {
    let index: HashMap<&str, usize> = v.tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let merges: Vec<(String, String)> = match merges {
        Some(m) => m
            .iter()
            .map(|m| {
                let (l, r) = m.split_once(' ').unwrap_or((m, ""));
                (l.to_string(), r.to_string())
            })
            .collect(),
        None => merges_from_scores(v.tokens, scores, &index),
    };
    byte_fallback_json(
        v,
        v.tokens,
        &index,
        merges,
        None,
        json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false}),
        true,
    )
}

/// `tokenizer.json` for a Gemma vocabulary (transformers' `GemmaTokenizer` from GGUF): spaces
/// become `▁` with no prefix space, bytes fall back to `<0xNN>` tokens, and the merges come from
/// the vocabulary in file order (Gemma's scores do not follow its merge order). A token of
/// spaces only, which the file stores as real spaces, is looked up as `▁`s.
fn gemma_json(v: &Vocab) -> Value {
    let spelled: Vec<String> = v
        .tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.trim().is_empty() {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.to_string()
            }
        })
        .collect();
    let spelled_refs: Vec<&str> = spelled.iter().map(String::as_str).collect();
    let index: HashMap<&str, usize> = spelled_refs
        .iter()
        .enumerate()
        .map(|(i, t)| (*t, i))
        .collect();
    // Rank by position: the first token merges first.
    let positions: Vec<f64> = (0..spelled_refs.len()).map(|i| -(i as f64)).collect();
    let merges = merges_from_scores(&spelled_refs, &positions, &index);
    // Added tokens keep the file's spelling, and a user-defined one is added only if that
    // spelling is in the (respelled) vocabulary, as transformers does.
    let mut json = byte_fallback_json(
        v,
        &spelled_refs,
        &index,
        merges,
        Some("<unk>"),
        json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
        false,
    );
    json["normalizer"] =
        json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    json
}

/// What the SentencePiece-style vocabularies share: a byte-fallback BPE model over `tokens`
/// (ids = positions) with `merges`, the added tokens found in `index`, HF's post-processor, and a
/// decoder turning `▁` back into spaces (then stripping the prefix space the pre-tokenizer added,
/// if `strip_prefix_space`).
fn byte_fallback_json(
    v: &Vocab,
    tokens: &[&str],
    index: &HashMap<&str, usize>,
    merges: Vec<(String, String)>,
    unk: Option<&str>,
    pre_tokenizer: Value,
    strip_prefix_space: bool,
) -> Value {
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let added = v.added_tokens(|t| index.contains_key(t), |_| true);
    let post_processor = template_processing(v.add_bos, v.add_eos, &vocab);
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if strip_prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    tokenizer_json(
        added,
        pre_tokenizer,
        post_processor,
        json!({"type": "Sequence", "decoders": decoders}),
        json!({
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        }),
    )
}

/// HF's post-processor: `[bos] $A [eos]` and `[bos] $A [eos] [bos] $B:1 [eos]:1`.
fn template_processing(
    bos: Option<&str>,
    eos: Option<&str>,
    vocab: &serde_json::Map<String, Value>,
) -> Value {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (name, type_id, out) in [("A", 0, 0), ("A", 0, 1), ("B", 1, 1)] {
        let target = if out == 0 { &mut single } else { &mut pair };
        if let Some(b) = bos {
            target.push(special(b, type_id));
        }
        target.push(seq(name, type_id));
        if let Some(e) = eos {
            target.push(special(e, type_id));
        }
    }
    let mut special_tokens = serde_json::Map::new();
    for t in [bos, eos].into_iter().flatten() {
        let id = vocab.get(t).cloned().unwrap_or(Value::Null);
        special_tokens.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens})
}
