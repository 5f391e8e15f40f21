//! `sampler = "openai"` against an HTTP server inside the test that speaks the
//! `/v1/completions` protocol and shows the faults real servers show: 500s, 429 with
//! Retry-After, timeouts, malformed JSON, fewer choices than asked, a server that dies
//! mid-stage (the rerun asks only for what is missing), and a bad request. Then the loop
//! itself, twice with the same seed: the same pairs.

use std::path::Path;
use std::time::Duration;

use prefopt_loop::apo::{run_apo, ApoConfig, Sampler};
use prefopt_loop::remote::{ApiClient, CompletionRequest, RemoteSampler};
use serde_json::{json, Value};

use crate::fake_server::{Reply, Server};
use crate::util::Silent;

/// A deterministic sampler: choice j of a request with seed s is " s<s>-<j>".
fn completions(request: &Value, limit: usize) -> Value {
    let (n, seed) = (request["n"].as_u64().unwrap() as usize, request["seed"].as_u64().unwrap());
    let choices: Vec<Value> = (0..n.min(limit))
        .map(|j| json!({"index": j, "text": format!(" s{seed}-{j}"), "finish_reason": "length"}))
        .collect();
    json!({"object": "text_completion", "choices": choices})
}

fn sampler(url: &str) -> RemoteSampler {
    RemoteSampler {
        client: ApiClient {
            url: url.to_string(),
            api_key: Some("test-key".into()),
            timeout: Duration::from_millis(500),
            retries: 3,
            backoff_s: 0.01,
        },
        concurrency: 2,
        extra_body: serde_json::Map::new(),
    }
}

const REQUEST: CompletionRequest = CompletionRequest { model: "m", n: 3, temperature: 0.7, top_p: 0.9, max_tokens: 8 };

fn prompts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("prompt {i}")).collect()
}

fn run(sampler: &RemoteSampler, n: usize, partial: &Path) -> Result<Vec<prefopt_loop::remote::RemoteAnswer>, String> {
    sampler.sample(&REQUEST, &prompts(n), |i| 100 * i as u64, partial, &mut |_, _| {}).map_err(|e| e.to_string())
}

#[test]
fn transient_failures_are_retried_and_short_answers_completed() {
    let tmp = tempfile::tempdir().unwrap();
    // Two 500s, then a 429 with Retry-After 0, then answers of one choice each (`n` ignored).
    let server = Server::start(|n, req| match n {
        0 | 1 => Reply::status(500, "busy"),
        2 => Reply { headers: vec![("Retry-After", "0".into())], ..Reply::status(429, "slow down") },
        _ => Reply::ok(completions(req, 1)),
    });
    let answers = run(&sampler(&server.url), 1, &tmp.path().join("a.partial.jsonl")).unwrap();
    assert_eq!(answers[0].texts, [" s0-0", " s1-0", " s2-0"], "the missing choices asked again with the next seeds");
    assert_eq!(answers[0].token_ids, None);
    assert_eq!(server.count(), 6);
    let first = &server.requests.lock().unwrap()[3];
    assert_eq!(
        (first["model"].as_str(), first["n"].as_u64(), first["max_tokens"].as_u64()),
        (Some("m"), Some(3), Some(8))
    );
}

#[test]
fn extra_body_fields_reach_every_request() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(|_, req| Reply::ok(completions(req, 1)));
    let mut extra = serde_json::Map::new();
    extra.insert("generation_config".into(), json!("{\"do_sample\": true}"));
    let with_extra = RemoteSampler { extra_body: extra, ..sampler(&server.url) };
    with_extra.sample(&REQUEST, &prompts(2), |i| i as u64, &tmp.path().join("x.jsonl"), &mut |_, _| {}).unwrap();
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), 6);
    assert!(requests.iter().all(|r| r["generation_config"] == "{\"do_sample\": true}"), "{:?}", requests[0]);
}

#[test]
fn https_urls_speak_tls() {
    // A plain-HTTP server behind an https:// URL: the TLS handshake fails, and the error
    // names the URL (the request went through the TLS stack, not around it).
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(|_, req| match req.is_null() {
        true => Reply::status(400, "not HTTP"),
        false => Reply::ok(completions(req, 3)),
    });
    let https = server.url.replacen("http://", "https://", 1);
    let e = run(&sampler(&https), 1, &tmp.path().join("s.jsonl")).unwrap_err();
    assert!(e.contains(&https) && e.contains("gave up after 4 attempts"), "{e}");
    let requests = server.requests.lock().unwrap();
    assert!(requests.iter().all(Value::is_null), "only TLS handshakes reached the plain server: {requests:?}");
}

#[test]
fn a_server_that_refuses_return_token_ids_is_asked_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    // `transformers serve` answers 422 to fields it does not know.
    let server = Server::start(|_, req| match req.get("return_token_ids") {
        Some(_) => Reply::status(422, r#"{"detail":"Unexpected fields in the request: {'return_token_ids'}"}"#),
        None => Reply::ok(completions(req, 3)),
    });
    let one_at_a_time = RemoteSampler { concurrency: 1, ..sampler(&server.url) };
    let answers = one_at_a_time
        .sample(&REQUEST, &prompts(3), |i| 100 * i as u64, &tmp.path().join("p.jsonl"), &mut |_, _| {})
        .unwrap();
    assert_eq!(answers.len(), 3);
    assert!(answers.iter().all(|a| a.token_ids.is_none()));
    assert_eq!(server.count(), 1 + 3, "one refusal, then the stage asks without the field");
}

#[test]
fn timeouts_bad_json_bad_requests_and_too_many_errors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let slow = Server::start(|_, req| Reply { delay: Duration::from_secs(2), ..Reply::ok(completions(req, 3)) });
    let e = run(&sampler(&slow.url), 1, &tmp.path().join("t.jsonl")).unwrap_err();
    assert!(e.contains(&slow.url) && e.contains("prompt 0") && e.contains("gave up after 4 attempts"), "{e}");

    let garbled = Server::start(|_, _| Reply::status(200, "<html>proxy error</html>"));
    let e = run(&sampler(&garbled.url), 1, &tmp.path().join("g.jsonl")).unwrap_err();
    assert!(e.contains("not completions JSON") && e.contains("<html>proxy error") && e.contains("prompt 0"), "{e}");
    assert_eq!(garbled.count(), 1, "malformed JSON is not retried");

    let refused = Server::start(|_, _| Reply::status(400, "{\"error\": \"model not found\"}"));
    let e = run(&sampler(&refused.url), 1, &tmp.path().join("r.jsonl")).unwrap_err();
    assert!(e.contains("HTTP 400") && e.contains("model not found"), "{e}");
    assert_eq!(refused.count(), 1, "a 400 is not retried");

    let failing = Server::start(|_, _| Reply::status(503, "down"));
    let e = run(&sampler(&failing.url), 1, &tmp.path().join("f.jsonl")).unwrap_err();
    assert!(e.contains("HTTP 503") && e.contains("gave up after 4 attempts"), "{e}");
    assert_eq!(failing.count(), 4);
}

#[test]
fn a_server_dying_mid_stage_loses_no_answer_and_the_rerun_asks_only_for_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let partial = tmp.path().join("samples.partial.jsonl");
    let server = Server::start(|_, req| Reply::ok(completions(req, 3)));
    // Answers 3 of 6 prompts, then the port closes.
    let one_at_a_time = RemoteSampler { concurrency: 1, ..sampler(&server.url) };
    let mut seen = 0;
    let e = one_at_a_time
        .sample(&REQUEST, &prompts(6), |i| 100 * i as u64, &partial, &mut |done, _| {
            seen = done;
            if done == 3 {
                server.kill();
            }
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt 3"), "{e}");
    assert_eq!(seen, 3);
    let kept = std::fs::read_to_string(&partial).unwrap();
    assert_eq!(kept.lines().count(), 3, "{kept}");
    // A kill in the middle of a fourth line: that line is ignored, and the rerun's appends
    // start on a line of their own.
    std::fs::write(&partial, format!("{kept}{{\"prompt_index\": 3, \"te")).unwrap();

    let healthy = Server::start(|_, req| Reply::ok(completions(req, 3)));
    let answers = run(&sampler(&healthy.url), 6, &partial).unwrap();
    assert_eq!(healthy.count(), 3, "only the unanswered prompts are asked again");
    let fresh = Server::start(|_, req| Reply::ok(completions(req, 3)));
    let whole = run(&sampler(&fresh.url), 6, &tmp.path().join("whole.partial.jsonl")).unwrap();
    assert_eq!(answers, whole, "resumed answers equal an uninterrupted stage's");
}

#[test]
fn the_loop_samples_from_the_server_and_a_rerun_gives_the_same_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    // Token ids for every choice (vLLM's `return_token_ids`): the chatml fixture's byte ids.
    let server = Server::start(|_, req| {
        let mut body = completions(req, 3);
        for c in body["choices"].as_array_mut().unwrap() {
            let ids: Vec<u32> = c["text"].as_str().unwrap().bytes().map(u32::from).collect();
            c["token_ids"] = json!(ids);
        }
        Reply::ok(body)
    });
    let run_loop = |out: &Path| {
        let cfg = ApoConfig {
            sampler: Sampler::Openai,
            sampler_url: Some(server.url.clone()),
            sampler_backoff_s: 0.01,
            iterations: 2,
            ..crate::apo_loop::config(out, 0.3)
        };
        run_apo(&cfg, &mut Silent).unwrap_or_else(|e| panic!("{e}"));
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run_loop(&a);
    run_loop(&b);
    for t in 1..=2 {
        let read = |dir: &Path| std::fs::read_to_string(dir.join(format!("iter-{t}/pairs.jsonl"))).unwrap();
        assert_eq!(read(&a), read(&b), "iteration {t}: pairs differ between two runs with the same seed");
        assert!(!a.join(format!("iter-{t}/samples.partial.jsonl")).exists(), "the partial file is removed");
    }
    let samples: Vec<Value> = std::fs::read_to_string(a.join("iter-1/samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(samples[0]["completions"][0].as_str().unwrap().starts_with(" s"), "{}", samples[0]);
    let ids: Vec<u64> = samples[0]["tokens"][0].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(ids, samples[0]["completions"][0].as_str().unwrap().bytes().map(u64::from).collect::<Vec<_>>());
    // Iteration 1 asks for the base folder, iteration 2 for pi_1 (`sampler_sync = "path"`).
    let models: Vec<String> =
        server.requests.lock().unwrap().iter().map(|r| r["model"].as_str().unwrap().to_string()).collect();
    let base = std::fs::canonicalize(crate::util::fixtures().join("models/qwen2-tied")).unwrap();
    assert!(models.iter().any(|m| *m == base.display().to_string()), "{models:?}");
    let pi_1 = std::fs::canonicalize(a.join("iter-1/extrapolated")).unwrap();
    assert!(models.iter().any(|m| *m == pi_1.display().to_string()), "{models:?}");
}

#[test]
fn lora_runs_load_each_policy_as_one_adapter_with_the_stack_s_weights() {
    let tmp = tempfile::tempdir().unwrap();
    // vLLM's runtime LoRA loading: `load_lora_adapter` answers 200, a second load of one name 400.
    let loaded = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = loaded.clone();
    let server = Server::start(move |_, req| {
        if let Some(name) = req["lora_name"].as_str() {
            let mut names = seen.lock().unwrap();
            if names.iter().any(|n| n == name) {
                return Reply::status(400, &format!("The lora adapter '{name}' has already been loaded."));
            }
            names.push(name.to_string());
            return Reply::ok(json!("Success"));
        }
        Reply::ok(completions(req, 3))
    });
    let out = tmp.path().join("apo");
    let cfg = ApoConfig {
        sampler: Sampler::Openai,
        sampler_url: Some(server.url.clone()),
        sampler_backoff_s: 0.01,
        sampler_sync: prefopt_loop::apo::SamplerSync::Lora,
        sampler_model: Some("base".into()),
        iterations: 2,
        ..crate::apo_lora::lora_config(&out, 0.3)
    };
    run_apo(&cfg, &mut Silent).unwrap_or_else(|e| panic!("{e}"));
    let requests = server.requests.lock().unwrap().clone();
    let models: Vec<&str> = requests.iter().filter_map(|r| r["prompt"].as_str().and(r["model"].as_str())).collect();
    assert!(models[..4].iter().all(|m| *m == "base"), "iteration 1 asks for the base: {models:?}");
    assert!(models[4..].iter().all(|m| *m == "prefopt-iter-1-extrapolated"), "{models:?}");
    let load = requests.iter().find(|r| r.get("lora_name").is_some()).unwrap();
    let adapter = out.join("iter-1/extrapolated-lora");
    assert_eq!(load["lora_path"], std::fs::canonicalize(&adapter).unwrap().display().to_string().as_str());
    // The one adapter over the base has the stack's effective weights.
    let base = crate::util::fixtures().join("models/qwen2-tied");
    let device = candle_core::Device::Cpu;
    let flat = prefopt_model::Policy::load(&base, &device).unwrap().with_adapter(&adapter, 1.0, &device).unwrap();
    let stack = prefopt_model::Policy::load(&out.join("iter-1/extrapolated"), &device).unwrap();
    assert_eq!(stack.adapters.len(), 1, "iteration 1's extrapolated policy: one adapter, coefficient 1.3");
    let worst = |flat: prefopt_model::Policy, stack: prefopt_model::Policy| {
        let (flat, stack) = (flat.merged().unwrap(), stack.merged().unwrap());
        let mut worst = 0f32;
        for (name, v) in stack.params.iter() {
            let w = flat.params.get(name).unwrap().as_tensor();
            let d = (v.as_tensor() - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            worst = worst.max(d);
        }
        worst
    };
    let err = worst(flat, stack);
    assert!(err < 1e-6, "the concatenated adapter differs from the stack by {err}");
    // Iteration 2's policy stacks two adapters (D_1 and D_2, weighted): one adapter of rank 8.
    let two = out.join("iter-2/extrapolated");
    let concatenated = tmp.path().join("two-lora");
    let (two_base, two_entries) = prefopt_model::stack::read_stack(&two).unwrap();
    assert_eq!(
        prefopt_model::stack::save_concatenated_adapter(&two_base, &two_entries, &concatenated, &device).unwrap(),
        8
    );
    let stack = prefopt_model::Policy::load(&two, &device).unwrap();
    assert_eq!(stack.adapters.len(), 2);
    let flat = prefopt_model::Policy::load(&base, &device).unwrap().with_adapter(&concatenated, 1.0, &device).unwrap();
    let err = worst(flat, stack);
    assert!(err < 1e-6, "two concatenated adapters differ from their stack by {err}");
    // A rerun (everything done) loads nothing new and fails on nothing.
    run_apo(&cfg, &mut Silent).unwrap_or_else(|e| panic!("{e}"));
}
