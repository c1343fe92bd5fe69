//! Chat templates, rendered as HF's `apply_chat_template(..., tokenize=False)` renders them.
//!
//! HF renders with Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls), Python string methods,
//! a `raise_exception` global, a `strftime_now` global and a `tojson` filter that is Python's
//! `json.dumps`. This module sets up minijinja the same way, so a model's own template gives the
//! same string here as in transformers.

use std::str::FromStr;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A turn of `role`.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Errors of template rendering.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not parse or fails while rendering (including `raise_exception`).
    #[error("chat template: {0}")]
    Template(String),
    /// An unknown built-in template name.
    #[error("unknown chat template `{0}` (built-in: chatml, llama2, alpaca, gemma)")]
    UnknownBuiltin(String),
}

impl From<Error> for ChatError {
    fn from(e: Error) -> Self {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        ChatError::Template(msg)
    }
}

/// Templates for models that ship none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (OpenAI ChatML; Qwen, SmolLM).
    ChatMl,
    /// `<s>[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST] ... </s>` (Llama-2 chat).
    Llama2,
    /// `### Instruction:` / `### Response:` (Stanford Alpaca).
    Alpaca,
    /// `<start_of_turn>user\n…<end_of_turn>\n<start_of_turn>model\n` (Gemma's instruction-tuned
    /// format; a system prompt opens the first user turn), for fine-tuning a Gemma base model.
    Gemma,
}

impl FromStr for BuiltinTemplate {
    type Err = ChatError;

    fn from_str(s: &str) -> Result<Self, ChatError> {
        match s {
            "chatml" => Ok(BuiltinTemplate::ChatMl),
            "llama2" | "llama-2" => Ok(BuiltinTemplate::Llama2),
            "alpaca" => Ok(BuiltinTemplate::Alpaca),
            "gemma" => Ok(BuiltinTemplate::Gemma),
            other => Err(ChatError::UnknownBuiltin(other.to_string())),
        }
    }
}

impl BuiltinTemplate {
    /// The Jinja source.
    pub fn source(self) -> &'static str {
        match self {
            BuiltinTemplate::ChatMl => concat!(
                "{% for message in messages %}",
                "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
                "{% endfor %}",
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
            ),
            BuiltinTemplate::Llama2 => concat!(
                "{% if messages[0]['role'] == 'system' %}",
                "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}",
                "{% set messages = messages[1:] %}",
                "{% else %}{% set system = '' %}{% endif %}",
                "{% for message in messages %}",
                "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
                "{% endif %}",
                "{% if message['role'] == 'user' %}",
                "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}",
                "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}",
                "{% endfor %}"
            ),
            BuiltinTemplate::Alpaca => concat!(
                "{% for message in messages %}",
                "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}",
                "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}",
                "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}",
                "{% endfor %}",
                "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
            ),
            BuiltinTemplate::Gemma => concat!(
                "{{ bos_token }}",
                "{% if messages[0]['role'] == 'system' %}",
                "{% set system = messages[0]['content'] + '\\n\\n' %}{% set messages = messages[1:] %}",
                "{% else %}{% set system = '' %}{% endif %}",
                "{% for message in messages %}",
                "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}",
                "{{ '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}",
                "{% endfor %}",
                "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
            ),
        }
    }
}

/// Special tokens a template may refer to.
#[derive(Debug, Clone, Default)]
pub struct TemplateTokens {
    /// `bos_token`.
    pub bos_token: Option<String>,
    /// `eos_token`.
    pub eos_token: Option<String>,
}

/// Renders `template` over `messages`.
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    tokens: &TemplateTokens,
) -> Result<String, ChatError> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| -> Result<Value, Error> {
        Ok(Value::from(strftime_now(&fmt)))
    });
    env.add_filter("tojson", tojson);
    env.add_template("chat", template)?;
    let ctx = minijinja::context! {
        messages => Value::from_serialize(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => tokens.bos_token.clone().unwrap_or_default(),
        eos_token => tokens.eos_token.clone().unwrap_or_default(),
    };
    Ok(env.get_template("chat")?.render(ctx)?)
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`, which is
/// HF's `tojson`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    py_dumps(&json, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn py_dumps(
    v: &serde_json::Value,
    indent: Option<usize>,
    sort: bool,
    depth: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    // Without indent Python separates items with ", "; with indent, with "," and a newline.
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                py_dumps(item, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            let mut keys: Vec<&String> = map.keys().collect();
            if sort {
                keys.sort();
            }
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).expect("string"));
                out.push_str(": ");
                py_dumps(&map[k], indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        J::Array(_) => out.push_str("[]"),
        J::Object(_) => out.push_str("{}"),
        J::Number(n) if n.is_f64() => {
            let f = n.as_f64().expect("f64");
            // Python prints whole floats with a trailing `.0`.
            if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&n.to_string());
            }
        }
        other => out.push_str(&serde_json::to_string(other).expect("json")),
    }
}

/// The current UTC time through a `strftime` subset (`%Y %m %d %b %B %H %M %S %%`).
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_builtin_renders_model_turns_with_the_system_prompt_first() {
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", " Hi "),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "Bye"),
        ];
        let tokens = TemplateTokens {
            bos_token: Some("<bos>".into()),
            eos_token: Some("<eos>".into()),
        };
        let text = render(BuiltinTemplate::Gemma.source(), &msgs, true, &tokens).unwrap();
        assert_eq!(
            text,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
             <start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn chatml_builtin_renders_a_generation_prompt() {
        let msgs = [ChatMessage::new("user", "Hi")];
        let text = render(
            BuiltinTemplate::ChatMl.source(),
            &msgs,
            true,
            &TemplateTokens::default(),
        )
        .unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let msgs = [ChatMessage::new("assistant", "first")];
        let tokens = TemplateTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
        };
        let err = render(BuiltinTemplate::Llama2.source(), &msgs, true, &tokens)
            .unwrap_err()
            .to_string();
        assert!(err.contains("must alternate"), "{err}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let msgs = [ChatMessage::new("user", "é <b>")];
        let out = render(
            "{{ messages | tojson }}",
            &msgs,
            false,
            &TemplateTokens::default(),
        )
        .unwrap();
        assert_eq!(out, r#"[{"role": "user", "content": "é <b>"}]"#);
        let v = serde_json::json!({"b": [1, 2.0, "é"], "a": {}});
        let mut s = String::new();
        py_dumps(&v, None, false, 0, &mut s);
        assert_eq!(s, r#"{"b": [1, 2.0, "é"], "a": {}}"#);
        let mut s = String::new();
        py_dumps(&v, Some(2), true, 0, &mut s);
        assert_eq!(
            s,
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.0,\n    \"é\"\n  ]\n}"
        );
    }
}
