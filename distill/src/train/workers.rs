//! Data-parallel training on the host's cores.
//!
//! candle spreads each operation over all cores, but a training step of the models edgelm
//! distils is thousands of small operations: measured on a 2-core machine, a distillation step
//! ran only 1.1x faster on two threads than on one, the second core mostly spinning between
//! operations. Splitting each batch into one share per core, each run single-threaded with its
//! own forward and backward pass, and summing the gradients keeps both cores busy.
//!
//! A binary opts in with [`use_data_parallel_training`] at start-up; library users who do not
//! keep candle's own threading and one share per batch.

use std::sync::OnceLock;

use crate::error::{Error, Result};

static WORKERS: OnceLock<usize> = OnceLock::new();

/// Makes training data-parallel for the rest of the process: one worker per core (or per
/// thread named by `RAYON_NUM_THREADS`), each running candle on one thread. Call it first
/// thing in `main`, before any thread exists: it sets `RAYON_NUM_THREADS=1` in the process
/// environment, which candle and its matmul read. Returns the number of workers.
pub fn use_data_parallel_training() -> usize {
    *WORKERS.get_or_init(|| {
        let asked = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0);
        let n = asked.or_else(|| std::thread::available_parallelism().ok().map(|n| n.get())).unwrap_or(1);
        if n > 1 {
            // Safe here: the caller runs this before spawning threads.
            std::env::set_var("RAYON_NUM_THREADS", "1");
        }
        n
    })
}

/// How many shares a batch is split into: the workers set up by
/// [`use_data_parallel_training`], or 1 (candle's own threading).
pub fn training_workers() -> usize {
    WORKERS.get().copied().unwrap_or(1)
}

/// Runs `f` on every part, each in its own thread when there is more than one, and returns the
/// results in the parts' order; a part whose thread panicked gives an error naming `what`.
pub(crate) fn map_parts<P: Sync, T: Send>(
    parts: &[P],
    what: &str,
    f: impl Fn(&P) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    if parts.len() <= 1 {
        return parts.iter().map(&f).collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = parts.iter().map(|p| s.spawn(|| f(p))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Training { what: format!("a {what} thread panicked") })))
            .collect()
    })
}

/// Splits `items` into at most `parts` contiguous, non-empty runs of nearly equal length.
pub(crate) fn split<T>(items: &[T], parts: usize) -> Vec<&[T]> {
    let parts = parts.clamp(1, items.len().max(1));
    let (base, extra) = (items.len() / parts, items.len() % parts);
    let mut out = Vec::with_capacity(parts);
    let mut at = 0;
    for i in 0..parts {
        let len = base + usize::from(i < extra);
        if len > 0 {
            out.push(&items[at..at + len]);
        }
        at += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_order_and_balances() {
        let v: Vec<u32> = (0..7).collect();
        let parts = split(&v, 3);
        assert_eq!(parts, vec![&[0, 1, 2][..], &[3, 4][..], &[5, 6][..]]);
        assert_eq!(split(&v, 1), vec![&v[..]]);
        assert_eq!(split(&v[..2], 4).len(), 2);
        assert!(split::<u32>(&[], 2).is_empty());
    }
}
