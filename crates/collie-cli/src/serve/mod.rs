//! `collie serve`: an OpenAI-compatible HTTP server with continuous batching and a chat page.
//!
//! Two threads of work: the HTTP side ([`api`], on a small tokio runtime) checks and tokenizes
//! requests and streams answers; the engine ([`engine`], this thread, which owns the models)
//! runs one `Batcher` per served model. Requests that arrive while others decode join the running
//! batch at the next step; a bounded queue holds those beyond `--max-batch`, and a full queue
//! answers 503. Under `mpirun` with `--tp N`, every rank holds its slice of the weights, rank 0
//! serves HTTP, and all ranks decode in lockstep.

mod api;
mod engine;
mod text;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use collie_core::device::DeviceSpec;
use collie_dist::Dist;
use collie_io::family::{ModelFiles, TrainModel};

use api::{App, Load};

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
    #[command(flatten)]
    quantize: crate::model::QuantizeArg,
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
    /// Tensor-parallel ranks (under `mpirun -np N`, built with the `mpi` feature): each rank
    /// holds a slice of every split weight and takes part in every decoding step.
    #[arg(long, default_value_t = 1)]
    tp: usize,
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

struct Task {
    args: Args,
    dist: Arc<Dist>,
}

impl crate::model::WithModel for Task {
    type Output = ();

    fn model_spec(&self) -> &str {
        &self.args.model
    }

    fn run<B: AutodiffBackend, M: TrainModel<B>>(self, device: B::Device) -> Result<()> {
        let Task { args, dist } = self;
        if args.max_batch == 0 {
            bail!("--max-batch must be at least 1");
        }
        let Served {
            base: base_name,
            own,
            named,
        } = served(&args)?;
        let tp = dist.dims.tp;
        // Tensor parallelism reads each split tensor's slice only (the model stays lazy until
        // sharded); one process reads every weight once and shares it among the adapters.
        let quantize = args.quantize.get()?;
        let loaded = match (tp, quantize) {
            (1, q) => M::Inner::load_quantized(&args.model, &device, q)
                .with_context(|| format!("loading model `{}`", args.model))?,
            (_, collie_io::quant::Quantize::None) => M::Inner::load_lazy(&args.model, &device)
                .with_context(|| format!("loading model `{}`", args.model))?,
            _ => bail!("--quantize: a quantized model is not split across ranks (--tp 1)"),
        };
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
        // Each served model is the base (its tensors shared, not copied), with its adapter.
        let build = |dir: Option<&PathBuf>| -> Result<M::Inner> {
            let mut model = loaded.model.clone();
            if let Some(dir) = dir {
                let (adapted, config) = collie_peft::adapter_io::load(model, dir, &device)
                    .with_context(|| format!("applying adapter {}", dir.display()))?;
                tracing::info!(
                    "applied {} adapter {}",
                    config.kind.peft_type(),
                    dir.display()
                );
                model = adapted;
            }
            let (model, _) =
                collie_core::tp::shard(model, &dist.tp).with_context(|| format!("--tp {tp}"))?;
            collie_io::module::materialize(&model);
            Ok(model)
        };
        let mut models = vec![build(own.as_ref())?];
        let mut names = vec![base_name];
        for (name, dir) in named {
            models.push(build(Some(&dir))?);
            names.push(name);
        }
        let world = (dist.size() > 1).then_some(&dist.world);
        if !dist.is_main() {
            engine::follow(&models, device, pad_id, &dist.world);
            return Ok(());
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
            lockstep: world.is_some(),
            sequences: AtomicU64::new(0),
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
        let ranks = match tp {
            1 => String::new(),
            n => format!(", tensor parallel over {n} ranks"),
        };
        let weights = match quantize {
            collie_io::quant::Quantize::None => String::new(),
            collie_io::quant::Quantize::Keep => ", linear weights in the file's blocks".into(),
            collie_io::quant::Quantize::To(ty) => {
                format!(", linear weights in {} blocks", ty.name())
            }
        };
        eprintln!(
            "collie serve: {} on http://{local} (max batch {}, context {max_context}{ranks}{weights})",
            names.join(", "),
            args.max_batch
        );
        engine::lead(&models, device, pad_id, args.max_batch, queue, &load, world);
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

/// Runs `collie serve`. Under `mpirun`, a failure on one rank ends every rank (the others
/// would wait for it in their next collective).
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    let dist = Arc::new(Dist::init(Some(1), args.tp, 1).context("--tp")?);
    let result = crate::model::run(
        device,
        Task {
            args,
            dist: dist.clone(),
        },
    );
    if let (Err(e), true) = (&result, dist.size() > 1) {
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        dist.abort(&chain.join(": "), 1);
    }
    result
}
