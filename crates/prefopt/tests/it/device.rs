//! `--device` on every command that runs a model: `cpu` works as before, `cuda` on a build
//! without the `cuda` feature is refused naming the feature, and an unknown name is refused
//! naming the accepted ones; the error exits non-zero, before any output is written.

use crate::util::{failure, fixtures, ok, run_prefopt, write};

/// Each model-running command with `--device` appended, on the fixtures.
fn commands(dir: &std::path::Path, device: &str) -> Vec<Vec<String>> {
    let model = fixtures().join("models/qwen2-tied").display().to_string();
    let data = fixtures().join("data/plain.jsonl").display().to_string();
    let prompts = write(dir, "prompts.jsonl", "{\"prompt\": \"Hello\"}\n").display().to_string();
    let out = |name: &str| dir.join(name).display().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let train_sets = |o: &str| {
        vec![
            "--set".into(),
            format!("model=\"{model}\""),
            "--set".into(),
            format!("train_data=\"{data}\""),
            "--set".into(),
            format!("output_dir=\"{}\"", out(o)),
            "--set".into(),
            "max_steps=1".into(),
        ]
    };
    vec![
        [s(&["score", "--model", &model, "--data", &data, "--out", &out("score.jsonl")])].concat(),
        s(&["generate", "--model", &model, "--prompts", &prompts, "--out", &out("gen.jsonl"), "--max-new-tokens", "2"]),
        [s(&["train"]), train_sets("train")].concat(),
        [
            s(&["apo"]),
            s(&["--set", &format!("model=\"{model}\""), "--set", &format!("prompts=\"{prompts}\"")]),
            s(&["--set", "judge=\"arithmetic\"", "--set", &format!("output_dir=\"{}\"", out("apo"))]),
        ]
        .concat(),
        s(&["bench", "forward", "--model", &model, "--steps", "1", "--warmup", "0", "--seq-len", "8", "--batch", "1"]),
        s(&["demo", "--quick", "--out", &out("demo")]),
    ]
    .into_iter()
    .map(|mut c| {
        c.extend(["--device".to_string(), device.to_string()]);
        c
    })
    .collect()
}

fn run(args: &[String]) -> std::process::Output {
    run_prefopt(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_refused_naming_the_feature() {
    let tmp = tempfile::tempdir().unwrap();
    for args in commands(tmp.path(), "cuda") {
        let err = failure(run(&args));
        assert!(err.contains("`cuda` cargo feature") && err.contains("--features cuda"), "{args:?}: {err}");
    }
    // Nothing was written by the refused runs.
    for name in ["score.jsonl", "gen.jsonl", "train", "apo", "demo"] {
        assert!(!tmp.path().join(name).exists(), "{name} exists after a refused run");
    }
}

#[test]
fn unknown_devices_are_refused_naming_the_accepted_ones() {
    let tmp = tempfile::tempdir().unwrap();
    for args in commands(tmp.path(), "gpu") {
        let err = failure(run(&args));
        assert!(err.contains("device `gpu`") && err.contains("cpu, cuda or cuda:N"), "{args:?}: {err}");
    }
}

#[test]
fn cpu_runs_as_before() {
    let tmp = tempfile::tempdir().unwrap();
    // The quick ones (train, apo and demo run on the CPU in their own tests, with the default).
    for args in
        commands(tmp.path(), "cpu").into_iter().filter(|a| ["score", "generate", "bench"].contains(&a[0].as_str()))
    {
        ok(run(&args));
    }
}
