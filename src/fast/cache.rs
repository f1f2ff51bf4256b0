//! A bounded, thread-safe cache of kernel spectra across calls.
//!
//! The kernel spectra `Ĉ_αβ` (and what is derived with them: the expansion, per-pair norms, the
//! row masses, the W norms) depend only on the polynomial's coefficients, the support, the
//! diagonal sequences `w_s(δ)` of the call's δ range, the mask/bias factor, the scale and the
//! shape `(nq, nk, d)` — not on q, k, v or on the data-dependent bound `R`. They are cached under
//! a [`KernelKey`] that *holds* those inputs (as bit patterns), so a hit means equal inputs, not
//! merely an equal hash: no collision can return another call's kernel. The per-call certificate
//! stays per call: a cached [`crate::fast::toeplitz::FastSpectra`] is wrapped with the current call's
//! plan ([`super::FastKernel::with_spectra`]), and every head is checked against that plan.
//!
//! Eviction is least-recently-used by bytes, under a global limit (default
//! `min(1 GiB, available memory / 8)`, [`KernelCache::set_limit`]; 0 disables the cache) and,
//! during a call, under that call's memory budget ([`KernelCache::make_room`] before a kernel is
//! looked up or built, so the cache plus the call's working set stay within `memory_limit`).
//! Entries are `Arc`s: evicting one that a running call still uses only drops the cache's
//! reference. Builds run outside the lock; two threads missing the same key both build (the
//! results are bitwise identical) and one copy is kept.

use crate::error::Result;
use ndarray::ArrayView2;
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// The inputs a cached kernel depends on, held exactly (f64 as bit patterns).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    /// What is built from them (forward or backward kernel, and its variant).
    kind: &'static str,
    /// `(nq, nk, d)`.
    shape: (usize, usize, usize),
    support: Vec<(usize, usize)>,
    scale: u64,
    coeffs: Vec<u64>,
    /// `|S| x glen`, row-major.
    seqs: Vec<u64>,
    factor: Vec<u64>,
}

impl KernelKey {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: &'static str,
        nq: usize,
        nk: usize,
        d: usize,
        support: &[(usize, usize)],
        scale: f64,
        coeffs: &[f64],
        seqs: ArrayView2<f64>,
        factor: &[f64],
    ) -> Self {
        let bits = |x: &f64| x.to_bits();
        KernelKey {
            kind,
            shape: (nq, nk, d),
            support: support.to_vec(),
            scale: scale.to_bits(),
            coeffs: coeffs.iter().map(bits).collect(),
            seqs: seqs.iter().map(bits).collect(),
            factor: factor.iter().map(bits).collect(),
        }
    }

    /// Bytes the key itself holds.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + 16 * self.support.len()
            + 8 * (self.coeffs.len() + self.seqs.len() + self.factor.len())
    }
}

struct Entry {
    value: Arc<dyn Any + Send + Sync>,
    bytes: usize,
    last_use: u64,
}

/// Counters and sizes of a [`KernelCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheInfo {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub entries: usize,
    pub bytes: usize,
    pub limit: usize,
}

struct Inner {
    map: HashMap<KernelKey, Entry>,
    bytes: usize,
    limit: usize,
    tick: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
}

impl Inner {
    /// Evicts least-recently-used entries other than `keep` until the bytes held by the others
    /// are at most `others_max`.
    fn evict_to(&mut self, others_max: usize, keep: Option<&KernelKey>) {
        let kept = keep.and_then(|k| self.map.get(k)).map_or(0, |e| e.bytes);
        while self.bytes - kept > others_max {
            let victim = self
                .map
                .iter()
                .filter(|(k, _)| Some(*k) != keep)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| k.clone());
            let Some(k) = victim else { break };
            if let Some(e) = self.map.remove(&k) {
                self.bytes -= e.bytes;
                self.evictions += 1;
            }
        }
    }
}

/// An LRU-by-bytes map from [`KernelKey`] to shared kernels (`Arc<T>` of any `T`; the key's
/// `kind` decides the type).
pub struct KernelCache {
    inner: Mutex<Inner>,
}

impl KernelCache {
    pub fn new(limit: usize) -> Self {
        KernelCache {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                bytes: 0,
                limit,
                tick: 0,
                hits: 0,
                misses: 0,
                evictions: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent map (every update is a few plain
        // assignments), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kernel for `key`: the cached one, or `build()`'s (`(kernel, bytes)`), which is kept
    /// when it fits both the cache limit and `budget` (the call's memory budget for everything
    /// the cache holds, this kernel included), evicting least-recently-used entries as needed.
    pub fn get_or_build<T: Any + Send + Sync>(
        &self,
        key: KernelKey,
        budget: usize,
        build: impl FnOnce() -> Result<(T, usize)>,
    ) -> Result<Arc<T>> {
        {
            let mut c = self.lock();
            c.tick += 1;
            let tick = c.tick;
            if c.limit > 0 {
                let found = c.map.get_mut(&key).and_then(|e| {
                    e.last_use = tick;
                    e.value.clone().downcast::<T>().ok()
                });
                if let Some(v) = found {
                    c.hits += 1;
                    return Ok(v);
                }
            }
            c.misses += 1;
        }
        let (value, bytes) = build()?;
        let value = Arc::new(value);
        let bytes = bytes.saturating_add(key.bytes());
        let mut c = self.lock();
        let cap = c.limit.min(budget);
        if bytes <= cap && !c.map.contains_key(&key) {
            c.evict_to(cap - bytes, None);
            c.tick += 1;
            let last_use = c.tick;
            c.bytes += bytes;
            let shared: Arc<dyn Any + Send + Sync> = value.clone();
            c.map.insert(
                key,
                Entry {
                    value: shared,
                    bytes,
                    last_use,
                },
            );
        }
        Ok(value)
    }

    /// Evicts least-recently-used entries (other than `keep`) until the bytes held by the others
    /// are at most `others_max`: called before a kernel is looked up, with the call's memory
    /// budget minus its working set.
    pub fn make_room(&self, others_max: usize, keep: &KernelKey) {
        self.lock().evict_to(others_max, Some(keep));
    }

    /// Sets the byte limit (0 disables the cache and empties it), evicting down to it.
    pub fn set_limit(&self, limit: usize) {
        let mut c = self.lock();
        c.limit = limit;
        c.evict_to(limit, None);
    }

    /// Drops every entry and resets the counters (the limit stays).
    pub fn clear(&self) {
        let mut c = self.lock();
        c.map.clear();
        c.bytes = 0;
        c.hits = 0;
        c.misses = 0;
        c.evictions = 0;
    }

    /// The cache's lock, held across a `fork` so the child never inherits it mid-update
    /// ([`crate::fork`]).
    #[cfg(feature = "python")]
    pub(crate) fn fork_guard(&'static self) -> Box<dyn Any> {
        Box::new(self.lock())
    }

    pub fn info(&self) -> CacheInfo {
        let c = self.lock();
        CacheInfo {
            hits: c.hits,
            misses: c.misses,
            evictions: c.evictions,
            entries: c.map.len(),
            bytes: c.bytes,
            limit: c.limit,
        }
    }
}

/// `min(1 GiB, MemAvailable / 8)` (256 MiB where available memory cannot be read).
pub fn default_limit() -> usize {
    const GIB: usize = 1 << 30;
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<usize>().ok())
            .map(|kb| kb.saturating_mul(1024))
    });
    match avail {
        Some(b) => GIB.min(b / 8),
        None => GIB / 4,
    }
}

/// The process-wide cache the dispatchers use.
pub fn global() -> &'static KernelCache {
    static CACHE: OnceLock<KernelCache> = OnceLock::new();
    CACHE.get_or_init(|| KernelCache::new(default_limit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn key(tag: f64, len: usize) -> KernelKey {
        let seqs = Array2::from_elem((1, len), tag);
        KernelKey::new(
            "test",
            1,
            len,
            1,
            &[(0, 0)],
            1.0,
            &[1.0],
            seqs.view(),
            &vec![1.0; len],
        )
    }

    #[test]
    fn lru_by_bytes_respects_the_cap_and_zero_disables() {
        let k0 = key(0.0, 8);
        let kb = k0.bytes();
        // Room for exactly two entries of 1000 + key bytes.
        let cache = KernelCache::new(2 * (1000 + kb));
        let build = |x: u32| move || Ok((x, 1000usize));
        assert_eq!(
            *cache
                .get_or_build(key(0.0, 8), usize::MAX, build(0))
                .unwrap(),
            0
        );
        assert_eq!(
            *cache
                .get_or_build(key(1.0, 8), usize::MAX, build(1))
                .unwrap(),
            1
        );
        // A hit refreshes entry 0, so inserting entry 2 evicts entry 1.
        assert_eq!(
            *cache
                .get_or_build(key(0.0, 8), usize::MAX, build(99))
                .unwrap(),
            0
        );
        assert_eq!(
            *cache
                .get_or_build(key(2.0, 8), usize::MAX, build(2))
                .unwrap(),
            2
        );
        let i = cache.info();
        assert_eq!((i.hits, i.misses, i.entries, i.evictions), (1, 3, 2, 1));
        assert_eq!(i.bytes, 2 * (1000 + kb));
        assert!(i.bytes <= i.limit);
        assert_eq!(
            *cache
                .get_or_build(key(1.0, 8), usize::MAX, build(11))
                .unwrap(),
            11
        );
        assert_eq!(
            *cache
                .get_or_build(key(2.0, 8), usize::MAX, build(22))
                .unwrap(),
            2
        );
        // Too large for the cap: returned, not kept.
        let big = cache
            .get_or_build(key(3.0, 8), usize::MAX, || Ok((3u32, 10_000)))
            .unwrap();
        assert_eq!(*big, 3);
        assert_eq!(cache.info().entries, 2);
        // A call budget below the cap is honoured too.
        cache
            .get_or_build(key(4.0, 8), 1000 + kb, build(4))
            .unwrap();
        let i = cache.info();
        assert_eq!((i.entries, i.bytes), (1, 1000 + kb));
        // make_room keeps the named key and evicts the others.
        cache
            .get_or_build(key(5.0, 8), usize::MAX, build(5))
            .unwrap();
        cache.make_room(0, &key(5.0, 8));
        let i = cache.info();
        assert_eq!((i.entries, i.bytes), (1, 1000 + kb));
        // Limit 0: empty, nothing kept, every lookup a miss.
        cache.set_limit(0);
        assert_eq!(cache.info().entries, 0);
        let (h0, m0) = (cache.info().hits, cache.info().misses);
        cache
            .get_or_build(key(5.0, 8), usize::MAX, build(55))
            .unwrap();
        let v = cache
            .get_or_build(key(5.0, 8), usize::MAX, build(56))
            .unwrap();
        let i = cache.info();
        assert_eq!((*v, i.entries, i.bytes), (56, 0, 0));
        assert_eq!((i.hits - h0, i.misses - m0), (0, 2));
        cache.set_limit(1 << 20);
        cache.clear();
        assert_eq!(
            cache.info(),
            CacheInfo {
                limit: 1 << 20,
                ..CacheInfo::default()
            }
        );
    }

    #[test]
    fn keys_compare_every_input() {
        let base = |scale: f64, coeff: f64, w: f64, f: f64, nq: usize| {
            let seqs = Array2::from_elem((2, 5), w);
            KernelKey::new(
                "forward",
                nq,
                6 - nq,
                2,
                &[(0, 0), (1, 1)],
                scale,
                &[1.0, coeff],
                seqs.view(),
                &[f; 5],
            )
        };
        let k = base(1.0, 1.0, 0.5, 1.0, 3);
        assert_eq!(k, base(1.0, 1.0, 0.5, 1.0, 3));
        for other in [
            base(1.5, 1.0, 0.5, 1.0, 3),
            base(1.0, 0.9, 0.5, 1.0, 3),
            base(1.0, 1.0, 0.25, 1.0, 3),
            base(1.0, 1.0, 0.5, 0.0, 3),
            base(1.0, 1.0, 0.5, 1.0, 2),
        ] {
            assert_ne!(k, other);
        }
    }
}
