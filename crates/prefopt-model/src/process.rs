//! Process-wide compute settings: one set of compute threads, and an allocator that keeps
//! freed tensor memory.
//!
//! Why: candle's CPU backend runs matmuls on rayon's pool but elementwise ops on a second,
//! private pool whose workers spin for a while after every op. On a small machine the two
//! pools' threads compete for the same cores: at 2 threads a DPO step lost 15-20% of its
//! throughput to threads spinning while others had work (measured, BENCHMARKS.md). We run
//! the work on one rayon pool, with the calling thread inside it (so a matmul's caller
//! computes instead of sleeping on a latch), and leave candle's elementwise ops on that
//! thread alone (`CANDLE_NUM_THREADS=1`); our fused ops (`crate::ops`) and matmuls still use
//! every thread.

/// Stack of the pool's threads: the main thread's usual 8 MiB is not enough for candle's
/// recursive graph walk on deep models, so give the compute threads room (virtual memory,
/// touched only when used).
const STACK_BYTES: usize = 64 << 20;

/// Runs `f` on a pool of `threads` threads (default: candle's count, `RAYON_NUM_THREADS` or
/// every core). Call it once, from `main`, before any tensor work: it sets the environment
/// variables candle reads when it creates its pools.
pub fn with_compute_threads<R: Send>(threads: Option<usize>, f: impl FnOnce() -> R + Send) -> R {
    if let Some(n) = threads {
        // candle reads RAYON_NUM_THREADS on every matmul to pick the gemm parallelism.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let n = candle_core::utils::get_num_threads();
    match rayon::ThreadPoolBuilder::new().num_threads(n).stack_size(STACK_BYTES).build() {
        Ok(pool) => pool.install(f),
        // No pool (threads cannot be spawned): run here; matmuls use rayon's global pool.
        Err(_) => f(),
    }
}

/// The allocator settings [`keep_freed_memory`] runs the process under: each as its glibc
/// tunable, its `mallopt` parameter and its value.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_SETTINGS: [(&str, libc::c_int, libc::c_int); 3] = [
    ("glibc.malloc.mmap_max", libc::M_MMAP_MAX, 0),
    ("glibc.malloc.arena_max", libc::M_ARENA_MAX, 1),
    ("glibc.malloc.trim_threshold", libc::M_TRIM_THRESHOLD, 1 << 30),
];

/// Transparent huge pages on the heap: a tunable only (no `mallopt` parameter).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const HUGE_PAGES_TUNABLE: &str = "glibc.malloc.hugetlb=1";

/// Set in the re-executed process to the caller's own `GLIBC_TUNABLES` (empty: none), which
/// [`keep_freed_memory`] puts back so that child processes get the caller's environment.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const CALLER_TUNABLES: &str = "PREFOPT_CALLER_GLIBC_TUNABLES";

/// Keeps freed memory in the process instead of handing it back to the kernel, in
/// transparent huge pages. Call it first thing in `main`: it re-executes the binary once,
/// with the same arguments, under glibc tunables (glibc reads them only at start-up).
///
/// Why: a training step allocates and frees a few hundred tensors, from a few MB up to a few
/// hundred (a real model's attention probabilities and logits). glibc serves large ones with
/// fresh `mmap`s, unmaps them on free and trims the heap's top after frees, so the next step
/// page-faults the same memory in again and the kernel zeroes it: at 135M parameters and a
/// ragged batch of 4 pairs, a 2-step run faulted in 20 GB (5.3 million pages) where its peak
/// memory is 10 GB, and a sixth of its CPU time was the kernel's (BENCHMARKS.md "Ragged
/// data"). So: no `mmap` for allocations (every block comes from the heap and is reused once
/// freed), one arena (the compute threads' blocks go back to the same heap, not to
/// per-thread arenas that glibc trims on its own), and the heap's top trimmed only past 1 GiB
/// free. Peak memory stays the high-water mark of one step. The first step still faults its
/// memory in, 2.4 million 4 KiB pages on the ragged benchmark; `hugetlb=1` has glibc ask for
/// transparent huge pages on the heap (`madvise`; where the kernel allows them): a few
/// thousand 2 MiB faults instead, a third less system CPU and a 3-step run 1.06x faster
/// (BENCHMARKS.md "Ragged data"; zeroing the fresh memory remains). Only the tunable reaches
/// that setting, hence the re-execution; where it fails, `mallopt` sets the rest here.
///
/// The user's own `GLIBC_TUNABLES` for malloc take precedence (prefopt then changes
/// nothing). No-op outside glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if let Some(caller) = std::env::var_os(CALLER_TUNABLES) {
            // The re-executed process: glibc has read the settings; the environment goes back.
            std::env::remove_var(CALLER_TUNABLES);
            match caller.is_empty() {
                true => std::env::remove_var("GLIBC_TUNABLES"),
                false => std::env::set_var("GLIBC_TUNABLES", caller),
            }
        } else {
            let caller = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
            if caller.contains("glibc.malloc.") {
                return;
            }
            let ours = MALLOC_SETTINGS.iter().map(|(name, _, value)| format!("{name}={value}"));
            let tunables: Vec<String> = (!caller.is_empty())
                .then(|| caller.clone())
                .into_iter()
                .chain(ours)
                .chain([HUGE_PAGES_TUNABLE.into()])
                .collect();
            let mut args = std::env::args_os();
            let arg0 = args.next().unwrap_or_default();
            // Returns only if the exec fails (no /proc, say): this process then goes on
            // without huge pages.
            let _ = std::process::Command::new("/proc/self/exe")
                .arg0(arg0)
                .args(args)
                .env("GLIBC_TUNABLES", tunables.join(":"))
                .env(CALLER_TUNABLES, &caller)
                .exec();
        }
        // The same values again (a no-op where glibc took the tunables): they hold even where
        // the exec failed or the tunables were ignored.
        for (_, param, value) in MALLOC_SETTINGS {
            // SAFETY: mallopt only changes allocator parameters; called before other threads
            // start.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

/// Makes a write past the file-size limit (`ulimit -f`) an error instead of a death.
///
/// Why: the kernel sends SIGXFSZ to a process whose write would exceed its file-size limit,
/// and its default action ends the process on the spot, with no message. Ignored, the
/// write fails with EFBIG, which the atomic writers report naming the file, and the
/// previous outputs stay as they were (the temp file is removed). No-op outside Unix.
pub fn report_file_size_limit_as_error() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code; called
    // from main before other threads start.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// The most memory this process can have, in bytes: the machine's RAM plus swap, or the
/// address-space limit (`ulimit -v`) when that is lower. `None` where the system does not
/// say (outside Linux); callers then skip their checks.
pub fn memory_limit_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    let machine = (kib("MemTotal:")? + kib("SwapTotal:").unwrap_or(0)) * 1024;
    // `Max address space  <soft> <hard> bytes`, or `unlimited`.
    let address_space = std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
        let line = limits.lines().find(|l| l.starts_with("Max address space"))?;
        line.trim_start_matches("Max address space").split_whitespace().next()?.parse::<u64>().ok()
    });
    Some(address_space.map_or(machine, |a| a.min(machine)))
}
