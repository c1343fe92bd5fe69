//! `collie serve`: an OpenAI-compatible HTTP server with continuous batching and a chat page.
//!
//! Two threads of work: the HTTP side ([`api`], on a small tokio runtime) checks and tokenizes
//! requests and streams answers; the engine (this thread, which owns the models) runs one
//! [`Batcher`] per served model. Requests that arrive while others decode join the running batch
//! at the next step; a bounded queue holds those beyond `--max-batch`, and a full queue answers
//! 503.

mod api;
mod text;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use collie_core::device::DeviceSpec;
use collie_core::lm::CausalLm;
use collie_io::family::TrainModel;
use collie_train::batcher::Batcher;

use api::{App, Job, Load};

/// Arguments of `collie serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// HF directory, GGUF file, or `pypi:NAME==VERSION/path` asset.
    #[arg(long)]
    model: String,
    /// A PEFT adapter: `DIR` applies it to the served model; `NAME=DIR` serves base + adapter as
    /// the model `NAME` beside it (requests pick it by their `model` field). Repeatable.
    #[arg(long)]
    adapter: Vec<String>,
    /// The id the model is served as (default: the model path's last component).
    #[arg(long)]
    served_name: Option<String>,
    /// Built-in chat template (chatml, llama2, alpaca, gemma) for models without one, or to
    /// override theirs.
    #[arg(long)]
    template: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests waiting beyond the running batch before the server answers 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Positions a sequence may hold, prompt and answer (default: the model's
    /// `max_position_embeddings`).
    #[arg(long)]
    max_context: Option<usize>,
}

/// What `--served-name` and `--adapter` ask to serve.
struct Served {
    /// The id of the model itself.
    base: String,
    /// The adapter applied to it, if any.
    own: Option<PathBuf>,
    /// Further ids, each the base with its adapter.
    named: Vec<(String, PathBuf)>,
}

/// The served models from the flags.
fn served(args: &Args) -> Result<Served> {
    let base = args.served_name.clone().unwrap_or_else(|| {
        let last = args.model.trim_end_matches('/').rsplit('/').next();
        let last = last.unwrap_or(&args.model);
        last.strip_suffix(".gguf").unwrap_or(last).to_string()
    });
    let mut own = None;
    let mut named = Vec::new();
    for spec in &args.adapter {
        match spec.split_once('=') {
            Some((name, dir)) if !name.is_empty() => {
                if name == base || named.iter().any(|(n, _)| n == name) {
                    bail!("--adapter {spec}: the name `{name}` is already served");
                }
                named.push((name.to_string(), PathBuf::from(dir)));
            }
            _ => {
                if own.is_some() {
                    bail!(
                        "--adapter {spec}: a second unnamed adapter; name the extra ones (NAME=DIR)"
                    );
                }
                own = Some(PathBuf::from(spec));
            }
        }
    }
    Ok(Served { base, own, named })
}

struct Task(Args);

impl crate::model::WithModel for Task {
    type Output = ();

    fn model_spec(&self) -> &str {
        &self.0.model
    }

    fn run<B: AutodiffBackend, M: TrainModel<B>>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        if args.max_batch == 0 {
            bail!("--max-batch must be at least 1");
        }
        let Served {
            base: base_name,
            own,
            named,
        } = served(&args)?;
        let loaded = crate::model::load::<B::InnerBackend, M::Inner>(&args.model, &device)?;
        let tok = loaded.tokenizer()?.clone();
        let (template, template_tokens) =
            crate::generate::chat_template(&tok, args.template.as_deref())?;
        let eos_ids = crate::model::eos_ids(&loaded)?;
        let pad_id = crate::model::pad_id(&loaded, &eos_ids);
        let positions = serde_json::to_value(&loaded.config)
            .ok()
            .and_then(|v| v.get("max_position_embeddings")?.as_u64())
            .map(|n| n as usize);
        let max_context = match (args.max_context, positions) {
            (Some(0), _) => bail!("--max-context must be at least 2"),
            (Some(n), _) => n,
            (None, Some(n)) => n,
            (None, None) => 2048,
        };
        // Each adapter goes on a copy of the base (its tensors are shared, not copied).
        let adapted = |dir: &PathBuf| -> Result<M::Inner> {
            let (model, config) = collie_peft::adapter_io::load(loaded.model.clone(), dir, &device)
                .with_context(|| format!("applying adapter {}", dir.display()))?;
            tracing::info!(
                "applied {} adapter {}",
                config.kind.peft_type(),
                dir.display()
            );
            Ok(model)
        };
        let mut models = vec![match &own {
            Some(dir) => adapted(dir)?,
            None => loaded.model.clone(),
        }];
        let mut names = vec![base_name];
        for (name, dir) in named {
            models.push(adapted(&dir)?);
            names.push(name);
        }
        let (jobs, queue) = sync_channel(args.queue);
        let load = Arc::new(Load::default());
        let app = Arc::new(App {
            models: names.clone(),
            tokenizer: Arc::new(tok),
            template,
            template_tokens,
            eos_ids,
            pad_id,
            max_context,
            jobs,
            counter: AtomicU64::new(0),
            load: load.clone(),
        });
        let addr: SocketAddr = format!("{}:{}", args.host, args.port)
            .parse()
            .with_context(|| format!("--host {} --port {}", args.host, args.port))?;
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let http = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || http_thread(listener, app))?;
        eprintln!(
            "collie serve: {} on http://{local} (max batch {}, context {max_context})",
            names.join(", "),
            args.max_batch
        );
        engine(&models, device, pad_id, args.max_batch, queue, &load);
        match http.join() {
            Ok(result) => result,
            Err(_) => bail!("the HTTP thread panicked"),
        }
    }
}

/// Serves HTTP until the listener fails; the engine stops when the app (its queue) is dropped.
fn http_thread(listener: std::net::TcpListener, app: Arc<App>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .build()
        .context("starting the HTTP runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(listener, api::router(app))
            .await
            .context("serving HTTP")
    })
}

/// Decodes for every served model until the queue's senders are gone: a step of each running
/// batch, with the requests that arrived since the last step joined first.
fn engine<B: Backend, M: CausalLm<B>>(
    models: &[M],
    device: B::Device,
    pad_id: u32,
    max_batch: usize,
    queue: Receiver<Job>,
    load: &Load,
) {
    let mut batches: Vec<Batcher<B, M>> = models
        .iter()
        .map(|m| Batcher::new(m, device.clone(), pad_id))
        .collect();
    loop {
        let running: usize = batches.iter().map(Batcher::len).sum();
        let mut arrived = Vec::new();
        if running == 0 {
            match queue.recv() {
                Ok(job) => arrived.push(job),
                Err(_) => return,
            }
        }
        while running + arrived.len() < max_batch {
            match queue.try_recv() {
                Ok(job) => arrived.push(job),
                Err(_) => break,
            }
        }
        load.waiting.fetch_sub(arrived.len(), Ordering::Relaxed);
        for (m, batch) in batches.iter_mut().enumerate() {
            let (these, rest): (Vec<Job>, Vec<Job>) =
                arrived.into_iter().partition(|j| j.model == m);
            arrived = rest;
            if !these.is_empty() {
                batch.admit(these.into_iter().map(|j| j.request).collect());
            }
        }
        for batch in &mut batches {
            batch.step();
        }
        let running = batches.iter().map(Batcher::len).sum();
        load.running.store(running, Ordering::Relaxed);
    }
}

/// Runs `collie serve`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    crate::model::run(device, Task(args))
}
