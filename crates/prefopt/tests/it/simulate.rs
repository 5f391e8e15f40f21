//! `prefopt simulate` end to end: the real binary on tiny configs (and once on the
//! built-in default).

use std::path::Path;
use std::process::Output;

use crate::util::{run_prefopt, stderr};

/// A small sweep: 2 prompts x 3 responses, both modes, 2 alphas, 2 seeds.
const TINY: &str = r#"
mode = "both"
alphas = [0.0, 0.5]
ns = [8]
seeds = [3, 4]
iterations = 5
rewards = [[0.0, 0.5, 1.0], [1.0, 0.2, 0.0]]
"#;

fn run_config(dir: &Path, text: &str, out: &str) -> Output {
    let cfg = dir.join(format!("{out}.toml"));
    std::fs::write(&cfg, text).unwrap();
    run_prefopt(&["simulate", "--config", cfg.to_str().unwrap(), "--out", dir.join(out).to_str().unwrap()])
}

#[test]
fn default_run_writes_results_summary_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sim");
    let o = run_prefopt(&["simulate", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(results.lines().next().unwrap()).unwrap();
    for key in ["alpha", "beta", "n", "seed", "iteration", "reward_gap", "tv_to_optimal", "kl_to_init"] {
        assert!(first.get(key).is_some(), "results.jsonl lacks `{key}`");
    }
    assert!(first.get("extrapolated_reward_gap").is_some());
    assert_eq!(first["iteration"], 0);

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    // The default config shows the acceleration: exact mode reaches the target gap in
    // strictly fewer iterations as alpha grows...
    let exact: Vec<f64> = summary["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["mode"] == "exact")
        .map(|g| g["iterations_to_target"]["iterations"]["mean"].as_f64().expect("exact runs reach the target"))
        .collect();
    assert!(exact.len() >= 3 && exact.windows(2).all(|w| w[1] < w[0]), "{exact:?}");
    // ...and the trade-off: for the smallest N the final gap gets worse beyond some
    // alpha, across seeds.
    let smallest = &summary["tradeoff"][0];
    assert!(smallest["worse_beyond_alpha"].is_number(), "{smallest}");
    assert_eq!(smallest["holds_across_seeds"], true, "{smallest}");

    let pngs: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert!(pngs.len() >= 4, "{pngs:?}");
    for p in pngs {
        assert_eq!(&std::fs::read(&p).unwrap()[1..4], b"PNG", "{}", p.display());
    }
    // Written atomically: no temporary file is left behind.
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.')));
    assert!(stderr(&o).contains("results.jsonl"));
}

#[test]
fn unknown_config_key_fails_naming_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_config(dir.path(), "alpahs = [0.5]\n", "bad");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("alpahs") && err.contains("bad.toml"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn out_of_range_value_fails_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_config(dir.path(), "alphas = [1.0]\n", "bad");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("`alphas`"), "{}", stderr(&o));
    let o =
        run_config(dir.path(), "preferences = [[[0.5, 0.9], [0.1, 0.5]]]\nloss = \"dpo\"\nmode = \"exact\"\n", "dpo");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("`loss`"), "{}", stderr(&o));
}

#[test]
fn same_seed_gives_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let a = run_config(dir.path(), TINY, "a");
    let b = run_config(dir.path(), TINY, "b");
    assert!(a.status.success() && b.status.success(), "{}", stderr(&a));
    let ra = std::fs::read(dir.path().join("a/results.jsonl")).unwrap();
    let rb = std::fs::read(dir.path().join("b/results.jsonl")).unwrap();
    assert_eq!(ra, rb);
    // 2 exact runs + 2 alphas x 2 seeds sampled runs, 6 iterations each (0..=5).
    assert_eq!(String::from_utf8(ra.clone()).unwrap().lines().count(), (2 + 4) * 6);
    let c = run_config(dir.path(), &TINY.replace("seeds = [3, 4]", "seeds = [5, 6]"), "c");
    assert!(c.status.success());
    assert_ne!(ra, std::fs::read(dir.path().join("c/results.jsonl")).unwrap());
}

#[test]
fn general_preferences_run_with_sppo() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
loss = "sppo"
alphas = [0.0, 0.3]
ns = [10]
seeds = [0]
iterations = 4
preferences = [[[0.5, 0.9, 0.2], [0.1, 0.5, 0.7], [0.8, 0.3, 0.5]]]
"#;
    let o = run_config(dir.path(), text, "g");
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("g/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["gap_metric"], "exploitability");
    let results = std::fs::read_to_string(dir.path().join("g/results.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(results.lines().next().unwrap()).unwrap();
    assert!(rec["reward_gap"].is_null());
    assert!(rec["exploitability"].as_f64().unwrap() > 0.0);
}

#[test]
fn print_config_prints_the_builtin_default() {
    let o = run_prefopt(&["simulate", "--print-config"]);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(text, prefopt_sim::DEFAULT_CONFIG_TOML);
    prefopt_sim::Config::from_toml_str(&text).unwrap();
}

/// A closed stdout (a reader that went away, as `| head` does) is an error that says so, with
/// a non-zero exit, not a panic.
#[test]
fn a_closed_stdout_is_an_error_not_a_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = crate::util::prefopt().args(["simulate", "--print-config"]).stdout(writer).output().unwrap();
    let err = crate::util::failure(output);
    assert!(err.contains("writing to stdout"), "{err}");
}

#[test]
fn adaptive_schedules_are_compared_with_constant_momentum_and_need_it() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{TINY}alpha_schedules = [\"constant\", \"restart\", \"monotone\"]\n");
    let o = run_config(dir.path(), &text, "adaptive");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("adaptive");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let adaptive = summary["adaptive"].as_array().unwrap();
    let schedules: Vec<&str> = adaptive.iter().map(|a| a["alpha_schedule"].as_str().unwrap()).collect();
    assert_eq!(schedules, ["restart", "monotone"], "one entry per rule at alpha 0.5, N = 8");
    for a in adaptive {
        assert_eq!((a["alpha"].as_f64(), a["seeds"].as_u64()), (Some(0.5), Some(2)), "{a}");
    }
    // Every monotone iteration applies alpha or drops it.
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let used: Vec<f64> = results
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["alpha_schedule"] == "monotone" && r["iteration"].as_u64() > Some(0))
        .map(|r| r["alpha_used"].as_f64().unwrap())
        .collect();
    assert!(!used.is_empty() && used.iter().all(|a| *a == 0.0 || *a == 0.5), "{used:?}");
    assert!(out.join("adaptive_gap_vs_iteration_n8_beta1.png").is_file());

    let o = run_config(dir.path(), &format!("{TINY}alpha_schedules = [\"monotone\"]\n"), "bad");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("alpha_schedules") && err.contains("must include \"constant\""), "{err}");
}
