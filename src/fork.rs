//! What the Python extension needs to keep working in a child made by `fork()` (`os.fork`,
//! `multiprocessing`'s fork start method, PyTorch's `DataLoader` workers on Linux).
//!
//! A forked child has only the thread that called `fork`. Two things break:
//!
//! * thread pools: rayon's global pool and the per-size pools of `num_threads=` keep their
//!   queues but have no threads, so the first call that hands them work waits forever. A child
//!   therefore gets pools of its own ([`pool`], [`forked`]); the parent's are leaked, never
//!   dropped (dropping one wakes threads that do not exist, through locks they may have held);
//! * locks: a mutex some other thread held at the moment of the fork stays held in the child.
//!   The prepare handler takes every process-wide lock of the crate (the kernel cache, the
//!   rotation and certificate memos, the pool list) before the fork and both sides release
//!   them after it, so the child inherits them unlocked and their data between updates, as
//!   glibc does for malloc and PyTorch and tokenizers do for their pools.
//!
//! A call in flight on another thread does not exist in the child: its Arcs and buffers are
//! leaked there (the parent, where it runs on, is unaffected).

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

/// Forks this process has been through since the handlers were installed (0 in the process
/// that loaded the extension, unless it was itself forked after loading it).
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Pools by size, with the generation they were started in.
type Pools = Vec<(usize, Arc<rayon::ThreadPool>)>;
static POOLS: Mutex<(u64, Pools)> = Mutex::new((0, Vec::new()));

thread_local! {
    /// The guards the prepare handler took, dropped by the parent and child handlers (which
    /// run on the thread that called `fork`).
    static HELD: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

extern "C" fn prepare() {
    // Always in this order; none of these locks is taken while another of them is held, so the
    // order cannot invert against a running call.
    let held: Vec<Box<dyn Any>> = vec![
        Box::new(POOLS.lock().unwrap_or_else(|e| e.into_inner())),
        crate::fast::cache::global().fork_guard(),
        crate::exact::rotate::fork_guard(),
        crate::poly::fork_guard(),
    ];
    HELD.with(|h| *h.borrow_mut() = held);
}

extern "C" fn release() {
    HELD.with(|h| h.borrow_mut().clear());
}

extern "C" fn child() {
    GENERATION.fetch_add(1, Ordering::SeqCst);
    release();
}

#[cfg(unix)]
extern "C" {
    fn pthread_atfork(
        prepare: Option<extern "C" fn()>,
        parent: Option<extern "C" fn()>,
        child: Option<extern "C" fn()>,
    ) -> std::ffi::c_int;
}

/// Installs the fork handlers (once per process; a forked child inherits them).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(unix)]
        // SAFETY: the three handlers are `extern "C"` functions with no arguments that live as
        // long as the process (the extension is never unloaded); the call only records them.
        unsafe {
            pthread_atfork(Some(prepare), Some(release), Some(child));
        }
    });
}

/// Whether this process is a forked child of one that loaded the extension: rayon's global
/// pool may then have no threads, and calls must use a pool of [`pool`] instead.
pub fn forked() -> bool {
    GENERATION.load(Ordering::Relaxed) != 0
}

/// The pool of `n` threads of this process, started on first use.
pub fn pool(n: usize) -> Result<Arc<rayon::ThreadPool>, rayon::ThreadPoolBuildError> {
    let generation = GENERATION.load(Ordering::SeqCst);
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if pools.0 != generation {
        // The parent's pools, threadless here: leaked, not dropped (see the module docs).
        std::mem::forget(std::mem::take(&mut pools.1));
        pools.0 = generation;
    }
    if let Some((_, p)) = pools.1.iter().find(|(m, _)| *m == n) {
        return Ok(p.clone());
    }
    let p = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(n).build()?);
    pools.1.push((n, p.clone()));
    Ok(p)
}
