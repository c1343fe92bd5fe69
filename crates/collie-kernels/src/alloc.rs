//! A global allocator for the binaries: the system allocator, with large blocks kept mapped
//! after `free` and handed out again, never holding more memory than the process has needed.
//!
//! Why: a training step allocates its large buffers (logits, activations, gradients, products)
//! afresh every step, in the same sizes as the step before. The system allocator maps each one
//! from the kernel and unmaps it on `free`, so every 4 KiB page faults on first touch (and is
//! zeroed and charged to the cgroup), and every unmap flushes the other threads' TLBs. On the
//! 2-vCPU VMs the benchmarks run on, touching a fresh 64 MiB buffer took 30-37 ms, half as long
//! as the LM-head product that fills it. Here a freed block of [`LARGE`] bytes or more stays
//! mapped; the next request of the same (page-rounded) size takes it back without a fault, a
//! new mapping is populated in one call instead of one fault per page, and a growing block is
//! moved by the kernel (`mremap`), never resident twice.
//!
//! Memory: the blocks kept are bounded by the process's own high-water mark. Let `live` be the
//! large blocks in use and `need` the most `live` has ever been; before mapping a new block the
//! cache unmaps its oldest blocks until `live + kept ≤ need`. The large blocks mapped are thus
//! never more than the most the process had in use at once, which is what the system
//! allocator maps at its peak too.
//!
//! Zeroed blocks of 64 KiB and more that the system allocator serves get their zeros written
//! (see [`ZERO_BY_WRITE`]'s note on the zero page). Other small blocks, and alignments above a
//! page, go to the system allocator untouched. Elsewhere than Linux the type is the system
//! allocator. A binary opts in with
//! `#[global_allocator] static ALLOC: collie_kernels::alloc::CachingAlloc = CachingAlloc;`.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks from which the cache manages the memory (smaller ones live in the system
/// allocator's arenas, which reuse them already). 1 MiB rather than more: with 4 MiB, UDR's
/// benchmark peaked 5.8 % higher than with the system allocator alone (its arenas, whose mmap
/// threshold grows to the sizes it still sees, kept the 1-4 MiB blocks beside the cache's);
/// with 1 MiB, within 1 %.
pub const LARGE: usize = 1 << 20;
/// Zeroed blocks (below [`LARGE`]) from which the zeros are written rather than left to fresh
/// pages: a fresh page that is read before it is written maps the shared zero page, and the
/// write then faults again and flushes the other threads' TLBs (an interrupt to each, slow in
/// a VM). Element-wise ops that accumulate into a zeroed buffer do exactly that; these faults
/// and flushes were about 14 % of a `20m` benchmark run.
pub const ZERO_BY_WRITE: usize = 64 << 10;
/// Alignment every mapping has (the smallest page size of the supported targets).
const PAGE: usize = 4096;

/// The global allocator: [`BlockCache`] for large blocks, the system allocator for the rest.
#[derive(Debug, Default, Clone, Copy)]
pub struct CachingAlloc;

/// Whether a layout's blocks come from the cache.
fn cached(layout: &Layout) -> bool {
    cfg!(target_os = "linux") && layout.size() >= LARGE && layout.align() <= PAGE
}

#[cfg(target_os = "linux")]
static CACHE: std::sync::Mutex<BlockCache<SLOTS>> = std::sync::Mutex::new(BlockCache::new());
/// Blocks the global cache keeps at most (a step's distinct large buffers fit many times).
#[cfg(target_os = "linux")]
const SLOTS: usize = 1024;

#[cfg(target_os = "linux")]
fn global<T>(f: impl FnOnce(&mut BlockCache<SLOTS>) -> T) -> T {
    // A panic cannot happen while the lock is held (no allocation, no fallible call), but a
    // poisoned lock must not turn every later allocation into an abort either.
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut cache)
}

// SAFETY: small blocks are the system allocator's; large ones are whole mappings of at least
// `layout.size()` bytes, page-aligned (every layout routed here has `align ≤ PAGE`), handed to
// one owner at a time (the cache gives a block out once and takes it back on `dealloc`).
unsafe impl GlobalAlloc for CachingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if cached(&layout) {
            return global(|c| c.take(layout.size(), false));
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if cached(&layout) {
            return global(|c| c.take(layout.size(), true));
        }
        if layout.size() >= ZERO_BY_WRITE {
            // SAFETY: the caller's contract, forwarded; the block is written within its size.
            unsafe {
                let p = System.alloc(layout);
                if !p.is_null() {
                    std::ptr::write_bytes(p, 0, layout.size());
                }
                return p;
            }
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(target_os = "linux")]
        if cached(&layout) {
            return global(|c| c.give(ptr, layout.size()));
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract (a valid alignment, a non-zero size), forwarded.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !cached(&layout) && !cached(&new) {
            // SAFETY: the caller's contract, forwarded.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        #[cfg(target_os = "linux")]
        if cached(&layout) && cached(&new) {
            // The kernel moves the pages (a growing `Vec` is never resident twice).
            return global(|c| c.resize(ptr, layout.size(), new_size));
        }
        // SAFETY: a block of the new layout; the old one is valid for `layout.size()` bytes.
        unsafe {
            let q = self.alloc(new);
            if !q.is_null() {
                std::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            q
        }
    }
}

/// A size rounded up to whole pages (the size of its mapping).
fn round(size: usize) -> usize {
    size.next_multiple_of(PAGE)
}

/// Freed large blocks kept mapped for reuse, at most `N`, bounded by the high-water mark of the
/// blocks in use (see the module docs). Fixed storage: it must not allocate itself.
#[derive(Debug)]
pub struct BlockCache<const N: usize> {
    /// Kept blocks: address (0 = empty slot), mapping size and the tick they were freed at.
    kept: [(usize, usize, u64); N],
    /// Bytes of the blocks in use.
    live: usize,
    /// Bytes of the kept blocks.
    held: usize,
    /// The most `live` has been.
    need: usize,
    /// Frees so far (the age of kept blocks).
    tick: u64,
}

impl<const N: usize> Default for BlockCache<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> BlockCache<N> {
    /// An empty cache.
    pub const fn new() -> Self {
        BlockCache {
            kept: [(0, 0, 0); N],
            live: 0,
            held: 0,
            need: 0,
            tick: 0,
        }
    }

    /// Bytes mapped by the cache now (blocks in use and kept).
    pub fn mapped(&self) -> usize {
        self.live + self.held
    }

    /// The most bytes of blocks that were in use at once.
    pub fn need(&self) -> usize {
        self.need
    }

    /// A block of `size` bytes (page-aligned, zeroed if asked): a kept block of the same
    /// mapping size, or a new mapping after unmapping the oldest kept blocks so that the
    /// cache maps no more than `need`. Null if the kernel refuses the mapping.
    pub fn take(&mut self, size: usize, zeroed: bool) -> *mut u8 {
        let len = round(size);
        let hit = self.kept.iter().position(|&(p, l, _)| p != 0 && l == len);
        let ptr = match hit {
            Some(i) => {
                let p = self.kept[i].0 as *mut u8;
                self.kept[i] = (0, 0, 0);
                self.held -= len;
                if zeroed {
                    // SAFETY: the block is this cache's mapping of `len` bytes, now unused.
                    unsafe { std::ptr::write_bytes(p, 0, len) };
                }
                p
            }
            None => {
                self.make_room(len);
                let p = map(len);
                if p.is_null() {
                    return p;
                }
                p
            }
        };
        self.live += len;
        ptr
    }

    /// Take back a block from [`take`](Self::take) of `size` bytes: kept for reuse, or
    /// unmapped when every slot is full.
    pub fn give(&mut self, ptr: *mut u8, size: usize) {
        let len = round(size);
        self.live -= len;
        self.tick += 1;
        match self.kept.iter().position(|&(p, _, _)| p == 0) {
            Some(i) => {
                self.kept[i] = (ptr as usize, len, self.tick);
                self.held += len;
            }
            _ => unmap(ptr, len),
        }
    }

    /// Resize a block from [`take`](Self::take) of `size` bytes to `new_size` in place or by
    /// moving its pages (`mremap`), keeping its contents; null (the block untouched) if the
    /// kernel refuses.
    pub fn resize(&mut self, ptr: *mut u8, size: usize, new_size: usize) -> *mut u8 {
        let (len, new_len) = (round(size), round(new_size));
        if new_len == len {
            return ptr;
        }
        if new_len > len {
            self.make_room(new_len - len);
        }
        let q = remap(ptr, len, new_len);
        if !q.is_null() {
            self.live = self.live - len + new_len;
        }
        q
    }

    /// Before mapping `extra` more bytes: raise `need` to what will be in use, then unmap the
    /// oldest kept blocks until everything mapped fits under it.
    fn make_room(&mut self, extra: usize) {
        self.need = self.need.max(self.live + extra);
        while self.live + extra + self.held > self.need {
            self.unmap_oldest();
        }
    }

    /// Unmap the kept block freed longest ago.
    fn unmap_oldest(&mut self) {
        let Some(i) = (0..N)
            .filter(|&i| self.kept[i].0 != 0)
            .min_by_key(|&i| self.kept[i].2)
        else {
            return;
        };
        let (p, len, _) = self.kept[i];
        self.kept[i] = (0, 0, 0);
        self.held -= len;
        unmap(p as *mut u8, len);
    }
}

/// A fresh anonymous mapping of `len` bytes (zero pages), its pages backed at once (one call
/// instead of a fault per page; a page read before it is written would map the shared zero
/// page and fault again on the write), or null.
fn map(len: usize) -> *mut u8 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: an anonymous private mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            p.cast()
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = len;
        std::ptr::null_mut()
    }
}

/// A mapping from [`map`] resized to `new_len` bytes, moved if it must be; null if refused.
fn remap(ptr: *mut u8, len: usize, new_len: usize) -> *mut u8 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `ptr` is a whole mapping of `len` bytes owned by the caller.
        let q = unsafe { libc::mremap(ptr.cast(), len, new_len, libc::MREMAP_MAYMOVE) };
        if q == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            q.cast()
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (ptr, len, new_len);
        std::ptr::null_mut()
    }
}

/// Return a mapping from [`map`] to the kernel.
fn unmap(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: `ptr` is a whole mapping of `len` bytes that nothing uses any more. A failure
    // (impossible for a whole mapping) would only leak it.
    unsafe {
        libc::munmap(ptr.cast(), len);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn a_freed_block_is_reused_by_the_same_size_and_zeroed_on_request() {
        let mut c = BlockCache::<8>::new();
        let a = c.take(3 * MIB, false);
        // SAFETY: `a` is a mapping of 3 MiB.
        unsafe { std::ptr::write_bytes(a, 7, 3 * MIB) };
        c.give(a, 3 * MIB);
        // the same page-rounded size (3 MiB − 100 B) gets the same block, zeroed
        let b = c.take(3 * MIB - 100, true);
        assert_eq!(a, b);
        // SAFETY: `b` is the same mapping.
        assert!(unsafe { std::slice::from_raw_parts(b, 3 * MIB) }
            .iter()
            .all(|&x| x == 0));
        c.give(b, 3 * MIB - 100);
        assert_eq!(c.mapped(), 3 * MIB);
    }

    #[test]
    fn the_cache_never_maps_more_than_the_most_ever_in_use() {
        let mut c = BlockCache::<8>::new();
        // a step that holds 4 + 2 MiB at once, then frees both and asks for 5 MiB: the kept
        // blocks are unmapped (oldest first) until 5 MiB fits under the 6 MiB high-water mark
        let a = c.take(4 * MIB, false);
        let b = c.take(2 * MIB, false);
        assert_eq!(c.need(), 6 * MIB);
        c.give(a, 4 * MIB);
        c.give(b, 2 * MIB);
        let d = c.take(5 * MIB, false);
        assert!(c.mapped() <= c.need(), "{} > {}", c.mapped(), c.need());
        // both kept blocks went (5 + 2 > 6)
        assert_eq!(c.mapped(), 5 * MIB);
        c.give(d, 5 * MIB);
        // over many steps of mixed sizes the bound holds after every request
        let sizes = [MIB, 3 * MIB, 2 * MIB + 5, 7 * MIB, MIB + 4096];
        let mut held: Vec<(*mut u8, usize)> = Vec::new();
        for i in 0..200 {
            let s = sizes[(i * 7) % sizes.len()];
            if i % 3 == 2 {
                if let Some((p, s)) = held.pop() {
                    c.give(p, s);
                }
            }
            let p = c.take(s, i % 2 == 0);
            assert!(!p.is_null());
            held.push((p, s));
            assert!(c.mapped() <= c.need(), "request {i}");
        }
        for (p, s) in held {
            c.give(p, s);
        }
    }

    #[test]
    fn a_resized_block_keeps_its_contents_and_its_count() {
        let mut c = BlockCache::<4>::new();
        let a = c.take(2 * MIB, false);
        // SAFETY: `a` is a mapping of 2 MiB.
        unsafe { std::ptr::write_bytes(a, 5, 2 * MIB) };
        let b = c.resize(a, 2 * MIB, 5 * MIB);
        // SAFETY: `b` is the same pages, now a mapping of 5 MiB.
        assert!(unsafe { std::slice::from_raw_parts(b, 2 * MIB) }
            .iter()
            .all(|&x| x == 5));
        assert_eq!((c.mapped(), c.need()), (5 * MIB, 5 * MIB));
        c.give(b, 5 * MIB);
    }

    #[test]
    fn a_full_cache_unmaps_what_it_cannot_keep() {
        let mut c = BlockCache::<2>::new();
        let blocks: Vec<_> = (0..3).map(|_| c.take(MIB, false)).collect();
        for &p in &blocks {
            c.give(p, MIB);
        }
        assert_eq!(c.mapped(), 2 * MIB);
    }

    #[test]
    fn the_global_allocator_keeps_contents_and_alignment() {
        let a = CachingAlloc;
        for (size, align) in [
            (1, 1),
            (64, 64),
            (ZERO_BY_WRITE + 1, 8),
            (LARGE, 4096),
            (LARGE, 8192),
            (9 << 20, 16),
        ] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: non-zero sizes; each block is written within its size and freed once
            // with the layout it has.
            unsafe {
                let z = a.alloc_zeroed(layout);
                assert!(!z.is_null() && (z as usize).is_multiple_of(align));
                assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                std::ptr::write_bytes(z, 3, size);
                a.dealloc(z, layout);
                let p = a.alloc(layout);
                std::ptr::write_bytes(p, 7, size);
                // grow across the large threshold and shrink back below it
                let q = a.realloc(p, layout, size * 2 + LARGE);
                assert!(std::slice::from_raw_parts(q, size).iter().all(|&b| b == 7));
                let r = a.realloc(
                    q,
                    Layout::from_size_align(size * 2 + LARGE, align).unwrap(),
                    1,
                );
                assert_eq!(*r, 7);
                a.dealloc(r, Layout::from_size_align(1, align).unwrap());
            }
        }
    }
}
