//! The HTTP side of `collie serve`: OpenAI's chat-completions and completions shapes, the model
//! list, health, and the chat page. A request is checked and tokenized here, then handed to the
//! engine thread as a [`Job`]; its tokens come back over a channel and are sent as one JSON answer
//! or as server-sent events.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use collie_data::chat::{render, ChatMessage, TemplateTokens};
use collie_io::tokenizer::TokenizerBundle;
use collie_train::batcher::{Event, Finish, Request};
use collie_train::generate::GenerationConfig;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::engine::Job;
use super::text::TextStream;

/// Largest request body accepted (bytes).
pub const BODY_LIMIT: usize = 4 << 20;

/// How busy the engine is, for `/health`.
#[derive(Default)]
pub struct Load {
    /// Sequences in the running batches (the engine updates it after every step).
    pub running: AtomicUsize,
    /// Requests queued and not yet taken by the engine.
    pub waiting: AtomicUsize,
}

/// What every handler shares.
pub struct App {
    /// Served model ids; the first answers requests that name none.
    pub models: Vec<String>,
    /// The models' tokenizer.
    pub tokenizer: Arc<TokenizerBundle>,
    /// Chat template source and the tokens it refers to.
    pub template: String,
    /// BOS / EOS text for the template.
    pub template_tokens: TemplateTokens,
    /// Ids that end a sequence.
    pub eos_ids: Vec<u32>,
    /// Id of padded slots.
    pub pad_id: u32,
    /// Positions a sequence may hold, prompt included.
    pub max_context: usize,
    /// The engine's bounded queue.
    pub jobs: SyncSender<Job>,
    /// Whether other ranks decode in lockstep with this one: a sink must then never drop its
    /// sequence itself (the engine cancels it on every rank at once).
    pub lockstep: bool,
    /// Numbers the sequences (their engine ids and response ids).
    pub sequences: AtomicU64,
    /// The engine's load.
    pub load: Arc<Load>,
}

/// The routes of `collie serve`.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

/// An OpenAI-style error answer.
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param,
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.is_server_error() {
            true => "server_error",
            false => "invalid_request_error",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }});
        (self.status, axum::Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn health(State(app): State<Arc<App>>) -> axum::Json<Value> {
    axum::Json(json!({
        "status": "ok",
        "running": app.load.running.load(Ordering::Relaxed),
        "waiting": app.load.waiting.load(Ordering::Relaxed),
    }))
}

async fn models(State(app): State<Arc<App>>) -> axum::Json<Value> {
    let data: Vec<Value> = app
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "collie-rs"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data}))
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint: the server answers /v1/chat/completions, /v1/completions, \
                  /v1/models and /health"
            .into(),
        param: None,
        code: None,
    }
}

/// A stop setting: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The settings both endpoints share.
#[derive(Deserialize)]
struct Settings {
    model: Option<String>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stop: Option<Stop>,
    seed: Option<u64>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// Message content: a string, or a list of text parts.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Content,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
}

/// A prompt: a string, or a list holding one.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
}

/// The body as JSON: a body over the limit and bytes that are not a JSON object (invalid UTF-8
/// included) are each a 4xx saying so.
fn parse(body: Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let bytes = body.map_err(|e| ApiError {
        status: e.status(),
        message: format!(
            "the request body could not be read ({}); the limit is {BODY_LIMIT} bytes",
            e.body_text()
        ),
        param: None,
        code: None,
    })?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::bad("the body must be a JSON object", None));
    }
    Ok(value)
}

/// The fields of `T` read from the body (others are ignored); a field of the wrong type or a
/// missing one is a 400 naming it.
fn fields<T: serde::de::DeserializeOwned>(body: &Value) -> ApiResult<T> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let message = if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        };
        ApiError::bad(message, None)
    })
}

/// A checked request, ready for the engine.
struct Prepared {
    model: usize,
    prompt: Vec<u32>,
    config: GenerationConfig,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

impl App {
    /// The served model `name` names (`None`: the first).
    fn model_index(&self, name: Option<&str>) -> ApiResult<usize> {
        match name {
            None | Some("") => Ok(0),
            Some(name) => self
                .models
                .iter()
                .position(|m| m == name)
                .ok_or_else(|| ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: format!(
                        "the model `{name}` is not served here (served: {})",
                        self.models.join(", ")
                    ),
                    param: Some("model"),
                    code: Some("model_not_found"),
                }),
        }
    }

    /// Checks the settings against the prompt and the context.
    fn prepare(&self, prompt: Vec<u32>, s: Settings) -> ApiResult<Prepared> {
        let model = self.model_index(s.model.as_deref())?;
        if s.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("n: only n = 1 is supported", Some("n")));
        }
        let temperature = s.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(
                format!("temperature: {temperature} is not in [0, 2]"),
                Some("temperature"),
            ));
        }
        if let Some(p) = s.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::bad(
                    format!("top_p: {p} is not in (0, 1]"),
                    Some("top_p"),
                ));
            }
        }
        if s.top_k == Some(0) {
            return Err(ApiError::bad("top_k: must be at least 1", Some("top_k")));
        }
        if prompt.is_empty() {
            return Err(ApiError::bad("the prompt encodes to no tokens", None));
        }
        let room = self.max_context.saturating_sub(prompt.len());
        if room == 0 {
            return Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "the prompt has {} tokens; the context holds {} (prompt and answer)",
                    prompt.len(),
                    self.max_context
                ),
                param: Some("messages"),
                code: Some("context_length_exceeded"),
            });
        }
        let asked = s.max_tokens.or(s.max_completion_tokens);
        let max_new_tokens = match asked {
            Some(0) => {
                return Err(ApiError::bad(
                    "max_tokens: must be at least 1",
                    Some("max_tokens"),
                ))
            }
            Some(n) if n as usize > self.max_context => {
                return Err(ApiError::bad(
                    format!(
                        "max_tokens: {n} exceeds the context of {} tokens",
                        self.max_context
                    ),
                    Some("max_tokens"),
                ))
            }
            Some(n) => (n as usize).min(room),
            None => room,
        };
        let stops = match s.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stops.len() > 4 {
            return Err(ApiError::bad("stop: at most 4 sequences", Some("stop")));
        }
        let seed = s.seed.unwrap_or_else(|| {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ self.sequences.load(Ordering::Relaxed).rotate_left(32)
        });
        Ok(Prepared {
            model,
            prompt,
            config: GenerationConfig {
                max_new_tokens,
                temperature: (temperature > 0.0).then_some(temperature),
                top_k: s.top_k,
                top_p: s.top_p,
                seed,
                eos_ids: self.eos_ids.clone(),
                pad_id: self.pad_id,
            },
            stops,
            stream: s.stream,
            include_usage: s.stream_options.unwrap_or_default().include_usage,
        })
    }

    /// Queues `p`; its id, and the channel its events come back on.
    fn submit(&self, p: &Prepared) -> ApiResult<(u64, UnboundedReceiver<Event>)> {
        let (tx, rx) = unbounded_channel();
        let gone = Arc::new(AtomicBool::new(false));
        let flag = gone.clone();
        let lockstep = self.lockstep;
        let sink = move |e| {
            let delivered = tx.send(e).is_ok();
            if !delivered {
                flag.store(true, Ordering::Relaxed);
            }
            delivered || lockstep
        };
        let id = self.sequences.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            model: p.model,
            request: Request {
                id,
                prompt: p.prompt.clone(),
                config: p.config.clone(),
                sink: Box::new(sink),
            },
            gone,
        };
        // Counted before it is sent: the engine takes it off as soon as it receives the job.
        self.load.waiting.fetch_add(1, Ordering::Relaxed);
        let sent = self.jobs.try_send(job);
        if sent.is_err() {
            self.load.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => Ok((id, rx)),
            Err(TrySendError::Full(_)) => Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the server's queue is full; retry later".into(),
                param: None,
                code: Some("queue_full"),
            }),
            Err(TrySendError::Disconnected(_)) => Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the generation engine has stopped".into(),
                param: None,
                code: None,
            }),
        }
    }
}

/// Which endpoint answers: the shapes differ.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    match prepare_chat(&app, body) {
        Ok(prepared) => respond(app.clone(), prepared, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    match prepare_completion(&app, body) {
        Ok(prepared) => respond(app.clone(), prepared, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

/// A chat request's messages rendered with the model's template, tokenized and checked.
fn prepare_chat(app: &App, body: Result<Bytes, BytesRejection>) -> ApiResult<Prepared> {
    let body = parse(body)?;
    let req: ChatRequest = fields(&body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            "messages: at least one message is needed",
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::bad(
                format!(
                    "messages[{i}].role: `{}` is not system, user or assistant",
                    m.role
                ),
                Some("messages"),
            ));
        }
        let content = match &m.content {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => {
                if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                    return Err(ApiError::bad(
                        format!(
                            "messages[{i}].content: parts of type `{}` are not supported",
                            p.kind
                        ),
                        Some("messages"),
                    ));
                }
                parts.iter().map(|p| p.text.as_str()).collect()
            }
        };
        messages.push(ChatMessage::new(&m.role, &content));
    }
    let text = render(&app.template, &messages, true, &app.template_tokens).map_err(|e| {
        ApiError::bad(
            format!("the chat template refused the messages: {e}"),
            Some("messages"),
        )
    })?;
    // The template writes any BOS itself, as apply_chat_template assumes.
    let prompt = app
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::bad(format!("the messages could not be tokenized: {e}"), None))?;
    app.prepare(prompt, fields(&body)?)
}

/// A completion request's prompt tokenized (with the tokenizer's special tokens) and checked.
fn prepare_completion(app: &App, body: Result<Bytes, BytesRejection>) -> ApiResult<Prepared> {
    let body = parse(body)?;
    let req: CompletionRequest = fields(&body)?;
    let prompt = match req.prompt {
        Prompt::One(p) => p,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(_) => {
            return Err(ApiError::bad(
                "prompt: only one prompt per request is supported",
                Some("prompt"),
            ))
        }
    };
    let ids = app
        .tokenizer
        .encode(&prompt, true)
        .map_err(|e| ApiError::bad(format!("the prompt could not be tokenized: {e}"), None))?;
    app.prepare(ids, fields(&body)?)
}

/// The finish reason OpenAI names.
fn reason(finish: &Finish, text: &TextStream) -> &'static str {
    if text.stopped() {
        return "stop";
    }
    match finish {
        Finish::Eos => "stop",
        Finish::Length | Finish::Invalid(_) => "length",
    }
}

/// Ids and timestamps of one response.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn new(app: &App, p: &Prepared, kind: Kind, n: u64) -> Self {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        Meta {
            id: format!("{prefix}-{created:x}{n:06}"),
            created,
            model: app.models[p.model].clone(),
            kind,
        }
    }

    fn usage(prompt: usize, completion: usize) -> Value {
        json!({"prompt_tokens": prompt, "completion_tokens": completion,
               "total_tokens": prompt + completion})
    }

    /// One streamed chunk carrying `text` (and the finish reason on the last).
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "choices": [choice]})
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }
}

/// Queues the sequence and answers with its text: whole, or streamed as it comes.
async fn respond(app: Arc<App>, p: Prepared, kind: Kind) -> Response {
    let (id, rx) = match app.submit(&p) {
        Ok(sent) => sent,
        Err(e) => return e.into_response(),
    };
    let meta = Meta::new(&app, &p, kind, id);
    if p.stream {
        return stream(app, p, meta, rx).into_response();
    }
    let start = Instant::now();
    let mut rx = rx;
    let mut text = TextStream::new(app.tokenizer.clone(), p.stops.clone());
    let mut finish = Finish::Length;
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token(id) => {
                text.push(id);
                if text.stopped() {
                    break;
                }
            }
            Event::Finished(Finish::Invalid(message)) => {
                return ApiError::bad(message, None).into_response()
            }
            Event::Finished(f) => {
                finish = f;
                break;
            }
        }
    }
    // Dropping the receiver frees the sequence's slot if a stop string ended it early.
    drop(rx);
    text.finish();
    let reason = reason(&finish, &text);
    tracing::info!(
        "{}: {} prompt + {} new tokens in {:.2} s ({reason})",
        meta.id,
        p.prompt.len(),
        text.tokens(),
        start.elapsed().as_secs_f64()
    );
    let choice = match kind {
        Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text.text()},
                            "logprobs": null, "finish_reason": reason}),
        Kind::Completion => {
            json!({"index": 0, "text": text.text(), "logprobs": null, "finish_reason": reason})
        }
    };
    let body = json!({"id": meta.id, "object": meta.object(false), "created": meta.created,
                      "model": meta.model, "choices": [choice],
                      "usage": Meta::usage(p.prompt.len(), text.tokens())});
    axum::Json(body).into_response()
}

/// Where a stream is.
enum Phase {
    Start,
    Tokens,
    Rest(&'static str),
    Finish(&'static str),
    Usage,
    Done,
    End,
}

/// The events of a streamed answer: a first chunk (the assistant role), a chunk per piece of
/// text, the finish reason, optionally the usage, then `[DONE]`. A client that goes away drops
/// the stream, and with it the receiver: the engine frees the sequence at its next token.
fn stream(
    app: Arc<App>,
    p: Prepared,
    meta: Meta,
    rx: UnboundedReceiver<Event>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    struct State {
        rx: Option<UnboundedReceiver<Event>>,
        phase: Phase,
        text: TextStream,
        meta: Meta,
        prompt: usize,
        include_usage: bool,
        start: Instant,
    }
    let state = State {
        rx: Some(rx),
        phase: Phase::Start,
        text: TextStream::new(app.tokenizer.clone(), p.stops),
        meta,
        prompt: p.prompt.len(),
        include_usage: p.include_usage,
        start: Instant::now(),
    };
    let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
    let events = futures_util::stream::unfold(state, move |mut st| async move {
        loop {
            match st.phase {
                Phase::Start => {
                    st.phase = Phase::Tokens;
                    if st.meta.kind == Kind::Chat {
                        let first = st.meta.chunk(Some(""), None, true);
                        return Some((data(first), st));
                    }
                }
                Phase::Tokens => {
                    let event = match st.rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => None,
                    };
                    match event {
                        Some(Event::Token(id)) => {
                            let piece = st.text.push(id);
                            if st.text.stopped() {
                                // Dropping the receiver frees the sequence's slot.
                                st.rx = None;
                                st.phase = Phase::Rest("stop");
                            }
                            if !piece.is_empty() {
                                let chunk = st.meta.chunk(Some(&piece), None, false);
                                return Some((data(chunk), st));
                            }
                        }
                        Some(Event::Finished(f)) => {
                            st.rx = None;
                            st.phase = Phase::Rest(reason(&f, &st.text));
                        }
                        None => {
                            st.rx = None;
                            st.phase = Phase::Rest("length");
                        }
                    }
                }
                Phase::Rest(reason) => {
                    st.phase = Phase::Finish(reason);
                    let rest = st.text.finish();
                    if !rest.is_empty() {
                        let chunk = st.meta.chunk(Some(&rest), None, false);
                        return Some((data(chunk), st));
                    }
                }
                Phase::Finish(reason) => {
                    st.phase = Phase::Usage;
                    tracing::info!(
                        "{}: {} prompt + {} new tokens in {:.2} s ({reason}, streamed)",
                        st.meta.id,
                        st.prompt,
                        st.text.tokens(),
                        st.start.elapsed().as_secs_f64()
                    );
                    let chunk = match st.meta.kind {
                        Kind::Chat => st.meta.chunk(None, Some(reason), false),
                        Kind::Completion => st.meta.chunk(Some(""), Some(reason), false),
                    };
                    return Some((data(chunk), st));
                }
                Phase::Usage => {
                    st.phase = Phase::Done;
                    if st.include_usage {
                        let usage = Meta::usage(st.prompt, st.text.tokens());
                        let chunk = json!({"id": st.meta.id, "object": st.meta.object(true),
                            "created": st.meta.created, "model": st.meta.model, "choices": [],
                            "usage": usage});
                        return Some((data(chunk), st));
                    }
                }
                Phase::Done => {
                    st.phase = Phase::End;
                    return Some((Ok(SseEvent::default().data("[DONE]")), st));
                }
                Phase::End => return None,
            }
        }
    });
    Sse::new(events)
}
