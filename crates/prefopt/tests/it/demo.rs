//! `prefopt demo --quick` end to end with the real binary and the shipped base model: the
//! summary's structure, the improvement over the base model, the report and plots, resuming,
//! and `prefopt init` / `prefopt tasks`, the commands that build the base model.

use std::path::Path;

use serde_json::Value;

use crate::util::{ok, prefopt};

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

#[test]
fn quick_demo_writes_the_summary_report_and_plots_and_online_methods_beat_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let run = || ok(prefopt().args(["demo", "--quick", "--out"]).arg(&out).output().unwrap());
    run();

    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in ["eval_reward", "eval_accuracy", "malformed_rate"] {
        let v = num(&summary["base"], key);
        assert!((0.0..=1.0).contains(&v), "base.{key} = {v}");
    }
    let runs = summary["runs"].as_array().unwrap();
    let iterations = summary["recipe"]["iterations"].as_u64().unwrap();
    let online_methods = summary["recipe"]["online_methods"].as_array().unwrap();
    let alphas: Vec<f64> = online_methods.iter().map(|m| num(m, "alpha")).collect();
    assert!(alphas.contains(&0.0) && alphas.iter().any(|a| *a > 0.0), "alphas {alphas:?}");
    for r in runs {
        for key in ["eval_reward", "eval_accuracy", "malformed_rate"] {
            num(r, key);
        }
        r["seed"].as_u64().unwrap();
        match r["experiment"].as_str().unwrap() {
            "online" => {
                let t = r["iteration"].as_u64().unwrap();
                assert!(t <= iterations);
                // Both models of an iteration are evaluated; the alpha applied is recorded.
                num(r, "extrapolated_eval_reward");
                if t > 0 {
                    assert_eq!(num(r, "alpha_used"), num(r, "alpha"), "constant schedules apply their alpha");
                }
            }
            "offline" => {
                num(r, "logp_chosen_delta");
            }
            other => panic!("experiment {other}"),
        }
    }
    // Every online method: one row per iteration 0..=T, and above the base at the end.
    for m in online_methods {
        let alpha = num(m, "alpha");
        let rows: Vec<&Value> =
            runs.iter().filter(|r| r["experiment"] == "online" && r["method"] == m["name"]).collect();
        assert_eq!(rows.len() as u64, iterations + 1, "{m}");
        assert!(out.join("online").join(m["name"].as_str().unwrap()).join("seed-1/manifest.json").is_file(), "{m}");
        let at = |t: u64| rows.iter().find(|r| r["iteration"].as_u64() == Some(t)).unwrap();
        let (base, last) = (at(0), at(iterations));
        assert!(
            num(last, "eval_accuracy") > num(base, "eval_accuracy"),
            "alpha {alpha}: accuracy {} after {iterations} iterations, base {}",
            num(last, "eval_accuracy"),
            num(base, "eval_accuracy")
        );
        assert!(num(last, "eval_reward") > num(base, "eval_reward"), "alpha {alpha}: reward");
    }
    // Offline: every method of the recipe has a row with its log-prob change.
    for m in summary["recipe"]["offline_methods"].as_array().unwrap() {
        assert!(runs.iter().any(|r| r["experiment"] == "offline" && r["method"] == m["name"]), "{m}");
    }

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for section in [
        "## Offline",
        "## Online",
        "## What holds across seeds",
        "| iterative-dpo |",
        "Held-out accuracy of the extrapolated model `pi_t`",
    ] {
        assert!(report.contains(section), "report lacks {section}");
    }
    for png in ["online_accuracy.png", "online_reward.png", "offline_logps.png"] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
    }

    // Rerunning finds every stage done and reproduces the same numbers.
    let before = summary["runs"].clone();
    run();
    let again: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(again["runs"], before);

    // Killed at seeded moments all along (every 8 new files) and rerun each time: the
    // finished demo is byte for byte the uninterrupted one (the report's wall-clock line
    // and the timing fields aside).
    let killed = dir.path().join("killed");
    let args = ["demo", "--quick", "--out", killed.to_str().unwrap()];
    let kills = crate::util::run_with_kills(&args, &killed, 5, 8);
    assert!(kills >= 5, "only {kills} runs were killed before one finished");
    eprintln!("demo --quick: {kills} kills");
    let without_wall = |files: Vec<(String, Vec<u8>)>| -> Vec<(String, Vec<u8>)> {
        files
            .into_iter()
            .map(|(name, bytes)| {
                if name != "report.md" {
                    return (name, bytes);
                }
                let text = String::from_utf8(bytes).unwrap();
                (name, text.lines().filter(|l| !l.contains("wall-clock")).collect::<Vec<_>>().join("\n").into_bytes())
            })
            .collect()
    };
    let (a, b) = (without_wall(crate::util::snapshot(&out)), without_wall(crate::util::snapshot(&killed)));
    let names = |s: &[(String, Vec<u8>)]| s.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&b), names(&a), "the same files, and no leftovers");
    for ((file, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{file} differs after {kills} kills");
    }

    // Other settings in the same folder are refused rather than mixed in.
    let refused = prefopt().args(["demo", "--quick", "--seeds", "2", "--out"]).arg(&out).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("holds a demo with other settings"));
}

#[test]
fn init_and_tasks_make_a_trainable_model_folder_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let arch = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/base_model/arch.json");
    let model = dir.path().join("init");
    ok(prefopt()
        .args(["init", "--char-tokenizer", "--seed", "3", "--arch"])
        .arg(&arch)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap());
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(model.join(f).is_file(), "{f}");
    }
    // Same seed, same weights; and an existing folder is not overwritten.
    let again = dir.path().join("again");
    ok(prefopt()
        .args(["init", "--char-tokenizer", "--seed", "3", "--arch"])
        .arg(&arch)
        .arg("--out")
        .arg(&again)
        .output()
        .unwrap());
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );
    let refused =
        prefopt().args(["init", "--char-tokenizer", "--arch"]).arg(&arch).arg("--out").arg(&model).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already exists"));

    let data = dir.path().join("sft.jsonl");
    ok(prefopt()
        .args(["tasks", "--task", "arithmetic", "--kind", "sft", "--count", "32", "--off-format-rate", "0.5", "--out"])
        .arg(&data)
        .output()
        .unwrap());
    assert_eq!(std::fs::read_to_string(&data).unwrap().lines().count(), 32);
    let out = dir.path().join("sft");
    ok(prefopt()
        .arg("sft")
        .args(["--set", &format!("model=\"{}\"", model.display())])
        .args(["--set", &format!("train_data=\"{}\"", data.display())])
        .args(["--set", &format!("output_dir=\"{}\"", out.display())])
        .args(["--set", "max_steps=2", "--set", "batch_size=8", "--set", "learning_rate=1e-3"])
        .output()
        .unwrap());
    assert!(out.join("final/model.safetensors").is_file());

    let bad = prefopt()
        .args(["tasks", "--task", "nope", "--kind", "sft", "--count", "1", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown task `nope`"));
    let bad = prefopt()
        .args(["tasks", "--task", "compare", "--kind", "sft", "--count", "1", "--off-format-rate", "0.7"])
        .args(["--wrong-rate", "0.5", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sum to at most 1"));
    assert_eq!(std::fs::read_to_string(&data).unwrap().lines().count(), 32, "the earlier output is kept");

    // An architecture whose vocabulary is smaller than the tokenizer's: named, nothing written.
    let small = dir.path().join("small.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&arch).unwrap()).unwrap();
    cfg["vocab_size"] = 50.into();
    std::fs::write(&small, cfg.to_string()).unwrap();
    let small_out = dir.path().join("small-model");
    let bad = prefopt()
        .args(["init", "--char-tokenizer", "--arch"])
        .arg(&small)
        .arg("--out")
        .arg(&small_out)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("small.json") && err.contains("vocab_size 50") && err.contains("98 tokens"), "{err}");
    assert!(!small_out.exists());
    // A tokenizer folder without tokenizer.json is named.
    let bad = prefopt()
        .args(["init", "--arch"])
        .arg(&arch)
        .arg("--tokenizer")
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no tokenizer.json in this folder"));
}
