//! `collie bench`: training-step throughput, matmul speed and per-optimizer peak memory.
//!
//! Timings are printed, never asserted; `scripts/bench/` runs the PyTorch twin of each benchmark
//! in the same command and `docs/benchmarks.md` records both.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor};
use collie_core::device::{dispatch, BackendTask, DeviceSpec};
use collie_core::loss::cross_entropy_sum;
use collie_llama::LlamaConfig;
use collie_optim::clip::clip_global_norm;
use collie_optim::{AdamW, AdamWConfig};
use collie_train::metrics::{flops_per_token, peak_rss_bytes, rss_bytes};
use collie_train::plot::{draw_memory, Series};
use collie_train::{RunOptions, TrainConfig, Trainer};

/// Benchmarks.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Forward + backward of a causal-LM training step on random tokens.
    Forward(ForwardArgs),
    /// A whole training step: forward + backward + global-norm clipping + AdamW update.
    Train(ForwardArgs),
    /// Square f32 matmul.
    Matmul(MatmulArgs),
    /// Peak memory of training steps through the trainer, per optimizer (one process per run).
    Memory(MemoryArgs),
    /// Forward + backward of one attention call (naive or memory-efficient): time and the
    /// memory it takes above its inputs.
    Attention(AttentionArgs),
}

/// Arguments of `collie bench attention`.
#[derive(clap::Args, Debug)]
pub struct AttentionArgs {
    /// `naive` or `flash`.
    #[arg(long, default_value = "flash")]
    attention: String,
    /// Tokens per sequence (queries = keys, causal).
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Sequences.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    /// Head width.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Timed calls (after one warm-up).
    #[arg(long, default_value_t = 3)]
    steps: usize,
}

/// Arguments of `collie bench memory`.
#[derive(clap::Args, Debug)]
pub struct MemoryArgs {
    /// Model shape: `30m`, `small` (SmolLM2-135M) or `360m` (SmolLM2-360M), or another preset.
    #[arg(long, default_value = "small")]
    preset: String,
    /// `[optim] name` to train with; a `+ckpt` suffix also turns on activation checkpointing.
    #[arg(long, default_value = "adamw")]
    optim: String,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Training steps (the optimizer state exists from the first; tokens/s is the median of the
    /// steps after it).
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// `train.max_grad_norm` (0: no clipping, as CoLLiE's memory profile).
    #[arg(long, default_value_t = 0.0)]
    max_grad_norm: f64,
    /// Compute dtype (`[model] dtype`): f32, bf16 or f16 (master weights f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// `[model] attention`: naive or flash.
    #[arg(long, default_value = "naive")]
    attention: String,
    /// `train.head_chunk_mib`: MiB of logits per chunk of the block-wise walk's head (LOMO,
    /// AdaLomo, `+ckpt`; 0 = unchunked).
    #[arg(long, default_value_t = 64.0)]
    head_chunk_mib: f64,
    /// Train a LoRA adapter of this rank on every linear layer (alpha 2r) instead of every
    /// parameter.
    #[arg(long)]
    lora: Option<usize>,
    /// `[model] quantize` of the frozen base (`q8_0`, `q4_k`; needs --lora).
    #[arg(long, default_value = "none")]
    quantize: String,
    /// Dense peak of the device in TFLOPS, for MFU (989 for an H100 SXM / H200 in bf16).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Run every preset × optimizer below, each in a fresh process, and write `memory.jsonl` and
    /// `memory.png` into this directory.
    #[arg(long)]
    sweep: Option<std::path::PathBuf>,
    /// Presets of the sweep.
    #[arg(long, value_delimiter = ',', default_value = "30m,small,360m")]
    presets: Vec<String>,
    /// Optimizers of the sweep.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "adamw,sgd,lion,adan,sophiag,lomo,adalomo,adamw+ckpt,lomo+ckpt,adalomo+ckpt"
    )]
    optims: Vec<String>,
}

/// Arguments of `collie bench forward`.
#[derive(clap::Args, Debug)]
pub struct ForwardArgs {
    /// `tiny` (4 layers, d 256, 4 M parameters), `20m` (6 layers, d 320, SmolLM2's vocabulary,
    /// 23 M) or `small` (SmolLM2-135M's shape).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Train rank-R LoRA adapters on every linear layer (alpha 2R) instead of all parameters.
    #[arg(long)]
    lora: Option<usize>,
}

/// Arguments of `collie bench matmul`.
#[derive(clap::Args, Debug)]
pub struct MatmulArgs {
    /// Matrix side.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 20)]
    iters: usize,
}

/// The benchmark model shapes.
pub fn preset(name: &str) -> Result<LlamaConfig> {
    Ok(match name {
        "tiny" => LlamaConfig::new(2048, 256, 688, 4, 8, 4),
        "20m" => {
            let mut c = LlamaConfig::new(49152, 320, 864, 6, 5, 5);
            c.tie_word_embeddings = true;
            c
        }
        "30m" => {
            let mut c = LlamaConfig::new(49152, 384, 1024, 6, 6, 2);
            c.tie_word_embeddings = true;
            c
        }
        "small" => {
            let mut c = LlamaConfig::new(49152, 576, 1536, 30, 9, 3);
            c.tie_word_embeddings = true;
            c
        }
        "360m" => {
            let mut c = LlamaConfig::new(49152, 960, 2560, 32, 15, 5);
            c.tie_word_embeddings = true;
            c
        }
        // The memory-per-rank model (scripts/bench/memory_per_rank.sh): ~321 M parameters whose
        // heads split by 2 and 4, SmolLM2's vocabulary, tied.
        "350m" => {
            let mut c = LlamaConfig::new(49152, 1024, 2816, 24, 16, 4);
            c.tie_word_embeddings = true;
            c
        }
        // The GPU benchmark's ~1.1 B LLaMA: 16 layers, d 2048, GQA 32:8, SwiGLU 8192.
        "1b" => LlamaConfig::new(32000, 2048, 8192, 16, 32, 8),
        other => bail!("unknown preset `{other}` (tiny, 20m, 30m, small, 350m, 360m, 1b)"),
    })
}

/// Bytes as MiB.
fn mib(bytes: Option<u64>) -> Option<f64> {
    bytes.map(|b| b as f64 / (1024.0 * 1024.0))
}

struct Forward {
    args: ForwardArgs,
    /// Also clip and take an AdamW step.
    update: bool,
}

impl BackendTask for Forward {
    type Output = Result<()>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let Forward { args, update } = self;
        let config = preset(&args.preset)?;
        let mut model = config.init::<B>(&device)?;
        if let Some(r) = args.lora {
            let mut peft = collie_peft::PeftConfig::new(collie_peft::PeftKind::Lora);
            peft.r = r;
            peft.alpha = 2.0 * r as f64;
            peft.target_modules = Some(collie_peft::TargetModules::Pattern("all-linear".into()));
            model = collie_peft::apply(model, &peft, None, &device)?;
        }
        let params: usize = burn::module::Module::num_params(&model);
        let trainable = collie_peft::TrainableReport::of(&model).trainable;
        let (b, s) = (args.batch_size, args.seq_len);
        let mut optimizer = AdamW::<B::InnerBackend>::new(AdamWConfig::default());
        let mut step = || -> Result<f64> {
            let ids = Tensor::<B, 2, Int>::random(
                [b, s + 1],
                Distribution::Uniform(0.0, config.vocab_size as f64),
                &device,
            );
            let input = ids.clone().slice([0..b, 0..s]);
            let targets = ids.slice([0..b, 1..s + 1]).reshape([b * s]);
            let start = Instant::now();
            let logits = model
                .forward(input, None)
                .reshape([b * s, config.vocab_size]);
            let (sum, _) = cross_entropy_sum(logits, targets);
            let loss = sum.div_scalar((b * s) as f64);
            let grads = loss.backward();
            if update {
                let mut grads = GradientsParams::from_grads(grads, &model);
                let (_, coef) = clip_global_norm(&model, &grads, 1.0);
                model = collie_optim::apply(model.clone(), &mut grads, &mut optimizer, 1e-4, coef);
            } else {
                drop(grads);
            }
            B::sync(&device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))?;
            Ok(start.elapsed().as_secs_f64())
        };
        step()?;
        let rss_after_warmup = mib(peak_rss_bytes());
        let mut times = Vec::new();
        for _ in 0..args.steps {
            times.push(step()?);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let line = serde_json::json!({
            "bench": if update { "train_step" } else { "forward_backward" },
            "preset": args.preset,
            "params": params,
            "trainable_params": trainable,
            "lora": args.lora,
            "batch_size": b,
            "seq_len": s,
            "step_s_median": median,
            "tokens_per_s": (b * s) as f64 / median,
            "peak_rss_mib": mib(peak_rss_bytes()),
            "peak_rss_mib_after_warmup": rss_after_warmup,
        });
        println!("{line}");
        Ok(())
    }
}

struct Matmul(MatmulArgs);

impl BackendTask for Matmul {
    type Output = Result<()>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let n = self.0.size;
        let a = Tensor::<B::InnerBackend, 2>::random([n, n], Distribution::Default, &device);
        let c = Tensor::<B::InnerBackend, 2>::random([n, n], Distribution::Default, &device);
        let time = || -> Result<f64> {
            let start = Instant::now();
            let out = a.clone().matmul(c.clone());
            <B::InnerBackend as Backend>::sync(&device)
                .map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))?;
            drop(out);
            Ok(start.elapsed().as_secs_f64())
        };
        time()?;
        let mut times = Vec::new();
        for _ in 0..self.0.iters {
            times.push(time()?);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let gflops = 2.0 * (n as f64).powi(3) / median / 1e9;
        println!(
            "{}",
            serde_json::json!({"bench": "matmul", "size": n, "median_s": median, "gflops": gflops})
        );
        Ok(())
    }
}

/// Runs `collie bench ...`.
pub fn run(cmd: Command, device: DeviceSpec) -> Result<()> {
    match cmd {
        Command::Forward(args) => dispatch(
            device,
            Forward {
                args,
                update: false,
            },
        ),
        Command::Train(args) => dispatch(device, Forward { args, update: true }),
        Command::Matmul(args) => dispatch(device, Matmul(args)),
        Command::Memory(args) => match args.sweep.clone() {
            Some(dir) => return memory_sweep(&args, &dir, device),
            None => dispatch(device, Memory(args)),
        },
        Command::Attention(args) => dispatch(device, AttentionBench(args)),
    }
    .context("selecting the device")?
}

struct Memory(MemoryArgs);

impl BackendTask for Memory {
    type Output = Result<()>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        let model = preset(&args.preset)?;
        let (name, checkpointing) = match args.optim.strip_suffix("+ckpt") {
            Some(name) => (name.to_string(), true),
            None => (args.optim.clone(), false),
        };
        let dir = std::env::temp_dir().join(format!("collie-bench-memory-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Random pre-tokenized sequences (a fixed LCG: the data does not matter, only its shape).
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut lines = String::new();
        for _ in 0..args.steps * args.batch_size {
            let ids: Vec<u64> = (0..args.seq_len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 33) % model.vocab_size as u64
                })
                .collect();
            lines.push_str(&serde_json::json!({ "input_ids": ids }).to_string());
            lines.push('\n');
        }
        let data = dir.join("data.jsonl");
        std::fs::write(&data, lines).with_context(|| format!("writing {}", data.display()))?;
        let text = format!(
            "[model]\npath = \"\"\ninit = \"scratch\"\ndtype = {:?}\nattention = {:?}\n[data]\ntrain = {:?}\nformat = \"tokens\"\nseq_len = {}\nshuffle = false\n[train]\nmax_steps = {}\nmicro_batch_size = {}\nmax_grad_norm = {:?}\nactivation_checkpointing = {checkpointing}\nhead_chunk_mib = {:?}\n[optim]\nname = {:?}\nlr = 1e-5\n[output]\ndir = {:?}\n",
            args.dtype,
            args.attention,
            data.display().to_string(),
            args.seq_len,
            args.steps,
            args.batch_size,
            args.max_grad_norm,
            args.head_chunk_mib,
            name,
            dir.join("out").display().to_string(),
        );
        let model_table = toml::to_string(&model).context("writing the model config")?;
        let text = format!("{text}[model.config]\n{model_table}");
        let mut config = TrainConfig::parse(&text, "bench memory", &[])?;
        // Set after validation, which keeps users from adapting a random model: here the random
        // weights stand in for a pretrained base of the preset's shape.
        if let Some(r) = args.lora {
            let table = format!(
                "kind = \"lora\"\nr = {r}\nalpha = {}\ntarget_modules = \"all-linear\"\n",
                2 * r
            );
            config.peft = toml::from_str(&table).context("the LoRA config")?;
        }
        if args.quantize != "none" {
            if args.lora.is_none() {
                bail!("--quantize: a quantized base is frozen; add --lora R");
            }
            args.quantize
                .parse::<collie_io::quant::Quantize>()
                .map_err(|e| anyhow::anyhow!("--{e}"))?;
            config.model.quantize = args.quantize.clone();
        }
        let options = RunOptions {
            quiet: true,
            ..Default::default()
        };
        let mut trainer = Trainer::<B, collie_llama::Llama<B>>::new(config, &options, &device)?;
        // A quantized weight is not a float parameter: its elements are counted here.
        let quantized: usize = {
            use collie_core::nn::Adaptable;
            let mut model = trainer.model.clone();
            model
                .linears_mut()
                .iter()
                .filter_map(|s| s.linear.quant.as_ref())
                .map(|q| q.shape().iter().product::<usize>())
                .sum()
        };
        let params = burn::module::Module::num_params(&trainer.model) + quantized;
        let mut seconds = Vec::new();
        for _ in 0..args.steps {
            seconds.push(trainer.train_step()?.seconds);
        }
        let peak = peak_rss_bytes().unwrap_or(0);
        // Median step time after the first (which allocates the optimizer state).
        let mut timed = seconds[1.min(seconds.len() - 1)..].to_vec();
        timed.sort_by(f64::total_cmp);
        let step_s = timed[timed.len() / 2];
        let tokens_per_s = (args.seq_len * args.batch_size) as f64 / step_s;
        // The LM head is a matmul whether or not it is tied to the embedding, whose lookup is
        // free: only an untied embedding table leaves the count.
        let lookup = if model.tie_word_embeddings {
            0
        } else {
            model.vocab_size * model.hidden_size
        };
        let flops_per_token = flops_per_token(
            params - lookup,
            model.num_hidden_layers,
            model.num_attention_heads,
            model.head_dim(),
            args.seq_len,
        );
        let mfu = args
            .peak_tflops
            .map(|p| tokens_per_s * flops_per_token / (p * 1e12));
        let line = serde_json::json!({
            "bench": "memory",
            "preset": args.preset,
            "optim": args.optim,
            "params": params,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "max_grad_norm": args.max_grad_norm,
            "head_chunk_mib": args.head_chunk_mib,
            "peak_rss_bytes": peak,
            "bytes_per_param": peak as f64 / params as f64,
            "step_s": step_s,
            "step_s_all": seconds,
            "tokens_per_s": tokens_per_s,
            "dtype": args.dtype,
            "attention": args.attention,
            "lora": args.lora,
            "quantize": args.quantize,
            "flops_per_token": flops_per_token,
            "mfu": mfu,
        });
        drop(trainer);
        std::fs::remove_dir_all(&dir).ok();
        println!("{line}");
        Ok(())
    }
}

struct AttentionBench(AttentionArgs);

impl BackendTask for AttentionBench {
    type Output = Result<()>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        use collie_core::attention::{attention, AttentionKind, AttnMask};
        let a = self.0;
        let kind: AttentionKind = a.attention.parse().map_err(anyhow::Error::msg)?;
        if a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
            bail!(
                "--heads {} must be a multiple of --kv-heads {}",
                a.heads,
                a.kv_heads
            );
        }
        let (b, s) = (a.batch_size, a.seq_len);
        let n = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<B, 4>::random([b, a.heads, s, a.head_dim], n, &device).require_grad();
        let k = Tensor::<B, 4>::random([b, a.kv_heads, s, a.head_dim], n, &device).require_grad();
        let v = Tensor::<B, 4>::random([b, a.kv_heads, s, a.head_dim], n, &device).require_grad();
        let sync = || B::sync(&device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"));
        sync()?;
        let before = mib(rss_bytes());
        let call = || -> Result<f64> {
            let start = Instant::now();
            let mask = AttnMask::new(b, s, s, None, None, 0);
            let mask = match kind {
                AttentionKind::Naive => mask.materialize(&device),
                AttentionKind::Flash => mask,
            };
            let o = attention(q.clone(), k.clone(), v.clone(), Some(&mask), kind);
            let grads = o.sum().backward();
            let dq = q.grad(&grads).context("no gradient for q")?;
            drop(grads);
            drop(dq);
            sync()?;
            Ok(start.elapsed().as_secs_f64())
        };
        call()?;
        let mut times = Vec::new();
        for _ in 0..a.steps {
            times.push(call()?);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        // Forward 2 matmuls + backward 4 (flash: 5 with the recomputed scores), causal: half.
        let flops = 2.0 * 2.0 * (b * a.heads * s * s * a.head_dim) as f64 * 3.0 / 2.0;
        let peak = mib(peak_rss_bytes());
        let line = serde_json::json!({
            "bench": "attention",
            "attention": a.attention,
            "batch_size": b,
            "seq_len": s,
            "heads": a.heads,
            "kv_heads": a.kv_heads,
            "head_dim": a.head_dim,
            "step_s_median": median,
            "tflops": flops / median / 1e12,
            "peak_rss_mib": peak,
            "rss_before_mib": before,
            "attention_peak_mib": match (peak, before) {
                (Some(p), Some(b0)) => Some(p - b0),
                _ => None,
            },
        });
        println!("{line}");
        Ok(())
    }
}

/// CoLLiE's published memory lines (README figure: GB per billion parameters, bf16, batch 1,
/// seq 2048, tensor parallel; see `docs/benchmarks.md`).
const COLLIE_LINES: [(&str, f64); 3] = [
    ("CoLLiE Adam/Lion 30.5", 30.5),
    ("CoLLiE Adan/Sophia 34.5", 34.5),
    ("CoLLiE LOMO/PEFT 2.1", 2.1),
];

/// Runs each preset × optimizer as its own `collie bench memory` process (peak RSS is per
/// process), then writes `memory.jsonl`, `memory.png` and prints a markdown table.
fn memory_sweep(args: &MemoryArgs, dir: &std::path::Path, device: DeviceSpec) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe().context("locating the collie binary")?;
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for p in &args.presets {
        preset(p)?;
        for o in &args.optims {
            eprintln!("bench memory: {p} {o}");
            let out = std::process::Command::new(&exe)
                .args(["--device", &device.to_string(), "bench", "memory"])
                .args(["--preset", p, "--optim", o])
                .args(["--seq-len", &args.seq_len.to_string()])
                .args(["--batch-size", &args.batch_size.to_string()])
                .args(["--steps", &args.steps.to_string()])
                .args(["--max-grad-norm", &args.max_grad_norm.to_string()])
                .args(["--dtype", &args.dtype, "--attention", &args.attention])
                .args(["--head-chunk-mib", &args.head_chunk_mib.to_string()])
                .output()
                .context("running collie bench memory")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let Some(line) = stdout.lines().last().filter(|_| out.status.success()) else {
                bail!(
                    "collie bench memory --preset {p} --optim {o} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            };
            rows.push(serde_json::from_str(line).context("reading the run's JSON line")?);
        }
    }
    let jsonl: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let path = dir.join("memory.jsonl");
    std::fs::write(&path, jsonl).with_context(|| format!("writing {}", path.display()))?;
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let mut series: Vec<Series> = args
        .optims
        .iter()
        .map(|o| Series {
            label: o.clone(),
            points: rows
                .iter()
                .filter(|r| r["optim"] == o.as_str())
                .map(|r| (f(r, "params") / 1e6, f(r, "bytes_per_param")))
                .collect(),
            reference: false,
        })
        .collect();
    let x_max = rows
        .iter()
        .map(|r| f(r, "params") / 1e6)
        .fold(0.0, f64::max);
    for (label, y) in COLLIE_LINES {
        series.push(Series {
            label: label.into(),
            points: vec![(0.0, y), (x_max, y)],
            reference: true,
        });
    }
    let png = dir.join("memory.png");
    draw_memory(
        &png,
        &format!(
            "peak RSS per parameter, one training step (seq {}, batch {}, f32)",
            args.seq_len, args.batch_size
        ),
        &series,
    )
    .map_err(|e| anyhow::anyhow!("drawing {}: {e}", png.display()))?;
    println!("| preset | params | optimizer | peak RSS (MiB) | bytes/param | tokens/s |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} M | {} | {:.0} | {:.2} | {:.1} |",
            r["preset"].as_str().unwrap_or("?"),
            f(r, "params") / 1e6,
            r["optim"].as_str().unwrap_or("?"),
            f(r, "peak_rss_bytes") / (1024.0 * 1024.0),
            f(r, "bytes_per_param"),
            f(r, "tokens_per_s"),
        );
    }
    Ok(())
}
