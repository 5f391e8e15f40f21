//! `prefopt score` end to end: the real binary on the committed fixtures, against the
//! numbers `transformers` computed (fixtures/expected), and its bad-input errors.

use std::path::Path;
use std::process::Output;

use crate::util::{failure, fixtures, read_jsonl, run_prefopt, write};

fn score(model: &str, data: &Path, max_length: usize, out: &Path) -> Output {
    let model = fixtures().join("models").join(model);
    run_prefopt(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-length",
        &max_length.to_string(),
        "--batch-size",
        "3",
    ])
}

/// Scores every model x dataset x budget of fixtures/expected and compares line by line.
#[test]
fn scores_match_transformers_for_every_model_dataset_and_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(fixtures().join("expected")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".jsonl") else { continue };
        let parts: Vec<&str> = stem.split("__").collect();
        let [model, dataset, budget] = parts[..] else { continue };
        let max_length: usize = if budget == "none" { 100_000 } else { budget.parse().unwrap() };
        let expected = read_jsonl(&fixtures().join("expected").join(&name));
        let mut sources = vec![fixtures().join(format!("data/{dataset}.jsonl"))];
        let parquet = fixtures().join(format!("data/{dataset}.parquet"));
        if parquet.exists() {
            sources.push(parquet);
        }
        for data in sources {
            let out = tmp.path().join(format!("{stem}.out.jsonl"));
            let run = score(model, &data, max_length, &out);
            assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
            let got = read_jsonl(&out);
            assert_eq!(got.len(), expected.len(), "{name}: line count");
            for (g, e) in got.iter().zip(&expected) {
                assert_eq!(g["index"], e["index"]);
                if e.get("dropped").is_some() {
                    assert!(g.get("dropped").is_some(), "{name}: index {} should be dropped, got {g}", e["index"]);
                    continue;
                }
                for key in ["n_tokens_chosen", "n_tokens_rejected"] {
                    assert_eq!(g[key], e[key], "{name} {}: index {}", data.display(), e["index"]);
                }
                for key in ["logp_chosen", "logp_rejected"] {
                    let (a, b) = (g[key].as_f64().unwrap(), e[key].as_f64().unwrap());
                    assert!((a - b).abs() < 1e-4, "{name} {}: index {} {key}: {a} vs {b}", data.display(), e["index"]);
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} expected files compared");
}

fn stderr_of(run: &Output) -> String {
    failure(run.clone())
}

#[test]
fn bad_data_fails_with_the_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.jsonl");
    let good = r#"{"prompt": "Hi", "chosen": "a", "rejected": "b"}"#;
    let data = write(tmp.path(), "bad.jsonl", &format!("{good}\n{good}\n{{\"prompt\": \"x\", \"chosen\": 1\n"));
    let err = stderr_of(&score("qwen2-tied", &data, 64, &out));
    assert!(err.contains("bad.jsonl:3"), "{err}");

    let data = write(tmp.path(), "missing.jsonl", &format!("{good}\n{{\"prompt\": \"x\", \"chosen\": \"y\"}}\n"));
    let err = stderr_of(&score("qwen2-tied", &data, 64, &out));
    assert!(err.contains("missing.jsonl:2") && err.contains("rejected"), "{err}");

    let data = write(tmp.path(), "type.jsonl", r#"{"prompt": "x", "chosen": 5, "rejected": "y"}"#);
    let err = stderr_of(&score("qwen2-tied", &data, 64, &out));
    assert!(err.contains("type.jsonl:1") && err.contains("chosen"), "{err}");
    assert!(!out.exists(), "no output may be written on failure");
}

#[test]
fn a_conversation_whose_prompt_is_not_a_prefix_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.jsonl");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expected/qwen2-tied__chat_bad_prefix.json")).unwrap(),
    )
    .unwrap();
    let data = fixtures().join("data/chat_bad_prefix.jsonl");
    let run = score("qwen2-tied", &data, 1000, &out);
    assert!(expected.to_string().contains("error"), "the fixture is meant to merge across the prompt's end");
    let err = stderr_of(&run);
    assert!(err.contains("chat_bad_prefix.jsonl:1") && err.contains("prefix"), "{err}");

    // TRL's rule as an option: the completion starts at the shared token prefix (25 of the
    // 26 prompt tokens, as transformers' tokenization shows), and the run says so.
    let model = fixtures().join("models/qwen2-tied");
    let run = crate::util::ok(run_prefopt(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--prompt-boundary",
        "common-prefix",
    ]));
    let line = &read_jsonl(&out)[0];
    let chosen_ids = expected["chosen_ids"].as_array().unwrap().len() as u64;
    assert_eq!(line["n_tokens_chosen"].as_u64(), Some(chosen_ids - 25), "{line}");
    assert!(crate::util::stderr(&run).contains("1 with the completion at the shared token prefix"));
}

#[test]
fn a_model_folder_without_a_tokenizer_or_config_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.jsonl");
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("models/qwen2-tied").join(f), model.join(f)).unwrap();
    }
    let data = fixtures().join("data/plain.jsonl");
    let run = run_prefopt(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = stderr_of(&run);
    assert!(err.contains("tokenizer.json") && err.contains("model"), "{err}");
    let run = run_prefopt(&[
        "score",
        "--model",
        "/nonexistent/model",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stderr_of(&run).contains("/nonexistent/model"));
}

#[test]
fn an_existing_output_survives_a_failed_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = write(tmp.path(), "out.jsonl", "precious\n");
    let data = write(tmp.path(), "bad.jsonl", "not json\n");
    stderr_of(&score("qwen2-tied", &data, 64, &out));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious\n");
}
