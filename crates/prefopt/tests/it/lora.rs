//! LoRA from the command line: `prefopt train` with `use_peft` writes a PEFT adapter that
//! `score --adapter`, `generate --adapter` and `merge` use (the merged folder scores and
//! generates as base + adapter), and bad LoRA settings or adapter folders fail naming what
//! is wrong.

use std::path::{Path, PathBuf};

use crate::util::{failure, fixtures, ok, prefopt, read_jsonl, run_prefopt, write};

fn base() -> PathBuf {
    fixtures().join("models/qwen2-tied")
}

fn train_lora(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = prefopt();
    cmd.arg("train");
    let sets = [
        format!("model=\"{}\"", base().display()),
        format!("train_data=\"{}\"", fixtures().join("data/plain.jsonl").display()),
        format!("output_dir=\"{}\"", out.display()),
        "use_peft=true".into(),
        "lora_r=4".into(),
        "lora_target_modules=\"all-linear\"".into(),
        "learning_rate=1e-2".into(),
        "batch_size=4".into(),
        "max_steps=2".into(),
        "max_length=256".into(),
    ];
    for s in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        cmd.args(["--set", s]);
    }
    cmd.output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_trained_adapter_scores_generates_and_merges_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    ok(train_lora(&run, &[]));
    let adapter = run.join("final");
    assert!(adapter.join("adapter_config.json").is_file() && adapter.join("adapter_model.safetensors").is_file());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (config["peft_type"].as_str(), config["task_type"].as_str(), config["r"].as_u64()),
        (Some("LORA"), Some("CAUSAL_LM"), Some(4))
    );

    let merged = tmp.path().join("merged");
    ok(run_prefopt(&["merge", "--model", s(&base()), "--adapter", s(&adapter), "--out", s(&merged)]));
    assert!(merged.join("config.json").is_file() && merged.join("tokenizer.json").is_file());

    let data = fixtures().join("data/plain.jsonl");
    let score = |model: &Path, adapter: Option<&Path>, out: &str| {
        let out = tmp.path().join(out);
        let mut args = vec!["score", "--model", s(model), "--data", s(&data), "--out", s(&out)];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        ok(run_prefopt(&args));
        read_jsonl(&out)
    };
    let (with_adapter, from_merged, plain) =
        (score(&base(), Some(&adapter), "a.jsonl"), score(&merged, None, "m.jsonl"), score(&base(), None, "b.jsonl"));
    let mut moved = 0f64;
    for ((a, m), b) in with_adapter.iter().zip(&from_merged).zip(&plain) {
        for key in ["logp_chosen", "logp_rejected"] {
            let (a, m, b) = (a[key].as_f64().unwrap(), m[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((a - m).abs() < 1e-4, "{key}: base + adapter {a} vs merged {m}");
            moved = moved.max((a - b).abs());
        }
    }
    assert!(moved > 1e-2, "the adapter changes no log-prob ({moved})");

    let prompts =
        write(tmp.path(), "prompts.jsonl", "{\"prompt\": \"What is 2 + 2?\"}\n{\"prompt\": \"Name a color.\"}\n");
    let generate = |model: &Path, adapter: Option<&Path>, out: &str| {
        let out = tmp.path().join(out);
        let mut args = vec![
            "generate",
            "--model",
            s(model),
            "--prompts",
            s(&prompts),
            "--out",
            s(&out),
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        ok(run_prefopt(&args));
        read_jsonl(&out).iter().map(|v| v["completion"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(generate(&base(), Some(&adapter), "ga.jsonl"), generate(&merged, None, "gm.jsonl"));

    // A stack of the adapter twice (1.3 and -0.5) as one adapter of rank 8: base + it scores
    // as the stack's merged folder.
    let stack = tmp.path().join("stack");
    std::fs::create_dir(&stack).unwrap();
    let entries = serde_json::json!({"base_model": std::fs::canonicalize(base()).unwrap(), "adapters": [
        {"adapter": std::fs::canonicalize(&adapter).unwrap(), "coefficient": 1.3},
        {"adapter": std::fs::canonicalize(&adapter).unwrap(), "coefficient": -0.5}]});
    std::fs::write(stack.join("adapter_stack.json"), entries.to_string()).unwrap();
    let (one, folded) = (tmp.path().join("one"), tmp.path().join("folded"));
    ok(run_prefopt(&["merge", "--model", s(&stack), "--out", s(&one), "--as-adapter"]));
    ok(run_prefopt(&["merge", "--model", s(&stack), "--out", s(&folded)]));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(one.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some(8), Some(8.0)));
    for (a, m) in score(&base(), Some(&one), "one.jsonl").iter().zip(&score(&folded, None, "folded.jsonl")) {
        for key in ["logp_chosen", "logp_rejected"] {
            let (a, m) = (a[key].as_f64().unwrap(), m[key].as_f64().unwrap());
            assert!((a - m).abs() < 1e-4, "{key}: base + concatenated adapter {a} vs merged stack {m}");
        }
    }

    // Merging again into the same folder is refused; merging a plain model alone is nothing.
    let err = failure(run_prefopt(&["merge", "--model", s(&base()), "--adapter", s(&adapter), "--out", s(&merged)]));
    assert!(err.contains("already exists"), "{err}");
    let err = failure(run_prefopt(&["merge", "--model", s(&base()), "--out", s(&tmp.path().join("m2"))]));
    assert!(err.contains("nothing to merge"), "{err}");
}

#[test]
fn bad_lora_settings_and_adapters_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cases: [(&[&str], &[&str]); 6] = [
        (&["lora_r=0"], &["lora_r", "at least 1"]),
        (&["lora_target_modules=[\"q_proj\", \"lm_head\"]"], &["`lm_head`", "q_proj, k_proj, v_proj"]),
        (&["lora_target_modules=\"q_.*\""], &["q_.*", "all-linear"]),
        (&["lora_dropout=1.5"], &["lora_dropout", "[0, 1)"]),
        (&["use_peft=false"], &["lora_r", "use_peft"]),
        (&[&format!("ref_model=\"{}\"", base().display())], &["ref_model", "LoRA"]),
    ];
    for (extra, expect) in cases {
        let err = failure(train_lora(&out, extra));
        for e in expect {
            assert!(err.contains(e), "{extra:?}: `{err}` lacks `{e}`");
        }
        assert!(!out.join("final").exists());
    }
    // Continuing an adapter whose own config disagrees with a key that is set.
    let adapter = fixtures().join("adapters/qwen2-tied-lora");
    let err = failure(train_lora(
        &out,
        &[&format!("adapter=\"{}\"", adapter.display()), "lora_target_modules=\"all-linear\"", "lora_r=8"],
    ));
    assert!(err.contains("lora_r") && err.contains('8') && err.contains('4'), "{err}");

    // Adapter folders: missing, not LoRA, for another base.
    let data = fixtures().join("data/plain.jsonl");
    let score = |adapter: &Path| {
        failure(run_prefopt(&[
            "score",
            "--model",
            s(&base()),
            "--data",
            s(&data),
            "--out",
            s(&tmp.path().join("o.jsonl")),
            "--adapter",
            s(adapter),
        ]))
    };
    let err = score(&fixtures().join("models/qwen2-tied"));
    assert!(err.contains("adapter_config.json") && err.contains("not a PEFT adapter folder"), "{err}");
    let ia3 = tmp.path().join("ia3");
    std::fs::create_dir_all(&ia3).unwrap();
    write(&ia3, "adapter_config.json", "{\"peft_type\": \"IA3\", \"target_modules\": [\"k_proj\"]}");
    let err = score(&ia3);
    assert!(err.contains("IA3") && err.contains("not supported"), "{err}");
    let err = failure(run_prefopt(&[
        "score",
        "--model",
        s(&fixtures().join("models/llama-deep-50k")),
        "--data",
        s(&data),
        "--out",
        s(&tmp.path().join("o.jsonl")),
        "--adapter",
        s(&adapter),
    ]));
    assert!(err.contains("lora_A.weight") || err.contains("lora_B.weight"), "{err}");
    assert!(!tmp.path().join("o.jsonl").exists(), "a failed score wrote output");
}
