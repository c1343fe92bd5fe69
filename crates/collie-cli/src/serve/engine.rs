//! The engine of `collie serve`: one [`Batcher`] per served model, stepped in a loop that first
//! cancels the sequences whose clients left, then joins the requests that arrived.
//!
//! In one process, [`lead`] is all there is. Under `mpirun` with a tensor-parallel model every
//! rank holds a slice of each weight and every forward pass is collective, so all ranks must run
//! the same steps on the same batch: rank 0 (which serves HTTP) decides each iteration's [`Plan`]
//! — what to cancel, what to admit — and broadcasts it; the other ranks [`follow`] it. Sampling
//! needs no exchange: each sequence's generator is seeded by its request and every rank sees the
//! same (gathered) logits, so every rank picks the same tokens and finishes the same sequences.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::backend::Backend;
use collie_core::dist::Group;
use collie_core::lm::CausalLm;
use collie_train::batcher::{Batcher, Request};
use collie_train::generate::GenerationConfig;
use serde::{Deserialize, Serialize};

use super::api::Load;

/// A request for the engine: which served model, the sequence, and whether its client left.
pub struct Job {
    /// Index into the served models.
    pub model: usize,
    /// The sequence to generate (its sink answers the client).
    pub request: Request,
    /// Set once the client is gone (its sink could not deliver): the sequence is cancelled at
    /// the next iteration.
    pub gone: Arc<AtomicBool>,
}

/// One sequence to admit, as every rank receives it.
#[derive(Serialize, Deserialize)]
struct Admit {
    model: usize,
    id: u64,
    prompt: Vec<u32>,
    config: GenerationConfig,
}

/// What every rank does before the next step.
#[derive(Serialize, Deserialize, Default)]
struct Plan {
    cancel: Vec<u64>,
    admit: Vec<Admit>,
    /// The server is shutting down.
    stop: bool,
}

/// How long an idle leader waits for a request before telling the followers nothing happened
/// (they wait inside a broadcast, which the collective watchdog bounds).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Rank 0's loop (the only one in a single process): takes requests from `queue`, decides each
/// iteration's plan, shares it with the other ranks of `world` (if any), and runs it. Returns
/// when the queue's senders are gone (the HTTP side stopped).
pub fn lead<B: Backend, M: CausalLm<B>>(
    models: &[M],
    device: B::Device,
    pad_id: u32,
    max_batch: usize,
    queue: Receiver<Job>,
    load: &Load,
    world: Option<&Group>,
) {
    let mut batches: Vec<Batcher<B, M>> = models
        .iter()
        .map(|m| Batcher::new(m, device.clone(), pad_id))
        .collect();
    let mut gone: HashMap<u64, Arc<AtomicBool>> = HashMap::new();
    loop {
        let running: usize = batches.iter().map(Batcher::len).sum();
        let mut arrived = Vec::new();
        let mut stop = false;
        if running == 0 {
            let next = match world {
                None => queue.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(_) => queue.recv_timeout(HEARTBEAT),
            };
            match next {
                Ok(job) => arrived.push(job),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
        }
        while running + arrived.len() < max_batch {
            match queue.try_recv() {
                Ok(job) => arrived.push(job),
                Err(_) => break,
            }
        }
        load.waiting.fetch_sub(arrived.len(), Ordering::Relaxed);
        // Forget the sequences that ended; cancel those whose clients left.
        let ids: Vec<u64> = batches.iter().flat_map(Batcher::ids).collect();
        gone.retain(|id, _| ids.contains(id));
        let cancel: Vec<u64> = (gone.iter())
            .filter(|(_, flag)| flag.load(Ordering::Relaxed))
            .map(|(id, _)| *id)
            .collect();
        let plan = Plan {
            cancel,
            admit: (arrived.iter())
                .map(|j| Admit {
                    model: j.model,
                    id: j.request.id,
                    prompt: j.request.prompt.clone(),
                    config: j.request.config.clone(),
                })
                .collect(),
            stop,
        };
        if let Some(world) = world {
            share(world, Some(&plan));
        }
        if stop {
            return;
        }
        let mut requests = Vec::with_capacity(arrived.len());
        for job in arrived {
            gone.insert(job.request.id, job.gone);
            requests.push((job.model, job.request));
        }
        run(&mut batches, &plan.cancel, requests);
        load.running
            .store(batches.iter().map(Batcher::len).sum(), Ordering::Relaxed);
    }
}

/// The loop of ranks other than 0: run each plan rank 0 shares, with sinks nobody reads.
pub fn follow<B: Backend, M: CausalLm<B>>(
    models: &[M],
    device: B::Device,
    pad_id: u32,
    world: &Group,
) {
    let mut batches: Vec<Batcher<B, M>> = models
        .iter()
        .map(|m| Batcher::new(m, device.clone(), pad_id))
        .collect();
    loop {
        let plan = share(world, None);
        if plan.stop {
            return;
        }
        let requests = (plan.admit.into_iter())
            .map(|a| {
                let request = Request {
                    id: a.id,
                    prompt: a.prompt,
                    config: a.config,
                    sink: Box::new(|_| true),
                };
                (a.model, request)
            })
            .collect();
        run(&mut batches, &plan.cancel, requests);
    }
}

/// One iteration: cancel, admit (grouped by model), then a step of every running batch.
fn run<B: Backend, M: CausalLm<B>>(
    batches: &mut [Batcher<B, M>],
    cancel: &[u64],
    mut requests: Vec<(usize, Request)>,
) {
    for (m, batch) in batches.iter_mut().enumerate() {
        if !cancel.is_empty() {
            batch.cancel(cancel);
        }
        let (these, rest): (Vec<_>, Vec<_>) = requests.into_iter().partition(|(i, _)| *i == m);
        requests = rest;
        if !these.is_empty() {
            batch.admit(these.into_iter().map(|(_, r)| r).collect());
        }
    }
    for batch in batches.iter_mut() {
        batch.step();
    }
}

/// Rank 0's plan on every rank of `world`: its JSON bytes, length first, as f32 values (exact
/// for bytes and for lengths below 2^24).
fn share(world: &Group, plan: Option<&Plan>) -> Plan {
    let bytes = plan.map_or_else(Vec::new, |p| serde_json::to_vec(p).expect("plan to JSON"));
    let mut len = [bytes.len() as f32];
    world.broadcast(&mut len, 0);
    let mut buf: Vec<f32> = match plan {
        Some(_) => bytes.iter().map(|&b| b as f32).collect(),
        None => vec![0.0; len[0] as usize],
    };
    world.broadcast(&mut buf, 0);
    let bytes: Vec<u8> = buf.iter().map(|&f| f as u8).collect();
    serde_json::from_slice(&bytes).expect("rank 0's plan")
}
