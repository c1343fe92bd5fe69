//! The world of a run: MPI when launched by `mpirun` (feature `mpi`), otherwise one process;
//! the data-, tensor- and pipeline-parallel groups of a [`ParallelDims`] layout; and the failure
//! path — a panic, an error or a stuck collective on one rank ends the whole job with a message
//! naming the rank, never a hang.

#[cfg(feature = "mpi")]
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "mpi")]
use std::sync::Arc;
use std::time::Duration;
#[cfg(feature = "mpi")]
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use collie_core::dist::{solo, Group};

use crate::dims::{Coords, ParallelDims};
use crate::error::DistError;

/// A process of a (possibly parallel) run and its groups.
pub struct Dist {
    /// The layout.
    pub dims: ParallelDims,
    /// Global rank.
    pub rank: usize,
    /// This rank's place in the layout.
    pub coords: Coords,
    /// All processes.
    pub world: Group,
    /// Ranks holding the same shard of the model (same tp rank and stage): gradients reduce here.
    pub dp: Group,
    /// Ranks sharing one layer's shards (same dp rank and stage).
    pub tp: Group,
    /// Ranks of one pipeline (same dp and tp rank), in stage order.
    pub pp: Group,
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Dist(rank {} of {}, {})",
            self.rank,
            self.dims.world(),
            self.dims
        )
    }
}

/// Whether the process was started by an MPI launcher (`mpirun`, `srun` with PMI).
fn launched_by_mpi() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// This process's rank as the MPI launcher announced it (0 when not launched by one): lets an
/// error met by every rank before MPI starts be printed once.
pub fn launcher_rank() -> usize {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(0)
}

impl Dist {
    /// The world of this process with the layout `dp × tp × pp` (`dp = None`: the rest).
    ///
    /// Under `mpirun` (and built with the `mpi` feature) this initializes MPI, installs the panic
    /// hook and the collective watchdog (see [`Dist::abort`]); otherwise it is a world of one.
    /// A layout that does not fit is an error on every rank (the same message everywhere).
    pub fn init(dp: Option<usize>, tp: usize, pp: usize) -> Result<Dist, DistError> {
        let launched = launched_by_mpi();
        #[cfg(feature = "mpi")]
        if launched.is_some() {
            return mpi_world::init(dp, tp, pp);
        }
        if let Some(n) = launched.filter(|&n| n > 1) {
            return Err(DistError::Mpi(format!(
                "started by an MPI launcher with {n} processes, but this binary was built without \
                 the `mpi` feature (cargo build --features mpi)"
            )));
        }
        Self::single(dp, tp, pp)
    }

    /// A world of one process (the layout must then be 1 × 1 × 1).
    pub fn single(dp: Option<usize>, tp: usize, pp: usize) -> Result<Dist, DistError> {
        let dims = ParallelDims::new(1, dp, tp, pp)?;
        Ok(Dist {
            dims,
            rank: 0,
            coords: dims.coords(0),
            world: solo(),
            dp: solo(),
            tp: solo(),
            pp: solo(),
            #[cfg(feature = "mpi")]
            _universe: None,
        })
    }

    /// Whether this process prints progress and writes run-wide outputs.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Number of processes.
    pub fn size(&self) -> usize {
        self.dims.world()
    }

    /// Ends the whole job at once with `code` after printing `message` with this rank's number:
    /// `MPI_Abort` under MPI (every rank is killed, `mpirun` exits non-zero), `exit` otherwise.
    /// Used when one rank fails on its own, where a clean exit would leave the others waiting in
    /// their next collective.
    pub fn abort(&self, message: &str, code: i32) -> ! {
        abort_world(self.rank, self.size(), message, code)
    }
}

/// Ends MPI after a start that failed on every rank alike ([`Dist::init`]'s error), once this
/// rank has reported it (rank 0 prints, the others stay silent): a barrier first, so that no rank
/// exits, and makes `mpirun` kill the job, before rank 0's message is out. Nothing to do otherwise.
pub fn finish_failed_start() {
    #[cfg(feature = "mpi")]
    mpi_world::finish_failed_start();
}

/// Prints `message` naming `rank` and ends the job.
fn abort_world(rank: usize, size: usize, message: &str, code: i32) -> ! {
    print_error(&format!("rank {rank} of {size}: {message}"));
    #[cfg(feature = "mpi")]
    if size > 1 {
        mpi_world::abort(code);
    }
    std::process::exit(code)
}

/// Prints `error: {message}` to stderr in one write: stderr is unbuffered, so `eprintln!` writes
/// its pieces one by one, and under `mpirun` another process's output (mpirun's own notice of a
/// failed rank) could land between "error: " and the message.
pub fn print_error(message: &str) {
    use std::io::Write;
    let line = format!("error: {message}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Seconds a collective may wait before the watchdog ends the job (`COLLIE_DIST_TIMEOUT`,
/// default 300): a peer that died or hangs outside MPI's sight must not hang the run.
pub fn collective_timeout() -> Duration {
    let secs = std::env::var("COLLIE_DIST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(300.0);
    Duration::from_secs_f64(secs)
}

/// When the collective in progress started (ms since the epoch; 0: none) and which one.
#[cfg(feature = "mpi")]
static IN_COLLECTIVE: AtomicU64 = AtomicU64::new(0);
#[cfg(feature = "mpi")]
static COLLECTIVE_NAME: AtomicUsize = AtomicUsize::new(0);
#[cfg(feature = "mpi")]
const NAMES: [&str; 9] = [
    "none",
    "all_reduce",
    "reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "barrier",
    "send",
    "recv",
];

#[cfg(feature = "mpi")]
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
}

/// Nanoseconds this process has spent blocked in collectives (see [`take_exposed_comm`]).
static EXPOSED_NANOS: AtomicU64 = AtomicU64::new(0);

/// Seconds this process spent blocked in collectives since the previous call: blocking
/// collectives, waits for non-blocking ones ([`collie_core::dist::Pending::wait`]) and pipeline
/// receives — the communication that computation did not hide. 0 in a world of one.
pub fn take_exposed_comm() -> f64 {
    EXPOSED_NANOS.swap(0, Ordering::Relaxed) as f64 * 1e-9
}

/// Marks a collective as in progress for the watchdog while the guard lives, and counts the
/// time as exposed communication.
#[cfg(feature = "mpi")]
pub(crate) struct Watch(Instant);

#[cfg(feature = "mpi")]
impl Watch {
    pub(crate) fn start(name: &str) -> Watch {
        let i = NAMES.iter().position(|n| *n == name).unwrap_or(0);
        COLLECTIVE_NAME.store(i, Ordering::Relaxed);
        IN_COLLECTIVE.store(now_ms(), Ordering::Release);
        Watch(Instant::now())
    }
}

#[cfg(feature = "mpi")]
impl Drop for Watch {
    fn drop(&mut self) {
        IN_COLLECTIVE.store(0, Ordering::Release);
        let nanos = self.0.elapsed().as_nanos() as u64;
        EXPOSED_NANOS.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Starts the thread that aborts the job when one collective waits longer than `timeout`.
#[cfg(feature = "mpi")]
fn spawn_watchdog(rank: usize, size: usize, timeout: Duration) {
    let limit = timeout.as_millis() as u64;
    std::thread::Builder::new()
        .name("collie-dist-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let since = IN_COLLECTIVE.load(Ordering::Acquire);
            if since != 0 && now_ms().saturating_sub(since) > limit {
                let name = NAMES[COLLECTIVE_NAME.load(Ordering::Relaxed)];
                abort_world(
                    rank,
                    size,
                    &format!(
                        "{name} waited more than {:.0} s for its peers (one of them failed or hangs; \
                         COLLIE_DIST_TIMEOUT sets the limit); aborting the job",
                        timeout.as_secs_f64()
                    ),
                    3,
                );
            }
        })
        .expect("spawning the watchdog thread");
}

/// Makes a panic on any rank end the job with the rank's number instead of leaving the others
/// blocked in a collective.
#[cfg(feature = "mpi")]
fn install_panic_hook(rank: usize, size: usize) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        abort_world(rank, size, &format!("panicked: {info}"), 101);
    }));
}

#[cfg(feature = "mpi")]
mod mpi_world {
    use super::*;
    use collie_core::dist::{Collectives, InFlight, Pending};
    use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
    use mpi::topology::{Color, Communicator, SimpleCommunicator};
    use mpi::Threading;

    /// One MPI communicator as a [`Collectives`] group.
    pub(super) struct MpiGroup {
        comm: SimpleCommunicator,
        rank: usize,
        size: usize,
        /// Sends in flight: the request and the buffer it reads.
        pending: std::sync::Mutex<Vec<(mpi::ffi::MPI_Request, Vec<f32>)>>,
    }

    // SAFETY: the trainer calls collectives from one thread at a time, and MPI is initialized with
    // MPI_THREAD_MULTIPLE where the library provides it; the only other thread (the watchdog)
    // calls nothing but MPI_Abort.
    unsafe impl Send for MpiGroup {}
    unsafe impl Sync for MpiGroup {}

    impl std::fmt::Debug for MpiGroup {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "MpiGroup(rank {} of {})", self.rank, self.size)
        }
    }

    /// Elements per MPI call: counts are C ints, and smaller messages pipeline better.
    const CHUNK: usize = 1 << 24;

    impl Collectives for MpiGroup {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) {
            let _w = Watch::start("all_reduce");
            for chunk in buf.chunks_mut(CHUNK) {
                let send = chunk.to_vec();
                self.comm
                    .all_reduce_into(&send[..], chunk, SystemOperation::sum());
            }
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
            let _w = Watch::start("all_reduce");
            let send = buf.to_vec();
            self.comm
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn all_reduce_max_f64(&self, buf: &mut [f64]) {
            let _w = Watch::start("all_reduce");
            let send = buf.to_vec();
            self.comm
                .all_reduce_into(&send[..], buf, SystemOperation::max());
        }
        fn all_gather(&self, send: &[f32], recv: &mut [f32]) {
            assert_eq!(
                recv.len(),
                send.len() * self.size,
                "all_gather buffer sizes"
            );
            let _w = Watch::start("all_gather");
            self.comm.all_gather_into(send, recv);
        }
        fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) {
            assert_eq!(
                send.len(),
                recv.len() * self.size,
                "reduce_scatter buffer sizes"
            );
            let _w = Watch::start("reduce_scatter");
            self.comm
                .reduce_scatter_block_into(send, recv, SystemOperation::sum());
        }
        fn reduce_sum(&self, buf: &mut [f32], root: usize) {
            let _w = Watch::start("reduce");
            let process = self.comm.process_at_rank(root as i32);
            for chunk in buf.chunks_mut(CHUNK) {
                if self.rank == root {
                    let send = chunk.to_vec();
                    process.reduce_into_root(&send[..], chunk, SystemOperation::sum());
                } else {
                    // A member that only sends needs no copy of its buffer.
                    process.reduce_into(&*chunk, SystemOperation::sum());
                }
            }
        }
        fn broadcast(&self, buf: &mut [f32], root: usize) {
            let _w = Watch::start("broadcast");
            for chunk in buf.chunks_mut(CHUNK) {
                self.comm.process_at_rank(root as i32).broadcast_into(chunk);
            }
        }
        fn barrier(&self) {
            let _w = Watch::start("barrier");
            self.comm.barrier();
        }
        fn send(&self, buf: Vec<f32>, dest: usize) {
            use mpi::raw::AsRaw;
            let mut request = unsafe { mpi::ffi::RSMPI_REQUEST_NULL };
            // SAFETY: the buffer moves into `pending` with its request and stays there, unmoved
            // (a Vec's heap storage does not move), until MPI_Wait says the send is complete.
            unsafe {
                mpi::ffi::MPI_Isend(
                    buf.as_ptr() as *const std::ffi::c_void,
                    buf.len() as i32,
                    mpi::ffi::RSMPI_FLOAT,
                    dest as i32,
                    0,
                    self.comm.as_raw(),
                    &mut request,
                );
            }
            self.pending
                .lock()
                .expect("pending sends")
                .push((request, buf));
        }
        fn recv(&self, buf: &mut [f32], src: usize) {
            use mpi::point_to_point::Source;
            let _w = Watch::start("recv");
            self.comm.process_at_rank(src as i32).receive_into(buf);
        }
        fn start_all_reduce_sum(&self, buf: Vec<f32>) -> Pending {
            self.start_sum(buf, None)
        }
        fn start_reduce_sum(&self, buf: Vec<f32>, root: usize) -> Pending {
            self.start_sum(buf, Some(root))
        }
        fn flush(&self) {
            let _w = Watch::start("send");
            let mut pending = self.pending.lock().expect("pending sends");
            for (mut request, _buf) in pending.drain(..) {
                // SAFETY: a request from MPI_Isend above, waited on once.
                unsafe {
                    mpi::ffi::MPI_Wait(&mut request, mpi::ffi::RSMPI_STATUS_IGNORE);
                }
            }
        }
    }

    /// `MPI_IN_PLACE` of the MPI library the process runs on: an ABI constant of each
    /// implementation family that rsmpi does not export (null where the family is unknown, and
    /// the reductions below then use a separate send buffer).
    fn in_place() -> *mut std::ffi::c_void {
        static VALUE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let v = *VALUE.get_or_init(|| {
            let version = mpi::environment::library_version().unwrap_or_default();
            if version.contains("Open MPI") {
                1
            } else if ["MPICH", "MVAPICH", "Intel(R) MPI"]
                .iter()
                .any(|f| version.contains(f))
            {
                usize::MAX
            } else {
                0
            }
        });
        v as *mut std::ffi::c_void
    }

    /// A non-blocking reduction: its requests (one per [`CHUNK`]) and the buffers they use.
    struct MpiPending {
        name: &'static str,
        buf: Vec<f32>,
        /// The send copy where `MPI_IN_PLACE` is unknown.
        send: Vec<f32>,
        requests: Vec<mpi::ffi::MPI_Request>,
    }

    // SAFETY: the requests are handles owned by this value alone (see `MpiGroup`'s Send).
    unsafe impl Send for MpiPending {}

    impl InFlight for MpiPending {
        fn test(&mut self) -> bool {
            let mut flag = 0;
            // SAFETY: requests started below and not yet waited on (completed ones become
            // MPI_REQUEST_NULL, which MPI_Testall accepts).
            unsafe {
                mpi::ffi::MPI_Testall(
                    self.requests.len() as i32,
                    self.requests.as_mut_ptr(),
                    &mut flag,
                    mpi::ffi::RSMPI_STATUSES_IGNORE,
                );
            }
            flag != 0
        }
        fn wait(mut self: Box<Self>) -> Vec<f32> {
            let _w = Watch::start(self.name);
            // SAFETY: as in `test`.
            unsafe {
                mpi::ffi::MPI_Waitall(
                    self.requests.len() as i32,
                    self.requests.as_mut_ptr(),
                    mpi::ffi::RSMPI_STATUSES_IGNORE,
                );
            }
            self.requests.clear();
            std::mem::take(&mut self.buf)
        }
    }

    impl Drop for MpiPending {
        fn drop(&mut self) {
            if !self.requests.is_empty() {
                // Dropped unfinished (a panic is ending the job): MPI may still write into the
                // buffers, so they are leaked rather than freed.
                std::mem::forget(std::mem::take(&mut self.buf));
                std::mem::forget(std::mem::take(&mut self.send));
            }
        }
    }

    impl MpiGroup {
        /// Starts a sum over the group of `buf`, chunk by chunk: onto every member, or onto
        /// `root` only.
        fn start_sum(&self, buf: Vec<f32>, root: Option<usize>) -> Pending {
            use mpi::raw::AsRaw;
            let place = in_place();
            let receives = root.is_none_or(|r| r == self.rank);
            // Without MPI_IN_PLACE a receiving member sends from a copy.
            let send = match place.is_null() && receives {
                true => buf.clone(),
                false => Vec::new(),
            };
            let mut op = Box::new(MpiPending {
                name: if root.is_some() {
                    "reduce"
                } else {
                    "all_reduce"
                },
                buf,
                send,
                requests: Vec::new(),
            });
            let n = op.buf.len();
            for start in (0..n).step_by(CHUNK) {
                let len = CHUNK.min(n - start);
                let recv = op.buf[start..].as_mut_ptr() as *mut std::ffi::c_void;
                let send: *const std::ffi::c_void = match (receives, place.is_null()) {
                    (true, false) => place,
                    (true, true) => op.send[start..].as_ptr() as *const _,
                    (false, _) => recv,
                };
                let mut request = unsafe { mpi::ffi::RSMPI_REQUEST_NULL };
                // SAFETY: the buffers live in `op` (heap storage that does not move) until the
                // request completes in `wait`, or are leaked if it never does (Drop).
                unsafe {
                    match root {
                        None => mpi::ffi::MPI_Iallreduce(
                            send,
                            recv,
                            len as i32,
                            mpi::ffi::RSMPI_FLOAT,
                            mpi::ffi::RSMPI_SUM,
                            self.comm.as_raw(),
                            &mut request,
                        ),
                        Some(r) => mpi::ffi::MPI_Ireduce(
                            send,
                            match receives {
                                true => recv,
                                false => std::ptr::null_mut(),
                            },
                            len as i32,
                            mpi::ffi::RSMPI_FLOAT,
                            mpi::ffi::RSMPI_SUM,
                            r as i32,
                            self.comm.as_raw(),
                            &mut request,
                        ),
                    };
                }
                op.requests.push(request);
            }
            Pending::new(op)
        }
    }

    fn group(world: &SimpleCommunicator, color: usize, key: usize) -> Group {
        let comm = world
            .split_by_color_with_key(Color::with_value(color as i32), key as i32)
            .expect("every rank has a color");
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        Arc::new(MpiGroup {
            comm,
            rank,
            size,
            pending: Default::default(),
        })
    }

    pub(super) fn init(dp: Option<usize>, tp: usize, pp: usize) -> Result<Dist, DistError> {
        let (universe, _) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| DistError::Mpi("MPI was already initialized".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        install_panic_hook(rank, size);
        // The layout is checked on every rank alike, so a bad one ends all of them cleanly: MPI
        // stays up until rank 0 has printed the error (see `finish_failed_start`), since a rank
        // that exited first would make mpirun kill rank 0 before it says why.
        let dims = match ParallelDims::new(size, dp, tp, pp) {
            Ok(dims) => dims,
            Err(e) => {
                FAILED_START.with(|u| *u.borrow_mut() = Some(universe));
                return Err(e);
            }
        };
        let c = dims.coords(rank);
        let dp_group = group(&world, c.pp * dims.tp + c.tp, c.dp);
        let tp_group = group(&world, c.pp * dims.dp + c.dp, c.tp);
        let pp_group = group(&world, c.dp * dims.tp + c.tp, c.pp);
        let world_group: Group = Arc::new(MpiGroup {
            comm: world,
            rank,
            size,
            pending: Default::default(),
        });
        if size > 1 {
            spawn_watchdog(rank, size, collective_timeout());
        }
        Ok(Dist {
            dims,
            rank,
            coords: c,
            world: world_group,
            dp: dp_group,
            tp: tp_group,
            pp: pp_group,
            _universe: Some(universe),
        })
    }

    thread_local! {
        /// MPI of a start that failed on every rank alike, kept until the error is reported.
        static FAILED_START: std::cell::RefCell<Option<mpi::environment::Universe>> =
            const { std::cell::RefCell::new(None) };
    }

    pub(super) fn finish_failed_start() {
        if let Some(universe) = FAILED_START.with(|u| u.borrow_mut().take()) {
            universe.world().barrier();
        }
    }

    pub(super) fn abort(code: i32) -> ! {
        // SAFETY: MPI is initialized (a world of more than one exists only after `init`).
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
        }
        std::process::exit(code)
    }
}
