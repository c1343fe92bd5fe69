//! LOMO's memory claim: the fused block-wise backward holds at most one block's gradients at a
//! time. Measured with a counting allocator (every host tensor of the CPU backend is a heap
//! allocation): the peak of a LOMO step above the model stays within a few of the largest
//! block's parameter bytes, while a plain backward + SGD step holds every gradient at once.
//! (One test per binary: the allocator counts the whole process.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use collie_train::TrainConfig;
use common::*;

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

type A = burn::backend::Autodiff<B>;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the peak of one training step above what was live before it (the second
/// step: the first materializes the lazily initialized parameters).
fn step_peak(optim: &str, out: &std::path::Path) -> usize {
    let text = format!(
        r#"[model]
path = ""
init = "scratch"
[model.config]
model_type = "llama"
vocab_size = 256
hidden_size = 256
intermediate_size = 1024
num_hidden_layers = 8
num_attention_heads = 4
num_key_value_heads = 4
max_position_embeddings = 64
tie_word_embeddings = false
[data]
train = "{data}"
format = "tokens"
seq_len = 16
shuffle = false
[train]
max_steps = 2
micro_batch_size = 1
max_grad_norm = 1.0
[optim]
name = "{optim}"
lr = 1e-3
[output]
dir = "{out}"
"#,
        data = out.join("data.jsonl").display(),
        out = out.join("run").display()
    );
    std::fs::create_dir_all(out).unwrap();
    let line = |s: u32| format!("{{\"input_ids\": {:?}}}\n", (s..s + 16).collect::<Vec<_>>());
    std::fs::write(out.join("data.jsonl"), line(3) + &line(40)).unwrap();
    let config = TrainConfig::parse(&text, optim, &[]).unwrap();
    let options = collie_train::RunOptions {
        quiet: true,
        ..Default::default()
    };
    let mut trainer = collie_train::Trainer::<A, collie_llama::Llama<A>>::new(
        config,
        &options,
        &Default::default(),
    )
    .unwrap();
    trainer.train_step().unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let m = trainer.train_step().unwrap();
    assert!(m.loss.is_finite(), "{optim}: loss {}", m.loss);
    PEAK.load(Ordering::Relaxed) - before
}

#[test]
fn lomo_holds_at_most_one_blocks_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    // One decoder layer: 4·256² + 3·256·1024 parameters; the model: 8 of them plus two
    // 256 × 256 vocabulary tables.
    let layer = (4 * 256 * 256 + 3 * 256 * 1024) * 4;
    let model = 8 * layer + 2 * 256 * 256 * 4;
    let lomo = step_peak("lomo", &tmp.path().join("lomo"));
    let sgd = step_peak("sgd", &tmp.path().join("sgd"));
    println!(
        "step peak above the model: LOMO {:.1} MB, SGD {:.1} MB (one layer {:.1} MB, all parameters {:.1} MB)",
        lomo as f64 / 1e6,
        sgd as f64 / 1e6,
        layer as f64 / 1e6,
        model as f64 / 1e6
    );
    // A plain backward holds every gradient at once.
    assert!(
        sgd >= model,
        "SGD's step peak {sgd} < the gradients' {model} bytes"
    );
    // LOMO: one layer's gradients, its updated weights and the backward's transients, never the
    // model's worth: within 3 layers' bytes (the model is 8 layers).
    assert!(
        lomo <= 3 * layer,
        "LOMO's step peak {lomo} bytes exceeds 3 layers ({} bytes)",
        3 * layer
    );
}
