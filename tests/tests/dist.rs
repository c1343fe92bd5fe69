//! Multi-process training under `mpirun` (feature `mpi`): every parallel layout must train
//! exactly as one process does on the same global batches, and a failing rank must end the job.
//!
//! Runs `collie-train-run` (the plain trainer) with `mpirun --allow-run-as-root --oversubscribe`.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use collie_io::family::{Families, ModelTask, TrainModel};
use collie_io::module::TensorSource;
use collie_io::safetensors::{SafetensorsSource, SaveDtype};
use collie_io::sharded::is_sharded;
use collie_models::Registry;
use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_collie-train-run");

/// Largest relative loss difference of a layout from one process (worst achieved: 4.1e-7,
/// Gemma 3 under tp2 with AdamW; the testing table in docs/architecture.md).
const LOSS_TOL: f64 = 1e-6;
/// Largest final-weight difference of a layout trained with SGD, LOMO or AdaLomo from one
/// process (worst achieved: 3.0e-7, IA3 under tp2).
const WEIGHT_TOL: f64 = 3e-6;
/// Largest final-weight difference of a layout trained with AdamW. AdamW's update does not scale
/// with the gradient, so an element whose gradient is a small sum of cancelling terms moves by
/// whichever step float summation order tipped it to (see [`ADAMW`] for the ε that damps this):
/// two single-process runs that only group the same examples differently end 8.3e-7..1.8e-6
/// apart here (printed as the float-order floor). The layouts land at 6.0e-8..8.7e-6 (Gemma 3
/// tp2); the bound is 4× the worst layout, left for CPUs whose gemm blocking sums in another
/// order.
const ADAMW_WEIGHT_TOL: f64 = 3.5e-5;

/// A config training the tiny fixture LLaMA on `train/io.jsonl` in file order for `steps` steps.
fn config(dir: &Path, body: &str) -> PathBuf {
    let text = format!(
        r#"
[model]
path = "{model}"
[data]
train = "{data}"
format = "input_output"
seq_len = 48
shuffle = false
{body}
[output]
dir = "{out}"
"#,
        model = fixture("train/model").display(),
        data = fixture("train/io.jsonl").display(),
        out = dir.join("run").display(),
    );
    let path = dir.join("config.toml");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn command(np: usize) -> Command {
    if np == 1 {
        return Command::new(BIN);
    }
    let mut c = mpirun(np);
    c.arg(BIN);
    c
}

/// `mpirun -np N` as root in a container; the program and its arguments follow.
fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ])
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

fn launch(np: usize, config: &Path, sets: &[&str]) -> Output {
    let mut c = command(np);
    c.arg("--config").arg(config).arg("--quiet");
    for s in sets {
        c.args(["--set", s]);
    }
    c.output().expect("running mpirun (is Open MPI installed?)")
}

/// Trains `np` processes with `sets`; returns the per-step losses and the run directory.
fn train(np: usize, dir: &Path, body: &str, sets: &[&str]) -> (Vec<f64>, PathBuf) {
    let cfg = config(dir, body);
    let out = launch(np, &cfg, sets);
    assert!(
        out.status.success(),
        "np {np} {sets:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = dir.join("run");
    // Every rank's peak memory, in world-rank order; rank 0's is the process's own.
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let peaks = summary["peak_rss_bytes_per_rank"].as_array().unwrap();
    assert_eq!(peaks.len(), np, "peak_rss_bytes_per_rank: {peaks:?}");
    assert!(peaks.iter().all(|p| p.as_u64().unwrap() > 0), "{peaks:?}");
    assert_eq!(peaks[0], summary["peak_rss_bytes"], "rank 0's peak");
    // The training loop's peaks come before the run's end.
    let train_peaks = summary["train_peak_rss_bytes_per_rank"].as_array().unwrap();
    assert_eq!(train_peaks.len(), np, "{train_peaks:?}");
    for (t, p) in train_peaks.iter().zip(peaks) {
        let (t, p) = (t.as_u64().unwrap(), p.as_u64().unwrap());
        assert!(t > 0 && t <= p, "training peak {t} vs run peak {p}");
    }
    let losses = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64())
        .collect();
    (losses, run)
}

/// The weights file of a checkpoint: the model's, or a PEFT run's adapter. A parallel run's
/// sharded checkpoint is first consolidated (as `collie convert` does) into `out`.
fn weights_of(dir: &Path, out: &Path) -> PathBuf {
    let dir = if is_sharded(dir) {
        consolidate(dir, out);
        out
    } else {
        dir
    };
    let adapter = dir.join("adapter_model.safetensors");
    if adapter.is_file() {
        adapter
    } else {
        dir.to_path_buf()
    }
}

/// Writes the sharded checkpoint `dir` as one process's checkpoint at `out`, with the family it
/// needs.
fn consolidate(dir: &Path, out: &Path) {
    type A = burn::backend::Autodiff<B>;
    struct Consolidate<'a>(&'a Path, &'a Path);
    impl ModelTask<A> for Consolidate<'_> {
        type Output = ();
        fn run<M: TrainModel<A>>(self) {
            collie_train::checkpoint::consolidate::<B, M::Inner>(
                self.0,
                self.1,
                SaveDtype::F32,
                &Default::default(),
            )
            .unwrap();
        }
    }
    let spec = collie_train::checkpoint::family_spec(dir).unwrap();
    let model_type = Registry::model_type_of(&spec).unwrap();
    Registry::run::<A, _>(&model_type, Consolidate(dir, out)).unwrap();
}

/// Largest |Δ| between the weights of two checkpoints.
fn weight_diff(a: &Path, b: &Path) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (
        weights_of(a, &tmp.path().join("a")),
        weights_of(b, &tmp.path().join("b")),
    );
    let dir_a = if a.is_dir() {
        a.clone()
    } else {
        a.parent().unwrap().to_path_buf()
    };
    let (a, b) = (
        SafetensorsSource::open(&a).unwrap(),
        SafetensorsSource::open(&b).unwrap(),
    );
    assert_eq!(a.keys(), b.keys(), "tensor names");
    // Parameters whose exact gradient is zero move by noise in each run (GLM's key bias).
    let noise = ZeroGradient::of(&dir_a);
    worst(a.keys().iter().map(|key| {
        let (x, y) = (a.read(key).unwrap(), b.read(key).unwrap());
        assert_eq!(x.shape, y.shape, "{key}");
        max_abs_diff(&x.data, &y.data, |i| !noise.contains(key, i))
    }))
}

/// `np` ranks against one process on the same global batches: a layout trained with AdamW and
/// with SGD + momentum, losses within [`LOSS_TOL`] and weights within [`WEIGHT_TOL`] (SGD) or
/// [`ADAMW_WEIGHT_TOL`]; see [`assert_equivalent_dp`].
fn assert_layout(name: &str, np: usize, dp: usize, micro: usize, accum: usize, sets: &[&str]) {
    assert_equivalent_dp(&format!("{name} adamw"), np, dp, micro, accum, ADAMW, sets);
    assert_equivalent_dp(&format!("{name} sgd"), np, dp, micro, accum, SGD, sets);
}

const SGD: &str = r#"
[train]
max_steps = 5
max_grad_norm = 1.0
[optim]
name = "sgd"
lr = 0.05
momentum = 0.9
"#;

/// The reference runs the same forward passes as the ranks (micro-batch `micro`, `dp` times the
/// accumulation steps; LOMO accumulates nothing, so there it is the wider run). One process with
/// `dp · micro` rows per forward pass must give the same losses too. Final weights are asserted
/// within [`WEIGHT_TOL`], or under AdamW within the float-order floor [`ADAMW_WEIGHT_TOL`] (its
/// update `m / (√v + ε)` does not depend on the gradient's scale, so summation-order noise
/// becomes steps of up to lr); each layout also runs with SGD + momentum, which has no such
/// amplification.
fn assert_equivalent(name: &str, np: usize, micro: usize, accum: usize, body: &str, sets: &[&str]) {
    assert_equivalent_dp(name, np, np, micro, accum, body, sets)
}

/// [`assert_equivalent`] for `np` ranks of which `dp` are data-parallel replicas (the others
/// split the model and read the same data).
fn assert_equivalent_dp(
    name: &str,
    np: usize,
    dp: usize,
    micro: usize,
    accum: usize,
    body: &str,
    sets: &[&str],
) {
    let tmp = tempfile::tempdir().unwrap();
    let set = |m: usize, a: usize| {
        vec![
            format!("train.micro_batch_size={m}"),
            format!("train.grad_accum_steps={a}"),
        ]
    };
    // LOMO updates inside the backward pass: one forward pass per step.
    let fused = body.contains("\"lomo\"") || body.contains("\"adalomo\"");
    let single_sets = if fused {
        set(micro * dp, accum)
    } else {
        set(micro, accum * dp)
    };
    // Settings other than the layout apply to the references too.
    let common: Vec<&str> = sets
        .iter()
        .copied()
        .filter(|s| !s.starts_with("parallel."))
        .collect();
    let mut single_refs: Vec<&str> = single_sets.iter().map(String::as_str).collect();
    single_refs.extend_from_slice(&common);
    let (want, single) = train(1, &tmp.path().join("single"), body, &single_refs);
    let wide_sets = set(micro * dp, accum);
    let mut wide_refs: Vec<&str> = wide_sets.iter().map(String::as_str).collect();
    wide_refs.extend_from_slice(&common);
    let (wide, wide_run) = train(1, &tmp.path().join("wide"), body, &wide_refs);
    let par_sets = set(micro, accum);
    let mut par_refs: Vec<&str> = par_sets.iter().map(String::as_str).collect();
    par_refs.extend_from_slice(sets);
    let (got, parallel) = train(np, &tmp.path().join("parallel"), body, &par_refs);
    assert_eq!(got.len(), want.len(), "{name}: number of steps");
    assert_eq!(
        wide.len(),
        want.len(),
        "{name}: number of steps (wider run)"
    );
    for (i, ((a, b), c)) in got.iter().zip(&want).zip(&wide).enumerate() {
        println!(
            "{name} step {}: loss {a:.7} vs {b:.7} (rel {:.1e}); vs {dp}x wider micro-batches {c:.7} (rel {:.1e})",
            i + 1,
            rel(*a, *b),
            rel(*a, *c)
        );
    }
    assert_within(
        &format!("dist {name}: loss max rel Δ vs one process"),
        max_rel_list(&got, &want),
        LOSS_TOL,
    );
    assert_within(
        &format!("dist {name}: loss max rel Δ vs one process with {dp}x wider micro-batches"),
        max_rel_list(&got, &wide),
        LOSS_TOL,
    );
    let steps = want.len();
    let ckpt = |run: &Path| run.join("checkpoints").join(format!("step-{steps}"));
    let worst = weight_diff(&ckpt(&parallel), &ckpt(&single));
    let floor = weight_diff(&ckpt(&single), &ckpt(&wide_run));
    println!(
        "{name}: final weights max |Δ| {worst:.1e} (vs wider micro-batches {:.1e}; two single-process groupings {floor:.1e})",
        weight_diff(&ckpt(&parallel), &ckpt(&wide_run)),
    );
    if body.contains("\"adamw\"") {
        // See ADAMW_WEIGHT_TOL: held to the float-order floor, which this test measures too.
        assert!(
            floor <= ADAMW_WEIGHT_TOL,
            "{name}: two single-process groupings differ by {floor:.2e}"
        );
        assert_within(
            &format!("dist {name}: AdamW final weights max |Δ| vs one process"),
            worst,
            ADAMW_WEIGHT_TOL,
        );
    } else {
        assert_within(
            &format!("dist {name}: final weights max |Δ| vs one process"),
            worst,
            WEIGHT_TOL,
        );
    }
    // Every rank logs each step with the time it spent blocked in communication.
    for rank in 0..np {
        let path = parallel.join("logs").join(format!("rank-{rank}.log"));
        let log = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{name}: every rank keeps a log ({}): {e}", path.display()));
        let field = |line: &str, key: &str| -> f64 {
            let mut words = line.split_whitespace();
            words.find(|w| *w == key);
            words
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("step ")).collect();
        assert_eq!(
            lines.len(),
            steps,
            "{name}: rank {rank}'s step lines\n{log}"
        );
        for line in lines {
            let (comm, seconds) = (field(line, "comm_exposed"), field(line, "seconds"));
            assert!(
                comm >= 0.0 && comm <= seconds,
                "{name}: rank {rank}: exposed communication within the step's time: {line}"
            );
        }
    }
}

/// Runs `legs` (`np` processes and settings each) one after the other on the run directory of
/// `cfg`, every leg after the first resuming from the latest checkpoint, and checks the losses of
/// all steps against the uninterrupted run's `want` ([`LOSS_TOL`] relative).
fn assert_resumed_legs(
    name: &str,
    cfg: &Path,
    dir: &Path,
    legs: &[(usize, &[&str])],
    want: &[f64],
) {
    for (i, (np, sets)) in legs.iter().enumerate() {
        let mut c = command(*np);
        c.arg("--config").arg(cfg).arg("--quiet");
        if i > 0 {
            c.args(["--resume", "latest"]);
        }
        for s in sets.iter() {
            c.args(["--set", s]);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{name} leg {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_resumed_losses(name, &dir.join("run"), want);
}

/// The per-step losses in `run`'s `metrics.jsonl` after its resumed legs: one for each step
/// 1, 2, … (a resume truncates what the interrupted leg logged past its checkpoint), within
/// [`LOSS_TOL`] of the uninterrupted run's `want`.
fn assert_resumed_losses(name: &str, run: &Path, want: &[f64]) {
    let got: Vec<(u64, f64)> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?)))
        .collect();
    let steps: Vec<u64> = got.iter().map(|g| g.0).collect();
    let expected: Vec<u64> = (1..=want.len() as u64).collect();
    assert_eq!(steps, expected, "{name}: steps in metrics.jsonl");
    let got: Vec<f64> = got.into_iter().map(|g| g.1).collect();
    for (i, (a, b)) in zip_eq(name, &got[..], want).enumerate() {
        println!(
            "{name} step {}: loss {a:.7} vs uninterrupted {b:.7} (rel {:.1e})",
            i + 1,
            rel(*a, *b)
        );
    }
    assert_within(
        &format!("dist {name}: resumed loss max rel Δ vs uninterrupted"),
        max_rel_list(&got, want),
        LOSS_TOL,
    );
}

/// AdamW with ε = 1e-6 rather than torch's 1e-8: AdamW's first step is `g / (|g| + ε)`, so an
/// element whose true gradient is 0 but whose computed one is float noise (1e-9..1e-8, its sign
/// set by summation order, which differs between layouts and between CPUs' gemm blockings) moves
/// by up to lr either way. With ε = 1e-8 that noise alone put Gemma 3's tp2 losses 3.3e-6 apart
/// (its SGD losses agree exactly) on this machine's CPU; ε = 1e-6 damps noise-sized gradients
/// 100× and leaves every real gradient of these models (≫ 1e-6) an Adam step.
const ADAMW: &str = r#"
[train]
max_steps = 5
max_grad_norm = 1.0
[optim]
name = "adamw"
lr = 1e-3
eps = 1e-6
weight_decay = 0.01
"#;

#[test]
fn data_parallel_adamw_matches_one_process() {
    assert_layout("dp2", 2, 2, 1, 2, &["parallel.dp=2"]);
    // Each block's reduction waited for at once instead of two blocks later: the same sums.
    assert_layout("dp2 no overlap", 2, 2, 1, 2, &["parallel.overlap=false"]);
}

/// `optimizer_state_bytes` that rank `r` of `run` reported.
fn state_bytes(run: &Path, r: usize) -> usize {
    let log = std::fs::read_to_string(run.join("logs").join(format!("rank-{r}.log"))).unwrap();
    log.lines()
        .find_map(|l| l.strip_prefix("optimizer_state_bytes "))
        .and_then(|l| l.split(' ').next()?.parse().ok())
        .expect("optimizer_state_bytes line")
}

#[test]
fn zero_1_and_2_match_one_process_with_a_shard_of_the_state_each() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, plain) = train(
        2,
        &tmp.path().join("plain"),
        ADAMW,
        &["train.micro_batch_size=1", "train.grad_accum_steps=2"],
    );
    let full = state_bytes(&plain, 0);
    assert_eq!(
        full,
        state_bytes(&plain, 1),
        "plain DP replicates the state"
    );
    for stage in [1, 2] {
        let set = format!("parallel.zero={stage}");
        assert_layout(&format!("dp2 zero{stage}"), 2, 2, 1, 2, &[&set]);
        let (_, run) = train(
            2,
            &tmp.path().join(format!("zero{stage}")),
            ADAMW,
            &["train.micro_batch_size=1", "train.grad_accum_steps=2", &set],
        );
        let shards = [state_bytes(&run, 0), state_bytes(&run, 1)];
        println!(
            "ZeRO-{stage}: optimizer state per rank {shards:?} bytes vs {full} with plain DP ({:.3} and {:.3} of it)",
            shards[0] as f64 / full as f64,
            shards[1] as f64 / full as f64
        );
        assert_eq!(
            shards[0] + shards[1],
            full,
            "the shards add up to the whole state"
        );
        for s in shards {
            // Cut at parameter boundaries: within the largest parameter of 1/dp.
            assert!(
                (s as f64 / full as f64 - 0.5).abs() < 0.15,
                "{shards:?} of {full}"
            );
        }
    }
}

#[test]
fn zero_3_matches_one_process_with_tp_lora_and_lomo() {
    // Each replica stores the parameters it owns; the block-wise walk gathers a block before it
    // runs and sums its gradients onto the owners as it leaves it.
    assert_layout("dp2 zero3", 2, 2, 1, 2, &["parallel.zero=3"]);
    assert_layout(
        "dp2 x tp2 zero3",
        4,
        2,
        1,
        1,
        &["parallel.tp=2", "parallel.zero=3"],
    );
    let lora = format!(
        "{ADAMW}\n[peft]\nkind = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"o_proj\", \"down_proj\", \"up_proj\"]\n"
    );
    assert_equivalent_dp("dp2 zero3 lora", 2, 2, 1, 2, &lora, &["parallel.zero=3"]);
    let lomo = "[train]\nmax_steps = 5\nmax_grad_norm = 1.0\n[optim]\nname = \"lomo\"\nlr = 1e-2\n";
    assert_equivalent("dp2 zero3 lomo", 2, 1, 1, lomo, &["parallel.zero=3"]);
    // A tied table (Gemma 3's fixture): the head's share of its gradient goes to the owner
    // right after the head, the embedding's own share at the end of the walk.
    let gemma3 = format!("model.path={}", fixture("families/gemma3/model").display());
    assert_equivalent_dp(
        "dp2 zero3 tied",
        2,
        2,
        1,
        2,
        SGD,
        &["parallel.zero=3", &gemma3],
    );
    assert_equivalent(
        "dp2 zero3 tied lomo",
        2,
        1,
        1,
        lomo,
        &["parallel.zero=3", &gemma3],
    );
}

#[test]
fn zero_3_checkpoint_of_dp2_x_tp2_resumes_at_pp2_one_process_and_tp2_x_pp2() {
    let tmp = tempfile::tempdir().unwrap();
    let accum = ["train.micro_batch_size=1", "train.grad_accum_steps=2"];
    let (want, _) = train(1, &tmp.path().join("straight"), ADAMW, &accum);
    // Steps 1-2 at dp2 x tp2 with ZeRO-3: each replica writes the parameters and state it owns.
    let first = tmp.path().join("zero3");
    let cfg = config(&first, ADAMW);
    let sets = [
        "train.max_steps=2",
        "train.micro_batch_size=1",
        "parallel.tp=2",
        "parallel.zero=3",
    ];
    assert_resumed_legs("zero3 dp2 x tp2", &cfg, &first, &[(4, &sets)], &want[..2]);
    // Steps 3-5 from that checkpoint at each other layout (and at dp2 with ZeRO-3 alone).
    let layouts: [(&str, usize, &[&str]); 4] = [
        ("pp2", 2, &[&accum[..], &["parallel.pp=2"]].concat()),
        ("one process", 1, &accum),
        (
            "tp2 x pp2",
            4,
            &[&accum[..], &["parallel.tp=2", "parallel.pp=2"]].concat(),
        ),
        (
            "dp2 zero3",
            2,
            &["train.micro_batch_size=1", "parallel.zero=3"],
        ),
    ];
    for (name, np, sets) in layouts {
        let dir = tmp.path().join(name.replace(' ', "_"));
        let cfg = config(&dir, ADAMW);
        copy_dir(&first.join("run"), &dir.join("run"));
        let mut c = command(np);
        c.arg("--config")
            .arg(&cfg)
            .args(["--quiet", "--resume", "latest"]);
        for s in sets {
            c.args(["--set", s]);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_resumed_losses(
            &format!("zero3 dp2 x tp2 -> {name}"),
            &dir.join("run"),
            &want,
        );
    }
}

#[test]
fn zero_checkpoint_of_two_replicas_resumes_in_one_process_and_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (want, _) = train(
        1,
        &tmp.path().join("straight"),
        ADAMW,
        &["train.micro_batch_size=1", "train.grad_accum_steps=2"],
    );
    // Steps 1-2 at dp2 with ZeRO-1, 3-4 in one process, 5 at dp2 with ZeRO-2 again.
    let dir = tmp.path().join("resharded");
    let cfg = config(&dir, ADAMW);
    let legs: [(usize, &[&str]); 3] = [
        (
            2,
            &[
                "train.max_steps=2",
                "train.micro_batch_size=1",
                "parallel.zero=1",
            ],
        ),
        (
            1,
            &[
                "train.max_steps=4",
                "train.micro_batch_size=1",
                "train.grad_accum_steps=2",
            ],
        ),
        (2, &["train.micro_batch_size=1", "parallel.zero=2"]),
    ];
    assert_resumed_legs("resharded", &cfg, &dir, &legs, &want);
}

/// Trains the fixture family `family` with AdamW in one process, then again in three legs — 2
/// steps on 2 processes with `layout`, 1 step in one process, the rest with `layout` — each
/// resuming the one before, and checks the losses against the uninterrupted run's (each leg's
/// optimizer state shapes the losses of the steps after its first).
fn assert_family_resumes_across(name: &str, family: &str, layout: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let model = format!(
        "model.path={}",
        fixture(&format!("families/{family}/model")).display()
    );
    let (want, _) = train(1, &tmp.path().join("straight"), ADAMW, &[&model]);
    let dir = tmp.path().join("resharded");
    let cfg = config(&dir, ADAMW);
    let legs: [(usize, &[&str]); 3] = [
        (2, &["train.max_steps=2", layout, &model]),
        (1, &["train.max_steps=3", &model]),
        (2, &[layout, &model]),
    ];
    assert_resumed_legs(name, &cfg, &dir, &legs, &want);
}

#[test]
fn tied_table_of_a_pipeline_resumes_in_one_process_and_back() {
    // At pp2 a tied table and its AdamW moments live on the last stage alone (the first looks up
    // the rows it is sent): its checkpoint resumes in one process and back with the same losses.
    assert_family_resumes_across("gemma3 pp2", "gemma3", "parallel.pp=2");
}

#[test]
fn glm_fused_gate_up_state_resumes_across_tensor_parallel_layouts() {
    // GLM's gate_up_proj is split per half under tp2 (ColumnParts), its AdamW moments with it:
    // a checkpoint written at tp2 must resume in one process and back with the same losses.
    assert_family_resumes_across("glm tp2 -> 1 -> tp2", "glm", "parallel.tp=2");
}

#[test]
fn mixtral_load_balancing_loss_under_every_layout_matches_one_process() {
    // The auxiliary loss is per micro-batch (not additive over rows), averaged over the global
    // batch's micro-batches, so each layout is held against one process with the same
    // micro-batches: dp2 with one row per micro-batch against the micro-batches accumulated;
    // under tp2 every rank routes the same all-reduced input (the same loss, whole routers);
    // under pp2 (one layer per stage) the expert counts travel with the activations and come
    // back with the gradients, each stage adding its layer's term (also when the first stage
    // recomputes its layer for the backward); LOMO under pp2 (one micro-batch of two rows)
    // against LOMO's block-wise walk in one process.
    let tmp = tempfile::tempdir().unwrap();
    let path = format!(
        "model.path={}",
        fixture("families/mixtral_aux/model").display()
    );
    let aux = |run: &Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["aux_loss"].as_f64())
            .collect()
    };
    let ckpt = |run: &Path| run.join("checkpoints").join("step-5");
    let lomo = "[train]\nmax_steps = 5\nmax_grad_norm = 1.0\n[optim]\nname = \"lomo\"\nlr = 1e-2\n";
    let accumulated = ["train.micro_batch_size=1", "train.grad_accum_steps=4"];
    let one_batch = ["train.micro_batch_size=2", "train.grad_accum_steps=1"];
    // (layout, optimizer, the reference's settings, the layout's settings)
    let layouts: [(&str, &str, &[&str], &[&str]); 5] = [
        (
            "dp2",
            SGD,
            &accumulated,
            &[
                "train.micro_batch_size=1",
                "train.grad_accum_steps=2",
                "parallel.dp=2",
            ],
        ),
        (
            "tp2",
            SGD,
            &accumulated,
            &[&accumulated[..], &["parallel.tp=2"]].concat(),
        ),
        (
            "pp2",
            SGD,
            &accumulated,
            &[&accumulated[..], &["parallel.pp=2"]].concat(),
        ),
        (
            "pp2 lomo",
            lomo,
            &one_batch,
            &[&one_batch[..], &["parallel.pp=2"]].concat(),
        ),
        // The first stage's forward without a graph still sends its layer's expert counts.
        (
            "pp2 checkpointing",
            SGD,
            &accumulated,
            &[
                &accumulated[..],
                &["parallel.pp=2", "train.activation_checkpointing=true"],
            ]
            .concat(),
        ),
    ];
    for (name, body, reference, sets) in layouts {
        let dir = tmp.path().join(name.replace(' ', "-"));
        let (want, single) = train(
            1,
            &dir.join("single"),
            body,
            &[reference, &[path.as_str()]].concat(),
        );
        let want_aux = aux(&single);
        assert_eq!(want_aux.len(), 5, "an aux_loss per step");
        let (got, run) = train(
            2,
            &dir.join("parallel"),
            body,
            &[sets, &[path.as_str()]].concat(),
        );
        let checks = [
            ("loss max rel Δ", max_rel_list(&got, &want), LOSS_TOL),
            (
                "aux_loss max rel Δ",
                max_rel_list(&aux(&run), &want_aux),
                LOSS_TOL,
            ),
            (
                "final weights max |Δ|",
                weight_diff(&ckpt(&run), &ckpt(&single)),
                WEIGHT_TOL,
            ),
        ];
        for (what, value, tol) in checks {
            println!("mixtral aux {name}: {what} {value:.2e}");
            assert_within(
                &format!("dist mixtral aux {name}: {what} vs one process"),
                value,
                tol,
            );
        }
    }
}

#[test]
fn data_parallel_lomo_matches_one_process() {
    let body = r#"
[train]
max_steps = 5
max_grad_norm = 1.0
[optim]
name = "lomo"
lr = 1e-2
"#;
    assert_equivalent("dp2 lomo", 2, 1, 1, body, &[]);
}

#[test]
fn layout_that_does_not_fit_is_reported_once_and_every_rank_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), ADAMW);
    let out = launch(2, &cfg, &["parallel.tp=3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        err.matches("parallel.tp (3)").count(),
        1,
        "one message, from rank 0:\n{err}"
    );
    assert!(err.contains("2 processes"), "{err}");
}

#[test]
fn zero_settings_it_cannot_serve_are_one_error_line_and_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let sophia = "[train]\nmax_steps = 2\n[optim]\nname = \"sophiag\"\nlr = 1e-3\n";
    let lomo = "[train]\nmax_steps = 2\n[optim]\nname = \"lomo\"\nlr = 1e-3\n";
    let cases: [(&str, &str, &[&str]); 4] = [
        ("sophia", sophia, &["parallel.zero=3"]),
        ("lomo zero2", lomo, &["parallel.zero=2"]),
        ("stage 4", ADAMW, &["parallel.zero=4"]),
        ("pp", ADAMW, &["parallel.zero=3", "parallel.pp=2"]),
    ];
    for (name, body, sets) in cases {
        let dir = tmp.path().join(name.replace(' ', "_"));
        let cfg = config(&dir, body);
        let out = launch(2, &cfg, sets);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(
            lines.len(),
            1,
            "{name}: one error line, from rank 0:\n{err}"
        );
        assert!(lines[0].contains("parallel.zero"), "{name}: {}", lines[0]);
        assert!(
            !dir.join("run").join("checkpoints").exists(),
            "{name}: nothing written"
        );
        println!("{name}: {}", lines[0]);
    }
}

/// Sends `signal` (`-KILL`) to `pid` through the shell's `kill` builtin: a minimal Debian has no
/// `kill` program (procps) on the PATH.
fn kill(signal: &str, pid: u32) -> std::process::ExitStatus {
    Command::new("sh")
        .args(["-c", &format!("kill {signal} {pid}")])
        .status()
        .expect("running sh")
}

/// Starts an endless AdamW run on `np` ranks (`env` set for each), sends `signal` to rank
/// `rank` once it trains, and waits for mpirun: (seconds from the signal to mpirun's end, its
/// stdout + stderr, whether it succeeded).
fn signal_a_rank(
    np: usize,
    rank: usize,
    signal: &str,
    env: &[(&str, &str)],
) -> (f64, String, bool) {
    let tmp = tempfile::tempdir().unwrap();
    let body = r#"
[train]
max_steps = 100000
save_every = 0
[optim]
name = "adamw"
lr = 1e-4
"#;
    let cfg = config(tmp.path(), body);
    let mut c = command(np);
    c.arg("--config")
        .arg(&cfg)
        .args(["--quiet", "--set", "train.micro_batch_size=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c.spawn().expect("mpirun");
    // The rank's log names its pid once it trains.
    let pid = training_pid(&tmp.path().join("run"), rank);
    assert!(kill(signal, pid).success());
    let sent = Instant::now();
    let out = child.wait_with_output().unwrap();
    let waited = sent.elapsed().as_secs_f64();
    // Leave nothing behind if mpirun left a stopped rank.
    kill("-KILL", pid);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("mpirun ended {waited:.1} s after {signal} to rank {rank}:\n{text}");
    (waited, text, out.status.success())
}

/// Waits until rank `r`'s log (under `run`) shows it training; returns its pid.
fn training_pid(run: &Path, r: usize) -> u32 {
    let log = run.join("logs").join(format!("rank-{r}.log"));
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 2 {
            let first = text.lines().next().unwrap();
            return first.rsplit(' ').next().unwrap().parse::<u32>().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "rank {r} never started training"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_rank_ends_the_job_within_a_minute_naming_the_rank() {
    let (waited, text, ok) = signal_a_rank(4, 2, "-KILL", &[]);
    assert!(!ok, "mpirun must fail");
    assert!(waited < 60.0, "took {waited:.1} s");
    assert!(text.contains("rank 2"), "the output names rank 2:\n{text}");
}

#[test]
fn a_rank_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one_at_another_size() {
    // dp2 x tp2 with ZeRO-3 saves every 2 steps; rank 2 (replica 1, which writes the parameters
    // and optimizer state it owns) is killed with SIGKILL while writing step 4. The job must end naming it, step-4 must
    // never appear, and tp2 on 2 processes resumes from step-2 with the uninterrupted losses.
    let tmp = tempfile::tempdir().unwrap();
    let (want, _) = train(
        1,
        &tmp.path().join("straight"),
        ADAMW,
        &["train.max_steps=6", "train.micro_batch_size=2"],
    );
    let dir = tmp.path().join("killed");
    let cfg = config(&dir, ADAMW);
    let run = dir.join("run");
    let mut c = command(4);
    c.arg("--config").arg(&cfg).arg("--quiet");
    for s in [
        "train.max_steps=6",
        "train.save_every=2",
        "train.micro_batch_size=1",
        "parallel.tp=2",
        "parallel.zero=3",
    ] {
        c.args(["--set", s]);
    }
    let child = c
        .env("COLLIE_TEST_PAUSE_WRITING", "4:2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun");
    let partial = run.join("checkpoints").join(".step-4.partial");
    let start = Instant::now();
    // Rank 2 has written its optimizer file and stopped; the others wait for it.
    while !partial.join("optimizer-rank-2.safetensors").is_file() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "rank 2 never wrote its part of step-4"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = training_pid(&run, 2);
    assert!(kill("-KILL", pid).success());
    let sent = Instant::now();
    let out = child.wait_with_output().unwrap();
    let waited = sent.elapsed().as_secs_f64();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("mpirun ended {waited:.1} s after SIGKILL to rank 2 mid-checkpoint:\n{text}");
    assert!(!out.status.success(), "mpirun must fail");
    assert!(waited < 60.0, "took {waited:.1} s");
    assert!(text.contains("rank 2"), "the output names rank 2:\n{text}");
    let checkpoints = run.join("checkpoints");
    assert!(checkpoints.join("step-2").join("manifest.json").is_file());
    assert!(
        !checkpoints.join("step-4").exists(),
        "an incomplete checkpoint was published"
    );
    // Resume at another world size: tp2 on 2 processes, from step-2.
    let mut c = command(2);
    c.arg("--config")
        .arg(&cfg)
        .args(["--quiet", "--resume", "latest"]);
    for s in [
        "train.max_steps=6",
        "train.save_every=2",
        "train.micro_batch_size=2",
        "parallel.tp=2",
    ] {
        c.args(["--set", s]);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "resume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!partial.exists(), "the partial step-4 was replaced");
    assert_resumed_losses("killed mid-checkpoint", &run, &want);
}

#[test]
fn a_hung_rank_is_ended_by_the_collective_watchdog() {
    // Rank 1 stops (SIGSTOP: alive, but no longer calling collectives). Rank 0 waits in its next
    // collective; after COLLIE_DIST_TIMEOUT seconds its watchdog must abort the whole job, naming
    // the rank that gave up and the collective it waited in.
    let timeout = 5.0;
    let (waited, text, ok) = signal_a_rank(
        2,
        1,
        "-STOP",
        &[("COLLIE_DIST_TIMEOUT", &timeout.to_string())],
    );
    assert!(!ok, "mpirun must fail");
    assert!(waited < timeout + 30.0, "took {waited:.1} s");
    // (Rank 0's collective may have started up to one step before the stop.)
    assert!(
        waited >= timeout - 1.0,
        "ended before the watchdog could have fired ({waited:.1} s)"
    );
    assert!(
        text.contains("rank 0 of 2") && text.contains("waited more than 5 s"),
        "the output names the rank and the wait:\n{text}"
    );
}

#[test]
fn tensor_parallel_collectives_give_the_dense_mlp_and_its_gradients() {
    // Column-parallel then row-parallel linear layers (Megatron's f and g as autodiff ops) on
    // 2 ranks against the dense MLP each rank also computes: loss, input gradient, weight and
    // bias gradient shards within 2e-6 (collie-dist-check exits non-zero otherwise).
    let out = mpirun(2)
        .arg(env!("CARGO_BIN_EXE_collie-dist-check"))
        .arg("tp-mlp")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert_eq!(
        text.matches("max |Δ|").count(),
        10,
        "5 checks on each of 2 ranks"
    );
}

#[test]
fn tensor_parallel_matches_one_process_alone_with_data_parallel_and_with_lora() {
    assert_layout("tp2", 2, 1, 2, 1, &["parallel.tp=2"]);
    assert_layout("dp2 x tp2", 4, 2, 1, 1, &["parallel.tp=2"]);
    let lora = format!(
        "{ADAMW}\n[peft]\nkind = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"o_proj\", \"down_proj\", \"up_proj\"]\n"
    );
    assert_equivalent_dp("tp2 lora", 2, 1, 2, 1, &lora, &["parallel.tp=2"]);
    // Tied embeddings: the vocabulary-parallel table is also the LM head. SGD with momentum here:
    // on this randomly initialized model some gradients are near zero, where AdamW's normalized
    // update turns summation-order noise into steps of up to lr (1.1e-5 apart after 5 steps,
    // with identical losses); SGD shows the gradients themselves agree.
    let tied = "[train]\nmax_steps = 5\nmax_grad_norm = 1.0\n[optim]\nname = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n\
         [model.config]\nmodel_type = \"llama\"\nvocab_size = 512\nhidden_size = 64\n\
         intermediate_size = 128\nnum_hidden_layers = 2\nnum_attention_heads = 4\n\
         num_key_value_heads = 2\nmax_position_embeddings = 128\ntie_word_embeddings = true\n";
    assert_equivalent_dp(
        "tp2 tied",
        2,
        1,
        2,
        1,
        tied,
        &["parallel.tp=2", "model.init=scratch"],
    );
}

#[test]
fn checkpoint_of_dp2_x_tp2_resumes_at_pp2_in_one_process_and_at_tp2_x_pp2() {
    let tmp = tempfile::tempdir().unwrap();
    let (want, _) = train(
        1,
        &tmp.path().join("straight"),
        ADAMW,
        &["train.micro_batch_size=2"],
    );
    // Steps 1-2 at dp2 x tp2 (ZeRO-1), 3 at pp2 (1F1B over 2 micro-batches), 4 in one
    // process, 5 at tp2 x pp2.
    let dir = tmp.path().join("resharded");
    let cfg = config(&dir, ADAMW);
    let legs: [(usize, &[&str]); 4] = [
        (
            4,
            &[
                "train.max_steps=2",
                "train.micro_batch_size=1",
                "parallel.tp=2",
                "parallel.zero=1",
            ],
        ),
        (
            2,
            &[
                "train.max_steps=3",
                "train.micro_batch_size=1",
                "train.grad_accum_steps=2",
                "parallel.pp=2",
            ],
        ),
        (1, &["train.max_steps=4", "train.micro_batch_size=2"]),
        (
            4,
            &["train.micro_batch_size=2", "parallel.tp=2", "parallel.pp=2"],
        ),
    ];
    assert_resumed_legs("tp-resharded", &cfg, &dir, &legs, &want);
}

#[test]
fn lora_checkpoint_of_dp2_x_tp2_resumes_in_one_process_and_at_pp2() {
    // A PEFT run's sharded checkpoint holds the trainable adapter pieces only (the base comes
    // from `model.path`): steps 1-2 at dp2 x tp2 (ZeRO-1), 3 in one process, 4-5 at pp2.
    let lora = format!(
        "{ADAMW}\n[peft]\nkind = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"o_proj\", \"down_proj\", \"up_proj\"]\n"
    );
    let tmp = tempfile::tempdir().unwrap();
    let (want, _) = train(
        1,
        &tmp.path().join("straight"),
        &lora,
        &["train.micro_batch_size=2"],
    );
    let dir = tmp.path().join("resharded");
    let cfg = config(&dir, &lora);
    let legs: [(usize, &[&str]); 3] = [
        (
            4,
            &[
                "train.max_steps=2",
                "train.micro_batch_size=1",
                "parallel.tp=2",
                "parallel.zero=1",
            ],
        ),
        (1, &["train.max_steps=3", "train.micro_batch_size=2"]),
        (
            2,
            &[
                "train.micro_batch_size=1",
                "train.grad_accum_steps=2",
                "parallel.pp=2",
            ],
        ),
    ];
    let step2 = dir.join("run/checkpoints/step-2");
    assert_resumed_legs("lora-resharded", &cfg, &dir, &legs, &want);
    // The first leg's checkpoint was sharded and held the adapter only.
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(step2.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["kind"], "adapter");
    let params = manifest["params"].as_object().unwrap();
    assert!(
        !params.is_empty() && params.keys().all(|k| k.contains(".adapter.Lora.")),
        "{params:?}"
    );
}

#[test]
fn evaluation_and_greedy_generation_under_tp2_and_pp2_match_one_process() {
    // Eval loss, classification by candidate loss and greedy generation, before and after 2 SGD
    // steps: under tp2 (vocabulary-parallel loss, gathered logits for generation), pp2 and
    // ZeRO-3 (each block gathered from the stage or replica that holds it as the forward pass
    // reaches it), in full and with LoRA: the same metrics and the same generated ids.
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<Value> = std::fs::read_to_string(fixture("train/io.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let generation = tmp.path().join("gen.jsonl");
    let classification = tmp.path().join("cls.jsonl");
    let mut gen_lines = String::new();
    let mut cls_lines = String::new();
    for (i, r) in rows.iter().take(4).enumerate() {
        gen_lines.push_str(&format!("{r}\n"));
        let candidates: Vec<&Value> = (0..3)
            .map(|k| &rows[(i + k) % rows.len()]["output"])
            .collect();
        let line = serde_json::json!({"input": r["input"], "candidates": candidates, "label": 0});
        cls_lines.push_str(&format!("{line}\n"));
    }
    std::fs::write(&generation, gen_lines).unwrap();
    std::fs::write(&classification, cls_lines).unwrap();
    let eval = format!(
        "\n[eval]\ngeneration = \"{}\"\nclassification = \"{}\"\nmax_new_tokens = 6\n",
        generation.display(),
        classification.display()
    );
    let lora = "[peft]\nkind = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n";
    let eval_data = format!("data.eval={}", fixture("train/io.jsonl").display());
    let steps = "train.max_steps=2";
    for (method, extra) in [("sgd", ""), ("lora", lora)] {
        let body = format!("{SGD}{eval}{extra}");
        let run = |name: &str, np: usize, sets: &[&str]| {
            let mut all = vec![steps, eval_data.as_str()];
            all.extend_from_slice(sets);
            train(
                np,
                &tmp.path().join(format!("{method}-{name}")),
                &body,
                &all,
            )
            .1
        };
        let single = run("single", 1, &["train.micro_batch_size=2"]);
        let evals = |run: &Path| -> Vec<Value> {
            std::fs::read_to_string(run.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .filter(|v| v.get("eval_exact_match").is_some())
                .collect()
        };
        let generated = |run: &Path, step: u64| -> Vec<Value> {
            std::fs::read_to_string(run.join("generations").join(format!("step-{step}.jsonl")))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()["generated_ids"].clone())
                .collect()
        };
        let want = evals(&single);
        assert_eq!(want.len(), 2, "an evaluation before and after training");
        for (name, np, sets) in [
            ("tp2", 2, &["parallel.tp=2", "train.micro_batch_size=2"][..]),
            (
                "pp2",
                2,
                &[
                    "parallel.pp=2",
                    "train.micro_batch_size=1",
                    "train.grad_accum_steps=2",
                ][..],
            ),
            (
                "dp2 zero3",
                2,
                &["parallel.zero=3", "train.micro_batch_size=1"][..],
            ),
            (
                "dp2 x tp2 zero3",
                4,
                &[
                    "parallel.zero=3",
                    "parallel.tp=2",
                    "train.micro_batch_size=1",
                ][..],
            ),
        ] {
            let parallel = run(name, np, sets);
            let got = evals(&parallel);
            assert_eq!(got.len(), want.len(), "{method} {name}: evaluations");
            for (g, w) in got.iter().zip(&want) {
                for key in [
                    "eval_accuracy",
                    "eval_exact_match",
                    "eval_bleu",
                    "eval_rouge_l",
                ] {
                    assert_eq!(g[key], w[key], "{method} {name} step {}: {key}", w["step"]);
                }
                assert_within(
                    &format!(
                        "dist {method} {name} step {}: eval_loss rel Δ vs one process",
                        w["step"]
                    ),
                    rel(
                        g["eval_loss"].as_f64().unwrap(),
                        w["eval_loss"].as_f64().unwrap(),
                    ),
                    LOSS_TOL,
                );
            }
            for step in [0, 2] {
                let ids = generated(&parallel, step);
                assert_eq!(ids.len(), 4, "{name} step {step}");
                assert!(
                    ids.iter().any(|g| !g.as_array().unwrap().is_empty()),
                    "{method} {name} step {step}: nothing generated"
                );
                assert_eq!(
                    ids,
                    generated(&single, step),
                    "{method} {name} step {step}: generated ids"
                );
            }
        }
    }
}

#[test]
fn tensor_parallel_degree_must_divide_the_heads() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), ADAMW);
    // The fixture model has 4 heads and 2 kv heads: tp = 4 cannot split the kv heads.
    let out = launch(4, &cfg, &["parallel.tp=4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("parallel.tp = 4 does not divide"), "{err}");
}

#[test]
fn pipeline_parallel_1f1b_matches_one_process_alone_and_with_data_and_tensor_parallel() {
    assert_layout("pp2", 2, 1, 1, 4, &["parallel.pp=2"]);
    assert_layout("dp2 x pp2", 4, 2, 1, 4, &["parallel.pp=2"]);
    assert_layout("tp2 x pp2", 4, 1, 1, 4, &["parallel.pp=2", "parallel.tp=2"]);
    // Tied embeddings: the table lives on the last stage (head), which sends the first the rows
    // each step looks up and adds their gradient back; also with the first stage recomputing.
    let tied = "[train]\nmax_steps = 5\nmax_grad_norm = 1.0\n[optim]\nname = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n\
         [model.config]\nmodel_type = \"llama\"\nvocab_size = 512\nhidden_size = 64\n\
         intermediate_size = 128\nnum_hidden_layers = 2\nnum_attention_heads = 4\n\
         num_key_value_heads = 2\nmax_position_embeddings = 128\ntie_word_embeddings = true\n";
    assert_equivalent_dp(
        "pp2 tied",
        2,
        1,
        1,
        4,
        tied,
        &["parallel.pp=2", "model.init=scratch"],
    );
    assert_equivalent_dp(
        "pp2 tied checkpointing",
        2,
        1,
        1,
        4,
        tied,
        &[
            "parallel.pp=2",
            "model.init=scratch",
            "train.activation_checkpointing=true",
        ],
    );
}

#[test]
fn pipeline_reports_its_bubble_and_refuses_more_stages_than_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, run) = train(
        2,
        &tmp.path().join("pp"),
        ADAMW,
        &[
            "train.micro_batch_size=1",
            "train.grad_accum_steps=4",
            "parallel.pp=2",
        ],
    );
    let log = std::fs::read_to_string(run.join("logs").join("rank-1.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.starts_with("pipeline stage 1 of 2"))
        .unwrap();
    println!("{line}");
    assert!(
        line.contains("ideal 1F1B 0.200 (4 micro-batches)"),
        "{line}"
    );
    let cfg = config(&tmp.path().join("bad"), ADAMW);
    // The fixture model has 2 decoder layers.
    let out = launch(4, &cfg, &["parallel.pp=4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("parallel.pp = 4 stages for a model of 2 decoder layers"),
        "{err}"
    );
}

#[test]
fn lomo_and_adalomo_under_pipeline_parallelism_match_one_process() {
    for name in ["lomo", "adalomo"] {
        let body = format!(
            "[train]\nmax_steps = 5\nmax_grad_norm = 1.0\n[optim]\nname = \"{name}\"\nlr = 1e-2\n"
        );
        assert_equivalent_dp(
            &format!("pp2 {name}"),
            2,
            1,
            2,
            1,
            &body,
            &["parallel.pp=2"],
        );
    }
    let body = "[train]\nmax_steps = 5\nmax_grad_norm = 1.0\n[optim]\nname = \"lomo\"\nlr = 1e-2\n";
    assert_equivalent_dp("dp2 x pp2 lomo", 4, 2, 1, 1, body, &["parallel.pp=2"]);
}

#[test]
fn lora_under_pipeline_and_checkpointing_under_tensor_parallelism_match_one_process() {
    let lora = "[train]\nmax_steps = 5\nmax_grad_norm = 1.0\n[optim]\nname = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n\
         [peft]\nkind = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n";
    assert_equivalent_dp("pp2 lora", 2, 1, 1, 4, lora, &["parallel.pp=2"]);
    // LoRA on a tied model (Gemma 3's fixture) under AdamW with weight decay: the frozen table
    // the first stage looks up and the last stage's head reads must stay frozen (no gradient
    // exchanged, no decay).
    let tied_lora = format!(
        "{ADAMW}[peft]\nkind = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n"
    );
    let gemma3 = format!("model.path={}", fixture("families/gemma3/model").display());
    assert_equivalent_dp(
        "pp2 tied lora",
        2,
        1,
        1,
        4,
        &tied_lora,
        &["parallel.pp=2", &gemma3],
    );
    let ia3 = "[train]\nmax_steps = 5\nmax_grad_norm = 1.0\n[optim]\nname = \"sgd\"\nlr = 0.5\nmomentum = 0.9\n\
         [peft]\nkind = \"ia3\"\ntarget_modules = [\"k_proj\", \"v_proj\", \"down_proj\"]\nfeedforward_modules = [\"down_proj\"]\n";
    assert_equivalent_dp("tp2 ia3", 2, 1, 2, 1, ia3, &["parallel.tp=2"]);
    assert_equivalent_dp("pp2 ia3", 2, 1, 1, 2, ia3, &["parallel.pp=2"]);
    assert_equivalent_dp(
        "tp2 checkpointing",
        2,
        1,
        2,
        1,
        SGD,
        &["parallel.tp=2", "train.activation_checkpointing=true"],
    );
    // A stage other than the last keeps only each micro-batch's input and runs its blocks again
    // for the backward.
    assert_layout(
        "pp2 checkpointing",
        2,
        1,
        1,
        4,
        &["parallel.pp=2", "train.activation_checkpointing=true"],
    );
}

/// Dense families beyond LLaMA with fixtures under `tests/fixtures/families/`.
const FAMILIES: &[&str] = &["qwen3", "gemma3", "glm", "codegen"];

/// Mixtures of experts (experts and router whole on every tensor-parallel rank). Their tp2 runs
/// use SGD only: the weights there agree to 4.5e-8, but under AdamW one element of Qwen3-MoE's
/// second o_proj, whose gradient is 2.3e-8 in one process and 3.5e-8 under tp2 (float noise
/// against a largest element of 0.05), takes steps of different sizes (its `|g|` is near ε) and
/// ends 7.0e-5 apart, twice the dense families' AdamW floor, while the losses agree to 1.3e-7.
/// The AdamW bookkeeping under tp2 (per-shard moments) is what the dense families check.
const MOE_FAMILIES: &[&str] = &["mixtral", "qwen3_moe"];

#[test]
fn families_under_tensor_and_pipeline_parallelism_match_one_process() {
    // Per-head q/k norms (Qwen3, Gemma 3) are whole on every rank but see only the rank's heads
    // under tensor parallelism: their gradients are summed over the group like LoRA's A. Gemma 3
    // adds sandwich norms, a scaled embedding and local layers, which every stage must keep.
    // A mixture of experts routes each token on every rank from the same all-reduced input.
    for family in FAMILIES.iter().chain(MOE_FAMILIES) {
        let path = format!(
            "model.path={}",
            fixture(&format!("families/{family}/model")).display()
        );
        let tp2 = ["parallel.tp=2", path.as_str()];
        if MOE_FAMILIES.contains(family) {
            assert_equivalent_dp(&format!("{family} tp2 sgd"), 2, 1, 2, 1, SGD, &tp2);
        } else {
            assert_layout(&format!("{family} tp2"), 2, 1, 2, 1, &tp2);
        }
        assert_layout(
            &format!("{family} pp2"),
            2,
            1,
            1,
            4,
            &["parallel.pp=2", &path],
        );
        let lomo =
            "[train]\nmax_steps = 5\nmax_grad_norm = 1.0\n[optim]\nname = \"lomo\"\nlr = 1e-2\n";
        assert_equivalent_dp(
            &format!("{family} pp2 lomo"),
            2,
            1,
            2,
            1,
            lomo,
            &["parallel.pp=2", &path],
        );
    }
    // GLM's one gate_up_proj splits each half on its own under tp2 (`ColumnParts`), and LoRA's B
    // on it with it; CodeGen's one qkv_proj splits as a column layer (whole mp_num groups per
    // rank). all-linear targets both as peft does.
    let lora = "[train]\nmax_steps = 5\nmax_grad_norm = 1.0\n[optim]\nname = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n\
         [peft]\nkind = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = \"all-linear\"\n";
    for family in ["glm", "codegen"] {
        let path = format!(
            "model.path={}",
            fixture(&format!("families/{family}/model")).display()
        );
        assert_equivalent_dp(
            &format!("{family} tp2 lora"),
            2,
            1,
            2,
            1,
            lora,
            &["parallel.tp=2", &path],
        );
    }
}
