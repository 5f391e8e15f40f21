//! `prefopt apo` killed anywhere: SIGKILL at seeded random moments, rerun each time with the
//! same command, and the finished run's files are byte-identical to an uninterrupted run's
//! (so no stage ever read a half-written file, and none left one behind).

use std::path::{Path, PathBuf};

use crate::util::{fixtures, ok, prefopt, run_with_kills, snapshot};

/// A judge command that scores the i-th completion i (1-based): deterministic, never tied.
const RANK_JUDGE: &str = r#"cmd:awk -F'","' '{printf "{\"scores\": ["; for (i = 1; i <= NF; i++) printf "%s%d", (i > 1 ? "," : ""), i; print "]}"}'"#;

/// A judge command that prefers short completions (minus each completion's field length).
const SHORT_JUDGE: &str = r#"cmd:awk -F'","' '{printf "{\"scores\": ["; for (i = 1; i <= NF; i++) printf "%s%d", (i > 1 ? "," : ""), -length($i); print "]}"}'"#;

/// A three-iteration run on the tiny fixture with `judge` and the top-level keys `extra`.
fn config(dir: &Path, out: &Path, judge: &str, extra: &str) -> PathBuf {
    let prompts = dir.join("prompts.jsonl");
    let rows: String = ["What is 2 + 2?", "Name a color.", "Say hello.", "Count to three.", "What is 10 - 3?"]
        .iter()
        .map(|p| format!("{{\"prompt\": \"{p}\"}}\n"))
        .collect();
    std::fs::write(&prompts, rows).unwrap();
    let toml = format!(
        r#"model = "{model}"
prompts = "{prompts}"
judge = '''{judge}'''
{extra}
iterations = 3
prompts_per_iteration = 4
num_samples = 3
alpha = 0.3
max_new_tokens = 8
num_eval_prompts = 5
output_dir = "{out}"

[train]
learning_rate = 1e-3
max_steps = 2
batch_size = 4
lr_scheduler_type = "constant"
logging_steps = 1
save_steps = 1
max_length = 128
"#,
        model = fixtures().join("models/qwen2-tied").display(),
        prompts = prompts.display(),
        out = out.display(),
    );
    let path = dir.join(format!("{}.toml", out.file_name().unwrap().to_string_lossy()));
    std::fs::write(&path, toml).unwrap();
    path
}

/// Every stage of the loop is killed somewhere: `logprob` extrapolation runs the reference
/// stage, `monotone` the safeguard stage (whose short-answer judge drops some candidates).
#[test]
fn apo_killed_at_random_moments_and_rerun_ends_byte_identical_to_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, judge, extra, seed) in [
        ("logprob", RANK_JUDGE, "extrapolation = \"logprob\"", 7),
        ("monotone", SHORT_JUDGE, "alpha_schedule = \"monotone\"", 11),
    ] {
        let (whole, killed) = (tmp.path().join(format!("{name}-whole")), tmp.path().join(format!("{name}-killed")));
        let whole_cfg = config(tmp.path(), &whole, judge, extra);
        ok(prefopt().args(["apo", "--config"]).arg(&whole_cfg).output().unwrap());

        let killed_cfg = config(tmp.path(), &killed, judge, extra);
        let args = ["apo", "--config", killed_cfg.to_str().unwrap()];
        let kills = run_with_kills(&args, &killed, seed, 1);
        assert!(kills >= 5, "{name}: only {kills} runs were killed before one finished");
        eprintln!("{name}: {kills} kills");
        let (a, b) = (snapshot(&whole), snapshot(&killed));
        let names = |s: &[(String, Vec<u8>)]| s.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&b), names(&a), "{name}: the same files, and no leftovers");
        for ((file, x), (_, y)) in a.iter().zip(&b) {
            // Where they part, with some context.
            let at = x.iter().zip(y.iter()).position(|(a, b)| a != b).unwrap_or(x.len().min(y.len()));
            let around =
                |v: &[u8]| String::from_utf8_lossy(&v[at.saturating_sub(300)..(at + 300).min(v.len())]).into_owned();
            assert!(x == y, "{name}: {file} differs after {kills} kills:\n{}\n---\n{}", around(x), around(y));
        }
    }
}

/// prefopt runs under its allocator settings (it re-executes itself with them as glibc
/// tunables: `process::keep_freed_memory`), and the commands it starts get the caller's own
/// environment back. The judge logs what it sees, and the mark the re-executed prefopt (its
/// parent) started with, which holds the caller's tunables. (glibc rewrites
/// `GLIBC_TUNABLES` in the environment it parses, so that one cannot be read back there.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn commands_prefopt_starts_see_the_callers_glibc_tunables_not_prefopts() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("env.log");
    let judge = format!(
        "cmd:{{ echo \"judge=${{GLIBC_TUNABLES-unset}} ${{PREFOPT_CALLER_GLIBC_TUNABLES-no mark}}\"; \
         tr '\\0' '\\n' < /proc/$PPID/environ | grep '^PREFOPT_CALLER_GLIBC_TUNABLES=' || echo not re-executed; }} >> {log}; {}",
        RANK_JUDGE.strip_prefix("cmd:").unwrap(),
        log = log.display(),
    );
    for (caller, judge_sees, prefopt_started_with) in [
        (None, "judge=unset no mark", "PREFOPT_CALLER_GLIBC_TUNABLES="),
        // Another subsystem's tunable: kept (prefopt adds its own after it).
        (Some("glibc.rtld.nns=4"), "judge=glibc.rtld.nns=4 no mark", "PREFOPT_CALLER_GLIBC_TUNABLES=glibc.rtld.nns=4"),
        // The caller's own malloc settings: prefopt leaves the allocator alone.
        (Some("glibc.malloc.mmap_max=65536"), "judge=glibc.malloc.mmap_max=65536 no mark", "not re-executed"),
    ] {
        let _ = std::fs::remove_file(&log);
        let out = tmp.path().join(format!("run-{}", caller.unwrap_or("none")));
        let cfg = config(tmp.path(), &out, &judge, "");
        let mut cmd = prefopt();
        cmd.args(["apo", "--config"]).arg(&cfg);
        match caller {
            Some(t) => cmd.env("GLIBC_TUNABLES", t),
            None => cmd.env_remove("GLIBC_TUNABLES"),
        };
        ok(cmd.output().unwrap());
        let seen = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = seen.lines().collect();
        assert!(lines.len() >= 2, "the judge ran: {seen}");
        for pair in lines.chunks(2) {
            assert_eq!(pair, [judge_sees, prefopt_started_with], "caller {caller:?}: {seen}");
        }
    }
}
