//! `collie bench`: training-step throughput and matmul speed.
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

/// Benchmarks.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Forward + backward of a causal-LM training step on random tokens.
    Forward(ForwardArgs),
    /// A whole training step: forward + backward + global-norm clipping + AdamW update.
    Train(ForwardArgs),
    /// Square f32 matmul.
    Matmul(MatmulArgs),
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
        "small" => {
            let mut c = LlamaConfig::new(49152, 576, 1536, 30, 9, 3);
            c.tie_word_embeddings = true;
            c
        }
        other => bail!("unknown preset `{other}` (tiny, 20m, small)"),
    })
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if known.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
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
        let params: usize = burn::module::Module::num_params(&model);
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
        let rss_after_warmup = peak_rss_mib();
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
            "batch_size": b,
            "seq_len": s,
            "step_s_median": median,
            "tokens_per_s": (b * s) as f64 / median,
            "peak_rss_mib": peak_rss_mib(),
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
    }
    .context("selecting the device")?
}
