//! Fixture parity: every fixture dataset (JSONL and Parquet) tokenized with every fixture
//! model's tokenizer must give exactly the ids, completion starts and dropped set that
//! `scripts/make_fixtures.py` computed with transformers (fixtures/expected).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::super::*;
use super::fixtures;
use crate::{parse_preference, read_records};

/// `<model>__<dataset>__<none|N>.jsonl` files: (model, dataset, max_length, path).
fn expected_files(dir: &Path) -> Vec<(String, String, Option<usize>, PathBuf)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".jsonl") else {
            continue;
        };
        let parts: Vec<&str> = stem.split("__").collect();
        if let [model, dataset, tag] = parts[..] {
            let max_length = if tag == "none" { None } else { Some(tag.parse().unwrap()) };
            out.push((model.to_string(), dataset.to_string(), max_length, path));
        }
    }
    out.sort();
    out
}

fn ids(v: &Value, key: &str) -> Vec<u32> {
    serde_json::from_value(v[key].clone()).unwrap_or_else(|e| panic!("{key}: {e} in {v}"))
}

#[test]
fn tokenization_matches_the_python_reference_on_every_fixture() {
    let root = fixtures();
    let files = expected_files(&root.join("expected"));
    if files.is_empty() {
        eprintln!("no fixtures under {}; parity not checked", root.display());
        return;
    }
    let mut tokenizers = BTreeMap::new();
    let mut mismatches = Vec::new();
    let mut checked = 0;
    for (model, dataset, max_length, expected_path) in &files {
        let tok = tokenizers.entry(model.clone()).or_insert_with(|| {
            HfTokenizer::from_dir(&root.join("models").join(model)).unwrap_or_else(|e| panic!("{e}"))
        });
        let expected: Vec<Value> = std::fs::read_to_string(expected_path)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let opts = TokenizeOptions { max_length: *max_length, max_prompt_length: None, ..TokenizeOptions::default() };
        for ext in ["jsonl", "parquet"] {
            let data = root.join("data").join(format!("{dataset}.{ext}"));
            if !data.exists() {
                continue;
            }
            let records = read_records(&data).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(records.len(), expected.len(), "{} vs {}", data.display(), expected_path.display());
            for want in &expected {
                let index = want["index"].as_u64().unwrap() as usize;
                let record = &records[index];
                let ex = parse_preference(record).unwrap_or_else(|e| panic!("{e}"));
                let got = tokenize_pair(tok, &ex, &opts).unwrap_or_else(|e| panic!("{e}"));
                checked += 1;
                let at = format!("{model} / {} / max_length {max_length:?}", record.source);
                match (got, want.get("dropped")) {
                    (PairOutcome::Dropped(why), Some(reason)) => {
                        if reason.as_str() != Some(why.as_str()) {
                            mismatches.push(format!("{at}: dropped as {why:?}, Python says {reason}"));
                        }
                    }
                    (PairOutcome::Dropped(why), None) => {
                        mismatches.push(format!("{at}: dropped ({why}) but Python keeps it"))
                    }
                    (PairOutcome::Kept(_), Some(reason)) => {
                        mismatches.push(format!("{at}: kept but Python drops it ({reason})"))
                    }
                    (PairOutcome::Kept(pair), None) => {
                        let checks: [(&str, Value, Value); 5] = [
                            ("prompt_ids", pair.prompt_ids.clone().into(), ids(want, "prompt_ids").into()),
                            ("chosen_ids", pair.chosen.input_ids.clone().into(), ids(want, "chosen_ids").into()),
                            ("rejected_ids", pair.rejected.input_ids.clone().into(), ids(want, "rejected_ids").into()),
                            (
                                "chosen_completion_start",
                                pair.chosen.completion_start.into(),
                                want["chosen_completion_start"].clone(),
                            ),
                            (
                                "rejected_completion_start",
                                pair.rejected.completion_start.into(),
                                want["rejected_completion_start"].clone(),
                            ),
                        ];
                        for (field, ours, theirs) in checks {
                            if ours != theirs {
                                mismatches.push(format!("{at}: {field}: ours {ours}, Python {theirs}"));
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!("fixture parity: {checked} examples over {} expected files", files.len());
    assert!(checked > 0, "no fixture example was checked");
    assert!(mismatches.is_empty(), "{} mismatches in {checked} examples:\n{}", mismatches.len(), mismatches.join("\n"));
}

#[test]
fn bad_prefix_fixture_errors_exactly_when_python_does() {
    let root = fixtures();
    let data = root.join("data/chat_bad_prefix.jsonl");
    let Ok(records) = read_records(&data) else {
        eprintln!("no {}; not checked", data.display());
        return;
    };
    let Ok(entries) = std::fs::read_dir(root.join("expected")) else {
        return;
    };
    let mut checked = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(model) =
            path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix("__chat_bad_prefix.json"))
        else {
            continue;
        };
        let want: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let tok = HfTokenizer::from_dir(&root.join("models").join(model)).unwrap();
        let index = want["index"].as_u64().unwrap() as usize;
        let ex = parse_preference(&records[index]).unwrap();
        assert_eq!(tokenize_prompt(&tok, &ex.prompt).unwrap(), ids(&want, "prompt_ids"), "{model}");
        let got = tokenize_pair(&tok, &ex, &TokenizeOptions::default());
        match (&got, want["error"].as_str()) {
            (Err(e), Some(_)) => {
                let e = e.to_string();
                assert!(e.contains("does not start with its rendering of the prompt"), "{model}: {e}");
                eprintln!("{model}: {e}");
            }
            (Ok(PairOutcome::Kept(pair)), None) => {
                assert_eq!(pair.chosen.input_ids, ids(&want, "chosen_ids"), "{model}");
                assert_eq!(pair.rejected.input_ids, ids(&want, "rejected_ids"), "{model}");
            }
            _ => panic!("{model}: ours {got:?}, Python {want}"),
        }
        checked += 1;
    }
    eprintln!("bad-prefix fixture checked for {checked} models");
}

#[test]
fn fixture_models_stop_on_config_and_generation_eos_ids() {
    let root = fixtures();
    let Ok(entries) = std::fs::read_dir(root.join("models")) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join("tokenizer.json").exists() {
            continue;
        }
        let tok = HfTokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        let eos = tok.eos_token().and_then(|t| tok.token_to_id(t)).unwrap();
        let ids = tok.eos_token_ids();
        assert_eq!(ids.first(), Some(&eos), "{}", dir.display());
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
            let gen: Value = serde_json::from_str(&text).unwrap();
            let gen_ids: Vec<u32> = match &gen["eos_token_id"] {
                Value::Array(a) => a.iter().map(|v| v.as_u64().unwrap() as u32).collect(),
                Value::Number(n) => vec![n.as_u64().unwrap() as u32],
                _ => vec![],
            };
            for id in gen_ids {
                assert!(ids.contains(&id), "{}: {ids:?} lacks {id}", dir.display());
            }
        }
    }
}
