//! `prefopt generate` end to end: the real binary on a fixture model with plain and
//! conversational prompts: output shape, determinism, batching independence, bad inputs.

use std::path::Path;

use serde_json::Value;

use crate::util::{failure, fixtures, run_prefopt, write};

fn model() -> String {
    fixtures().join("models/qwen2-tied").to_str().unwrap().to_string()
}

const PROMPTS: &str = r#"{"prompt": "Hello there"}
{"messages": [{"role": "user", "content": "What is 2+2?"}]}
{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]}
{"prompt": "A much longer plain prompt, so that the batch has to be padded on the left."}
{"prompt": "x", "other": 1}
"#;

/// Runs generate on `prompts` with `extra` flags; returns the output file's text.
fn run(dir: &Path, prompts: &Path, out: &str, extra: &[&str]) -> String {
    let out = dir.join(out);
    let mut args =
        vec!["generate", "--model", &model(), "--prompts", prompts.to_str().unwrap(), "--out", out.to_str().unwrap()]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = run_prefopt(&args);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    std::fs::read_to_string(out).unwrap()
}

fn lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn writes_one_line_per_prompt_and_sample_with_the_prompt_as_given() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write(tmp.path(), "p.jsonl", PROMPTS);
    let text = run(tmp.path(), &prompts, "o.jsonl", &["--num-samples", "3", "--max-new-tokens", "12", "--seed", "1"]);
    let got = lines(&text);
    let given: Vec<Value> = PROMPTS.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), 5 * 3);
    for (n, (line, raw)) in got.iter().zip(text.lines()).enumerate() {
        let (i, k) = (n / 3, n % 3);
        assert_eq!(line.as_object().unwrap().len(), 7, "{raw}");
        let at: Vec<usize> = ["prompt_index", "sample", "prompt", "completion", "n_tokens", "logprob", "finish_reason"]
            .iter()
            .map(|key| raw.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("no {key} in {raw}")))
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "fields out of order: {raw}");
        assert_eq!(line["prompt_index"], i);
        assert_eq!(line["sample"], k);
        let want_prompt = if given[i].get("prompt").is_some() { &given[i]["prompt"] } else { &given[i]["messages"] };
        assert_eq!(&line["prompt"], want_prompt);
        let n_tokens = line["n_tokens"].as_u64().unwrap();
        assert!((1..=12).contains(&n_tokens), "{line}");
        assert!(line["completion"].is_string());
        let logprob = line["logprob"].as_f64().unwrap();
        assert!(logprob < 0.0 && logprob.is_finite(), "{line}");
        match line["finish_reason"].as_str().unwrap() {
            "length" => assert_eq!(n_tokens, 12, "{line}"),
            "stop" => assert!(n_tokens <= 12),
            other => panic!("finish_reason {other}"),
        }
    }
    // Samples of one prompt differ.
    assert_ne!(got[0]["completion"], got[1]["completion"]);
}

#[test]
fn same_seed_gives_the_same_bytes_and_another_seed_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write(tmp.path(), "p.jsonl", PROMPTS);
    let flags =
        ["--num-samples", "2", "--max-new-tokens", "16", "--top-k", "50", "--top-p", "0.9", "--temperature", "0.8"];
    let a = run(tmp.path(), &prompts, "a.jsonl", &[&flags[..], &["--seed", "7"]].concat());
    let b = run(tmp.path(), &prompts, "b.jsonl", &[&flags[..], &["--seed", "7"]].concat());
    assert_eq!(a, b);
    let c = run(tmp.path(), &prompts, "c.jsonl", &[&flags[..], &["--seed", "8"]].concat());
    assert_ne!(a, c);
}

#[test]
fn the_batch_size_does_not_change_the_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write(tmp.path(), "p.jsonl", PROMPTS);
    let flags = ["--num-samples", "2", "--max-new-tokens", "20", "--seed", "3"];
    let one = lines(&run(tmp.path(), &prompts, "b1.jsonl", &[&flags[..], &["--batch-size", "1"]].concat()));
    let four = lines(&run(tmp.path(), &prompts, "b4.jsonl", &[&flags[..], &["--batch-size", "4"]].concat()));
    assert_eq!(one.len(), four.len());
    for (a, b) in one.iter().zip(&four) {
        for key in ["prompt_index", "sample", "prompt", "completion", "n_tokens", "finish_reason"] {
            assert_eq!(a[key], b[key], "{key}: {a} vs {b}");
        }
        // Different batch shapes round differently in the last float bits (see generate.rs).
        let (x, y) = (a["logprob"].as_f64().unwrap(), b["logprob"].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-6 * x.abs(), "logprob {x} vs {y}");
    }
}

#[test]
fn greedy_decoding_ignores_the_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write(tmp.path(), "p.jsonl", PROMPTS);
    let a = run(tmp.path(), &prompts, "a.jsonl", &["--temperature", "0", "--max-new-tokens", "8", "--seed", "1"]);
    let b = run(tmp.path(), &prompts, "b.jsonl", &["--temperature", "0", "--max-new-tokens", "8", "--seed", "2"]);
    assert_eq!(a, b);
}

/// Runs generate expecting failure; returns stderr.
fn fails(args: &[&str]) -> String {
    failure(run_prefopt(args))
}

#[test]
fn bad_inputs_fail_with_a_message_naming_the_file_or_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let good = write(tmp.path(), "p.jsonl", PROMPTS);
    let out = tmp.path().join("o.jsonl");
    let out = out.to_str().unwrap();
    let m = model();
    let generate = |prompts: &Path, extra: &[&str]| {
        let mut args = vec!["generate", "--model", &m, "--prompts", prompts.to_str().unwrap(), "--out", out];
        args.extend(extra);
        fails(&args)
    };

    let empty = write(tmp.path(), "empty.jsonl", "");
    let err = generate(&empty, &[]);
    assert!(err.contains(&format!("{}: no prompts", empty.display())), "{err}");

    let bad_json = write(tmp.path(), "bad.jsonl", "{\"prompt\": \"ok\"}\n{\"prompt\": \n");
    let err = generate(&bad_json, &[]);
    assert!(err.contains("bad.jsonl:2"), "{err}");

    let no_prompt = write(tmp.path(), "np.jsonl", "{\"prompt\": \"ok\"}\n{\"question\": \"?\"}\n");
    let err = generate(&no_prompt, &[]);
    assert!(err.contains("np.jsonl:2") && err.contains("prompt"), "{err}");

    let answered = write(
        tmp.path(),
        "a.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n",
    );
    let err = generate(&answered, &[]);
    assert!(err.contains("a.jsonl:1") && err.contains("assistant"), "{err}");

    let long = write(
        tmp.path(),
        "long.jsonl",
        &format!("{{\"prompt\": \"ok\"}}\n{{\"prompt\": \"{}\"}}\n", "ab ".repeat(400)),
    );
    let err = generate(&long, &[]);
    assert!(err.contains("long.jsonl:2") && err.contains("max_position_embeddings (256)"), "{err}");

    for (flag, value) in [
        ("--temperature", "-1"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--max-new-tokens", "0"),
        ("--num-samples", "0"),
        ("--batch-size", "0"),
    ] {
        let arg = format!("{flag}={value}");
        let err = generate(&good, &[&arg]);
        assert!(err.contains(flag), "{flag}={value}: {err}");
    }

    // A model folder without a tokenizer.
    let bare = tmp.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models/qwen2-tied")).unwrap() {
        let entry = entry.unwrap();
        if !entry.file_name().to_string_lossy().starts_with("tokenizer") {
            std::fs::copy(entry.path(), bare.join(entry.file_name())).unwrap();
        }
    }
    let err =
        fails(&["generate", "--model", bare.to_str().unwrap(), "--prompts", good.to_str().unwrap(), "--out", out]);
    assert!(err.contains("tokenizer.json not found"), "{err}");

    // A failed run leaves no output behind.
    assert!(!Path::new(out).exists());
}

/// A server that answers every prompt with `n` choices " ok <seed>", stopped.
fn answering() -> crate::fake_server::Server {
    crate::fake_server::Server::start(|_, req| {
        let (n, seed) = (req["n"].as_u64().unwrap(), req["seed"].as_u64().unwrap());
        let choices: Vec<Value> = (0..n)
            .map(|j| serde_json::json!({"index": j, "text": format!(" ok {}", seed + j), "finish_reason": "stop"}))
            .collect();
        crate::fake_server::Reply::ok(serde_json::json!({"choices": choices}))
    })
}

#[test]
fn a_server_samples_and_the_local_model_scores_and_a_rerun_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write(tmp.path(), "p.jsonl", PROMPTS);
    let server = answering();
    let flags = ["--num-samples", "2", "--seed", "7", "--sampler-url", &server.url];
    let got = lines(&run(tmp.path(), &prompts, "o.jsonl", &flags));
    assert_eq!(got.len(), 5 * 2);
    // Sample j of prompt i asks with seed `seed + 2 i + j`.
    assert_eq!(got[3]["completion"], " ok 10");
    assert_eq!(got[3]["finish_reason"], "stop");
    assert!(got.iter().all(|l| l["logprob"].as_f64().unwrap() < 0.0));
    let requests = server.requests.lock().unwrap().clone();
    let served = std::fs::canonicalize(model()).unwrap().display().to_string();
    assert!(requests.iter().all(|r| r["model"] == served.as_str()), "{:?}", requests[0]);
    let chat = requests.iter().find(|r| r["seed"] == 9).unwrap();
    assert!(chat["prompt"].as_str().unwrap().contains("What is 2+2?<|im_end|>"), "the chat template: {chat}");
    // " ok 10": its 5 tokens plus the EOS the server stopped on.
    assert_eq!(got[3]["n_tokens"], 5 + 1);

    // A server that dies after two prompts: a clear error, the answers kept, and the rerun
    // asks only for the other three.
    let dying = std::sync::Arc::new(std::sync::OnceLock::<crate::fake_server::Server>::new());
    let handle = dying.clone();
    let server = crate::fake_server::Server::start(move |n, req| {
        if n == 2 {
            handle.get().unwrap().kill();
            return crate::fake_server::Reply::status(503, "going away");
        }
        let seed = req["seed"].as_u64().unwrap();
        let choices: Vec<Value> =
            (0..2).map(|j| serde_json::json!({"text": format!(" ok {}", seed + j), "finish_reason": "stop"})).collect();
        crate::fake_server::Reply::ok(serde_json::json!({"choices": choices}))
    });
    let url = server.url.clone();
    let _ = dying.set(server);
    let out = tmp.path().join("r.jsonl");
    let e = failure(run_prefopt(&[
        "generate",
        "--model",
        &model(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--num-samples",
        "2",
        "--seed",
        "7",
        "--sampler-url",
        &url,
        "--sampler-concurrency",
        "1",
        "--sampler-retries",
        "1",
    ]));
    assert!(e.contains(&url) && e.contains("prompt 2"), "{e}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_to_string(tmp.path().join("r.partial.jsonl")).unwrap().lines().count(), 2);
    let healthy = answering();
    let resumed =
        run(tmp.path(), &prompts, "r.jsonl", &["--num-samples", "2", "--seed", "7", "--sampler-url", &healthy.url]);
    assert_eq!(healthy.count(), 3);
    assert_eq!(lines(&resumed), got, "the resumed output equals an uninterrupted run's");
    assert!(!tmp.path().join("r.partial.jsonl").exists());
}
